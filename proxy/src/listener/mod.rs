//! Listeners: bind each configured address once (SO_REUSEPORT sockets shared by every worker's
//! accept loop), run the listener filters (`original_dst`, `tls_inspector`), pick a filter chain
//! and hand the connection to its network filters: the RBAC filters (`network_filters`), then
//! `tcp_proxy` or the HTTP connection manager.
//!
//! Starting a listener builds each filter chain's runtime (rustls config, connection manager
//! with its filters and access logs, `tcp_proxy` stats); an error there names the field and the
//! listener is not started. Listener updates reuse the bound socket and drain the old
//! listener's connections; removals stop accepting and drain. Open connections are never cut
//! before the drain time.

pub mod tls_inspector;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures::FutureExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{ConfigError, FilterChain, Listener, NetworkFilter, Runtime};
use crate::drain::Drain;
use crate::filter_chain::{self, ConnectionInfo};
use crate::http::manager::Manager;
use crate::network_filters::rbac::{FirstByteGate, NetworkRbacRuntime};
use crate::stats::{GaugeGuard, ListenerStats, Registry, SslStats, TcpStats};
use crate::store::Store;
use crate::tcp_proxy::TcpProxyRuntime;
use crate::tls::PeerCertificate;
use tls_inspector::NoVerdict;

/// A filter chain's runtime, built when its listener starts.
#[derive(Debug)]
pub enum ChainRuntime {
    Tcp(Arc<TcpProxyRuntime>),
    Http(Arc<Manager>),
}

/// A chain's runtime and its TLS termination.
#[derive(Debug)]
struct BuiltChain {
    config: Arc<FilterChain>,
    /// The chain's RBAC network filters, in order (empty: none).
    rbac: Arc<[NetworkRbacRuntime]>,
    runtime: ChainRuntime,
    tls: Option<Termination>,
}

/// TLS termination: the rustls config and the listener's `ssl.*` stats.
#[derive(Debug)]
struct Termination {
    config: Arc<rustls::ServerConfig>,
    stats: Arc<SslStats>,
}

impl BuiltChain {
    /// Builds a chain of the listener whose stats are `listener.STATS_ADDR.*`.
    fn build(
        chain: &Arc<FilterChain>,
        context: &ListenerContext,
        egress: bool,
        stats_addr: &str,
    ) -> Result<BuiltChain, ConfigError> {
        let filter_path = format!("{}.filters[{}].typed_config", chain.path, chain.rbac.len());
        let runtime = match &chain.filter {
            NetworkFilter::TcpProxy(tcp) => ChainRuntime::Tcp(Arc::new(TcpProxyRuntime {
                config: tcp.clone(),
                stats: Arc::new(TcpStats::new(&context.registry, &tcp.stat_prefix)),
                store: context.store.clone(),
                logs: crate::http::access_log::for_filter(
                    &tcp.access_logs,
                    &context.registry,
                    &filter_path,
                )?,
            })),
            NetworkFilter::Http(hcm) => ChainRuntime::Http(Manager::build(
                hcm.clone(),
                &context.registry,
                context.store.clone(),
                (&context.tracing, egress),
                &context.lifecycle,
                (&filter_path, stats_addr),
            )?),
        };
        let tls = chain
            .tls
            .as_ref()
            .map(|tls| {
                let stats = SslStats::new(&context.registry, &format!("listener.{stats_addr}"));
                crate::tls::server_config(tls, &context.secrets, &stats)
                    .map(|config| Termination { config, stats })
            })
            .transpose()?;
        let rbac = chain
            .rbac
            .iter()
            .map(|config| NetworkRbacRuntime::new(config.clone(), &context.registry))
            .collect();
        Ok(BuiltChain {
            config: chain.clone(),
            rbac,
            runtime,
            tls,
        })
    }
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind: {0}")]
    Bind(#[from] std::io::Error),
    #[error("duplicate address {address} as existing listener {holder:?}")]
    DuplicateAddress { address: SocketAddr, holder: String },
}

/// What listeners need from the rest of the proxy.
#[derive(Debug)]
pub struct ListenerContext {
    pub workers: Vec<tokio::runtime::Handle>,
    pub main: tokio::runtime::Handle,
    pub drain_time: std::time::Duration,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub limits: Arc<ConnectionLimits>,
    /// Node identity and settings every tracer shares.
    pub tracing: crate::http::tracing::TracingContext,
    /// SDS secrets that TLS contexts name.
    pub secrets: Arc<crate::tls::Secrets>,
    /// The server's state, for the health check filter and `/healthcheck/fail`'s drain close.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

/// Downstream connection limits from the runtime: across all listeners and per listener.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    /// Downstream connections open on all listeners (`global_downstream_max_connections`).
    open: AtomicU64,
    global_max: Option<u64>,
    per_listener: HashMap<String, u64>,
    /// Admin connections neither count towards nor are refused by the global limit.
    admin_ignores_global: bool,
}

impl ConnectionLimits {
    pub fn new(runtime: &Runtime, admin_ignores_global: bool) -> Self {
        ConnectionLimits {
            open: AtomicU64::new(0),
            global_max: runtime.global_max_connections,
            per_listener: runtime.listener_connection_limits.clone(),
            admin_ignores_global,
        }
    }

    pub fn admin_ignores_global(&self) -> bool {
        self.admin_ignores_global
    }
}

/// A listener that is accepting (or draining).
#[derive(Debug)]
pub struct ActiveListener {
    pub config: Arc<Listener>,
    pub local_addr: SocketAddr,
    pub drain: Drain,
    pub stats: Arc<ListenerStats>,
    /// The bound sockets; released when the listener stops accepting so the port closes
    /// (an update on the same address keeps them open through its own references).
    sockets: Mutex<Vec<Arc<std::net::TcpListener>>>,
    chains: Vec<BuiltChain>,
    stop: watch::Sender<bool>,
    /// The runtime's `connection_limit` for this listener, and its open connections.
    connection_limit: Option<u64>,
    connections: AtomicU64,
}

impl ActiveListener {
    fn built(&self, chain: &Arc<FilterChain>) -> Option<&BuiltChain> {
        self.chains
            .iter()
            .find(|built| Arc::ptr_eq(&built.config, chain))
    }

    fn stop_accepting(&self) {
        self.stop.send_replace(true);
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// The listener among `active` that `config` would share an address with
/// ([`Listener::collides_with`]).
fn holder_of(active: &BTreeMap<String, Arc<ActiveListener>>, config: &Listener) -> Option<String> {
    active
        .values()
        .find(|other| config.collides_with(&other.config))
        .map(|other| other.config.name.clone())
}

fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<Arc<std::net::TcpListener>>> {
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).ok();
        }
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        sockets.push(Arc::new(listener));
    }
    Ok(sockets)
}

/// Every listener by name, plus the ones still draining.
#[derive(Debug)]
pub struct ListenerManager {
    context: ListenerContext,
    active: Mutex<BTreeMap<String, Arc<ActiveListener>>>,
    /// The active listeners by configured address, for handing over connections redirected by
    /// `use_original_dst`: rebuilt on add/update/remove (rare), read without a lock per
    /// connection (a sidecar's capture listener does this for every connection).
    by_address: ArcSwap<HashMap<SocketAddr, Arc<ActiveListener>>>,
    draining: Mutex<Vec<Arc<ActiveListener>>>,
}

impl ListenerManager {
    pub fn new(context: ListenerContext) -> Arc<Self> {
        Arc::new(ListenerManager {
            context,
            active: Mutex::default(),
            by_address: ArcSwap::default(),
            draining: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &Arc<ConnectionLimits> {
        &self.context.limits
    }

    /// Starts or updates a listener. An unchanged listener is left alone.
    pub fn add_or_update(
        self: &Arc<Self>,
        config: Arc<Listener>,
    ) -> Result<SocketAddr, StartError> {
        let context = &self.context;
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let old = active.get(&config.name).cloned();
        if let Some(old) = &old
            && old.config.raw == config.raw
        {
            return Ok(old.local_addr);
        }
        if let Some(holder) = holder_of(&active, &config) {
            return Err(StartError::DuplicateAddress {
                address: config.address,
                holder,
            });
        }
        // Reuse the old sockets when the address is unchanged, so no connection is refused.
        let sockets = match &old {
            Some(old) if old.config.address == config.address => old
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            _ => bind(config.address, context.workers.len())?,
        };
        let local_addr = sockets
            .first()
            .map(|s| s.local_addr())
            .transpose()?
            .unwrap_or(config.address);
        let stats_addr = if config.address.port() == 0 {
            local_addr.to_string()
        } else {
            config.address.to_string()
        };
        let chains = config
            .chains()
            .map(|chain| {
                BuiltChain::build(
                    chain,
                    context,
                    config.outbound,
                    &stats_addr.replace(':', "_"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stats = Arc::new(ListenerStats::new(
            &context.registry,
            &stats_addr,
            context.workers.len(),
        ));
        let (stop, _) = watch::channel(false);
        let listener = Arc::new(ActiveListener {
            connection_limit: context.limits.per_listener.get(&config.name).copied(),
            config,
            local_addr,
            drain: Drain::new(),
            stats,
            sockets: Mutex::new(sockets.clone()),
            chains,
            stop,
            connections: AtomicU64::new(0),
        });
        for (index, worker) in context.workers.iter().enumerate() {
            let socket = sockets[index % sockets.len()].clone();
            worker.spawn(accept_loop(self.clone(), listener.clone(), socket, index));
        }
        // Envoy counts a listener's start once on each worker.
        context
            .registry
            .counter("listener_manager.listener_create_success")
            .add(context.workers.len() as u64);
        active.insert(listener.config.name.clone(), listener.clone());
        self.reindex(&active);
        drop(active);
        tracing::info!(name = %listener.config.name, address = %local_addr, "listener started");
        if let Some(old) = old {
            self.retire(old);
        }
        Ok(local_addr)
    }

    /// The active listener `config` would share an address with, if any.
    pub fn address_holder(&self, config: &Listener) -> Option<String> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        holder_of(&active, config)
    }

    /// Stops a listener and drains its connections.
    pub fn remove(self: &Arc<Self>, name: &str) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let removed = active.remove(name);
        self.reindex(&active);
        drop(active);
        if let Some(old) = removed {
            tracing::info!(name, "listener removed; draining");
            self.retire(old);
        }
    }

    fn retire(self: &Arc<Self>, old: Arc<ActiveListener>) {
        old.stop_accepting();
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old.clone());
        let deadline = self.context.drain_time;
        let owner = self.clone();
        self.context.main.spawn(async move {
            old.drain.drain(deadline).await;
            let mut draining = owner.draining.lock().unwrap_or_else(|p| p.into_inner());
            draining.retain(|l| !Arc::ptr_eq(l, &old));
        });
    }

    pub fn names(&self) -> Vec<String> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn list(&self) -> Vec<Arc<ActiveListener>> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Downstream connections open on every listener, draining ones included (Envoy's
    /// `server.total_connections`; the admin's are not counted).
    pub fn open_connections(&self) -> u64 {
        let open = |listener: &Arc<ActiveListener>| listener.connections.load(Ordering::Relaxed);
        let active: u64 = {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            active.values().map(open).sum()
        };
        let draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        active + draining.iter().map(open).sum::<u64>()
    }

    pub fn draining_count(&self) -> usize {
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn reindex(&self, active: &BTreeMap<String, Arc<ActiveListener>>) {
        let index = active
            .values()
            .map(|l| (l.config.address, l.clone()))
            .collect();
        self.by_address.store(Arc::new(index));
    }

    /// The listener for a connection's original destination: one bound to exactly that
    /// address, else a wildcard one on its port (same address family first).
    fn by_address(&self, addr: SocketAddr) -> Option<Arc<ActiveListener>> {
        let index = self.by_address.load();
        let wildcards: [IpAddr; 2] = if addr.is_ipv4() {
            [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
        } else {
            [Ipv6Addr::UNSPECIFIED.into(), Ipv4Addr::UNSPECIFIED.into()]
        };
        std::iter::once(addr)
            .chain(wildcards.map(|ip| SocketAddr::new(ip, addr.port())))
            .find_map(|candidate| index.get(&candidate).cloned())
    }

    /// Stops the listeners accepting (only the `INBOUND` ones when `inbound_only`) and, when
    /// `graceful`, waits for their connections to drain or the deadline.
    pub async fn drain_all(
        &self,
        deadline: std::time::Duration,
        graceful: bool,
        inbound_only: bool,
    ) {
        let all: Vec<Arc<ActiveListener>> = self
            .list()
            .into_iter()
            .filter(|listener| !inbound_only || listener.config.inbound)
            .collect();
        for listener in &all {
            listener.stop_accepting();
        }
        if graceful {
            futures::future::join_all(all.iter().map(|l| l.drain.drain(deadline))).await;
        }
    }
}

/// Accepts connections on `socket` for worker `worker` (its index, for the worker's stats).
async fn accept_loop(
    manager: Arc<ListenerManager>,
    listener: Arc<ActiveListener>,
    socket: Arc<std::net::TcpListener>,
    worker: usize,
) {
    let cloned = socket.try_clone();
    drop(socket); // only the registered clone and the listener's list keep the port open
    let std_listener = match cloned {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot clone listening socket");
            return;
        }
    };
    let accepting = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "cannot register listening socket");
            return;
        }
    };
    let mut stop = listener.stop.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = accepting.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Boxed: the connection's future is some 14 KB (every filter's state), and
                    // the task would otherwise move it several times on spawn and again on
                    // completion (a tenth of the handshake profile's memmove).
                    tokio::spawn(Box::pin(serve_connection(
                        manager.clone(),
                        listener.clone(),
                        (stream, peer),
                        worker,
                    )));
                }
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::task::yield_now().await;
                }
            },
        }
    }
    // Connections already queued on this socket go to the old config rather than being lost.
    while let Some(Ok((stream, peer))) = accepting.accept().now_or_never() {
        tokio::spawn(Box::pin(serve_connection(
            manager.clone(),
            listener.clone(),
            (stream, peer),
            worker,
        )));
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        let now = *stop.borrow_and_update();
        if now {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// IPv4 peers on dual-stack sockets appear v4-mapped; match and connect with plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The destination before an iptables REDIRECT (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).
/// IPv4 connections accepted on a dual-stack socket show a v4-mapped local address.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if v4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    original.ok().and_then(|a| a.as_socket())
}

/// A downstream connection counted against the runtime's connection limits until it closes:
/// `global_downstream_max_connections` across every listener (the admin's included, unless it
/// ignores the limit, as in Envoy) and the listener's own `connection_limit`.
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    listener: Option<Arc<ActiveListener>>,
    /// Counted in the global limit (not for a listener with `ignore_global_conn_limit`).
    global: bool,
}

impl Admitted {
    /// Counts a connection accepted on `listener` (`None`: the admin), or refuses it when a
    /// limit is reached.
    pub fn try_new(
        limits: &Arc<ConnectionLimits>,
        listener: Option<&Arc<ActiveListener>>,
    ) -> Option<Self> {
        fn within(count: &AtomicU64, limit: Option<u64>) -> bool {
            count
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    limit.is_none_or(|limit| n < limit).then_some(n + 1)
                })
                .is_ok()
        }
        let global = listener.is_none_or(|l| !l.config.ignores_global_limit);
        if global && !within(&limits.open, limits.global_max) {
            if let Some(listener) = listener {
                listener.stats.downstream_global_cx_overflow.inc();
            }
            return None;
        }
        if let Some(listener) = listener
            && !within(&listener.connections, listener.connection_limit)
        {
            if global {
                limits.open.fetch_sub(1, Ordering::Relaxed);
            }
            listener.stats.downstream_cx_overflow.inc();
            return None;
        }
        Some(Admitted {
            limits: limits.clone(),
            listener: listener.cloned(),
            global,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.global {
            self.limits.open.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(listener) = &self.listener {
            listener.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection counted under its listener (and the worker that took it) while open, and as
/// destroyed, with its length, once closed.
struct OpenConnection {
    stats: Arc<ListenerStats>,
    opened: std::time::Instant,
    _active: [GaugeGuard; 2],
}

impl OpenConnection {
    fn new(stats: &Arc<ListenerStats>, worker: usize) -> Self {
        let on_worker = &stats.workers[worker % stats.workers.len()];
        stats.downstream_cx_total.inc();
        on_worker.downstream_cx_total.inc();
        OpenConnection {
            stats: stats.clone(),
            opened: std::time::Instant::now(),
            _active: [
                GaugeGuard::new(&stats.downstream_cx_active),
                GaugeGuard::new(&on_worker.downstream_cx_active),
            ],
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.stats.downstream_cx_destroy.inc();
        self.stats
            .downstream_cx_length_ms
            .record_duration(self.opened.elapsed());
    }
}

/// Serves a connection `worker` accepted.
async fn serve_connection(
    manager: Arc<ListenerManager>,
    listener: Arc<ActiveListener>,
    (stream, peer): (TcpStream, SocketAddr),
    worker: usize,
) {
    // Over a connection limit: closed before anything is read, as Envoy does at accept.
    let Some(_admitted) = Admitted::try_new(&manager.context.limits, Some(&listener)) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr().map(canonical) else {
        return;
    };
    let peer = canonical(peer);
    let mut destination = local;
    let mut listener = listener;
    if listener.config.use_original_dst
        && let Some(original) = original_destination(&stream).map(canonical)
    {
        destination = original;
        // Hand the connection to the listener for the original destination, if any.
        if original != local
            && let Some(target) = manager.by_address(original)
        {
            listener = target;
        }
    }
    let config = listener.config.clone();
    let _open = OpenConnection::new(&listener.stats, worker);
    let watch = listener.drain.watch();
    let mut info = ConnectionInfo {
        destination,
        source: peer,
        direct_source: peer,
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: Vec::new(),
        peer_certificate: None,
        tls_terminated: false,
    };
    if config.tls_inspector {
        let inspecting = GaugeGuard::new(&listener.stats.downstream_pre_cx_active);
        let inspected = tls_inspector::inspect(&stream, config.listener_filters_timeout).await;
        drop(inspecting);
        match inspected {
            Ok(hello) => {
                if hello.tls {
                    info.transport_protocol = "tls";
                }
                info.server_name = hello.server_name.map(Arc::from);
                info.application_protocols = hello.alpn;
            }
            Err(NoVerdict::TimedOut) => {
                listener.stats.downstream_pre_cx_timeout.inc();
                if !config.continue_on_listener_filters_timeout {
                    return;
                }
            }
            Err(NoVerdict::Failed) => return,
        }
    }
    let Some(chain) = filter_chain::select(&config, &info) else {
        listener.stats.no_filter_chain_match.inc();
        return;
    };
    let Some(built) = listener.built(chain) else {
        return;
    };
    match &built.tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
            let handshake =
                tokio::time::timeout(config.listener_filters_timeout, acceptor.accept(stream))
                    .await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tls.stats.failed(&error);
                    tracing::debug!(%error, "downstream TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tls.stats.connection_error.inc();
                    tracing::debug!("downstream TLS handshake timed out");
                    return;
                }
            };
            let session = stream.get_ref().1;
            tls.stats.handshake.inc();
            if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                tls.stats.session_reused.inc();
            }
            if session.peer_certificates().is_none() {
                tls.stats.no_certificate.inc();
            }
            let mut info = info;
            info.transport_protocol = "tls";
            info.tls_terminated = true;
            // Without a TLS inspector, the handshake is where the SNI is first seen.
            if info.server_name.is_none() {
                info.server_name = session.server_name().map(Arc::from);
            }
            info.peer_certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Arc::new(PeerCertificate::lazy(leaf.clone())));
            dispatch(built, stream, info, watch).await;
        }
        None => dispatch(built, stream, info, watch).await,
    }
}

/// Hands a (possibly TLS-terminated) connection to its chain's network filters: the RBAC
/// filters, if any, guard the stream the terminal filter gets.
async fn dispatch<S>(
    chain: &BuiltChain,
    stream: S,
    info: ConnectionInfo,
    watch: crate::drain::Watch,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if chain.rbac.is_empty() {
        terminal(&chain.runtime, stream, info, watch).await;
    } else {
        let gated = FirstByteGate::new(stream, chain.rbac.clone(), info.clone());
        terminal(&chain.runtime, gated, info, watch).await;
    }
}

/// Hands a connection to its chain's terminal filter.
async fn terminal<S>(
    runtime: &ChainRuntime,
    stream: S,
    info: ConnectionInfo,
    watch: crate::drain::Watch,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match runtime {
        ChainRuntime::Tcp(tcp) => crate::tcp_proxy::serve(tcp, stream, &info, watch).await,
        ChainRuntime::Http(manager) => {
            crate::http::conn_manager::serve(manager.clone(), stream, info, watch).await
        }
    }
}
