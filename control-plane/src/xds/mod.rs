//! The xDS server: ADS and the per-type discovery services, in both state-of-the-world
//! ([`sotw`]) and incremental ([`delta`]) variants, sharing one stream driver ([`stream`]).
//!
//! Every stream runs in its own task and follows its group's snapshot channel, so a slow proxy
//! only delays itself. Within a stream, types are pushed make-before-break: responses go out in
//! the order clusters, endpoints, listeners, routes, secrets; listeners and routes additionally
//! wait until the clusters and endpoints sent before them are ACKed (Envoy ACKs CDS only once the
//! new clusters have warmed, i.e. received their endpoints); removals of clusters and endpoints
//! wait until everything else is in sync.

pub mod delta;
pub mod server;
pub mod sotw;
pub mod stream;

pub use server::XdsContext;

use crate::resource::Kind;

/// Types whose pending responses must be ACKed before a response of `kind` may go out.
/// Endpoints are not gated on clusters: Envoy holds its CDS ACK until the new clusters have
/// their endpoints, so waiting would deadlock until its initial fetch timeout.
pub fn prerequisites(kind: Kind) -> &'static [Kind] {
    match kind {
        Kind::Listener | Kind::Route => &[Kind::Cluster, Kind::Endpoint],
        Kind::Cluster | Kind::Endpoint | Kind::Secret => &[],
    }
}
