//! The RBAC network filter (`envoy.filters.network.rbac`) and what it shares with the RBAC
//! HTTP filter: the facts a rule reads from a connection ([`access_request`]) and the stats of
//! one filter ([`RbacStats`]).
//!
//! As Envoy with `ONE_TIME_ON_FIRST_BYTE`: a connection is decided once, when its first bytes
//! arrive; a denied client's connect succeeded, and the connection is closed then (after
//! `delay_deny`, reading stopped meanwhile), its bytes never passed on. Shadow rules are
//! evaluated and counted at the same moment. Stats: `PREFIX.rbac.{allowed,denied}` and
//! `PREFIX.rbac.SHADOW_PREFIX.{shadow_allowed,shadow_denied}`.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use remora_config::rbac::{AccessRequest, Decision, NetworkRbac, PeerIdentity, Rbac, RequestHead};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::filter_chain::ConnectionInfo;
use crate::stats::{Registry, Stat};

/// The facts RBAC rules read about a connection: `remote` is the client the HTTP connection
/// manager trusts (the connection's peer on the network filter); `http` the request head.
pub fn access_request<'a>(
    info: &'a ConnectionInfo,
    remote: IpAddr,
    http: Option<RequestHead<'a>>,
) -> AccessRequest<'a> {
    AccessRequest {
        source: info.source.ip(),
        direct_remote: info.direct_source.ip(),
        remote,
        destination: info.destination,
        server_name: info.server_name.as_deref().unwrap_or(""),
        // As Envoy's `connection.ssl()`: any TLS this proxy terminated, a certificate or not.
        tls: match (&info.peer_certificate, info.tls_terminated) {
            (Some(cert), _) => Some(PeerIdentity {
                uri_sans: cert.uri_sans(),
                dns_sans: cert.dns_sans(),
                subject: cert.subject(),
            }),
            (None, true) => Some(PeerIdentity::default()),
            (None, false) => None,
        },
        http,
    }
}

/// Envoy's `statPrefixJoin`: `prefix.rest`, without doubling a trailing dot.
fn join(prefix: &str, rest: &str) -> String {
    match prefix {
        "" => rest.to_string(),
        p if p.ends_with('.') => format!("{p}{rest}"),
        p => format!("{p}.{rest}"),
    }
}

/// One RBAC filter's counters, network or HTTP.
#[derive(Debug)]
pub struct RbacStats {
    pub allowed: Arc<Stat>,
    pub denied: Arc<Stat>,
    pub shadow_allowed: Arc<Stat>,
    pub shadow_denied: Arc<Stat>,
}

impl RbacStats {
    /// `PREFIX.rbac.RULES_PREFIX.{allowed,denied}` and
    /// `PREFIX.rbac.SHADOW_PREFIX.{shadow_allowed,shadow_denied}` (Envoy 1.40 joins each
    /// non-empty prefix with a dot, unless it ends with one), registered at once as Envoy does:
    /// they show as 0 before any traffic.
    pub fn new(registry: &Registry, prefix: &str, rules_prefix: &str, shadow_prefix: &str) -> Self {
        let base = join(prefix, "rbac.");
        let rules = format!("{base}{rules_prefix}");
        let shadow = format!("{base}{shadow_prefix}");
        RbacStats {
            allowed: registry.counter(join(&rules, "allowed")),
            denied: registry.counter(join(&rules, "denied")),
            shadow_allowed: registry.counter(join(&shadow, "shadow_allowed")),
            shadow_denied: registry.counter(join(&shadow, "shadow_denied")),
        }
    }

    /// Evaluates the shadow rules (counted only) and then the enforced ones (counted): whether
    /// the request or connection may go on, and the enforced policy that matched. No rules:
    /// allowed, uncounted.
    pub fn decide<'r>(
        &self,
        rules: Option<&'r Rbac>,
        shadow_rules: Option<&Rbac>,
        request: &AccessRequest<'_>,
    ) -> Decision<'r> {
        if let Some(shadow) = shadow_rules {
            let decision = shadow.decide(request);
            tracing::debug!(allowed = decision.allowed, policy = ?decision.policy, "rbac shadow");
            match decision.allowed {
                true => self.shadow_allowed.inc(),
                false => self.shadow_denied.inc(),
            }
        }
        let Some(rules) = rules else {
            return Decision {
                allowed: true,
                policy: None,
            };
        };
        let decision = rules.decide(request);
        tracing::debug!(allowed = decision.allowed, policy = ?decision.policy, "rbac enforced");
        match decision.allowed {
            true => self.allowed.inc(),
            false => self.denied.inc(),
        }
        decision
    }
}

/// One RBAC network filter of a filter chain, built when its listener starts.
#[derive(Debug)]
pub struct NetworkRbacRuntime {
    config: Arc<NetworkRbac>,
    stats: RbacStats,
}

impl NetworkRbacRuntime {
    pub fn new(config: Arc<NetworkRbac>, registry: &Registry) -> Self {
        let stats = RbacStats::new(
            registry,
            &config.stat_prefix,
            "",
            &config.shadow_rules_stat_prefix,
        );
        NetworkRbacRuntime { config, stats }
    }

    fn allows(&self, info: &ConnectionInfo) -> bool {
        let request = access_request(info, info.source.ip(), None);
        self.stats
            .decide(
                self.config.rules.as_ref(),
                self.config.shadow_rules.as_ref(),
                &request,
            )
            .allowed
    }
}

enum Gate {
    /// Waiting for the first bytes.
    Undecided {
        filters: Arc<[NetworkRbacRuntime]>,
        info: ConnectionInfo,
    },
    Allowed,
    /// Denied with `delay_deny`: reading stopped until the delay is over.
    Delaying(Pin<Box<tokio::time::Sleep>>),
    Denied,
}

/// A downstream stream that passes nothing on until the chain's RBAC filters, in order, allow
/// the connection on its first bytes; a denial fails every later read and write, which closes
/// the connection through the terminal filter.
pub struct FirstByteGate<S> {
    inner: S,
    gate: Gate,
}

impl<S> FirstByteGate<S> {
    pub fn new(inner: S, filters: Arc<[NetworkRbacRuntime]>, info: ConnectionInfo) -> Self {
        FirstByteGate {
            inner,
            gate: Gate::Undecided { filters, info },
        }
    }
}

fn denied() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "rbac_deny_close")
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByteGate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.gate {
                Gate::Allowed => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Gate::Denied => return Poll::Ready(Err(denied())),
                Gate::Delaying(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.gate = Gate::Denied;
                }
                Gate::Undecided { filters, info } => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    // The first bytes, or the end of a connection that sent none: Envoy's
                    // filter decides on either (and counts it).
                    let denying = filters.iter().find(|filter| !filter.allows(info));
                    match denying {
                        None => {
                            this.gate = Gate::Allowed;
                            return Poll::Ready(Ok(()));
                        }
                        Some(filter) => {
                            // The bytes that woke the check are not passed on.
                            buf.set_filled(before);
                            let delay = filter.config.delay_deny;
                            this.gate = if delay.is_zero() {
                                Gate::Denied
                            } else {
                                Gate::Delaying(Box::pin(tokio::time::sleep(delay)))
                            };
                        }
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByteGate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.gate {
            Gate::Denied | Gate::Delaying(_) => Poll::Ready(Err(denied())),
            _ => Pin::new(&mut this.inner).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.gate {
            Gate::Denied | Gate::Delaying(_) => Poll::Ready(Err(denied())),
            _ => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn info(source: &str) -> ConnectionInfo {
        let source = source.parse().unwrap();
        ConnectionInfo {
            destination: "127.0.0.1:9000".parse().unwrap(),
            source,
            direct_source: source,
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: Vec::new(),
            peer_certificate: None,
            tls_terminated: false,
        }
    }

    /// One filter allowing only 10.0.0.1, with `delay_deny`.
    fn filters(registry: &Registry, delay_deny: &str) -> Arc<[NetworkRbacRuntime]> {
        let proto: xds_api::envoy::extensions::filters::network::rbac::v3::Rbac =
            xds_api::json::from_yaml_str(&format!(
                "stat_prefix: t\ndelay_deny: {delay_deny}\nrules: {{policies: {{p: {{permissions: [{{any: true}}], principals: [{{source_ip: {{address_prefix: 10.0.0.1, prefix_len: 32}}}}]}}}}}}"
            ))
            .unwrap();
        let config = remora_config::rbac::network_rbac(&xds_api::any::pack(&proto), "n").unwrap();
        Arc::from(vec![NetworkRbacRuntime::new(Arc::new(config), registry)])
    }

    #[tokio::test]
    async fn an_allowed_connection_passes_its_bytes_and_is_counted_once() {
        let registry = Registry::default();
        let (mut client, server) = tokio::io::duplex(64);
        let mut gated = FirstByteGate::new(server, filters(&registry, "0s"), info("10.0.0.1:5"));
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        gated.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        client.write_all(b"again").await.unwrap();
        gated.read_exact(&mut buf).await.unwrap();
        gated.write_all(b"back").await.unwrap();
        assert_eq!(registry.counter("t.rbac.allowed").get(), 1);
        assert_eq!(registry.counter("t.rbac.denied").get(), 0);
    }

    #[tokio::test]
    async fn a_denied_connection_passes_nothing_on() {
        let registry = Registry::default();
        let (mut client, server) = tokio::io::duplex(64);
        let mut gated = FirstByteGate::new(server, filters(&registry, "0s"), info("10.0.0.2:5"));
        // Before any byte arrives, nothing is decided: writes still go through.
        gated.write_all(b"banner").await.unwrap();
        client.write_all(b"secret").await.unwrap();
        let mut buf = [0u8; 16];
        let error = gated.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(gated.write_all(b"x").await.is_err());
        assert!(gated.read(&mut buf).await.is_err());
        assert_eq!(registry.counter("t.rbac.denied").get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_deny_holds_the_connection_first() {
        let registry = Registry::default();
        let (mut client, server) = tokio::io::duplex(64);
        let mut gated = FirstByteGate::new(server, filters(&registry, "2s"), info("10.0.0.2:5"));
        client.write_all(b"x").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 4];
        assert!(gated.read(&mut buf).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_connection_closed_before_sending_is_decided_too() {
        let registry = Registry::default();
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let mut gated = FirstByteGate::new(server, filters(&registry, "0s"), info("10.0.0.1:5"));
        let mut buf = [0u8; 4];
        assert_eq!(gated.read(&mut buf).await.unwrap(), 0);
        assert_eq!(registry.counter("t.rbac.allowed").get(), 1);
    }

    #[test]
    fn stat_names_join_prefixes_as_envoy_does() {
        let registry = Registry::default();
        RbacStats::new(&registry, "http.ingress.", "enforced_", "");
        RbacStats::new(&registry, "tcp", "", "audit.");
        let names: Vec<String> = registry
            .snapshot(&|_| true)
            .into_iter()
            .map(|stat| stat.name)
            .collect();
        for name in [
            "http.ingress.rbac.enforced_.allowed",
            "http.ingress.rbac.enforced_.denied",
            "http.ingress.rbac.shadow_allowed",
            "tcp.rbac.allowed",
            "tcp.rbac.audit.shadow_denied",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
        }
    }
}
