//! Remora sidecar injection: admission webhook, manual injection and install manifests.
