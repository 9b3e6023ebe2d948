//! Request mirroring (`request_mirror_policies`): a copy of a share of the requests goes to
//! another cluster with `-shadow` added to its host, fire and forget. The copy runs in its own
//! task under the route timeout; its answer is read and dropped, and nothing about it can
//! delay or fail the request it copies.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::BodyExt;
use rand::Rng;
use remora_config::route::{Mirror, MirrorCluster};

use crate::body::outgoing::OutgoingBody;
use crate::body::replay::SharedBody;
use crate::store::Snapshot;
use crate::upstream::{LbContext, Outcome};

/// What every copy of one request shares.
pub struct Copy<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The request body, if it has one (shared with the main request).
    pub body: Option<&'a SharedBody>,
    pub timeout: Option<Duration>,
    /// The client is internal: the copy's dynamic stats go under `internal.`.
    pub internal: bool,
}

/// Sends the copies `mirrors` ask for (each by its own share of requests).
pub fn send(mirrors: &[Mirror], snapshot: &Snapshot, copy: Copy<'_>) {
    for mirror in mirrors {
        if mirror.per_million < 1_000_000
            && rand::rng().random_range(0..1_000_000) >= mirror.per_million
        {
            continue;
        }
        let name = match &mirror.cluster {
            MirrorCluster::Name(name) => name.as_str(),
            MirrorCluster::Header(header) => {
                match copy.headers.get(header).and_then(|v| v.to_str().ok()) {
                    Some(name) => name,
                    None => continue,
                }
            }
        };
        // As in Envoy, a mirror to a cluster that does not exist is skipped.
        let Some(cluster) = snapshot.cluster(name) else {
            tracing::debug!(cluster = name, "mirror cluster not found; no copy sent");
            continue;
        };
        let mut headers = copy.headers.clone();
        // Envoy's shadow requests go through a router of its own, with dynamic stats on.
        let internal = copy.internal;
        if let Some(host) = &mirror.host_rewrite {
            headers.insert(header::HOST, host.clone());
        }
        if mirror.shadow_suffix
            && let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
            && let Ok(shadow) = HeaderValue::from_str(&shadow_host(host))
        {
            headers.insert(header::HOST, shadow);
        }
        let body = match copy.body {
            Some(shared) if shared.replayable() => OutgoingBody::Shared(shared.reader()),
            Some(_) => continue,
            None => OutgoingBody::Empty,
        };
        let mut request = Request::new(body);
        *request.method_mut() = copy.method.clone();
        *request.uri_mut() = copy.uri.clone();
        *request.version_mut() = copy.version;
        *request.headers_mut() = headers;
        let timeout = copy.timeout;
        let cluster: Arc<crate::upstream::Cluster> = cluster.clone();
        tokio::spawn(async move {
            let Some(host) = cluster.choose(&LbContext::default()) else {
                cluster.stats.upstream_cx_none_healthy.inc();
                return;
            };
            let sending = async {
                let (response, lease) = cluster.pools.send(&host, request, None).await?;
                cluster.stats.upstream_rq_total.inc();
                cluster
                    .responses
                    .count(response.status().as_u16(), internal);
                cluster.record_outcome(&host, Outcome::Status(response.status().as_u16()));
                // Read to the end so the connection can serve again.
                let _ = response.into_body().collect().await;
                if let Some(lease) = lease {
                    lease.release(std::time::Instant::now());
                }
                Ok::<(), crate::upstream::pool::PoolError>(())
            };
            let outcome = match timeout {
                Some(timeout) => tokio::time::timeout(timeout, sending).await.ok(),
                None => Some(sending.await),
            };
            if !matches!(outcome, Some(Ok(()))) {
                tracing::debug!(cluster = %cluster.name(), "mirrored request failed or timed out");
            }
        });
    }
}

/// Envoy's shadow host: `-shadow` after the host name, before any port.
fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(']')
                && port.bytes().all(|b| b.is_ascii_digit())
                && !name.contains(':') =>
        {
            format!("{name}-shadow:{port}")
        }
        Some((name, port)) if name.ends_with(']') => format!("{name}-shadow:{port}"),
        _ => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::shadow_host;

    #[test]
    fn the_shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("api.example"), "api.example-shadow");
        assert_eq!(shadow_host("api.example:8080"), "api.example-shadow:8080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
    }
}
