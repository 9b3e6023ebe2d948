//! Remora data plane: the sidecar proxy, from listener to upstream.
//!
//! Modules follow the path a byte travels:
//! [`listener`] (accept, listener filters) → [`filter_chain`] (pick a chain) →
//! [`tcp_proxy`] or [`http::conn_manager`] → [`http::router`] → [`cluster`] → [`lb`] →
//! [`pool`] → upstream. Config arrives through [`config`] (bootstrap) and [`xds`] (ADS) and is
//! published as immutable snapshots; [`admin`] and [`stats`] observe it all. [`memory`] hands
//! back what reading config needed once.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod drain;
pub mod error;
pub mod filter_chain;
pub mod http;
pub mod lb;
pub mod listener;
pub mod memory;
pub mod pool;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod tls;
pub mod uuid;
pub mod xds;
