//! Upstream connection pools: one hyper client per cluster per worker (no cross-worker locks),
//! HTTP/1.1 with keep-alive reuse or HTTP/2 multiplexing as the cluster asks. The connector
//! counts connections into the cluster's stats and enforces the circuit breakers as Envoy does:
//! a request that finds no idle connection is pending (up to `max_pending_requests`, else it
//! overflows) until it gets a connection, and a new connection waits for a slot under
//! `max_connections`.
//!
//! hyper-util races a pool checkout against the connector, and only calls the connector when no
//! idle connection is there. So a pending request is a running connector call: it ends when a
//! slot frees and the connection is made, or when the checkout wins (an idle connection came
//! back; hyper-util then moves the connect to a background task, where it stops waiting), or
//! when the request goes away (route timeout, downstream reset), which drops it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::{Cluster, UpstreamProtocol};
use crate::stats::ClusterStats;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the current thread as worker `index` (its pools are its own).
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

fn worker_index(slots: usize) -> usize {
    let index = WORKER.with(Cell::get);
    if index < slots.saturating_sub(1) {
        index
    } else {
        slots.saturating_sub(1)
    }
}

/// Error when a request would queue beyond `max_pending_requests`.
#[derive(Debug, thiserror::Error)]
#[error("upstream pending request limit reached")]
pub struct PendingOverflow;

/// Error ending a connect that was waiting for a slot after its request took an idle pooled
/// connection instead (hyper-util finishes such connects in the background).
#[derive(Debug, thiserror::Error)]
#[error("connect no longer wanted by its request")]
struct NoLongerWanted;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A cluster's circuit breaker state, shared by every worker's client.
#[derive(Debug)]
struct Limits {
    /// Connections open or being opened.
    connections: AtomicUsize,
    max_connections: usize,
    /// Requests waiting for a connection.
    pending: AtomicUsize,
    max_pending: usize,
    /// Wakes pending connects when a connection slot frees.
    freed: Notify,
}

/// Connections (open or being opened) per upstream host in one worker's pool. Only touched
/// when a connection opens or closes, never per request.
#[derive(Debug, Default)]
struct WorkerConnections(Mutex<Vec<(Authority, usize)>>);

impl WorkerConnections {
    fn count(&self, host: &Authority) -> usize {
        let hosts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        hosts.iter().find(|(h, _)| h == host).map_or(0, |(_, n)| *n)
    }

    fn add(&self, host: &Authority) {
        let mut hosts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match hosts.iter_mut().find(|(h, _)| h == host) {
            Some((_, n)) => *n += 1,
            None => hosts.push((host.clone(), 1)),
        }
    }

    fn remove(&self, host: &Authority) {
        let mut hosts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = hosts.iter().position(|(h, _)| h == host) {
            hosts[index].1 -= 1;
            if hosts[index].1 == 0 {
                hosts.swap_remove(index);
            }
        }
    }
}

/// One request counted as pending (cluster-wide and in `upstream_rq_pending_active`).
struct Pending {
    limits: Arc<Limits>,
    stats: Arc<ClusterStats>,
}

impl Pending {
    fn try_new(limits: &Arc<Limits>, stats: &Arc<ClusterStats>) -> Option<Pending> {
        limits
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limits.max_pending).then_some(n + 1)
            })
            .ok()?;
        stats.upstream_rq_pending_total.inc();
        stats.upstream_rq_pending_active.inc();
        Some(Pending {
            limits: limits.clone(),
            stats: stats.clone(),
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::Relaxed);
        self.stats.upstream_rq_pending_active.dec();
    }
}

/// One connection slot under `max_connections`, held from before the connect until the
/// connection closes (or the connect fails or is dropped).
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    worker: Arc<WorkerConnections>,
    host: Authority,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.connections.fetch_sub(1, Ordering::Relaxed);
        self.worker.remove(&self.host);
        self.limits.freed.notify_waiters();
    }
}

/// Counts connections and bytes, enforces the circuit breakers.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: HttpConnector,
    stats: Arc<ClusterStats>,
    limits: Arc<Limits>,
    /// This worker's connections; fresh per worker client.
    worker: Arc<WorkerConnections>,
    tls: Option<crate::tls::UpstreamTls>,
}

impl Connector {
    fn slot(&self, host: &Authority) -> Slot {
        self.worker.add(host);
        Slot {
            limits: self.limits.clone(),
            worker: self.worker.clone(),
            host: host.clone(),
        }
    }

    fn try_slot(&self, host: &Authority) -> Option<Slot> {
        let limits = &self.limits;
        limits
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limits.max_connections).then_some(n + 1)
            })
            .ok()?;
        Some(self.slot(host))
    }

    /// Waits for a connection slot. Fails with [`NoLongerWanted`] once polled from a task other
    /// than `task`, the request's own: hyper-util moved the connect to the background because
    /// the request took an idle connection.
    async fn wait_for_slot(
        &self,
        host: &Authority,
        task: Option<tokio::task::Id>,
    ) -> Result<Slot, NoLongerWanted> {
        let mut overflowed = false;
        loop {
            // Registered before the check, so a slot freed in between still wakes us.
            let freed = self.limits.freed.notified();
            tokio::pin!(freed);
            if let Some(slot) = self.try_slot(host) {
                return Ok(slot);
            }
            if !overflowed {
                overflowed = true;
                self.stats.upstream_cx_overflow.inc();
            }
            // Envoy's rule: a pool with no connection to the host gets one over the limit,
            // else requests queued here could wait on connections idle in another worker.
            if self.worker.count(host) == 0 {
                self.limits.connections.fetch_add(1, Ordering::Relaxed);
                return Ok(self.slot(host));
            }
            std::future::poll_fn(|cx| {
                if tokio::task::try_id() != task {
                    return Poll::Ready(Err(NoLongerWanted));
                }
                freed.as_mut().poll(cx).map(Ok)
            })
            .await?;
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = CountedIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // Called only when the pool had no idle connection: the request is pending.
        let Some(pending) = Pending::try_new(&self.limits, &self.stats) else {
            self.stats.upstream_rq_pending_overflow.inc();
            return Box::pin(async { Err(Box::new(PendingOverflow) as Self::Error) });
        };
        let task = tokio::task::try_id();
        let mut connector = self.clone();
        Box::pin(async move {
            let host = uri
                .authority()
                .cloned()
                .ok_or("upstream uri without authority")?;
            let slot = connector.wait_for_slot(&host, task).await?;
            let stats = connector.stats.clone();
            let io = match connector.inner.call(uri).await {
                Ok(io) => io,
                Err(error) => {
                    stats.upstream_cx_connect_fail.inc();
                    return Err(error.into());
                }
            };
            let io = match connector.tls {
                None => Io::Plain(io),
                Some(tls) => {
                    let tcp = io.into_inner();
                    let name = match tls.sni.clone() {
                        Some(name) => name,
                        None => {
                            rustls::pki_types::ServerName::IpAddress(tcp.peer_addr()?.ip().into())
                        }
                    };
                    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                    match connector.connect(name, tcp).await {
                        Ok(stream) => Io::Tls(Box::new(TokioIo::new(stream))),
                        Err(error) => {
                            stats.upstream_cx_connect_fail.inc();
                            return Err(error.into());
                        }
                    }
                }
            };
            drop(pending);
            stats.upstream_cx_total.inc();
            stats.upstream_cx_active.inc();
            Ok(CountedIo {
                io,
                stats,
                _slot: slot,
            })
        })
    }
}

/// An upstream connection that updates the cluster's stats.
#[derive(Debug)]
pub struct CountedIo {
    io: Io,
    stats: Arc<ClusterStats>,
    _slot: Slot,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.stats.upstream_cx_active.dec();
    }
}

/// A plain or TLS upstream connection.
#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(io) => io.connected(),
            Io::Tls(io) => {
                let (tcp, session) = io.inner().get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

macro_rules! with_io {
    ($self:expr, $io:ident => $body:expr) => {
        match &mut $self.io {
            Io::Plain($io) => $body,
            Io::Tls($io) => {
                let $io = &mut **$io;
                $body
            }
        }
    };
}

impl Read for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        with_io!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl Write for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = with_io!(this, io => Pin::new(io).poll_write(cx, buf));
        if let Poll::Ready(Ok(n)) = result {
            this.stats.upstream_cx_tx_bytes_total.add(n as u64);
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_io!(self, io => Pin::new(io).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_io!(self, io => Pin::new(io).poll_shutdown(cx))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = with_io!(this, io => Pin::new(io).poll_write_vectored(cx, bufs));
        if let Poll::Ready(Ok(n)) = result {
            this.stats.upstream_cx_tx_bytes_total.add(n as u64);
        }
        result
    }
}

pub type UpstreamClient = Client<Connector, crate::http::body::RequestBody>;

/// Per-worker clients of one cluster.
#[derive(Debug)]
pub struct Pools {
    slots: Box<[std::sync::OnceLock<UpstreamClient>]>,
    connector: Connector,
    protocol: UpstreamProtocol,
}

impl Pools {
    pub fn new(cluster: &Cluster, stats: Arc<ClusterStats>, workers: usize) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(cluster.connect_timeout));
        if cluster.tcp_keepalive {
            inner.set_keepalive(Some(Duration::from_secs(60)));
        }
        let limits = Arc::new(Limits {
            connections: AtomicUsize::new(0),
            max_connections: cluster.thresholds.max_connections as usize,
            pending: AtomicUsize::new(0),
            max_pending: cluster.thresholds.max_pending_requests as usize,
            freed: Notify::new(),
        });
        Pools {
            slots: (0..workers + 1)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            connector: Connector {
                inner,
                stats,
                limits,
                worker: Arc::default(),
                tls: cluster.tls.clone(),
            },
            protocol: cluster.protocol,
        }
    }

    /// The calling worker's client.
    pub fn client(&self) -> &UpstreamClient {
        let slot = &self.slots[worker_index(self.slots.len())];
        slot.get_or_init(|| {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .set_host(false)
                .retry_canceled_requests(true);
            if self.protocol == UpstreamProtocol::Http2 {
                builder.http2_only(true);
            }
            builder.build(Connector {
                worker: Arc::default(),
                ..self.connector.clone()
            })
        })
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }
}

/// Whether an upstream error was a pending-request overflow.
pub fn is_overflow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<PendingOverflow>() {
            return true;
        }
        current = e.source();
    }
    false
}
