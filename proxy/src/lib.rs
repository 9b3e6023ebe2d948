//! Remora data plane: the sidecar proxy, from listener to upstream.
//!
//! Modules follow the path a byte travels:
//! [`listener`] (accept, listener filters) → [`filter_chain`] (pick a chain) →
//! [`network_filters`] (RBAC) → [`tcp_proxy`] or [`http::conn_manager`] → [`http::filter`]
//! chain → [`http::router`] → [`upstream`] (cluster, priority, load balancer, connect path,
//! pool) → upstream; request [`body`]s travel the same way, below both wings, and [`tunnel`]
//! moves the bytes of `tcp_proxy` and of upgraded HTTP/1.1 streams. Both HTTP sockets send
//! short messages through [`gathered_write`], one `send(2)` each.
//! Config arrives through [`config`] (the bootstrap, converted by the `remora-config` crate) and
//! [`xds`] (ADS); routes and clusters are published as one immutable snapshot in [`store`];
//! [`admin`] and [`stats`] observe it all; [`server`] wires the parts together, and
//! [`lifecycle`] says where the server stands. [`memory`]
//! hands back what reading config needed once. Beside the path, [`probes`] answers the
//! kubelet's probes that the injector rewrote.

pub mod admin;
pub mod app_log;
pub mod body;
pub mod cli;
pub mod config;
pub mod drain;
pub mod error;
pub mod filter_chain;
pub mod gathered_write;
pub mod hex;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod memory;
pub mod network_filters;
pub mod probes;
pub mod server;
pub mod server_stats;
pub mod stats;
pub mod store;
pub mod tcp_proxy;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod uuid;
pub mod xds;
