//! `tcp_proxy`: L4 forwarding. Picks a cluster (or a weighted one), connects with the cluster's
//! connect timeout and retries other hosts on connect failure, then copies bytes both ways with
//! half-close passed through, an idle timeout, and byte counts in stats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{TcpClusters, TcpProxy};
use crate::drain::{Phase, Watch};
use crate::filter_chain::ConnectionInfo;
use crate::lb::{HostGauge, LbContext};
use crate::server::Server;
use crate::stats::{GaugeGuard, Stat, TcpStats};

const BUFFER: usize = 64 * 1024;

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
    server: &Arc<Server>,
    config: &TcpProxy,
    stats: &Arc<TcpStats>,
    downstream: D,
    info: &ConnectionInfo,
    mut watch: Watch,
) where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    stats.downstream_cx_total.inc();
    let name = pick_cluster(&config.clusters);
    let Some(cluster) = server.clusters.get(name) else {
        stats.downstream_cx_no_route.inc();
        tracing::debug!(cluster = name, "tcp_proxy: unknown cluster");
        return;
    };
    let context = LbContext {
        original_dst: Some(info.destination),
    };
    let mut upstream = None;
    for _ in 0..config.max_connect_attempts {
        let Some(host) = cluster.choose(&context) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            break;
        };
        // As Envoy, a connection counts in `cx_total` and `cx_active` from its first attempt.
        cluster.stats.upstream_cx_total.inc();
        host.stats.cx_total.inc();
        let active = (
            GaugeGuard::new(&cluster.stats.upstream_cx_active),
            HostGauge::new(&host.stats, |s| &s.cx_active),
        );
        match tokio::time::timeout(
            cluster.config.connect_timeout,
            TcpStream::connect(host.addr),
        )
        .await
        {
            Ok(Ok(stream)) => {
                upstream = Some((stream, host, active));
                break;
            }
            _ => {
                cluster.stats.upstream_cx_connect_fail.inc();
                host.stats.cx_connect_fail.inc();
            }
        }
    }
    let Some((upstream, host, _active)) = upstream else {
        return;
    };
    let upstream_addr = host.addr;
    let _ = upstream.set_nodelay(true);
    let base = Instant::now();
    let last_activity = Activity {
        base,
        nanos: AtomicU64::new(0),
    };
    let upstream: Box<dyn Stream> = match &cluster.config.tls {
        Some(tls) => {
            let name = tls.sni.clone().unwrap_or_else(|| {
                rustls::pki_types::ServerName::IpAddress(upstream_addr.ip().into())
            });
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            match tokio::time::timeout(
                cluster.config.connect_timeout,
                connector.connect(name, upstream),
            )
            .await
            {
                Ok(Ok(stream)) => Box::new(stream),
                _ => {
                    cluster.stats.upstream_cx_connect_fail.inc();
                    host.stats.cx_connect_fail.inc();
                    return;
                }
            }
        }
        None => Box::new(upstream),
    };
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = copy(
        &mut down_read,
        &mut up_write,
        &stats.downstream_cx_rx_bytes_total,
        &cluster.stats.upstream_cx_tx_bytes_total,
        &last_activity,
    );
    let to_downstream = copy(
        &mut up_read,
        &mut down_write,
        &stats.downstream_cx_tx_bytes_total,
        &cluster.stats.upstream_cx_rx_bytes_total,
        &last_activity,
    );
    let idle = async {
        match config.idle_timeout {
            Some(timeout) => loop {
                let deadline = last_activity.get() + timeout;
                tokio::time::sleep_until(deadline).await;
                if last_activity.get() + timeout <= Instant::now() {
                    stats.idle_timeout.inc();
                    return;
                }
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = async { tokio::try_join!(to_upstream, to_downstream) } => {}
        _ = idle => {}
        _ = watch.reached(Phase::Closed) => {}
    }
}

async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    counted: &Stat,
    counted_upstream: &Stat,
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
        counted_upstream.add(n as u64);
        activity.touch();
    }
}

/// When bytes last moved, shared by both copy directions.
struct Activity {
    base: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.nanos
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn get(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// Either a plain or a TLS upstream stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
