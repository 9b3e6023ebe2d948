//! Upstream connection pools: one hyper client per cluster per worker (no cross-worker locks),
//! HTTP/1.1 with keep-alive reuse or HTTP/2 multiplexing as the cluster asks. The connector
//! counts connections into the cluster's stats and enforces `max_connections`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

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

/// Error when the cluster's connection limit is reached.
#[derive(Debug, thiserror::Error)]
#[error("upstream connection limit reached")]
pub struct ConnectionOverflow;

#[derive(Debug)]
struct Limits {
    active: AtomicUsize,
    max: usize,
}

/// Counts connections and bytes, enforces the limit.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: HttpConnector,
    stats: Arc<ClusterStats>,
    limits: Arc<Limits>,
    tls: Option<crate::tls::UpstreamTls>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = CountedIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let stats = self.stats.clone();
        let limits = self.limits.clone();
        if limits.active.load(Ordering::Relaxed) >= limits.max {
            stats.upstream_cx_overflow.inc();
            return Box::pin(async { Err(Box::new(ConnectionOverflow) as Self::Error) });
        }
        let tls = self.tls.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match connecting.await {
                Ok(io) => {
                    let io = match tls {
                        None => Io::Plain(io),
                        Some(tls) => {
                            let tcp = io.into_inner();
                            let name = match tls.sni.clone() {
                                Some(name) => name,
                                None => rustls::pki_types::ServerName::IpAddress(
                                    tcp.peer_addr()?.ip().into(),
                                ),
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
                    stats.upstream_cx_total.inc();
                    stats.upstream_cx_active.inc();
                    limits.active.fetch_add(1, Ordering::Relaxed);
                    Ok(CountedIo { io, stats, limits })
                }
                Err(error) => {
                    stats.upstream_cx_connect_fail.inc();
                    Err(error.into())
                }
            }
        })
    }
}

/// An upstream connection that updates the cluster's stats.
#[derive(Debug)]
pub struct CountedIo {
    io: Io,
    stats: Arc<ClusterStats>,
    limits: Arc<Limits>,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.stats.upstream_cx_active.dec();
        self.limits.active.fetch_sub(1, Ordering::Relaxed);
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
            active: AtomicUsize::new(0),
            max: cluster.thresholds.max_connections as usize,
        });
        Pools {
            slots: (0..workers + 1)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            connector: Connector {
                inner,
                stats,
                limits,
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
            builder.build(self.connector.clone())
        })
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }
}

/// Whether an upstream error was the connection limit.
pub fn is_overflow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<ConnectionOverflow>() {
            return true;
        }
        current = e.source();
    }
    false
}
