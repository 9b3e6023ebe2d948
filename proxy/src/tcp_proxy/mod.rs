//! `tcp_proxy`: L4 forwarding. Picks a cluster (or a weighted one), connects through the
//! cluster's connect path (its `max_connections`, connect timeout, keepalive and TLS), trying
//! other hosts on connect failure, then moves bytes both ways with half-close passed through,
//! an idle timeout, and byte counts in stats: with [`splice`] when both sides are plain TCP,
//! else by copying.

mod splice;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{TcpClusters, TcpProxy};
use crate::drain::{Phase, Watch};
use crate::filter_chain::ConnectionInfo;
use crate::stats::{Stat, TcpStats};
use crate::store::Store;
use crate::upstream::{LbContext, Outcome};

const BUFFER: usize = 64 * 1024;

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
            .connect(host.addr, &host.state, slot)
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
    let activity = Activity::new();
    // Plain TCP on both sides: the kernel moves the bytes (splice); otherwise they are copied.
    if let (Some(down), Some(up)) = (
        (&downstream as &dyn std::any::Any).downcast_ref::<TcpStream>(),
        upstream.plain_socket(),
    ) && let (Ok(pipe_up), Ok(pipe_down)) = (splice::Pipe::new(), splice::Pipe::new())
    {
        let to_upstream = splice::forward(down, up, &pipe_up, |n| {
            stats.downstream_cx_rx_bytes_total.add(n as u64);
            upstream.count_sent(n as u64);
            activity.touch();
        });
        let to_downstream = splice::forward(up, down, &pipe_down, |n| {
            stats.downstream_cx_tx_bytes_total.add(n as u64);
            upstream.count_received(n as u64);
            activity.touch();
        });
        let both = async { tokio::try_join!(to_upstream, to_downstream).map(drop) };
        relay(both, proxy, &activity, &mut watch).await;
        return;
    }
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = copy(
        &mut down_read,
        &mut up_write,
        &stats.downstream_cx_rx_bytes_total,
        &activity,
    );
    let to_downstream = copy(
        &mut up_read,
        &mut down_write,
        &stats.downstream_cx_tx_bytes_total,
        &activity,
    );
    let both = async { tokio::try_join!(to_upstream, to_downstream).map(drop) };
    relay(both, proxy, &activity, &mut watch).await;
}

/// Runs `transfer` (both directions) until it ends, the connection has been idle for the idle
/// timeout, or the listener drains.
async fn relay(
    transfer: impl Future<Output = std::io::Result<()>>,
    proxy: &TcpProxyRuntime,
    activity: &Activity,
    watch: &mut Watch,
) {
    let idle = async {
        match proxy.config.idle_timeout {
            Some(timeout) => loop {
                let deadline = activity.get() + timeout;
                tokio::time::sleep_until(deadline).await;
                if activity.get() + timeout <= Instant::now() {
                    proxy.stats.idle_timeout.inc();
                    return;
                }
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = transfer => {}
        _ = idle => {}
        _ = watch.reached(Phase::Closed) => {}
    }
}

/// Copies one direction; the upstream side's bytes are counted by its connection.
async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    counted: &Stat,
    activity: &Activity,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the FIN on and keep the other direction open.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        counted.add(n as u64);
        activity.touch();
    }
}

/// When bytes last moved, shared by both copy directions.
struct Activity {
    base: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.nanos
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn get(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}
