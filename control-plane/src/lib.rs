//! Remora control plane: serves listener, route, cluster, endpoint and secret config over xDS.
//!
//! Config flows: HTTP API ([`api`]) → validation ([`validate`]) → store ([`store`], redb or
//! etcd) via the single write path ([`config`]) → debounced per-group snapshots ([`snapshot`])
//! → one task per xDS stream ([`xds`]), SotW or delta, pushing make-before-break.

pub mod api;
pub mod config;
pub mod metrics;
pub mod resource;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod validate;
pub mod xds;
