//! What every xDS stream shares: the context it runs in, and the driver loop that reads
//! requests, follows snapshots, writes responses and reports each type's status to the
//! [`ProxyRegistry`] for one stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;
use tracing::Instrument;
use xds_api::envoy::config::core::v3::Node;

use crate::mesh::hub::{MeshHub, MeshSubscription};
use crate::mesh::names::WORKLOAD_CERT_SECRET;
use crate::mesh::sidecar::Sidecar;
use crate::metrics::Metrics;
use crate::registry::{ProxyRegistry, RegisteredStream, TypeStatus, TypeStatusView};
use crate::resource::Kind;
use crate::snapshot::{Snapshot, SnapshotHub};
use crate::xds::auth::{Caller, Revocation, XdsAuth, authorize};
use crate::xds::frame::{Frame, RequestStream};

/// What every stream needs.
#[derive(Clone)]
pub struct XdsContext {
    pub hub: Arc<SnapshotHub>,
    /// Generated config for mesh sidecars, when mesh generation is on.
    pub mesh: Option<Arc<MeshHub>>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    /// Whether streams must present a credential, and what it grants.
    pub auth: XdsAuth,
}

/// Something a request told the stream, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ack { latency: Duration },
    Nack,
}

/// The protocol-specific half of a stream: SotW or delta.
pub trait StreamProtocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const NAME: &'static str;

    /// The gRPC frame that carries `response`.
    fn frame(response: Self::Response) -> Frame;
    /// Takes the node out of `request` (only the first request's counts).
    fn take_node(request: &mut Self::Request) -> Option<Node>;
    /// Takes in one request; an error ends the stream with that status.
    fn on_request(&mut self, request: Self::Request) -> Result<Option<Outcome>, Status>;
    /// The next response the stream may send now, if any.
    fn next_response(&mut self, snapshot: &Snapshot) -> Option<Self::Response>;
    /// The status of `kind` as the registry of connected proxies shows it, borrowed.
    fn status_view(&self, kind: Kind) -> TypeStatusView<'_>;
    /// Whether the client subscribes to resource `name` of `kind` now, by name or wildcard.
    fn subscribes_to(&self, kind: Kind, name: &str) -> bool;
}

/// Runs one stream until the client goes away. `caller` is who its credential proves (with
/// authenticated xDS): it decides the stream's group and a sidecar's identity.
pub async fn drive<P: StreamProtocol>(
    context: XdsContext,
    peer: Option<SocketAddr>,
    mut requests: RequestStream<P::Request>,
    responses: mpsc::Sender<Result<Frame, Status>>,
    protocol: P,
    caller: Option<Caller>,
) {
    // The node is only guaranteed on the first request.
    let mut first = match requests.next().await {
        Some(Ok(request)) => request,
        _ => return,
    };
    let mut node = P::take_node(&mut first).unwrap_or_default();
    let mut sidecar = Sidecar::from_node(&node);
    if let Some(caller) = &caller
        && let Err(status) = authorize(caller, &mut node, sidecar.as_mut())
    {
        tracing::info!(node = %node.id, %status, "xDS stream refused");
        let _ = responses.send(Err(status)).await;
        return;
    }
    // Revoking the credential ends the stream.
    let revocation = caller
        .as_ref()
        .and_then(|caller| context.auth.follow(caller));
    let span = tracing::debug_span!("xds", node = %node.id);
    serve::<P>(
        context, peer, requests, responses, protocol, first, node, sidecar, revocation,
    )
    .instrument(span)
    .await
}

/// The rest of [`drive`], once the node is known (its logs carry the node id).
#[allow(clippy::too_many_arguments)]
async fn serve<P: StreamProtocol>(
    context: XdsContext,
    peer: Option<SocketAddr>,
    mut requests: RequestStream<P::Request>,
    responses: mpsc::Sender<Result<Frame, Status>>,
    mut protocol: P,
    first: P::Request,
    node: Node,
    sidecar: Option<Sidecar>,
    mut revocation: Option<Revocation>,
) {
    let registration = context.registry.register(&node, peer, P::NAME);
    tracing::info!(node = %node.id, group = %node.cluster, protocol = P::NAME, "xDS stream opened");
    // A mesh sidecar's lease says whether its stream wants the workload certificate.
    let (mut snapshots, mut lease) = match (&context.mesh, sidecar) {
        (Some(mesh), Some(sidecar)) => {
            let MeshSubscription { snapshots, lease } = mesh.subscribe(sidecar).await;
            (snapshots, Some(lease))
        }
        _ => (context.hub.subscribe(&node.cluster), None),
    };
    let mut snapshot = snapshots.borrow_and_update().clone();
    let mut reported: [TypeStatus; 5] = Default::default();
    let mut pending_request = Some(first);
    loop {
        if let Some(request) = pending_request.take() {
            match protocol.on_request(request) {
                Ok(Some(Outcome::Ack { latency })) => context.metrics.observe_ack(latency),
                Ok(Some(Outcome::Nack)) => {
                    context.metrics.nacks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => {}
                Err(status) => {
                    let _ = responses.send(Err(status)).await;
                    return;
                }
            }
            // The certificate is issued when first subscribed to, before the answer is planned.
            if let Some(lease) = lease.as_mut() {
                let wanted = protocol.subscribes_to(Kind::Secret, WORKLOAD_CERT_SECRET);
                if wanted != lease.wants_certificate() {
                    lease.want_certificate(wanted).await;
                    snapshot = snapshots.borrow_and_update().clone();
                }
            }
        }
        while let Some(response) = protocol.next_response(&snapshot) {
            context.metrics.pushes.fetch_add(1, Ordering::Relaxed);
            update_status(&registration, &protocol, &mut reported);
            if responses.send(Ok(P::frame(response))).await.is_err() {
                return;
            }
        }
        update_status(&registration, &protocol, &mut reported);
        tokio::select! {
            message = requests.next() => match message {
                Some(Ok(request)) => pending_request = Some(request),
                Some(Err(status)) => {
                    tracing::debug!(node = %node.id, %status, "xDS stream ended with an error");
                    return;
                }
                None => {
                    tracing::info!(node = %node.id, "xDS stream closed");
                    return;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                snapshot = snapshots.borrow_and_update().clone();
            }
            status = revoked(&mut revocation) => {
                tracing::info!(node = %node.id, %status, "xDS stream closed: its credential was revoked");
                let _ = responses.send(Err(status)).await;
                return;
            }
        }
    }
}

/// The status to end the stream with once its credential is revoked; never, without one.
async fn revoked(revocation: &mut Option<Revocation>) -> Status {
    match revocation {
        Some(revocation) => revocation.revoked().await,
        None => std::future::pending().await,
    }
}

/// Reports the types whose status changed since `reported`: the registry is one lock for all
/// streams, so an ACK that changed nothing does not take it.
fn update_status<P: StreamProtocol>(
    registration: &RegisteredStream,
    protocol: &P,
    reported: &mut [TypeStatus; 5],
) {
    let mut changed = Vec::new();
    for kind in Kind::ALL {
        let view = protocol.status_view(kind);
        if !view.matches(&reported[kind.index()]) {
            let status = view.to_status();
            reported[kind.index()] = status.clone();
            changed.push((kind, status));
        }
    }
    if !changed.is_empty() {
        registration.set_type_statuses(changed);
    }
}
