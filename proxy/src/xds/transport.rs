//! The xDS streams' transport: a connection to a host of the bootstrap's ADS cluster (or of an
//! SDS source's cluster) through that cluster's connect path (so its `transport_socket` TLS
//! applies, and its keepalive and connect timeout), or to the unix socket that is its endpoint
//! (Istio's agent), HTTP/2 for gRPC on top; and the reconnect backoff.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use rand::Rng;

use super::XdsContext;
use crate::store::Store;
use crate::upstream::LbContext;

/// Opens a gRPC channel to the ADS cluster.
pub async fn connect(context: &XdsContext) -> anyhow::Result<tonic::transport::Channel> {
    connect_cluster(&context.store, &context.config.ads_cluster, "ADS").await
}

/// Opens a gRPC channel to cluster `name`, which serves the `role` stream (for messages).
pub async fn connect_cluster(
    store: &Store,
    name: &str,
    role: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let cluster = store
        .load()
        .cluster(name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{role} cluster {name} is not defined"))?;
    if let Some(path) = &cluster.config.pipe {
        return connect_pipe(path, cluster.config.connect.connect_timeout).await;
    }
    tokio::time::timeout(Duration::from_secs(5), cluster.members.initialized())
        .await
        .ok();
    let host = cluster
        .choose(&LbContext::default())
        .ok_or_else(|| anyhow::anyhow!("no healthy host in {role} cluster {name}"))?;
    let slot = cluster.connector.limit.acquire_over();
    let io = cluster
        .connector
        .connect(host.addr, &host.state, slot)
        .await?;
    let scheme = if cluster.connector.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", host.addr))?;
    channel(io, endpoint).await
}

/// A gRPC channel over a connection made already: the connector hands it over once.
async fn channel<IO>(
    io: IO,
    endpoint: tonic::transport::Endpoint,
) -> anyhow::Result<tonic::transport::Channel>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = std::sync::Mutex::new(Some(io));
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let io = io.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            io.map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the ADS connection was used already"))
        }
    });
    let endpoint = endpoint
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// A plaintext gRPC channel over the unix socket at `path`.
async fn connect_pipe(
    path: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {} timed out", path.display()))?
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", path.display()))?;
    // The authority is only a name here: the socket is made already.
    channel(
        stream,
        tonic::transport::Endpoint::from_static("http://localhost"),
    )
    .await
}

/// The bootstrap's `initial_metadata`, then the token of `--xds-token-file` (read now, so a
/// rotated token serves the next stream) as `authorization: Bearer TOKEN`.
pub fn add_credentials(
    context: &XdsContext,
    metadata: &mut tonic::metadata::MetadataMap,
) -> anyhow::Result<()> {
    use tonic::metadata::{MetadataKey, MetadataValue};
    for (name, value) in &context.config.initial_metadata {
        let key = MetadataKey::from_bytes(name.as_str().as_bytes())?;
        metadata.insert(key, MetadataValue::try_from(value.as_bytes())?);
    }
    if let Some(path) = &context.identity.token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the xDS token {}: {e}", path.display()))?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| anyhow::anyhow!("the xDS token in {} is not text", path.display()))?;
        metadata.insert("authorization", value);
    }
    Ok(())
}

/// Jittered exponential backoff: 0.5 s doubling up to 30 s, full jitter in the upper half.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Duration::from_millis(500)
            .saturating_mul(1 << self.attempt.min(6))
            .min(Duration::from_secs(30));
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    /// A stream that got a response: start over from the shortest wait.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!((Duration::from_millis(250)..=Duration::from_millis(500)).contains(&first));
        for _ in 0..20 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
        assert!(backoff.next_delay() >= Duration::from_secs(15));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(500));
    }
}
