//! Remora control plane: serves listener, route, cluster, endpoint and secret config over xDS.
//!
//! Config flows: HTTP API ([`api`]) → validation ([`validate`]) → store ([`store`], redb or
//! etcd) via the single write path ([`config`]) → debounced per-group snapshots ([`snapshot`])
//! → one task per xDS stream ([`xds`]), SotW or delta, pushing make-before-break.
//!
//! With mesh generation on ([`mesh`]), sidecars also get config generated from services,
//! endpoints, pods and traffic policies (Kubernetes, or the REST API), merged with their
//! group's raw resources into a snapshot per sidecar. The mesh CA ([`ca`]) signs each
//! sidecar's workload certificate, served with the trust bundle as SDS secrets.

pub mod api;
pub mod ca;
pub mod config;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod resource;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod validate;
pub mod xds;
