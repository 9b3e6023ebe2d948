//! `tcp_proxy`: L4 forwarding. Picks a cluster (or a weighted one), connects through the
//! cluster's connect path (its `max_connections`, connect timeout, keepalive and TLS), trying
//! other hosts on connect failure, then moves bytes both ways with half-close passed through,
//! an idle timeout, and byte counts in stats, through [`crate::tunnel`].

use std::sync::Arc;

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{TcpClusters, TcpProxy};
use crate::drain::{Phase, Watch};
use crate::filter_chain::ConnectionInfo;
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
    let name = pick_cluster(&config.clusters);
    let snapshot = proxy.store.load();
    let Some(cluster) = snapshot.cluster(name).cloned() else {
        stats.downstream_cx_no_route.inc();
        tracing::debug!(cluster = name, "tcp_proxy: unknown cluster");
        return;
    };
    drop(snapshot);
    let context = LbContext {
        original_dst: Some(info.destination),
        ..LbContext::default()
    };
    let mut upstream = None;
    let mut early = EarlyBytes::new(&mut downstream);
    for _ in 0..config.max_connect_attempts {
        let Some(host) = cluster.choose(&context) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            break;
        };
        let Some(slot) = cluster.connector.limit.try_acquire() else {
            cluster.stats.upstream_cx_overflow.inc();
            break;
        };
        match cluster
            .connector
            .connect_sending(host.addr, &host.state, slot, Some(&mut early))
            .await
        {
            Ok(io) => {
                cluster.record_outcome(&host, Outcome::Connected);
                upstream = Some(io);
                break;
            }
            Err(error) => {
                tracing::debug!(%error, "tcp_proxy: connect failed");
                cluster.record_outcome(&host, Outcome::ConnectFailed { http: false });
            }
        }
    }
    let Some(upstream) = upstream else {
        return;
    };
    let activity = Activity::default();
    let sent_early = early.bytes().len() as u64;
    if sent_early > 0 {
        stats.downstream_cx_rx_bytes_total.add(sent_early);
        upstream.count_sent(sent_early);
        activity.touch();
    }
    let transfer = tunnel::both_ways(downstream, upstream, |direction, n| {
        match direction {
            Direction::ToUpstream => stats.downstream_cx_rx_bytes_total.add(n as u64),
            Direction::ToDownstream => stats.downstream_cx_tx_bytes_total.add(n as u64),
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
}
