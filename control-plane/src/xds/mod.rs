//! The xDS server: ADS and the per-type discovery services, in both state-of-the-world
//! ([`sotw`]) and incremental ([`delta`]) variants, sharing one stream driver ([`stream`]).
//! Responses are framed by hand ([`frame`]); each stream's requests are decoded by a decoder
//! that skips what Envoy repeats: nodes after the first, SotW name lists sent before
//! ([`requests`]).
//! Streams report to the [`crate::registry`] of connected proxies. The same port serves
//! Remora's certificate service ([`certificates`]), and TLS with `--xds-tls` ([`tls`]).
//!
//! Every stream runs in its own task and follows its group's snapshot channel, so a slow proxy
//! only delays itself. Within a stream, types are pushed make-before-break: responses go out in
//! the order clusters, endpoints, listeners, routes, secrets; listeners and routes additionally
//! wait until the clusters and endpoints sent before them are ACKed (Envoy ACKs CDS only once the
//! new clusters have warmed, i.e. received their endpoints); removals of clusters and endpoints
//! wait until everything else is in sync.

pub mod auth;
pub mod certificates;
pub mod delta;
pub mod frame;
pub mod kube_auth;
pub mod requests;
pub mod server;
pub mod sotw;
pub mod stream;
pub mod tls;

pub use stream::XdsContext;

use crate::resource::Kind;
use crate::snapshot::Snapshot;

/// Types whose pending responses must be ACKed before a response of `kind` may go out.
/// Endpoints are not gated on clusters: Envoy holds its CDS ACK until the new clusters have
/// their endpoints, so waiting would deadlock until its initial fetch timeout.
pub fn prerequisites(kind: Kind) -> &'static [Kind] {
    match kind {
        Kind::Listener | Kind::Route => &[Kind::Cluster, Kind::Endpoint],
        Kind::Cluster | Kind::Endpoint | Kind::Secret => &[],
    }
}

/// One stream's per-type state, as the make-before-break scheduler sees it. SotW and delta
/// streams differ in what they send, not in when they may send it.
pub(crate) trait TypeSchedule {
    type Response;
    /// The one type a per-type service serves, or `None` for ADS (all types).
    fn only(&self) -> Option<Kind>;
    /// Whether a response of `kind` is out and not yet ACKed or NACKed.
    fn is_pending(&self, kind: Kind) -> bool;
    /// Whether the client has asked for `kind` at all.
    fn is_requested(&self, kind: Kind) -> bool;
    /// The response for `kind` now, if there is something to send; removals only when allowed.
    fn plan(
        &mut self,
        kind: Kind,
        snapshot: &Snapshot,
        allow_removals: bool,
    ) -> Option<Self::Response>;
}

/// The next response a stream may send: additions in push order (clusters, endpoints,
/// listeners, routes, secrets), each type waiting for its [`prerequisites`]; removals only once
/// everything sent has been ACKed.
pub(crate) fn next_in_order<S: TypeSchedule>(
    stream: &mut S,
    snapshot: &Snapshot,
) -> Option<S::Response> {
    let kinds = match stream.only() {
        Some(kind) => vec![kind],
        None => Kind::ALL.to_vec(),
    };
    for allow_removals in [false, true] {
        if allow_removals && Kind::ALL.iter().any(|&kind| stream.is_pending(kind)) {
            return None;
        }
        for &kind in &kinds {
            if stream.is_pending(kind) || !stream.is_requested(kind) {
                continue;
            }
            if prerequisites(kind)
                .iter()
                .any(|&before| stream.is_pending(before))
            {
                continue;
            }
            if let Some(response) = stream.plan(kind, snapshot, allow_removals) {
                return Some(response);
            }
        }
    }
    None
}
