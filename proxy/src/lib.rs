//! Remora data plane: the sidecar proxy, from listener to upstream.
