//! Remora sidecar injection: admission webhook, manual injection, install manifests and
//! the traffic-capture rules that `remora-init` installs in each pod.
//!
//! Flow: the API server (or `remora-injector inject`) hands a Pod to [`inject`], which adds
//! the capture init container and the proxy; [`webhook`] wraps that in AdmissionReview
//! handling and [`server`] serves it over HTTPS; [`workload`] applies it to the pod
//! templates of workloads in YAML; [`manifests`] renders what installs Remora;
//! [`capture`] is the rule generator behind `remora-init`; [`probes`] rewrites the app's
//! kubelet probes to the proxy's probe port.

pub mod capture;
pub mod config;
pub mod inject;
pub mod manifests;
pub mod probes;
pub mod server;
pub mod webhook;
pub mod workload;

/// Well-known ports and ids shared by the injector, `remora-init` and the proxy.
pub mod ports {
    /// Proxy admin listener, bound to 127.0.0.1 only.
    pub const ADMIN: u16 = 15000;
    /// Proxy listener that receives captured outbound traffic.
    pub const OUTBOUND: u16 = 15001;
    /// Proxy listener that receives captured inbound traffic.
    pub const INBOUND: u16 = 15006;
    /// The proxy's probe server: the app's rewritten kubelet probes (never captured).
    pub const PROBES: u16 = 15021;
    /// uid and gid the proxy runs as; its traffic is never captured.
    pub const PROXY_UID: u32 = 1337;
}
