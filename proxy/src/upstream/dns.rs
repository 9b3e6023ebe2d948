//! Names of STRICT_DNS and LOGICAL_DNS endpoints resolved to addresses: by the system resolver
//! (`getaddrinfo`, as the rest of the host resolves), or, for a cluster with `respect_dns_ttl`,
//! by a resolver reading `/etc/resolv.conf` and `/etc/hosts` itself, which also gives each
//! answer's TTL (the system resolver keeps it to itself), so the cluster can resolve again
//! when the answer expires, as Envoy does.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use hickory_resolver::TokioResolver;

/// What one name resolved to.
#[derive(Debug)]
pub struct Answer {
    pub addrs: Vec<SocketAddr>,
    /// How long the answer holds, in whole seconds (rounded up), when asked for; zero when the
    /// answer came with a TTL of zero or from `/etc/hosts`.
    pub ttl: Option<Duration>,
}

/// Resolves `host`; `with_ttl` also gives the answer's TTL.
pub async fn resolve(host: &str, port: u16, with_ttl: bool) -> std::io::Result<Answer> {
    if !with_ttl {
        let addrs = tokio::net::lookup_host((host, port)).await?.collect();
        return Ok(Answer { addrs, ttl: None });
    }
    let resolver = ttl_resolver().map_err(std::io::Error::other)?;
    let lookup = resolver
        .lookup_ip(host)
        .await
        .map_err(std::io::Error::other)?;
    let left = lookup
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok(Answer {
        addrs: lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
        ttl: Some(Duration::from_secs(left.as_secs_f64().ceil() as u64)),
    })
}

/// The resolver of `respect_dns_ttl` clusters, made on first use from the system's
/// configuration; why it cannot be made, if it cannot.
fn ttl_resolver() -> Result<&'static TokioResolver, String> {
    static RESOLVER: OnceLock<Result<TokioResolver, String>> = OnceLock::new();
    RESOLVER
        .get_or_init(|| {
            TokioResolver::builder_tokio()
                .map(|builder| builder.build())
                .map_err(|error| format!("cannot read the system's DNS configuration: {error}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}
