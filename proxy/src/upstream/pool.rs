//! Upstream connection pools: per cluster, one pool per worker (no cross-worker locks on the
//! request path), keyed by endpoint address so that connections outlive EDS updates that keep
//! the address.
//!
//! - HTTP/1.1: idle keep-alive connections wait in a per-address stack. A request takes the
//!   most recently used one; its response body hands the connection back (a [`Lease`]) once the
//!   response has been read in full, or drops it (the connection closes) if the body was cut.
//! - HTTP/2: one multiplexed connection per address per worker. Requests that arrive while it
//!   is being opened wait for that same connect instead of opening their own.
//! - Idle HTTP/1.1 connections close after the cluster's `idle_timeout` (a sweep per worker
//!   pool); a removed or replaced cluster closes its idle connections at once.
//!
//! Connections come from the cluster's [`Connector`] (one connect path with `tcp_proxy`).
//!
//! Circuit breakers as Envoy enforces them: a request that finds no usable connection is
//! *pending* (up to `max_pending_requests`, else it overflows) until it gets one, either a
//! connection slot under `max_connections` (then it connects) or, for HTTP/1.1, an idle
//! connection handed back meanwhile. A pending request that goes away (route timeout,
//! downstream reset) takes its connect with it: nothing continues in the background.
//!
//! Written here rather than taken from hyper-util's pooled client: that client hashes its pool
//! key on every checkout and return, and spawns a task per HTTP/1.1 request to return the
//! connection, about a sixth of the proxy's per-request work; and it cannot count HTTP/2
//! requests waiting for a connection as pending.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Notify;

use super::connect::{Connector, InFlight, LimitSlot, RequestOnConnection, UpstreamIo};
use super::host::{Host, HostStats};
use crate::body::outgoing::OutgoingBody;
use crate::config::{Cluster, Http2Options, Thresholds, UpstreamProtocol};
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

/// Why a request got no response from the pool. Clone, because the requests waiting on one
/// HTTP/2 connect all get its error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// The request would have queued beyond `max_pending_requests` (flag UO).
    #[error("upstream pending request limit reached")]
    Overflow,
    /// No connection could be made (flag UF); with what the transport said, if it failed.
    #[error("upstream connect error: {reason}")]
    Connect {
        reason: Arc<str>,
        transport: Option<Arc<str>>,
    },
    /// The connection failed while the request was on it (flag UR, or a downstream timeout).
    #[error("upstream request failed: {0}")]
    Request(Arc<hyper::Error>),
}

impl PoolError {
    fn connect(reason: impl std::fmt::Display) -> Self {
        PoolError::Connect {
            reason: reason.to_string().into(),
            transport: None,
        }
    }
}

type Http1Sender = Conn<http1::SendRequest<OutgoingBody>>;
type Http2Sender = Conn<http2::SendRequest<OutgoingBody>>;

/// A connection's request sender, with the local address of its socket: what a request's
/// `%UPSTREAM_LOCAL_ADDRESS%` shows. It derefs to the sender.
#[derive(Clone)]
struct Conn<S> {
    sender: S,
    local: Option<SocketAddr>,
    /// Requests sent on the connection (shared by an HTTP/2 sender's clones), for
    /// `max_requests_per_connection`.
    used: Arc<AtomicU32>,
    /// Requests in flight on it, which its end counts.
    in_flight: Arc<InFlight>,
}

impl<S> Conn<S> {
    fn new(sender: S, local: Option<SocketAddr>, in_flight: Arc<InFlight>) -> Self {
        Conn {
            sender,
            local,
            used: Arc::default(),
            in_flight,
        }
    }

    /// Counts one more request on the connection: whether it may carry it, and whether it
    /// is the last it may carry.
    fn count_request(&self, max: Option<u32>) -> (bool, bool) {
        let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        match max {
            None => (true, false),
            Some(max) => (n <= max, n >= max),
        }
    }
}

impl<S> std::ops::Deref for Conn<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.sender
    }
}

impl<S> std::ops::DerefMut for Conn<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.sender
    }
}

/// Where [`Pools::send`] notes the local address of the connection a request goes out on, once
/// it has one: a request that then times out or is reset still knows it.
pub type LocalAddress = std::sync::Mutex<Option<SocketAddr>>;

/// Puts the address of the connection in hand in `slot`, if the caller asked for it.
fn note(slot: Option<&LocalAddress>, local: Option<SocketAddr>) {
    if let Some(slot) = slot {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = local;
    }
}

type Http2Connect = Shared<BoxFuture<'static, Result<Http2Sender, PoolError>>>;

/// The pending-request breaker (`max_pending_requests`), shared by every worker's pool.
#[derive(Debug)]
struct PendingLimit {
    pending: AtomicUsize,
    max: usize,
}

/// One worker's connections to one endpoint address.
#[derive(Default)]
struct HostConnections {
    /// Connections open or being opened (Envoy lets a pool with none open one over the limit).
    open: usize,
    /// HTTP/1.1 connections ready for a request, each with when it became idle, most
    /// recently used last.
    idle: Vec<(Http1Sender, Instant)>,
    http2: Option<Http2Sender>,
    /// The HTTP/2 connect in progress, shared by the requests waiting for it.
    http2_connect: Option<Http2Connect>,
}

/// A worker's connections by endpoint address (foldhash: SipHash per request is measurable).
type HostMap = HashMap<SocketAddr, HostConnections, foldhash::fast::RandomState>;

/// One worker's connections to a cluster. Only that worker's thread touches it on the request
/// path, so its lock is never contended; it is a lock at all because the pools are shared.
#[derive(Default)]
struct WorkerPool {
    hosts: Mutex<HostMap>,
    /// Wakes this worker's pending HTTP/1.1 requests when a connection comes back idle.
    released: Notify,
    /// `max_requests_per_connection`, and the stats that count connections it closed.
    max_requests: Option<u32>,
    stats: Arc<ClusterStats>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// A worker's pool, with a task on the worker that closes HTTP/1.1 connections idle for
    /// longer than the cluster's `idle_timeout` (checked every half of it; `None`: kept until
    /// the upstream closes them) and ends with the pool.
    fn start(
        idle_timeout: Option<Duration>,
        max_requests: Option<u32>,
        stats: &Arc<ClusterStats>,
    ) -> Arc<WorkerPool> {
        let pool = Arc::new(WorkerPool {
            max_requests,
            stats: stats.clone(),
            ..WorkerPool::default()
        });
        if let Some(timeout) = idle_timeout
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let pool = Arc::downgrade(&pool);
            let stats = stats.clone();
            runtime.spawn(async move {
                let mut sweep = tokio::time::interval(timeout / 2);
                sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                sweep.tick().await;
                loop {
                    sweep.tick().await;
                    let Some(pool) = pool.upgrade() else { return };
                    let closed = pool.close_idle_since(Instant::now() - timeout);
                    stats.upstream_cx_idle_timeout.add(closed as u64);
                }
            });
        }
        pool
    }

    /// Drops the HTTP/1.1 connections idle since before `cutoff` (hyper then closes them);
    /// returns how many were still open.
    fn close_idle_since(&self, cutoff: Instant) -> usize {
        let mut closed = 0;
        for host in self.hosts().values_mut() {
            host.idle.retain(|(sender, since)| {
                let expired = *since < cutoff;
                closed += usize::from(expired && !sender.is_closed());
                !expired
            });
        }
        closed
    }

    fn hosts(&self) -> MutexGuard<'_, HostMap> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle HTTP/1.1 connection to `addr`, dropping any that closed while idle.
    fn take_idle(&self, addr: SocketAddr) -> Option<Http1Sender> {
        let mut hosts = self.hosts();
        let idle = &mut hosts.get_mut(&addr)?.idle;
        while let Some((sender, _)) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, sender: Http1Sender, since: Instant) {
        // No entry: every connection to the address has closed, this one included.
        if let Some(host) = self.hosts().get_mut(&addr) {
            host.idle.push((sender, since));
            self.released.notify_waiters();
        }
    }

    fn open_connections(&self, addr: SocketAddr) -> usize {
        self.hosts().get(&addr).map_or(0, |h| h.open)
    }
}

/// One connection slot: a place under `max_connections` and this worker's count of its
/// connections to the host, both held from before the connect until the connection closes.
struct Slot {
    limit: LimitSlot,
    worker: WorkerSlot,
}

impl Slot {
    fn new(limit: LimitSlot, worker: &Arc<WorkerPool>, host: &Host) -> Slot {
        worker.hosts().entry(host.addr).or_default().open += 1;
        Slot {
            limit,
            worker: WorkerSlot {
                worker: worker.clone(),
                addr: host.addr,
            },
        }
    }
}

/// A connection counted in its worker's `open` for its host.
struct WorkerSlot {
    worker: Arc<WorkerPool>,
    addr: SocketAddr,
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        let mut hosts = self.worker.hosts();
        if let Some(host) = hosts.get_mut(&self.addr) {
            host.open -= 1;
            // Nothing open: whatever senders are left belong to closed connections.
            if host.open == 0 && host.http2_connect.is_none() {
                hosts.remove(&self.addr);
            }
        }
    }
}

/// An upstream connection handed back by hyper after a `101 Switching Protocols`: it leaves
/// the pool for good and carries a tunnel.
pub struct UpgradedUpstream {
    /// The connection; it counts what passes through it and holds its `max_connections` slot.
    pub io: UpstreamIo,
    /// What hyper read past the response head: the tunnel passes it on first.
    pub early: bytes::Bytes,
    _worker: WorkerSlot,
}

impl UpgradedUpstream {
    /// Takes the connection back from hyper; every HTTP/1.1 connection of the pool is one.
    pub fn take(upgraded: hyper::upgrade::Upgraded) -> Result<Self, hyper::upgrade::Upgraded> {
        let parts = upgraded.downcast::<PooledIo>()?;
        Ok(UpgradedUpstream {
            io: parts.io.io.into_inner(),
            early: parts.read_buf,
            _worker: parts.io._worker,
        })
    }
}

/// A pooled connection's transport: the counted upstream connection and its worker's count.
struct PooledIo {
    io: TokioIo<UpstreamIo>,
    _worker: WorkerSlot,
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// One request counted as pending (cluster-wide, in `upstream_rq_pending_active` and in its
/// host's `rq_pending_active`).
struct Pending<'a> {
    dialer: &'a Dialer,
    host: &'a HostStats,
}

impl<'a> Pending<'a> {
    fn try_new(dialer: &'a Dialer, host: &'a HostStats) -> Result<Pending<'a>, PoolError> {
        let limit = &dialer.pending;
        let stats = &dialer.connector.stats;
        if limit
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit.max).then_some(n + 1)
            })
            .is_err()
        {
            stats.upstream_rq_pending_overflow.inc();
            return Err(PoolError::Overflow);
        }
        stats.upstream_rq_pending_total.inc();
        stats.upstream_rq_pending_active.inc();
        host.rq_pending_active.inc();
        Ok(Pending { dialer, host })
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.dialer.pending.pending.fetch_sub(1, Ordering::Relaxed);
        self.dialer.connector.stats.upstream_rq_pending_active.dec();
        self.host.rq_pending_active.dec();
    }
}

/// What a pending HTTP/1.1 request got first.
enum Got {
    Slot(Slot),
    Idle(Http1Sender),
}

/// Opens connections for the pools: the cluster's connector, the pending-request breaker and
/// the HTTP settings of its connections.
#[derive(Debug)]
struct Dialer {
    connector: Arc<Connector>,
    pending: PendingLimit,
    /// `per_host_thresholds.max_connections`: connections to one host, across workers.
    per_host_max_connections: Option<u64>,
    max_headers_count: usize,
    http2: Http2Options,
}

impl Dialer {
    fn try_slot(&self, worker: &Arc<WorkerPool>, host: &Host) -> Option<Slot> {
        if self
            .per_host_max_connections
            .is_some_and(|max| host.stats().cx_active.get() >= max)
        {
            return None;
        }
        let limit = self.connector.limit.try_acquire()?;
        Some(Slot::new(limit, worker, host))
    }

    /// Waits for a connection slot or, when `idle_too`, an HTTP/1.1 connection handed back to
    /// this worker's pool, whichever comes first.
    async fn wait_for_slot(&self, worker: &Arc<WorkerPool>, host: &Host, idle_too: bool) -> Got {
        let mut overflowed = false;
        loop {
            // Created before the checks, so a release in between still wakes us.
            let freed = self.connector.limit.freed.notified();
            let released = worker.released.notified();
            if let Some(slot) = self.try_slot(worker, host) {
                return Got::Slot(slot);
            }
            if idle_too && let Some(sender) = worker.take_idle(host.addr) {
                return Got::Idle(sender);
            }
            if !overflowed {
                overflowed = true;
                self.connector.stats.upstream_cx_overflow.inc();
            }
            // Envoy's rule: a pool with no connection to the host gets one over the limit,
            // else requests queued here could wait on connections idle in another worker.
            if worker.open_connections(host.addr) == 0 {
                return Got::Slot(Slot::new(self.connector.limit.acquire_over(), worker, host));
            }
            tokio::select! {
                () = freed => {}
                () = released, if idle_too => {}
            }
        }
    }

    /// Opens a connection in `slot` through the cluster's connector; the worker's count of
    /// it travels with the connection.
    async fn connect(
        &self,
        host: &Host,
        slot: Slot,
    ) -> Result<(PooledIo, Option<SocketAddr>, Arc<InFlight>), PoolError> {
        let Slot { limit, worker } = slot;
        let io = self
            .connector
            .connect(host.addr, &host.state, limit)
            .await
            .map_err(|error| PoolError::Connect {
                reason: error.to_string().into(),
                transport: error.transport,
            })?;
        let local = io.local_addr();
        let in_flight = io.requests().unwrap_or_default();
        let io = PooledIo {
            io: TokioIo::new(io),
            _worker: worker,
        };
        Ok((io, local, in_flight))
    }

    /// A new HTTP/1.1 connection, or an idle one handed back while this request was pending.
    async fn http1_connection(
        &self,
        worker: &Arc<WorkerPool>,
        host: &Host,
    ) -> Result<Http1Sender, PoolError> {
        let pending = Pending::try_new(self, host.stats())?;
        let slot = match self.wait_for_slot(worker, host, true).await {
            Got::Slot(slot) => slot,
            Got::Idle(sender) => return Ok(sender),
        };
        self.connector.stats.upstream_cx_http1_total.inc();
        let (io, local, in_flight) = self.connect(host, slot).await?;
        let mut builder = http1::Builder::new();
        // As downstream: an explicit limit costs hyper a filled vector per response.
        if self.max_headers_count != remora_config::common::DEFAULT_MAX_HEADERS_COUNT as usize {
            builder.max_headers(self.max_headers_count);
        }
        let (sender, connection) = builder.handshake(io).await.map_err(PoolError::connect)?;
        // Upgrades: a 101 hands the connection to the WebSocket (or other) tunnel.
        tokio::spawn(connection.with_upgrades());
        drop(pending);
        Ok(Conn::new(sender, local, in_flight))
    }

    /// Opens the worker's HTTP/2 connection to the host and records it in the pool.
    async fn http2_connection(
        self: Arc<Self>,
        worker: Arc<WorkerPool>,
        host: Arc<Host>,
    ) -> Result<Http2Sender, PoolError> {
        let addr = host.addr;
        let opened = async {
            let slot = match self.wait_for_slot(&worker, &host, false).await {
                Got::Slot(slot) => slot,
                // Only HTTP/1.1 waits take idle connections.
                Got::Idle(_) => {
                    return Err(PoolError::connect("unexpected idle HTTP/1.1 connection"));
                }
            };
            self.connector.stats.upstream_cx_http2_total.inc();
            let (io, local, in_flight) = self.connect(&host, slot).await?;
            let options = &self.http2;
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .initial_stream_window_size(options.initial_stream_window_size)
                .initial_connection_window_size(options.initial_connection_window_size);
            if let Some(keepalive) = options.keepalive {
                builder
                    .keep_alive_interval(keepalive.interval)
                    .keep_alive_timeout(keepalive.timeout)
                    .keep_alive_while_idle(true);
            }
            let (sender, connection) = builder.handshake(io).await.map_err(PoolError::connect)?;
            tokio::spawn(connection);
            Ok(Conn::new(sender, local, in_flight))
        }
        .await;
        let mut hosts = worker.hosts();
        let entry = hosts.entry(addr).or_default();
        entry.http2_connect = None;
        match opened {
            Ok(sender) => {
                entry.http2 = Some(sender.clone());
                Ok(sender)
            }
            Err(error) => {
                if entry.open == 0 {
                    hosts.remove(&addr);
                }
                Err(error)
            }
        }
    }
}

/// A request's place on its connection until its response has been read in full: then give
/// it back with [`Lease::release`]. An HTTP/1.1 connection is on loan to the request, and
/// goes back to its pool; dropping the lease instead closes it (and counts the request as
/// given up on it).
pub struct Lease {
    /// HTTP/1.1: the connection, its worker's pool and its host's address.
    http1: Option<(Http1Sender, Arc<WorkerPool>, SocketAddr)>,
    request: RequestOnConnection,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = self.http1.as_ref().map(|(_, _, addr)| addr);
        f.debug_struct("Lease").field("addr", &addr).finish()
    }
}

impl Lease {
    /// The response failed with `error` before its end.
    pub fn failed(&mut self, error: &hyper::Error) {
        self.request.failed(error);
    }

    /// The response was read in full. An HTTP/1.1 connection goes back to its pool: hyper
    /// marks it ready once it has finished both the request and the response, which has
    /// nearly always happened by the time the response body ends; if not (the request body is
    /// still going), a task waits for it. `now`: the caller's clock read, from which the
    /// connection counts as idle.
    pub fn release(self, now: Instant) {
        let Lease { http1, mut request } = self;
        request.answered();
        let Some((mut sender, worker, addr)) = http1 else {
            return;
        };
        // Its last request: closed (by dropping it) rather than pooled.
        if worker
            .max_requests
            .is_some_and(|max| sender.used.load(Ordering::Relaxed) >= max)
        {
            worker.stats.upstream_cx_max_requests.inc();
            return;
        }
        if sender.is_ready() {
            worker.put_idle(addr, sender, now);
        } else if !sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    worker.put_idle(addr, sender, Instant::now());
                }
            });
        }
    }
}

/// A cluster's pools, one per worker plus one for the main thread.
#[derive(Debug)]
pub struct Pools {
    /// Made on a worker's first request: most clusters see traffic from few workers, or none.
    workers: Box<[OnceLock<Arc<WorkerPool>>]>,
    dialer: Arc<Dialer>,
    protocol: UpstreamProtocol,
    idle_timeout: Option<Duration>,
    max_requests: Option<u32>,
}

/// A removed or replaced cluster closes its idle connections at once (as Envoy drains them);
/// connections still carrying a request close when it ends. Without this, each idle one would
/// keep its worker pool alive through its slot until the idle timeout.
impl Drop for Pools {
    fn drop(&mut self) {
        for worker in self.workers.iter().filter_map(OnceLock::get) {
            worker.hosts().clear();
        }
    }
}

impl Pools {
    /// Pools for one routing priority of `cluster`, under that priority's `thresholds`.
    pub fn new(
        cluster: &Cluster,
        thresholds: &Thresholds,
        connector: Arc<Connector>,
        workers: usize,
    ) -> Self {
        Pools {
            workers: (0..workers + 1).map(|_| OnceLock::new()).collect(),
            dialer: Arc::new(Dialer {
                connector,
                pending: PendingLimit {
                    pending: AtomicUsize::new(0),
                    max: thresholds.max_pending_requests as usize,
                },
                per_host_max_connections: cluster.per_host_max_connections.map(u64::from),
                max_headers_count: cluster.max_headers_count as usize,
                http2: cluster.http2,
            }),
            protocol: cluster.protocol,
            idle_timeout: cluster.idle_timeout,
            max_requests: cluster.max_requests_per_connection,
        }
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// Requests waiting for a connection, and the limit (for the circuit breaker gauges).
    pub fn pending(&self) -> (u64, u64) {
        let limit = &self.dialer.pending;
        (
            limit.pending.load(Ordering::Relaxed) as u64,
            limit.max as u64,
        )
    }

    /// Sends `request` (origin-form URI, `Host` header set) to the endpoint at `addr` on the
    /// calling worker's pool. An HTTP/1.1 response comes with the [`Lease`] of its connection.
    /// `local`, if given, gets the connection's local address.
    pub async fn send(
        &self,
        host: &Arc<Host>,
        request: Request<OutgoingBody>,
        local: Option<&LocalAddress>,
    ) -> Result<(Response<Incoming>, Option<Lease>), PoolError> {
        let worker = self.workers[worker_index(self.workers.len())].get_or_init(|| {
            WorkerPool::start(
                self.idle_timeout,
                self.max_requests,
                &self.dialer.connector.stats,
            )
        });
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_http1(worker, host, request, local).await,
            UpstreamProtocol::Http2 => {
                let (response, lease) = self.send_http2(worker, host, request, local).await?;
                Ok((response, Some(lease)))
            }
        }
    }

    async fn send_http1(
        &self,
        worker: &Arc<WorkerPool>,
        host: &Host,
        mut request: Request<OutgoingBody>,
        local: Option<&LocalAddress>,
    ) -> Result<(Response<Incoming>, Option<Lease>), PoolError> {
        let addr = host.addr;
        loop {
            let (mut sender, reused) = match worker.take_idle(addr) {
                Some(sender) => (sender, true),
                // Boxed: a connect is rare, and its state would otherwise widen every
                // request's future (moved whole at each hop).
                None => (
                    Box::pin(self.dialer.http1_connection(worker, host)).await?,
                    false,
                ),
            };
            note(local, sender.local);
            // One sender carries one request at a time, so the count cannot pass the bound;
            // without a bound nothing is counted (an atomic add per request saved).
            if self.max_requests.is_some() {
                sender.count_request(None);
            }
            let mut on_connection = RequestOnConnection::new(&sender.in_flight, true);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        http1: Some((sender, worker.clone(), addr)),
                        request: on_connection,
                    };
                    return Ok((response, Some(lease)));
                }
                Err(mut error) => match error.take_message() {
                    // An idle connection the upstream closed before the request went out:
                    // try the next one (each retry uses up an idle connection).
                    Some(unsent) if reused => {
                        on_connection.unsent();
                        request = unsent;
                    }
                    _ => return Err(PoolError::Request(Arc::new(error.into_error()))),
                },
            }
        }
    }

    async fn send_http2(
        &self,
        worker: &Arc<WorkerPool>,
        host: &Arc<Host>,
        mut request: Request<OutgoingBody>,
        local: Option<&LocalAddress>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        to_http2_form(&mut request, host.addr);
        let mut retried = false;
        loop {
            let mut sender = self.http2_sender(worker, host).await?;
            note(local, sender.local);
            let mut on_connection = RequestOnConnection::new(&sender.in_flight, false);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        http1: None,
                        request: on_connection,
                    };
                    return Ok((response, lease));
                }
                Err(mut error) => match error.take_message() {
                    // The connection closed (GOAWAY) before the stream opened: once more on
                    // a fresh one.
                    Some(unsent) if !retried => {
                        on_connection.unsent();
                        retried = true;
                        request = unsent;
                    }
                    _ => {
                        let error = error.into_error();
                        on_connection.failed(&error);
                        return Err(PoolError::Request(Arc::new(error)));
                    }
                },
            }
        }
    }

    /// The HTTP/2 connection one request goes out on (the worker's, or a new one).
    /// With `max_requests_per_connection`, a connection that reaches it leaves the pool (its
    /// streams finish; then it closes) and the next request opens another.
    async fn http2_sender(
        &self,
        worker: &Arc<WorkerPool>,
        host: &Arc<Host>,
    ) -> Result<Http2Sender, PoolError> {
        loop {
            let sender = self.http2_candidate(worker, host).await?;
            let (may, last) = sender.count_request(self.max_requests);
            if last {
                let mut hosts = worker.hosts();
                if let Some(open) = hosts.get_mut(&host.addr)
                    && open
                        .http2
                        .as_ref()
                        .is_some_and(|current| Arc::ptr_eq(&current.used, &sender.used))
                {
                    open.http2 = None;
                    worker.stats.upstream_cx_max_requests.inc();
                }
            }
            if may {
                return Ok(sender);
            }
        }
    }

    /// The worker's open HTTP/2 connection to `addr`, or the connect every request waits on.
    async fn http2_candidate(
        &self,
        worker: &Arc<WorkerPool>,
        host: &Arc<Host>,
    ) -> Result<Http2Sender, PoolError> {
        if let Some(open) = worker.hosts().get(&host.addr)
            && let Some(sender) = &open.http2
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let _pending = Pending::try_new(&self.dialer, host.stats())?;
        let connecting = worker
            .hosts()
            .entry(host.addr)
            .or_default()
            .http2_connect
            .get_or_insert_with(|| {
                self.dialer
                    .clone()
                    .http2_connection(worker.clone(), host.clone())
                    .boxed()
                    .shared()
            })
            .clone();
        connecting.await
    }
}

/// HTTP/2 carries the host in `:authority`, taken from the URI: the request's `Host` becomes
/// the authority (as Envoy's codec does), else the endpoint address.
fn to_http2_form(request: &mut Request<OutgoingBody>, addr: SocketAddr) {
    let host = request.headers_mut().remove(http::header::HOST);
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(addr.to_string()).ok());
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}
