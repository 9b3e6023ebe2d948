//! The process: worker threads (one current-thread runtime each, as Envoy's workers), the main
//! runtime (admin, xDS, DNS, signals), startup from the bootstrap, and graceful shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::cluster::ClusterManager;
use crate::config::{Bootstrap, Node};
use crate::http::router::RouteTable;
use crate::listener::ListenerManager;
use crate::stats::Registry;

/// Server state as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Initializing = 0,
    Live = 1,
    Draining = 2,
}

/// Why the server is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// SIGTERM: drain, then exit.
    Drain,
    /// `/quitquitquit` or SIGINT: exit now.
    Quit,
}

/// Everything shared by the main thread and the workers.
#[derive(Debug)]
pub struct Server {
    pub node: Node,
    pub bootstrap: Bootstrap,
    pub registry: Arc<Registry>,
    pub clusters: ClusterManager,
    /// RDS route tables by name.
    pub routes: ArcSwap<HashMap<String, Arc<RouteTable>>>,
    pub listeners: ListenerManager,
    pub workers: Vec<tokio::runtime::Handle>,
    pub main: tokio::runtime::Handle,
    pub drain_time: Duration,
    pub xds: crate::xds::Status,
    pub started: Instant,
    state: AtomicU8,
    stop: watch::Sender<Stop>,
    /// Downstream connections open on all listeners (`global_downstream_max_connections`).
    pub downstream_connections: std::sync::atomic::AtomicU64,
}

impl Server {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            1 => State::Live,
            2 => State::Draining,
            _ => State::Initializing,
        }
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn request_stop(&self, stop: Stop) {
        self.stop.send_replace(stop);
    }

    pub fn is_static_cluster(&self, name: &str) -> bool {
        self.bootstrap.clusters.iter().any(|c| c.name == name)
    }

    pub fn is_static_listener(&self, name: &str) -> bool {
        self.bootstrap.listeners.iter().any(|l| l.name == name)
    }
}

/// Period of a do-nothing timer on every worker. Tokio wakes its own driver (an eventfd write
/// plus an extra `epoll_wait`) whenever a new timer is due before every registered one; without
/// a timer due sooner, each request's route timeout (15 s by default) would do that, costing
/// two syscalls per request. The price is one wakeup per period on an idle worker.
const TIMER_HEARTBEAT: Duration = Duration::from_secs(5);

/// Runs the proxy until it is told to stop.
pub fn run(bootstrap: Bootstrap, concurrency: usize, drain_time: Duration) -> anyhow::Result<()> {
    // Workers.
    let (park_tx, park_rx) = watch::channel(false);
    let mut threads = Vec::new();
    let mut workers = Vec::new();
    for index in 0..concurrency {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let mut park = park_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("remora-worker-{index}"))
            .spawn(move || {
                crate::pool::set_worker_index(index);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "cannot start worker runtime");
                        return;
                    }
                };
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(async move {
                    let mut heartbeat = tokio::time::interval(TIMER_HEARTBEAT);
                    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = park.wait_for(|stop| *stop) => break,
                            _ = heartbeat.tick() => {}
                        }
                    }
                });
            })?;
        workers.push(handle_rx.recv().context("worker runtime did not start")?);
        threads.push(thread);
    }
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    crate::pool::set_worker_index(concurrency);
    let result = main.block_on(serve(bootstrap, workers, drain_time));
    park_tx.send_replace(true);
    for thread in threads {
        let _ = thread.join();
    }
    result
}

async fn serve(
    bootstrap: Bootstrap,
    workers: Vec<tokio::runtime::Handle>,
    drain_time: Duration,
) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::default());
    let (stop, mut stopped) = watch::channel(Stop::Running);
    let server = Arc::new(Server {
        node: bootstrap.node.clone(),
        clusters: ClusterManager::new(registry.clone(), workers.len()),
        registry,
        routes: ArcSwap::from_pointee(HashMap::new()),
        listeners: ListenerManager::default(),
        main: tokio::runtime::Handle::current(),
        workers,
        drain_time,
        xds: Default::default(),
        started: Instant::now(),
        state: AtomicU8::new(State::Initializing as u8),
        stop,
        downstream_connections: Default::default(),
        bootstrap,
    });
    server.registry.gauge("server.live");
    // Static clusters, then static listeners.
    let clusters: Vec<_> = server
        .bootstrap
        .clusters
        .iter()
        .map(|c| server.clusters.build(c.clone()))
        .collect();
    for cluster in &clusters {
        cluster.start_background();
    }
    server.clusters.insert_all(clusters);
    if let Some(admin) = server.bootstrap.admin {
        let listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot bind admin address {admin}"))?;
        tracing::info!(address = %listener.local_addr()?, "admin listening");
        tokio::spawn(crate::admin::serve(server.clone(), listener));
    }
    for listener in server.bootstrap.listeners.clone() {
        let name = listener.name.clone();
        server
            .listeners
            .add_or_update(&server, listener)
            .with_context(|| format!("cannot bind listener {name}"))?;
    }
    if server.bootstrap.dynamic.is_some() {
        crate::xds::start(server.clone());
    } else {
        server.set_state(State::Live);
        server.registry.gauge("server.live").set(1);
    }

    // SIGUSR1: reopen access log files (log rotation), as Envoy does.
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1: reopening access log files");
            crate::http::access_log::reopen_files();
        }
    });

    // Wait for a reason to stop.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let reason = tokio::select! {
        _ = term.recv() => Stop::Drain,
        _ = int.recv() => Stop::Quit,
        stop = wait_stop(&mut stopped) => stop,
    };
    server.set_state(State::Draining);
    match reason {
        Stop::Drain => {
            tracing::info!(drain_time = ?server.drain_time, "SIGTERM: draining listeners");
            server
                .listeners
                .drain_all(server.drain_time, true, false)
                .await;
        }
        _ => {
            tracing::info!("shutting down");
            server
                .listeners
                .drain_all(Duration::ZERO, false, false)
                .await;
        }
    }
    Ok(())
}

async fn wait_stop(stopped: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let now = *stopped.borrow_and_update();
        if now != Stop::Running {
            return now;
        }
        if stopped.changed().await.is_err() {
            return Stop::Quit;
        }
    }
}
