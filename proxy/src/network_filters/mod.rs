//! Network filters that run on a connection before its terminal filter (`tcp_proxy` or the
//! HTTP connection manager): the chain's `envoy.filters.network.rbac` filters. The listener
//! wraps the (possibly TLS-terminated) stream in [`rbac::FirstByteGate`] and hands the wrapper
//! on, so the terminal filter starts as it would without them (tcp_proxy connects upstream at
//! once, as in Envoy) and the decision is made when the first bytes arrive.

pub mod rbac;
