//! What every xDS stream shares: the registry of connected proxies shown by `GET /v1/proxies`,
//! the per-type status each stream reports there, and the driver loop that reads requests,
//! follows snapshots and writes responses for one stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use tracing::Instrument;
use xds_api::envoy::config::core::v3::Node;

use crate::mesh::sidecar::Sidecar;
use crate::resource::Kind;
use crate::snapshot::Snapshot;
use crate::xds::XdsContext;

/// A rejected push.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NackRecord {
    /// The config version the proxy rejected.
    pub version: String,
    pub message: String,
    /// RFC 3339, UTC.
    pub time: String,
}

/// Where one resource type stands with one proxy.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    pub acked_version: Option<String>,
    pub pending_nonce: Option<String>,
    pub last_nack: Option<NackRecord>,
}

/// One connected stream, as listed by the API.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub group: String,
    pub peer: Option<String>,
    pub connected_since: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Keyed by xDS short name (CDS, EDS, LDS, RDS, SDS).
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// Every open xDS stream.
#[derive(Default)]
pub struct ProxyRegistry {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    pub fn register(
        self: &Arc<Self>,
        node: &Node,
        peer: Option<SocketAddr>,
        protocol: &'static str,
    ) -> RegisteredStream {
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let status = ProxyStatus {
            stream_id,
            node_id: node.id.clone(),
            group: node.cluster.clone(),
            peer: peer.map(|addr| addr.to_string()),
            connected_since: rfc3339(SystemTime::now()),
            protocol,
            types: BTreeMap::new(),
        };
        self.lock().insert(stream_id, status);
        RegisteredStream {
            registry: self.clone(),
            stream_id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.streams
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn list(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stream's entry in the registry; removed when dropped.
pub struct RegisteredStream {
    registry: Arc<ProxyRegistry>,
    stream_id: u64,
}

impl RegisteredStream {
    pub fn set_type_status(&self, kind: Kind, status: TypeStatus) {
        if let Some(entry) = self.registry.lock().get_mut(&self.stream_id) {
            if status == TypeStatus::default() {
                entry.types.remove(kind.xds_name());
            } else {
                entry.types.insert(kind.xds_name(), status);
            }
        }
    }
}

impl Drop for RegisteredStream {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.stream_id);
    }
}

/// Formats a time as RFC 3339 in UTC with second precision.
pub fn rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    jiff::Timestamp::from_second(seconds as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
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
    type Response: prost::Message + Send + 'static;
    const NAME: &'static str;

    fn node(request: &Self::Request) -> Option<&Node>;
    /// Takes in one request; an error ends the stream with that status.
    fn on_request(&mut self, request: Self::Request) -> Result<Option<Outcome>, Status>;
    /// The next response the stream may send now, if any.
    fn next_response(&mut self, snapshot: &Snapshot) -> Option<Self::Response>;
    /// The types whose status changed since the last call, with their status.
    fn status(&self, kind: Kind) -> TypeStatus;
}

/// Runs one stream until the client goes away.
pub async fn drive<P: StreamProtocol>(
    context: XdsContext,
    peer: Option<SocketAddr>,
    mut requests: Streaming<P::Request>,
    responses: mpsc::Sender<Result<bytes::Bytes, Status>>,
    protocol: P,
) where
    Streaming<P::Request>: tokio_stream::Stream<Item = Result<P::Request, Status>>,
{
    // The node is only guaranteed on the first request.
    let first = match requests.next().await {
        Some(Ok(request)) => request,
        _ => return,
    };
    let node = P::node(&first).cloned().unwrap_or_default();
    let span = tracing::debug_span!("xds", node = %node.id);
    serve::<P>(context, peer, requests, responses, protocol, first, node)
        .instrument(span)
        .await
}

/// The rest of [`drive`], once the node is known (its logs carry the node id).
async fn serve<P: StreamProtocol>(
    context: XdsContext,
    peer: Option<SocketAddr>,
    mut requests: Streaming<P::Request>,
    responses: mpsc::Sender<Result<bytes::Bytes, Status>>,
    mut protocol: P,
    first: P::Request,
    node: Node,
) where
    Streaming<P::Request>: tokio_stream::Stream<Item = Result<P::Request, Status>>,
{
    let registration = context.registry.register(&node, peer, P::NAME);
    tracing::info!(node = %node.id, group = %node.cluster, protocol = P::NAME, "xDS stream opened");
    let mut snapshots = match (&context.mesh, Sidecar::from_node(&node)) {
        (Some(mesh), Some(sidecar)) => mesh.subscribe(sidecar).await,
        _ => context.hub.subscribe(&node.cluster),
    };
    let mut snapshot = snapshots.borrow_and_update().clone();
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
        }
        while let Some(response) = protocol.next_response(&snapshot) {
            context.metrics.pushes.fetch_add(1, Ordering::Relaxed);
            update_status(&registration, &protocol);
            if responses
                .send(Ok(crate::xds::server::grpc_frame(&response)))
                .await
                .is_err()
            {
                return;
            }
        }
        update_status(&registration, &protocol);
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
        }
    }
}

fn update_status<P: StreamProtocol>(registration: &RegisteredStream, protocol: &P) {
    for kind in Kind::ALL {
        registration.set_type_status(kind, protocol.status(kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_798_761_599)), "2026-12-31T23:59:59Z");
    }
}
