//! Listeners: bind each configured address once (SO_REUSEPORT sockets shared by every worker's
//! accept loop), run the listener filters (`original_dst`, `tls_inspector`), pick a filter chain
//! and hand the connection to `tcp_proxy` or the HTTP connection manager.
//!
//! Listener updates reuse the bound socket and drain the old listener's connections; removals
//! stop accepting and drain. Open connections are never cut before the drain time.

pub mod tls_inspector;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures::FutureExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{FilterChain, Listener, NetworkFilter};
use crate::drain::Drain;
use crate::filter_chain::{self, ConnectionInfo};
use crate::server::Server;
use crate::stats::{GaugeGuard, HttpStats, ListenerStats, TcpStats};

/// Per-chain state registered when the listener starts (stats handles).
#[derive(Debug)]
pub enum ChainRuntime {
    Tcp(Arc<TcpStats>),
    Http(Arc<HttpStats>),
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
    chains: Vec<(Arc<FilterChain>, ChainRuntime)>,
    stop: watch::Sender<bool>,
    /// The runtime's `connection_limit` for this listener, and its open connections.
    connection_limit: Option<u64>,
    connections: AtomicU64,
}

impl ActiveListener {
    fn chain_runtime(&self, chain: &Arc<FilterChain>) -> Option<&ChainRuntime> {
        self.chains
            .iter()
            .find(|(c, _)| Arc::ptr_eq(c, chain))
            .map(|(_, rt)| rt)
    }

    fn stop_accepting(&self) {
        self.stop.send_replace(true);
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
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
#[derive(Debug, Default)]
pub struct ListenerManager {
    active: Mutex<BTreeMap<String, Arc<ActiveListener>>>,
    /// The active listeners by configured address, for handing over connections redirected by
    /// `use_original_dst`: rebuilt on add/update/remove (rare), read without a lock per
    /// connection (a sidecar's capture listener does this for every connection).
    by_address: ArcSwap<HashMap<SocketAddr, Arc<ActiveListener>>>,
    draining: Mutex<Vec<Arc<ActiveListener>>>,
}

impl ListenerManager {
    /// Starts or updates a listener. An unchanged listener is left alone.
    pub fn add_or_update(
        &self,
        server: &Arc<Server>,
        config: Arc<Listener>,
    ) -> std::io::Result<SocketAddr> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let old = active.get(&config.name).cloned();
        if let Some(old) = &old
            && old.config.raw == config.raw
        {
            return Ok(old.local_addr);
        }
        // Reuse the old sockets when the address is unchanged, so no connection is refused.
        let sockets = match &old {
            Some(old) if old.config.address == config.address => old
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            _ => bind(config.address, server.workers.len())?,
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
        let stats = Arc::new(ListenerStats::new(&server.registry, &stats_addr));
        let mut chains = Vec::new();
        for chain in config
            .filter_chains
            .iter()
            .chain(config.default_filter_chain.iter())
        {
            let runtime = match &chain.filter {
                NetworkFilter::TcpProxy(tcp) => {
                    ChainRuntime::Tcp(Arc::new(TcpStats::new(&server.registry, &tcp.stat_prefix)))
                }
                NetworkFilter::Http(hcm) => {
                    ChainRuntime::Http(Arc::new(HttpStats::new(&server.registry, &hcm.stat_prefix)))
                }
            };
            chains.push((chain.clone(), runtime));
        }
        let (stop, _) = watch::channel(false);
        let config_name = config.name.clone();
        let listener = Arc::new(ActiveListener {
            config,
            local_addr,
            drain: Drain::new(),
            stats,
            sockets: Mutex::new(sockets.clone()),
            chains,
            stop,
            connection_limit: server
                .bootstrap
                .runtime
                .listener_connection_limits
                .get(&config_name)
                .copied(),
            connections: AtomicU64::new(0),
        });
        for (index, worker) in server.workers.iter().enumerate() {
            let socket = sockets[index % sockets.len()].clone();
            worker.spawn(accept_loop(server.clone(), listener.clone(), socket));
        }
        active.insert(listener.config.name.clone(), listener.clone());
        self.reindex(&active);
        drop(active);
        tracing::info!(name = %listener.config.name, address = %local_addr, "listener started");
        if let Some(old) = old {
            self.retire(server, old);
        }
        Ok(local_addr)
    }

    /// Stops a listener and drains its connections.
    pub fn remove(&self, server: &Arc<Server>, name: &str) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let removed = active.remove(name);
        self.reindex(&active);
        drop(active);
        if let Some(old) = removed {
            tracing::info!(name, "listener removed; draining");
            self.retire(server, old);
        }
    }

    fn retire(&self, server: &Arc<Server>, old: Arc<ActiveListener>) {
        old.stop_accepting();
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old.clone());
        let deadline = server.drain_time;
        let owner = server.clone();
        server.main.spawn(async move {
            old.drain.drain(deadline).await;
            let mut draining = owner
                .listeners
                .draining
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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

async fn accept_loop(
    server: Arc<Server>,
    listener: Arc<ActiveListener>,
    socket: Arc<std::net::TcpListener>,
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
                    tokio::spawn(serve_connection(server.clone(), listener.clone(), stream, peer));
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
        tokio::spawn(serve_connection(
            server.clone(),
            listener.clone(),
            stream,
            peer,
        ));
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
    server: Arc<Server>,
    listener: Option<Arc<ActiveListener>>,
}

impl Admitted {
    /// Counts a connection accepted on `listener` (`None`: the admin), or refuses it when a
    /// limit is reached.
    pub fn try_new(server: &Arc<Server>, listener: Option<&Arc<ActiveListener>>) -> Option<Self> {
        fn within(count: &AtomicU64, limit: Option<u64>) -> bool {
            count
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    limit.is_none_or(|limit| n < limit).then_some(n + 1)
                })
                .is_ok()
        }
        let global = server.bootstrap.runtime.global_max_connections;
        if !within(&server.downstream_connections, global) {
            if let Some(listener) = listener {
                listener.stats.downstream_global_cx_overflow.inc();
            }
            return None;
        }
        if let Some(listener) = listener
            && !within(&listener.connections, listener.connection_limit)
        {
            server
                .downstream_connections
                .fetch_sub(1, Ordering::Relaxed);
            listener.stats.downstream_cx_overflow.inc();
            return None;
        }
        Some(Admitted {
            server: server.clone(),
            listener: listener.cloned(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.server
            .downstream_connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(listener) = &self.listener {
            listener.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

async fn serve_connection(
    server: Arc<Server>,
    listener: Arc<ActiveListener>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    // Over a connection limit: closed before anything is read, as Envoy does at accept.
    let Some(_admitted) = Admitted::try_new(&server, Some(&listener)) else {
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
            && let Some(target) = server.listeners.by_address(original)
        {
            listener = target;
        }
    }
    let config = listener.config.clone();
    listener.stats.downstream_cx_total.inc();
    let _active = GaugeGuard::new(&listener.stats.downstream_cx_active);
    let watch = listener.drain.watch();
    let mut info = ConnectionInfo {
        destination,
        source: peer,
        direct_source: peer,
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: Vec::new(),
    };
    if config.tls_inspector {
        match tls_inspector::inspect(&stream, config.listener_filters_timeout).await {
            Some(hello) => {
                if hello.tls {
                    info.transport_protocol = "tls";
                }
                info.server_name = hello.server_name;
                info.application_protocols = hello.alpn;
            }
            None if config.continue_on_listener_filters_timeout => {}
            None => return,
        }
    }
    let Some(chain) = filter_chain::select(&config, &info) else {
        listener.stats.no_filter_chain_match.inc();
        return;
    };
    let Some(runtime) = listener.chain_runtime(chain) else {
        return;
    };
    match &chain.tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let handshake =
                tokio::time::timeout(config.listener_filters_timeout, acceptor.accept(stream))
                    .await;
            let Ok(Ok(stream)) = handshake else {
                tracing::debug!("downstream TLS handshake failed");
                return;
            };
            let mut info = info;
            info.transport_protocol = "tls";
            dispatch(&server, chain, runtime, stream, info, watch).await;
        }
        None => dispatch(&server, chain, runtime, stream, info, watch).await,
    }
}

/// Hands a (possibly TLS-terminated) connection to its chain's network filter.
async fn dispatch<S>(
    server: &Arc<Server>,
    chain: &FilterChain,
    runtime: &ChainRuntime,
    stream: S,
    info: ConnectionInfo,
    watch: crate::drain::Watch,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match (&chain.filter, runtime) {
        (NetworkFilter::TcpProxy(tcp), ChainRuntime::Tcp(stats)) => {
            crate::tcp_proxy::serve(server, tcp, stats, stream, &info, watch).await;
        }
        (NetworkFilter::Http(hcm), ChainRuntime::Http(stats)) => {
            crate::http::conn_manager::serve(
                server.clone(),
                hcm.clone(),
                stats.clone(),
                stream,
                info,
                watch,
            )
            .await;
        }
        _ => {}
    }
}
