//! Remora control plane: serves listener, route, cluster, endpoint and secret config over xDS.
