//! The one way Remora opens a connection to an upstream host, for the HTTP pools and for
//! `tcp_proxy` alike: a slot under the cluster's `max_connections`, TCP with the cluster's
//! connect timeout, `TCP_NODELAY` and keepalive settings, then TLS if configured; the
//! connection counted in the cluster's and the host's stats from its first attempt to its
//! close, and its bytes in both directions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

use super::host::HostState;
use crate::config::{ConnectOptions, TcpKeepalive};
use crate::stats::ClusterStats;
use crate::tls::ClientTls;

/// The cluster's `max_connections`: connections open or being opened, across workers.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    /// Wakes requests waiting for a slot when one frees.
    pub freed: Notify,
}

impl ConnectionLimit {
    pub fn new(max: u32) -> Self {
        ConnectionLimit {
            open: AtomicUsize::new(0),
            max: max as usize,
            freed: Notify::new(),
        }
    }

    /// A slot if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<LimitSlot> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(LimitSlot(self.clone()))
    }

    /// A slot over the limit (Envoy lets a pool with no connection to a host open one).
    pub fn acquire_over(self: &Arc<Self>) -> LimitSlot {
        self.open.fetch_add(1, Ordering::Relaxed);
        LimitSlot(self.clone())
    }
}

/// One place under `max_connections`, held until the connection closes.
#[derive(Debug)]
pub struct LimitSlot(Arc<ConnectionLimit>);

impl Drop for LimitSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_waiters();
    }
}

/// Why no connection could be made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{addr}: {reason}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    pub reason: Arc<str>,
    /// What the transport said, as Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%` writes it
    /// (`delayed_connect_error: Connection refused`); none for a timeout.
    pub transport: Option<Arc<str>>,
}

/// An error of the system's connect call as Envoy reports it: `strerror`'s text, without
/// Rust's `(os error N)`.
fn connect_failure(error: &std::io::Error) -> String {
    let text = error.to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    format!("delayed_connect_error: {text}")
}

/// Makes a cluster's connections.
#[derive(Debug)]
pub struct Connector {
    pub stats: Arc<ClusterStats>,
    pub limit: Arc<ConnectionLimit>,
    connect_timeout: Duration,
    keepalive: Option<TcpKeepalive>,
    tls: Option<ClientTls>,
}

impl Connector {
    /// Builds the connector; `tls` is the cluster's TLS origination, built once per cluster.
    pub fn new(
        options: &ConnectOptions,
        max_connections: u32,
        stats: Arc<ClusterStats>,
        tls: Option<ClientTls>,
    ) -> Self {
        Connector {
            stats,
            limit: Arc::new(ConnectionLimit::new(max_connections)),
            connect_timeout: options.connect_timeout,
            keepalive: options.tcp_keepalive,
            tls,
        }
    }

    /// Connections open or being opened, and the limit (for the circuit breaker gauges).
    pub fn readings(&self) -> (u64, u64) {
        (
            self.limit.open.load(Ordering::Relaxed) as u64,
            self.limit.max as u64,
        )
    }

    /// The ALPN protocols offered when TLS is on.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// Opens a connection to `addr` in `slot`: TCP within the connect timeout, then TLS.
    /// Counted in `cx_total` and `cx_active` from this attempt on, as Envoy counts.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        host: &Arc<HostState>,
        slot: LimitSlot,
    ) -> Result<UpstreamIo, ConnectError> {
        self.connect_sending(addr, host, slot, None).await
    }

    /// As [`Connector::connect`]; over TLS, what `early`'s downstream has already sent when
    /// TCP is up goes to the session before the handshake, so rustls sends it right behind
    /// the client's last handshake flight, in the same write (sparing both sides a round of
    /// reads and wakeups per connection). Nothing is sent before the server is verified.
    pub async fn connect_sending(
        &self,
        addr: SocketAddr,
        host: &Arc<HostState>,
        slot: LimitSlot,
        early: Option<&mut EarlyBytes<'_>>,
    ) -> Result<UpstreamIo, ConnectError> {
        let mut counted = Counted::new(&self.stats, host, slot);
        let failed = |reason: String, transport: Option<String>| {
            self.stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.inc();
            ConnectError {
                addr,
                reason: reason.into(),
                transport: transport.map(Arc::from),
            }
        };
        let tcp =
            match tokio::time::timeout(self.connect_timeout, tcp_connect(addr, self.keepalive))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(error)) => {
                    // Refused or unreachable: the far end's answer, as Envoy sees it.
                    counted.ended_by_peer = true;
                    return Err(failed(error.to_string(), Some(connect_failure(&error))));
                }
                Err(_) => {
                    self.stats.upstream_cx_connect_timeout.inc();
                    return Err(failed("connect timeout".into(), None));
                }
            };
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = tls
                    .sni
                    .clone()
                    .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let first: &[u8] = match early {
                    Some(early) => early.read_ready().await,
                    None => &[],
                };
                let handshake = connector.connect_with(name, tcp, |session| {
                    // Buffered until the handshake is done; less than rustls's default
                    // limit (64 KiB), so all of it is taken.
                    let _ = std::io::Write::write(&mut session.writer(), first);
                });
                // The handshake shares the connect timeout, as Envoy's transport socket does.
                match tokio::time::timeout(self.connect_timeout, handshake).await {
                    Ok(Ok(stream)) => {
                        tls.stats.handshake.inc();
                        if stream.get_ref().1.handshake_kind()
                            == Some(rustls::HandshakeKind::Resumed)
                        {
                            tls.stats.session_reused.inc();
                        }
                        Stream::Tls(Box::new(stream))
                    }
                    Ok(Err(error)) => {
                        tls.stats.failed(&error);
                        counted.ended_by_peer = peer_gone(&error);
                        return Err(failed(
                            format!("TLS: {error}"),
                            Some(format!("TLS_error: {error}")),
                        ));
                    }
                    Err(_) => {
                        tls.stats.connection_error.inc();
                        // Envoy's connect timeout runs until the handshake is done.
                        self.stats.upstream_cx_connect_timeout.inc();
                        return Err(failed("TLS handshake timeout".into(), None));
                    }
                }
            }
        };
        self.stats
            .upstream_cx_connect_ms
            .record_duration(counted.opened.elapsed());
        Ok(UpstreamIo {
            stream,
            counted: Some(counted),
        })
    }

    /// A connection for an active health check: TCP (with the cluster's socket options) and
    /// TLS as for traffic, but under no connection limit and in no stats, as Envoy's checker
    /// connections; the caller's check timeout bounds it.
    pub async fn connect_for_health_check(&self, addr: SocketAddr) -> std::io::Result<UpstreamIo> {
        let tcp = tcp_connect(addr, self.keepalive).await?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = tls
                    .sni
                    .clone()
                    .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                Stream::Tls(Box::new(connector.connect(name, tcp).await?))
            }
        };
        Ok(UpstreamIo {
            stream,
            counted: None,
        })
    }
}

/// The most [`EarlyBytes`] reads.
const EARLY_MAX: usize = 16 * 1024;

/// What a `tcp_proxy` downstream has sent by the time its upstream's TCP connect is done, read
/// without waiting, once; later calls give the same bytes. Once the connection is up the caller
/// counts them as sent and reads the downstream on from where this stopped.
pub struct EarlyBytes<'a> {
    downstream: &'a mut (dyn AsyncRead + Unpin + Send),
    bytes: Vec<u8>,
    read: bool,
}

impl<'a> EarlyBytes<'a> {
    pub fn new(downstream: &'a mut (dyn AsyncRead + Unpin + Send)) -> Self {
        EarlyBytes {
            downstream,
            bytes: Vec::new(),
            read: false,
        }
    }

    /// The bytes read (none before [`EarlyBytes::read_ready`]).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    async fn read_ready(&mut self) -> &[u8] {
        if !self.read {
            self.read = true;
            self.bytes.reserve_exact(EARLY_MAX);
            let mut read = std::pin::pin!(tokio::io::AsyncReadExt::read_buf(
                &mut self.downstream,
                &mut self.bytes
            ));
            // One poll: nothing there yet (or an end or error, which the tunnel's own read
            // meets again) means nothing to send early.
            let _ = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        }
        &self.bytes
    }
}

/// A TCP connection with Remora's socket options.
pub async fn tcp_connect(
    addr: SocketAddr,
    keepalive: Option<TcpKeepalive>,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(keepalive) = keepalive {
        set_keepalive(&socket2::SockRef::from(&socket), keepalive)?;
    }
    socket.connect(addr).await
}

/// Turns keepalive on with the given probes, time and interval; an unset value keeps the
/// operating system's default, as in Envoy.
pub fn set_keepalive(
    socket: &socket2::SockRef<'_>,
    keepalive: TcpKeepalive,
) -> std::io::Result<()> {
    socket.set_keepalive(true)?;
    let mut params = socket2::TcpKeepalive::new();
    if let Some(time) = keepalive.time {
        params = params.with_time(time);
    }
    if let Some(interval) = keepalive.interval {
        params = params.with_interval(interval);
    }
    if let Some(probes) = keepalive.probes {
        params = params.with_retries(probes);
    }
    socket.set_tcp_keepalive(&params)
}

/// A connection in the cluster's and its host's `cx_total` and `cx_active` from its first
/// attempt, holding its connection slot; leaves `cx_active` (and counts `upstream_cx_destroy`,
/// and by which side) when dropped, whether the connect failed, was given up on or the
/// connection closed.
#[derive(Debug)]
struct Counted {
    stats: Arc<ClusterStats>,
    host: Arc<HostState>,
    _slot: LimitSlot,
    /// For `upstream_cx_length_ms`.
    opened: std::time::Instant,
    /// The upstream ended it: refused the connect, or closed or reset the connection.
    ended_by_peer: bool,
    /// The requests it carries, to count its end with requests in flight.
    requests: Arc<InFlight>,
}

/// The requests a connection carries, from the pool's [`RequestOnConnection`]s: a connection
/// that ends with one unanswered counts as `upstream_cx_destroy_with_active_rq`, as in Envoy.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Requests sent and not yet answered in full, and all it carried (`upstream_rq_per_cx`).
    active: AtomicU32,
    carried: AtomicU32,
    /// An HTTP/1.1 request given up before its response ended: its connection closes with it.
    abandoned: AtomicBool,
    /// Where an HTTP/2 stream's reset counts (none for a connection counted nowhere).
    stats: Option<Arc<ClusterStats>>,
}

/// One request on a connection, from send to the end of its response.
#[derive(Debug)]
pub struct RequestOnConnection {
    on: Arc<InFlight>,
    /// HTTP/1.1: the connection carries nothing else, and closes if the request is given up.
    exclusive: bool,
    end: StreamEnd,
}

/// How a request's stream on its connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// Not (yet): dropped so, the proxy gave the stream up and reset it.
    Open,
    /// Answered in full, or never sent on this connection, or refused by the upstream
    /// (`REFUSED_STREAM`, which Envoy counts as no reset).
    Done,
    /// The upstream reset the stream.
    RemoteReset,
    /// The connection went away under it.
    ConnectionLost,
}

impl RequestOnConnection {
    pub fn new(on: &Arc<InFlight>, exclusive: bool) -> Self {
        on.active.fetch_add(1, Ordering::Relaxed);
        on.carried.fetch_add(1, Ordering::Relaxed);
        RequestOnConnection {
            on: on.clone(),
            exclusive,
            end: StreamEnd::Open,
        }
    }

    /// The response ended.
    pub fn answered(&mut self) {
        self.end = StreamEnd::Done;
    }

    /// The request never went out on this connection (it closed first).
    pub fn unsent(&mut self) {
        self.end = StreamEnd::Done;
        self.on.carried.fetch_sub(1, Ordering::Relaxed);
    }

    /// The request or its response failed with `error`.
    pub fn failed(&mut self, error: &hyper::Error) {
        let end = match crate::error::source_of::<h2::Error>(error) {
            Some(h2) => match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => StreamEnd::Done,
                Some(_) if h2.is_reset() && h2.is_remote() => StreamEnd::RemoteReset,
                _ => StreamEnd::ConnectionLost,
            },
            None => StreamEnd::ConnectionLost,
        };
        if self.end == StreamEnd::Open {
            self.end = end;
        }
    }
}

impl Drop for RequestOnConnection {
    fn drop(&mut self) {
        if self.exclusive {
            if self.end != StreamEnd::Done {
                self.on.abandoned.store(true, Ordering::Relaxed);
            }
        } else if let Some(stats) = &self.on.stats {
            // Envoy counts an HTTP/2 stream's reset by who reset it; a lost connection as
            // `upstream_rq_pending_failure_eject`, its name for streams a connection took down.
            match self.end {
                StreamEnd::Open => stats.upstream_rq_tx_reset.inc(),
                StreamEnd::RemoteReset => stats.upstream_rq_rx_reset.inc(),
                StreamEnd::ConnectionLost => stats.upstream_rq_pending_failure_eject.inc(),
                StreamEnd::Done => {}
            }
        }
        self.on.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an I/O error says the peer went away (reset, closed) rather than that this side
/// failed.
fn peer_gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

impl Counted {
    fn new(stats: &Arc<ClusterStats>, host: &Arc<HostState>, slot: LimitSlot) -> Self {
        stats.upstream_cx_total.inc();
        stats.upstream_cx_active.inc();
        host.stats.cx_total.inc();
        host.stats.cx_active.inc();
        Counted {
            stats: stats.clone(),
            host: host.clone(),
            _slot: slot,
            opened: std::time::Instant::now(),
            ended_by_peer: false,
            requests: Arc::new(InFlight {
                stats: Some(stats.clone()),
                ..InFlight::default()
            }),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.stats.upstream_cx_active.dec();
        self.stats.upstream_cx_destroy.inc();
        let with_active_rq = self.requests.active.load(Ordering::Relaxed) > 0
            || self.requests.abandoned.load(Ordering::Relaxed);
        // Envoy records it for each connection that carried a request.
        let carried = self.requests.carried.load(Ordering::Relaxed);
        if carried > 0 {
            self.stats.upstream_rq_per_cx.record(u64::from(carried));
        }
        let stats = &self.stats;
        let (side, side_active) = match self.ended_by_peer {
            true => (
                &stats.upstream_cx_destroy_remote,
                &stats.upstream_cx_destroy_remote_with_active_rq,
            ),
            false => (
                &stats.upstream_cx_destroy_local,
                &stats.upstream_cx_destroy_local_with_active_rq,
            ),
        };
        side.inc();
        if with_active_rq {
            side_active.inc();
            stats.upstream_cx_destroy_with_active_rq.inc();
        }
        self.host.stats.cx_active.dec();
        self.stats
            .upstream_cx_length_ms
            .record_duration(self.opened.elapsed());
    }
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An open upstream connection, plain or TLS, counting the bytes it moves.
#[derive(Debug)]
pub struct UpstreamIo {
    stream: Stream,
    /// Absent for health check connections, which count nowhere.
    counted: Option<Counted>,
}

/// A tunnel splices a plain connection's bytes past its `AsyncRead`/`AsyncWrite`, and counts
/// them here instead.
impl crate::tunnel::UpstreamEnd for UpstreamIo {
    fn plain_socket(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Plain(stream) => Some(stream),
            Stream::Tls(_) => None,
        }
    }

    fn count_sent(&self, bytes: u64) {
        if let Some(counted) = &self.counted {
            counted.stats.upstream_cx_tx_bytes_total.add(bytes);
        }
    }

    fn count_received(&self, bytes: u64) {
        if let Some(counted) = &self.counted {
            counted.stats.upstream_cx_rx_bytes_total.add(bytes);
        }
    }
}

impl UpstreamIo {
    /// The requests the connection carries (none counted for a health check's).
    pub fn requests(&self) -> Option<Arc<InFlight>> {
        self.counted
            .as_ref()
            .map(|counted| counted.requests.clone())
    }

    /// The local address of the connection's socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.stream {
            Stream::Plain(tcp) => tcp.local_addr().ok(),
            Stream::Tls(tls) => tls.get_ref().0.local_addr().ok(),
        }
    }

    /// The negotiated ALPN protocol, if TLS.
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }
}

macro_rules! with_stream {
    ($self:expr, $io:ident => $body:expr) => {
        match &mut $self.stream {
            Stream::Plain($io) => $body,
            Stream::Tls($io) => {
                let $io = &mut **$io;
                $body
            }
        }
    };
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        let result = with_stream!(this, io => Pin::new(io).poll_read(cx, buf));
        let read = buf.filled().len() - before;
        if let (Poll::Ready(outcome), Some(counted)) = (&result, &mut this.counted) {
            if read > 0 {
                counted.stats.upstream_cx_rx_bytes_total.add(read as u64);
            } else if match outcome {
                Ok(()) => room,
                Err(error) => peer_gone(error),
            } {
                // The stream's end, or a reset.
                counted.ended_by_peer = true;
            }
        }
        result
    }
}

/// Counts a write's bytes, or that it found the peer gone.
fn count_written(counted: &mut Option<Counted>, result: &Poll<std::io::Result<usize>>) {
    match (result, counted) {
        (Poll::Ready(Ok(n)), Some(counted)) => {
            counted.stats.upstream_cx_tx_bytes_total.add(*n as u64)
        }
        (Poll::Ready(Err(error)), Some(counted)) if peer_gone(error) => {
            counted.ended_by_peer = true;
        }
        _ => {}
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = with_stream!(this, io => Pin::new(io).poll_write(cx, buf));
        count_written(&mut this.counted, &result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = with_stream!(this, io => crate::gathered_write::poll_write_gathered(
            Pin::new(io),
            cx,
            bufs
        ));
        count_written(&mut this.counted, &result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(io) => io.is_write_vectored(),
            Stream::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_stream!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        with_stream!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_settings_reach_the_socket_and_unset_ones_keep_the_default() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keepalive = TcpKeepalive {
            probes: Some(4),
            time: Some(Duration::from_secs(33)),
            interval: None,
        };
        let stream = tcp_connect(addr, Some(keepalive)).await.unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(33)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        let plain = tcp_connect(addr, None).await.unwrap();
        let plain = socket2::SockRef::from(&plain);
        assert!(!plain.keepalive().unwrap());
        // Linux's default interval (75 s) is kept when the config leaves it unset.
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            plain.tcp_keepalive_interval().unwrap()
        );
        assert!(
            plain.tcp_nodelay().unwrap(),
            "every upstream socket has TCP_NODELAY"
        );
    }

    #[tokio::test]
    async fn the_limit_admits_up_to_max_and_frees_on_drop() {
        let limit = Arc::new(ConnectionLimit::new(2));
        let a = limit.try_acquire().expect("first");
        let _b = limit.try_acquire().expect("second");
        assert!(limit.try_acquire().is_none());
        drop(a);
        assert!(limit.try_acquire().is_some());
    }
}
