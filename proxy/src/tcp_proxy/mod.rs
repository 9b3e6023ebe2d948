//! `tcp_proxy`: L4 forwarding. Picks a cluster (or a weighted one), connects through the
//! cluster's connect path (its `max_connections`, connect timeout, keepalive and TLS), trying
//! other hosts on connect failure, then moves bytes both ways with half-close passed through,
//! an idle timeout, and byte counts in stats, through [`crate::tunnel`]. Its access logs get a
//! line per connection when it closes, as Envoy's TCP proxy writes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{TcpClusters, TcpProxy};
use crate::drain::{Phase, Watch};
use crate::error::ResponseFlag;
use crate::filter_chain::ConnectionInfo;
use crate::http::access_log::{AccessLogs, Entry, PendingLine};
use crate::stats::TcpStats;
use crate::store::Store;
use crate::tunnel::{self, Activity, Direction, UpstreamEnd};
use crate::upstream::connect::EarlyBytes;
use crate::upstream::{LbContext, Outcome};

/// A `tcp_proxy` filter built from its config.
#[derive(Debug)]
pub struct TcpProxyRuntime {
    pub config: Arc<TcpProxy>,
    pub stats: Arc<TcpStats>,
    pub store: Arc<Store>,
    pub logs: Arc<AccessLogs>,
}

fn pick_cluster(clusters: &TcpClusters) -> &str {
    match clusters {
        TcpClusters::One(name) => name,
        TcpClusters::Weighted(list) => {
            let total: u64 = list.iter().map(|w| u64::from(w.weight)).sum();
            let mut ticket = rand::rng().random_range(0..total.max(1));
            for w in list {
                if ticket < u64::from(w.weight) {
                    return &w.name;
                }
                ticket -= u64::from(w.weight);
            }
            list.first().map(|w| w.name.as_str()).unwrap_or_default()
        }
    }
}

/// Proxies one downstream connection.
pub async fn serve<D>(
    proxy: &TcpProxyRuntime,
    downstream: D,
    info: &ConnectionInfo,
    mut watch: Watch,
) where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut downstream = downstream;
    let stats = &proxy.stats;
    let config = &proxy.config;
    stats.downstream_cx_total.inc();
    // Written when this function returns, however the connection ended.
    let mut line = (!proxy.logs.is_empty()).then(|| {
        let at = (std::time::Instant::now(), info.source, info.destination);
        let mut entry = Entry::for_connection(at, &proxy.logs);
        entry.server_name.clone_from(&info.server_name);
        entry.peer_certificate.clone_from(&info.peer_certificate);
        PendingLine { entry }
    });
    let mut log = |record: &mut dyn FnMut(&mut Entry)| {
        if let Some(line) = line.as_mut() {
            record(&mut line.entry);
        }
    };
    let name = pick_cluster(&config.clusters);
    let snapshot = proxy.store.load();
    let Some(cluster) = snapshot.cluster(name).cloned() else {
        stats.downstream_cx_no_route.inc();
        tracing::debug!(cluster = name, "tcp_proxy: unknown cluster");
        log(&mut |entry| entry.flags.insert(ResponseFlag::NoClusterFound));
        return;
    };
    drop(snapshot);
    log(&mut |entry| entry.upstream_cluster = Some(cluster.config.clone()));
    let context = LbContext {
        original_dst: Some(info.destination),
        ..LbContext::default()
    };
    let mut upstream = None;
    let mut early = EarlyBytes::new(&mut downstream);
    let mut failed = None;
    for attempt in 1..=config.max_connect_attempts {
        let Some(host) = cluster.choose(&context) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            failed = Some(ResponseFlag::NoHealthyUpstream);
            break;
        };
        let Some(slot) = cluster.connector.limit.try_acquire() else {
            cluster.stats.upstream_cx_overflow.inc();
            failed = Some(ResponseFlag::UpstreamOverflow);
            break;
        };
        log(&mut |entry| {
            entry.upstream_host = Some(host.addr);
            entry.upstream_request_attempt_count = attempt;
        });
        match cluster
            .connector
            .connect_sending(host.addr, &host.state, slot, Some(&mut early))
            .await
        {
            Ok(io) => {
                cluster.record_outcome(&host, Outcome::Connected);
                log(&mut |entry| entry.upstream_local = io.local_addr());
                upstream = Some(io);
                break;
            }
            Err(error) => {
                tracing::debug!(%error, "tcp_proxy: connect failed");
                cluster.record_outcome(&host, Outcome::ConnectFailed { http: false });
                failed = Some(ResponseFlag::UpstreamConnectionFailure);
                log(&mut |entry| entry.transport_failure.clone_from(&error.transport));
            }
        }
    }
    let Some(upstream) = upstream else {
        if let Some(flag) = failed {
            log(&mut |entry| {
                entry.flags.insert(flag);
                // Every attempt failed to connect: Envoy adds URX, the attempts used up.
                if flag == ResponseFlag::UpstreamConnectionFailure {
                    entry.flags.insert(ResponseFlag::UpstreamRetryLimitExceeded);
                }
            });
        }
        return;
    };
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    let activity = Activity::default();
    let sent_early = early.bytes().len() as u64;
    if sent_early > 0 {
        received.fetch_add(sent_early, Ordering::Relaxed);
        stats.downstream_cx_rx_bytes_total.add(sent_early);
        upstream.count_sent(sent_early);
        activity.touch();
    }
    let transfer = tunnel::both_ways(downstream, upstream, |direction, n| {
        match direction {
            Direction::ToUpstream => {
                received.fetch_add(n as u64, Ordering::Relaxed);
                stats.downstream_cx_rx_bytes_total.add(n as u64);
            }
            Direction::ToDownstream => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
                stats.downstream_cx_tx_bytes_total.add(n as u64);
            }
        }
        activity.touch();
    });
    let idle = async {
        tunnel::idle(&activity, config.idle_timeout).await;
        stats.idle_timeout.inc();
    };
    tokio::select! {
        _ = transfer => {}
        _ = idle => {}
        _ = watch.reached(Phase::Closed) => {}
    }
    log(&mut |entry| {
        entry
            .bytes_received
            .store(received.load(Ordering::Relaxed), Ordering::Relaxed);
        entry.bytes_sent = sent.load(Ordering::Relaxed);
    });
}
