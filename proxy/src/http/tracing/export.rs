//! Getting finished spans out of the proxy without slowing a request: each tracer hands its
//! spans to a bounded queue (a full queue drops the span and counts it); one task per exporter
//! drains it in batches of `max_cache_size` spans, when a batch is full or every 5 s (Envoy's
//! flush interval), and sends one batch at a time. The tasks run on one thread of their own
//! (`remora-tracing`), so encoding and a slow or absent collector never touch a worker, and
//! memory stays bounded: the queue, plus the one batch in flight.
//!
//! Collectors are reached through their cluster as the proxy reaches any upstream: a host from
//! the cluster's load balancer, a connection from its connect path (limits, TLS, stats).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use remora_config::tracing::{HttpCollector, Provider};

use super::{ExportTags, Record, TracingContext};
use crate::config::UpstreamProtocol;
use crate::stats::{Registry, Stat};
use crate::store::Store;
use crate::upstream::LbContext;
use crate::upstream::connect::UpstreamIo;

/// How often a partly filled batch is sent anyway (Envoy's `flush_interval_ms` default).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// A queued span: the tracer's tags and what the request recorded.
pub type Queued = (Arc<ExportTags>, Box<Record>);

/// Why a batch did not make it.
#[derive(Debug)]
pub enum SendError {
    /// The collector answered, and not with success.
    Rejected(String),
    /// No answer: no host, no connection, a timeout.
    Failed(String),
    /// The collector cluster does not exist (Zipkin counts these apart).
    NoCluster(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Rejected(why) | SendError::Failed(why) | SendError::NoCluster(why) => {
                f.write_str(why)
            }
        }
    }
}

/// A batch's way to its collector.
pub trait Sink: Send + Sync + 'static {
    /// Sends one batch (counted by the caller, failures logged at debug).
    fn send(
        &self,
        batch: Vec<Queued>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + '_>>;
}

/// Counters under Envoy's names: `tracing.opentelemetry.*` or `tracing.zipkin.*`. Envoy 1.40
/// has no `http_reports_*` and no Zipkin `spans_dropped`: Remora adds them, so that lost spans
/// and failed exports show.
#[derive(Debug)]
pub struct ExportStats {
    /// Spans in the batches sent, whether the collector took them or not (as Envoy counts).
    pub spans_sent: Arc<Stat>,
    /// Spans lost to a full queue (Envoy's OpenTelemetry `spans_dropped`).
    pub spans_dropped: Arc<Stat>,
    pub timer_flushed: Arc<Stat>,
    /// Batches attempted (OpenTelemetry `http_reports_sent`; Zipkin has no such counter).
    pub attempted: Option<Arc<Stat>>,
    /// Batches the collector accepted (`http_reports_success`; Zipkin `reports_sent`).
    pub accepted: Arc<Stat>,
    /// Batches it answered with an error (`http_reports_failed`; Zipkin `reports_dropped`).
    pub rejected: Arc<Stat>,
    /// Batches that got no answer (`http_reports_failed`; Zipkin `reports_failed`).
    pub failed: Arc<Stat>,
    /// Batches not sent: the collector cluster does not exist (Zipkin
    /// `reports_skipped_no_cluster`; OpenTelemetry counts them failed).
    pub skipped_no_cluster: Arc<Stat>,
}

impl ExportStats {
    fn new(registry: &Registry, provider: &Provider) -> Self {
        match provider {
            Provider::OpenTelemetry(_) => {
                let c = |name: &str| registry.counter(format!("tracing.opentelemetry.{name}"));
                ExportStats {
                    spans_sent: c("spans_sent"),
                    spans_dropped: c("spans_dropped"),
                    timer_flushed: c("timer_flushed"),
                    attempted: Some(c("http_reports_sent")),
                    accepted: c("http_reports_success"),
                    rejected: c("http_reports_failed"),
                    failed: c("http_reports_failed"),
                    skipped_no_cluster: c("http_reports_failed"),
                }
            }
            Provider::Zipkin(_) => {
                let c = |name: &str| registry.counter(format!("tracing.zipkin.{name}"));
                ExportStats {
                    spans_sent: c("spans_sent"),
                    spans_dropped: c("spans_dropped"),
                    timer_flushed: c("timer_flushed"),
                    attempted: None,
                    accepted: c("reports_sent"),
                    rejected: c("reports_dropped"),
                    failed: c("reports_failed"),
                    skipped_no_cluster: c("reports_skipped_no_cluster"),
                }
            }
        }
    }
}

/// One exporter: a queue, and the task that empties it.
pub struct Exporter {
    queue: SyncSender<Queued>,
    queued: Arc<AtomicUsize>,
    batch: usize,
    flush: Arc<tokio::sync::Notify>,
    stats: Arc<ExportStats>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("batch", &self.batch)
            .finish()
    }
}

/// An exporter in use, by the provider config it was made for.
type Shared = (Provider, Weak<Exporter>);

/// Batches the queue holds before spans are dropped.
const QUEUED_BATCHES: usize = 4;

impl Exporter {
    /// The exporter for a provider: shared by every connection manager with the same provider
    /// config (as Envoy shares a tracer driver), made on first use. `sink` makes the
    /// provider's wire format, once, on the export runtime.
    pub fn for_provider(
        provider: &Provider,
        context: &TracingContext,
        registry: &Registry,
        sink: fn(&Provider, &TracingContext) -> Box<dyn Sink>,
    ) -> Arc<Exporter> {
        static EXPORTERS: OnceLock<Mutex<Vec<Shared>>> = OnceLock::new();
        let mut exporters = EXPORTERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        exporters.retain(|(_, exporter)| exporter.strong_count() > 0);
        if let Some(exporter) = exporters
            .iter()
            .find(|(known, _)| known == provider)
            .and_then(|(_, exporter)| exporter.upgrade())
        {
            return exporter;
        }
        let batch = match provider {
            Provider::OpenTelemetry(otel) => otel.max_cache_size as usize,
            // Envoy's Zipkin `min_flush_spans` is 5; a larger batch costs nothing here.
            Provider::Zipkin(_) => 1024,
        };
        let (queue, receiver) = std::sync::mpsc::sync_channel(batch * QUEUED_BATCHES);
        let stats = Arc::new(ExportStats::new(registry, provider));
        let exporter = Arc::new(Exporter {
            queue,
            queued: Arc::default(),
            batch,
            flush: Arc::default(),
            stats: stats.clone(),
        });
        let task = Drain {
            receiver,
            queued: exporter.queued.clone(),
            batch,
            flush: exporter.flush.clone(),
            stats,
        };
        let provider_config = provider.clone();
        let context = context.clone();
        runtime().spawn(async move {
            task.run(sink(&provider_config, &context)).await;
        });
        exporters.push((provider.clone(), Arc::downgrade(&exporter)));
        exporter
    }

    /// Hands a finished span over; never blocks. A full queue drops it.
    pub fn push(&self, tags: Arc<ExportTags>, record: Box<Record>) {
        match self.queue.try_send((tags, record)) {
            Ok(()) => {
                if self.queued.fetch_add(1, Ordering::Relaxed) + 1 == self.batch {
                    self.flush.notify_one();
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.spans_dropped.inc()
            }
        }
    }
}

/// The exporter's task: waits for a full batch or the timer, then sends what is queued.
struct Drain {
    receiver: Receiver<Queued>,
    queued: Arc<AtomicUsize>,
    batch: usize,
    flush: Arc<tokio::sync::Notify>,
    stats: Arc<ExportStats>,
}

impl Drain {
    async fn run(self, sink: Box<dyn Sink>) {
        let mut timer = tokio::time::interval(FLUSH_INTERVAL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.tick().await;
        loop {
            tokio::select! {
                () = self.flush.notified() => {}
                _ = timer.tick() => self.stats.timer_flushed.inc(),
            }
            loop {
                let mut batch = Vec::with_capacity(self.batch.min(1024));
                let mut closed = false;
                while batch.len() < self.batch {
                    match self.receiver.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                let full = batch.len() == self.batch;
                if !batch.is_empty() {
                    let spans = batch.len() as u64;
                    self.stats.spans_sent.add(spans);
                    if let Some(attempted) = &self.stats.attempted {
                        attempted.inc();
                    }
                    match sink.send(batch).await {
                        Ok(()) => self.stats.accepted.inc(),
                        Err(error) => {
                            match &error {
                                SendError::Rejected(_) => self.stats.rejected.inc(),
                                SendError::Failed(_) => self.stats.failed.inc(),
                                SendError::NoCluster(_) => self.stats.skipped_no_cluster.inc(),
                            }
                            ::tracing::debug!(%error, spans, "span export failed");
                        }
                    }
                }
                if closed {
                    return;
                }
                if !full {
                    break;
                }
            }
        }
    }
}

/// The thread all exporters run on: a current-thread runtime of its own.
pub fn runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("remora-tracing".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        ::tracing::error!(%error, "cannot start the tracing runtime");
                        return;
                    }
                };
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(std::future::pending::<()>());
            });
        match spawned.ok().and_then(|_| handle_rx.recv().ok()) {
            Some(handle) => handle,
            // Without a thread of its own, exports share the caller's runtime.
            None => tokio::runtime::Handle::current(),
        }
    })
}

/// Opens a connection to a host of `cluster` through the cluster's connect path.
pub async fn connect(
    store: &Store,
    cluster: &str,
) -> Result<(UpstreamIo, UpstreamProtocol), String> {
    let snapshot = store.load();
    let Some(cluster) = snapshot.cluster(cluster) else {
        return Err(format!("collector cluster {cluster:?} does not exist"));
    };
    let Some(host) = cluster.choose(&LbContext::default()) else {
        return Err(format!(
            "no healthy host in collector cluster {}",
            cluster.name()
        ));
    };
    let connector = cluster.connector.clone();
    let slot = connector
        .limit
        .try_acquire()
        .unwrap_or_else(|| connector.limit.acquire_over());
    let io = connector
        .connect(host.addr, &host.state, slot)
        .await
        .map_err(|error| error.to_string())?;
    Ok((io, cluster.pools.protocol()))
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_usable(&self) -> bool {
        match self {
            Sender::Http1(sender) => sender.is_ready(),
            Sender::Http2(sender) => !sender.is_closed(),
        }
    }
}

/// POSTs to a collector through its cluster, keeping one connection open between batches.
pub struct CollectorClient {
    pub store: Arc<Store>,
    pub collector: HttpCollector,
    sender: tokio::sync::Mutex<Option<Sender>>,
}

impl std::fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorClient")
            .field("cluster", &self.collector.cluster)
            .finish()
    }
}

impl CollectorClient {
    pub fn new(store: Arc<Store>, collector: HttpCollector) -> Self {
        CollectorClient {
            store,
            collector,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    async fn open(&self) -> Result<Sender, String> {
        let (io, protocol) = connect(&self.store, &self.collector.cluster).await?;
        let io = TokioIo::new(io);
        Ok(match protocol {
            UpstreamProtocol::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            UpstreamProtocol::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        })
    }

    /// Sends `request` (its URI's path is used; `Host` is the collector's) within the
    /// collector's timeout, and reads the whole response.
    pub async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, String> {
        let timeout = self.collector.timeout;
        match tokio::time::timeout(timeout, self.send_inner(request)).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be stuck: the next batch opens a fresh one.
                *self.sender.lock().await = None;
                Err(format!("collector did not answer within {timeout:?}"))
            }
        }
    }

    async fn send_inner(&self, request: Request<Bytes>) -> Result<Response<Bytes>, String> {
        let mut guard = self.sender.lock().await;
        if !guard.as_ref().is_some_and(Sender::is_usable) {
            *guard = Some(self.open().await?);
        }
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| self.collector.path.clone(), |pq| pq.as_str().to_string());
        for (name, value) in &self.collector.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        let request = Request::from_parts(parts, Full::new(body));
        let result = match guard.as_mut() {
            Some(Sender::Http1(sender)) => {
                let mut request = request;
                *request.uri_mut() = Uri::try_from(path).map_err(|e| e.to_string())?;
                if let Ok(host) = http::HeaderValue::from_str(&self.collector.authority) {
                    request.headers_mut().insert(http::header::HOST, host);
                }
                sender.send_request(request).await
            }
            Some(Sender::Http2(sender)) => {
                let mut request = request;
                *request.uri_mut() =
                    Uri::try_from(format!("http://{}{}", self.collector.authority, path))
                        .map_err(|e| e.to_string())?;
                sender.send_request(request).await
            }
            None => return Err("no connection".into()),
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                *guard = None;
                return Err(error.to_string());
            }
        };
        drop(guard);
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// A successful collector answer, or why not.
pub fn check_status(status: StatusCode) -> Result<(), SendError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(SendError::Rejected(format!("collector answered {status}")))
    }
}

/// tonic's connector for an OTLP/gRPC collector: every connection goes through the cluster.
#[derive(Clone)]
pub struct ClusterConnector {
    pub store: Arc<Store>,
    pub cluster: String,
}

impl tower_service::Service<Uri> for ClusterConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (store, cluster) = (self.store.clone(), self.cluster.clone());
        Box::pin(async move {
            let (io, _) = connect(&store, &cluster).await?;
            Ok(TokioIo::new(io))
        })
    }
}
