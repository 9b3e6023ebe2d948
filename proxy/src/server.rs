//! The process: worker threads (one current-thread runtime each, as Envoy's workers), the main
//! runtime (admin, xDS, DNS, signals), startup from the bootstrap, and graceful shutdown.
//!
//! This is wiring only: it builds the shared pieces — the stats [`Registry`], the config
//! [`Store`], the [`ListenerManager`], the [`Lifecycle`] — and hands each part the few it needs.

#[cfg(target_os = "linux")]
use std::ffi::c_int;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::Bootstrap;
use crate::lifecycle::{InitPart, Lifecycle, Stop};
use crate::listener::{ConnectionLimits, ListenerContext, ListenerManager};
use crate::stats::Registry;
use crate::store::Store;
use crate::upstream::Cluster;

/// Period of a do-nothing timer on every worker. Tokio wakes its own driver (an eventfd write
/// plus an extra `epoll_wait`) whenever a new timer is due before every registered one; without
/// a timer due sooner, each request's route timeout (15 s by default) would do that, costing
/// two syscalls per request. The price is one wakeup per period on an idle worker.
const TIMER_HEARTBEAT: Duration = Duration::from_secs(5);

/// Runs the proxy until it is told to stop.
pub fn run(
    bootstrap: Bootstrap,
    concurrency: usize,
    drain_time: Duration,
    identity: crate::cli::XdsIdentity,
) -> anyhow::Result<()> {
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
                skip_cancellation_bookkeeping();
                crate::upstream::pool::set_worker_index(index);
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
    skip_cancellation_bookkeeping();
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    crate::upstream::pool::set_worker_index(concurrency);
    let result = main.block_on(serve(Arc::new(bootstrap), workers, drain_time, identity));
    park_tx.send_replace(true);
    for thread in threads {
        let _ = thread.join();
    }
    result
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
unsafe extern "C" {
    fn pthread_setcancelstate(state: c_int, old: *mut c_int) -> c_int;
    fn pthread_setcanceltype(kind: c_int, old: *mut c_int) -> c_int;
}

/// Lets the calling thread's system calls skip glibc's thread-cancellation bookkeeping.
///
/// In a process with more than one thread, glibc brackets every call that is a cancellation
/// point (`recv`, `writev`, `epoll_wait`, ...) with two atomic compare-and-swaps, switching the
/// thread to asynchronous cancellation and back, unless it is asynchronous already. Remora never
/// cancels a thread, so each runtime thread disables cancellation and then marks itself
/// asynchronous once: the swaps become a load and a branch. They were 1.5% of the worker's
/// samples under `perf` on the default bootstrap (see bench/README.md).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn skip_cancellation_bookkeeping() {
    // The same values in glibc and musl.
    const PTHREAD_CANCEL_DISABLE: c_int = 1;
    const PTHREAD_CANCEL_ASYNCHRONOUS: c_int = 1;
    let mut old = 0;
    // SAFETY: both change only the calling thread's cancellation flags. Cancellation is
    // disabled first, so no cancellation request can act on the thread whatever its type.
    unsafe {
        if pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) == 0 {
            pthread_setcanceltype(PTHREAD_CANCEL_ASYNCHRONOUS, &mut old);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn skip_cancellation_bookkeeping() {}

async fn serve(
    bootstrap: Arc<Bootstrap>,
    workers: Vec<tokio::runtime::Handle>,
    drain_time: Duration,
    identity: crate::cli::XdsIdentity,
) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::default());
    registry.set_histogram_buckets(&bootstrap.stats.histogram_buckets);
    let store = Arc::new(Store::default());
    let secrets = crate::tls::Secrets::new(tokio::runtime::Handle::current());
    for secret in &bootstrap.secrets {
        secrets
            .set(&crate::config::SecretSource::Static, secret)
            .with_context(|| format!("static secret {}", secret.name))?;
    }
    let parts: &[InitPart] = match &bootstrap.dynamic {
        Some(_) => &[InitPart::Static, InitPart::Xds],
        None => &[InitPart::Static],
    };
    let (lifecycle, mut stopped) = Lifecycle::new(&registry, parts);
    let concurrency = workers.len();
    let limits = Arc::new(ConnectionLimits::new(
        &bootstrap.runtime,
        bootstrap
            .admin
            .as_ref()
            .is_some_and(|a| a.ignores_global_limit)
            || bootstrap.runtime.global_limit_skips_admin,
    ));
    let listeners = ListenerManager::new(ListenerContext {
        workers,
        main: tokio::runtime::Handle::current(),
        drain_time,
        registry: registry.clone(),
        store: store.clone(),
        limits,
        tracing: crate::http::tracing::TracingContext::new(
            &bootstrap.node,
            bootstrap.runtime.propagate_w3c_and_b3,
            store.clone(),
            bootstrap.tracing_provider.clone(),
        ),
        secrets: secrets.clone(),
        lifecycle: lifecycle.clone(),
    });
    // Static clusters, then admin, then static listeners. The clusters go into the store in
    // one change: a change copies the snapshot, and one per cluster made startup quadratic.
    let mut clusters = Vec::with_capacity(bootstrap.clusters.len());
    for config in &bootstrap.clusters {
        let cluster = Cluster::new(config.clone(), &registry, concurrency, None, &secrets)
            .with_context(|| format!("cluster {}", config.name))?;
        cluster.start_background();
        clusters.push((config.name.clone(), cluster));
    }
    let manager_stats = crate::stats::ManagerStats::new(&registry);
    manager_stats.cluster_added.add(clusters.len() as u64);
    store.update(|snapshot| snapshot.clusters.extend(clusters));
    let channels = store.clone();
    let sinks = crate::stats::sink::start(
        &bootstrap.stats_sinks,
        bootstrap.stats_flush_interval,
        bootstrap.stats.clone(),
        &registry,
        &bootstrap.node.proto,
        Arc::new(move |cluster: String| {
            let store = channels.clone();
            Box::pin(
                async move { crate::xds::grpc_channel(&store, &cluster, "metrics service").await },
            )
        }),
    )
    .context("cannot open a socket for stats_sinks")?;
    // Secrets from an SDS source of their own stream from its cluster, now in place.
    secrets.open_streams_with(crate::xds::sds::opener(
        store.clone(),
        bootstrap.node.proto.clone(),
        &secrets,
    ));
    let xds_status = Arc::new(crate::xds::Status::default());
    let server_stats = crate::server_stats::ServerStats::start(
        &registry,
        concurrency,
        crate::server_stats::Sources {
            lifecycle: lifecycle.clone(),
            listeners: listeners.clone(),
            store: store.clone(),
            secrets: secrets.clone(),
            xds: xds_status.clone(),
        },
        bootstrap.stats_flush_interval,
    );
    if let Some(admin) = &bootstrap.admin {
        let listener = tokio::net::TcpListener::bind(admin.address)
            .await
            .with_context(|| format!("cannot bind admin address {}", admin.address))?;
        tracing::info!(address = %listener.local_addr()?, "admin listening");
        let dropped = registry.counter("access_log.dropped_lines");
        let logs = crate::http::access_log::activate(&admin.access_logs, &dropped, "admin")?;
        tokio::spawn(crate::admin::serve(
            Arc::new(crate::admin::Context {
                lifecycle: lifecycle.clone(),
                bootstrap: bootstrap.clone(),
                registry: registry.clone(),
                store: store.clone(),
                listeners: listeners.clone(),
                xds: xds_status.clone(),
                secrets: secrets.clone(),
                concurrency,
                drain_time,
                logs,
                sinks: sinks.clone(),
                server_stats,
            }),
            listener,
        ));
    }
    // The xDS client starts now: the secrets static listeners and clusters name may come
    // over ADS, as Envoy starts ADS once its static clusters are loaded.
    let awaited = static_secrets(&bootstrap);
    if let Some(dynamic) = &bootstrap.dynamic {
        crate::xds::start(crate::xds::XdsContext {
            static_secrets: awaited
                .iter()
                .filter(|a| a.secret.source == crate::config::SecretSource::Ads)
                .map(|a| a.secret.name.clone())
                .collect(),
            config: dynamic.clone(),
            node: bootstrap.node.proto.clone(),
            static_clusters: bootstrap.clusters.iter().map(|c| c.name.clone()).collect(),
            static_listeners: bootstrap.listeners.iter().map(|l| l.name.clone()).collect(),
            registry: registry.clone(),
            store: store.clone(),
            listeners: listeners.clone(),
            lifecycle: lifecycle.clone(),
            status: xds_status,
            secrets: secrets.clone(),
            identity,
            concurrency,
        });
    }
    // As Envoy, static listeners start once every static cluster's hosts had their first
    // active health check (each bounded by the check's timeout) and every secret that static
    // listeners and clusters name has arrived or timed out; until then nothing listens on
    // their ports and the server is initializing. Stopping meanwhile stops at once.
    // The secrets' timeouts count from now, while the health checks run.
    let static_init = async {
        let checked = async {
            for cluster in store.load().clusters.values() {
                cluster.members.health_ready().await;
            }
        };
        tokio::join!(checked, secrets.wait_initial(awaited, &registry));
    };
    tokio::select! {
        () = static_init => {}
        stop = wait_stop(&mut stopped) => {
            tracing::info!(?stop, "stopping while initializing");
            lifecycle.set_draining();
            listeners.drain_all(Duration::ZERO, false, false).await;
            return Ok(());
        }
    }
    for listener in &bootstrap.listeners {
        listeners
            .add_or_update(listener.clone())
            .with_context(|| format!("cannot start listener {}", listener.name))?;
        manager_stats.listener_added.inc();
    }
    lifecycle.init_done(InitPart::Static);

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
    lifecycle.set_draining();
    match reason {
        Stop::Drain => {
            tracing::info!(drain_time = ?drain_time, "SIGTERM: draining listeners");
            listeners.drain_all(drain_time, true, false).await;
        }
        _ => {
            tracing::info!("shutting down");
            listeners.drain_all(Duration::ZERO, false, false).await;
        }
    }
    // The last requests' log lines may still wait for their writer's interval.
    tokio::task::spawn_blocking(|| {
        crate::http::access_log::flush_all(Duration::from_secs(2));
    })
    .await?;
    // As Envoy does at exit: the counts since the last interval reach the sinks too.
    if let Some(sinks) = &sinks {
        sinks.shutdown();
    }
    Ok(())
}

/// The secrets, not static ones, that static listeners and clusters name.
fn static_secrets(bootstrap: &Bootstrap) -> Vec<crate::tls::secrets::Awaited> {
    let listeners = bootstrap.listeners.iter().flat_map(|listener| {
        listener
            .sds_secrets()
            .map(|sds| (format!("listener {}", listener.name), sds))
    });
    let clusters = bootstrap.clusters.iter().flat_map(|cluster| {
        cluster
            .connect
            .sds_secrets()
            .map(|sds| (format!("cluster {}", cluster.name), sds))
    });
    crate::tls::secrets::Awaited::collect(
        listeners
            .chain(clusters)
            .filter(|(_, sds)| sds.source != crate::config::SecretSource::Static),
    )
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

#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
mod tests {
    use super::{c_int, pthread_setcancelstate, pthread_setcanceltype};

    /// The thread's (state, type), read by setting them to what they were.
    fn cancellation() -> (c_int, c_int) {
        let (mut state, mut kind, mut ignored) = (-1, -1, -1);
        // SAFETY: sets the calling thread's flags back to the values just read.
        unsafe {
            pthread_setcancelstate(0, &mut state);
            pthread_setcancelstate(state, &mut ignored);
            pthread_setcanceltype(0, &mut kind);
            pthread_setcanceltype(kind, &mut ignored);
        }
        (state, kind)
    }

    #[test]
    fn a_runtime_thread_is_uncancellable_and_marked_asynchronous() {
        std::thread::spawn(|| {
            assert_eq!(cancellation(), (0, 0), "a new thread: enabled, deferred");
            super::skip_cancellation_bookkeeping();
            assert_eq!(cancellation(), (1, 1), "disabled, asynchronous");
        })
        .join()
        .unwrap();
    }
}
