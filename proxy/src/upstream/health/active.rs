//! Active health checking: one session per host and cluster, a task on the main runtime that
//! probes the host (HTTP, TCP or gRPC) on Envoy's schedule and moves its health flags as
//! Envoy's checker does: the first result decides at once, later ones need
//! `healthy_threshold` successes or `unhealthy_threshold` failures (a wrong HTTP status or a
//! gRPC NOT_SERVING fails at once; timeouts and network errors count).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{GrpcProbe, HealthCheck, HttpProbe, Probe, ProbeProtocol, TcpProbe};
use crate::stats::{ClusterStats, HealthCheckStats};
use crate::upstream::connect::{Connector, UpstreamIo};
use crate::upstream::host::HostState;

static USER_AGENT: HeaderValue = HeaderValue::from_static("Envoy/HC");
static X_ENVOY_DEGRADED: &str = "x-envoy-degraded";
static X_IMMEDIATE_FAIL: &str = "x-envoy-immediate-health-check-fail";
static X_HEALTHCHECKED_CLUSTER: &str = "x-envoy-upstream-healthchecked-cluster";

/// What a session shares with the other sessions of its cluster.
#[derive(Debug)]
pub struct Checker {
    pub config: Arc<HealthCheck>,
    pub cluster_name: String,
    pub stats: Arc<HealthCheckStats>,
    pub cluster_stats: Arc<ClusterStats>,
    pub connector: Arc<Connector>,
}

/// Where one host is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The endpoint's `health_check_config.hostname`.
    pub hostname: String,
}

/// Why a check failed (Envoy's failure types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The host answered, wrongly.
    Active {
        retriable: bool,
    },
    Network,
    Timeout,
    /// `x-envoy-immediate-health-check-fail` on a proxied response.
    Passive,
}

/// Whether a result moved the host between healthy and unhealthy (Envoy's `HealthTransition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// A threshold is being counted toward.
    Pending,
    Changed,
}

/// One probe's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Healthy { degraded: bool },
    Failed(Failure),
}

fn counts(state: &HostState) -> std::sync::MutexGuard<'_, crate::upstream::host::ActiveCounts> {
    state.active.lock().unwrap_or_else(|p| p.into_inner())
}

/// Clears the warm-up flag: the host's excluded set changes even when its health did not.
fn clear_pending(state: &HostState, changed: Transition) -> Transition {
    if state.set_flag(HostState::PENDING_ACTIVE_HC, false) {
        Transition::Changed
    } else {
        changed
    }
}

/// Envoy's `handleSuccess`.
pub fn on_success(state: &HostState, degraded: bool, healthy_threshold: u32) -> Transition {
    let mut counts = counts(state);
    counts.unhealthy = 0;
    let mut changed = Transition::Unchanged;
    if state.has(HostState::FAILED_ACTIVE_HC) {
        counts.healthy += 1;
        if counts.first_check || counts.healthy >= healthy_threshold {
            state.set_flag(HostState::ACTIVE_HC_TIMEOUT, false);
            state.set_flag(HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL, false);
            state.set_flag(HostState::FAILED_ACTIVE_HC, false);
            changed = Transition::Changed;
        } else {
            changed = Transition::Pending;
        }
    }
    changed = clear_pending(state, changed);
    if state.set_flag(HostState::DEGRADED_ACTIVE_HC, degraded) && changed == Transition::Unchanged {
        changed = Transition::Changed;
    }
    counts.first_check = false;
    changed
}

/// Envoy's `setUnhealthy`.
pub fn on_failure(state: &HostState, failure: Failure, unhealthy_threshold: u32) -> Transition {
    let mut counts = counts(state);
    counts.healthy = 0;
    let mut changed = Transition::Unchanged;
    if !state.has(HostState::FAILED_ACTIVE_HC) {
        let counted = matches!(
            failure,
            Failure::Network | Failure::Timeout | Failure::Active { retriable: true }
        );
        counts.unhealthy += 1;
        if !counted || counts.unhealthy >= unhealthy_threshold {
            state.set_flag(HostState::FAILED_ACTIVE_HC, true);
            changed = Transition::Changed;
        } else {
            changed = Transition::Pending;
        }
    }
    let timed_out = failure == Failure::Timeout && state.has(HostState::FAILED_ACTIVE_HC);
    state.set_flag(HostState::ACTIVE_HC_TIMEOUT, timed_out);
    changed = clear_pending(state, changed);
    counts.first_check = false;
    changed
}

fn count_failure(stats: &HealthCheckStats, failure: Failure) {
    stats.failure.inc();
    match failure {
        Failure::Network | Failure::Timeout => stats.network_failure.inc(),
        Failure::Passive => stats.passive_failure.inc(),
        Failure::Active { .. } => {}
    }
}

/// A passive failure reported by the router (`x-envoy-immediate-health-check-fail`).
pub fn on_passive_failure(checker: &Checker, state: &HostState) -> Transition {
    count_failure(&checker.stats, Failure::Passive);
    on_failure(state, Failure::Passive, checker.config.unhealthy_threshold)
}

impl Checker {
    /// Envoy's interval choice: the edge intervals while a threshold is being counted, the
    /// unhealthy interval for a failed host, the no-traffic intervals until the cluster has
    /// carried traffic; then jitter.
    fn next_interval(&self, healthy: bool, changed: Transition) -> Duration {
        let c = &self.config;
        let stats = &self.cluster_stats;
        let traffic = stats.upstream_cx_total.used()
            || stats.upstream_cx_tx_bytes_total.used()
            || stats.upstream_cx_rx_bytes_total.used();
        let pending = changed == Transition::Pending;
        let base = match (traffic, healthy, pending) {
            (true, false, true) => c.unhealthy_edge_interval,
            (true, false, false) => c.unhealthy_interval,
            (true, true, true) => c.healthy_edge_interval,
            (true, true, false) => c.interval,
            (false, true, false) => c.no_traffic_healthy_interval,
            (false, _, _) => c.no_traffic_interval,
        };
        with_jitter(base, c.interval_jitter, c.interval_jitter_percent)
    }

    fn hostname<'a>(&'a self, target: &'a Target, configured: &'a str) -> &'a str {
        if !target.hostname.is_empty() {
            &target.hostname
        } else if !configured.is_empty() {
            configured
        } else {
            &self.cluster_name
        }
    }
}

fn random_below(ms: u128) -> u64 {
    if ms == 0 {
        0
    } else {
        rand::rng().random_range(0..ms as u64)
    }
}

fn with_jitter(base: Duration, jitter: Duration, percent: u32) -> Duration {
    let base_ms = base.as_millis();
    let mut ms = base_ms as u64;
    ms += random_below(u128::from(percent) * base_ms / 100);
    ms += random_below(jitter.as_millis());
    Duration::from_millis(ms.max(1))
}

/// A session's open connection, kept between probes when `reuse_connection`.
enum Conn {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
    Tcp(Box<UpstreamIo>, BytesMut),
}

impl Conn {
    fn usable(&self) -> bool {
        match self {
            Conn::Http1(sender) => !sender.is_closed(),
            Conn::Http2(sender) => !sender.is_closed(),
            Conn::Tcp(..) => true,
        }
    }
}

/// One host's session: probes until the task is aborted or the cluster's members are gone.
pub async fn run(
    members: Weak<dyn super::Watched>,
    checker: Arc<Checker>,
    state: Arc<HostState>,
    target: Target,
) {
    let config = checker.config.clone();
    if !config.initial_jitter.is_zero() {
        let wait = random_below(config.initial_jitter.as_millis()).max(1);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let mut conn: Option<Conn> = None;
    loop {
        checker.stats.attempt.inc();
        let verdict =
            match tokio::time::timeout(config.timeout, probe(&checker, &target, &mut conn, &state))
                .await
            {
                Ok(verdict) => verdict,
                Err(_) => {
                    conn = None;
                    Verdict::Failed(Failure::Timeout)
                }
            };
        if !config.reuse_connection {
            conn = None;
        }
        let (healthy, changed) = match verdict {
            Verdict::Healthy { degraded } => {
                checker.stats.success.inc();
                (true, on_success(&state, degraded, config.healthy_threshold))
            }
            Verdict::Failed(failure) => {
                count_failure(&checker.stats, failure);
                (
                    false,
                    on_failure(&state, failure, config.unhealthy_threshold),
                )
            }
        };
        let Some(owner) = members.upgrade() else {
            return;
        };
        owner.after_check(&state, healthy, changed);
        drop(owner);
        tokio::time::sleep(checker.next_interval(healthy, changed)).await;
    }
}

async fn probe(
    checker: &Checker,
    target: &Target,
    conn: &mut Option<Conn>,
    state: &HostState,
) -> Verdict {
    match &checker.config.probe {
        Probe::Http(http) => http_probe(checker, http, target, conn, state).await,
        Probe::Tcp(tcp) => tcp_probe(checker, tcp, target, conn).await,
        Probe::Grpc(grpc) => grpc_probe(checker, grpc, target, conn).await,
    }
}

async fn connect(checker: &Checker, addr: SocketAddr) -> Option<UpstreamIo> {
    checker.connector.connect_for_health_check(addr).await.ok()
}

/// An HTTP/1.1 or HTTP/2 sender on `conn`, opening a connection when there is none.
async fn http_sender(
    checker: &Checker,
    addr: SocketAddr,
    protocol: ProbeProtocol,
    conn: &mut Option<Conn>,
) -> Option<()> {
    if conn.as_ref().is_some_and(Conn::usable) {
        return Some(());
    }
    *conn = None;
    let io = TokioIo::new(connect(checker, addr).await?);
    *conn = Some(match protocol {
        ProbeProtocol::Http1 => {
            let (sender, connection) = http1::handshake(io).await.ok()?;
            tokio::spawn(connection);
            Conn::Http1(sender)
        }
        ProbeProtocol::Http2 => {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(connection);
            Conn::Http2(sender)
        }
    });
    Some(())
}

async fn send(
    conn: &mut Option<Conn>,
    request: Request<Full<Bytes>>,
) -> Option<http::Response<hyper::body::Incoming>> {
    let result = match conn.as_mut()? {
        Conn::Http1(sender) => {
            sender.ready().await.ok()?;
            sender.send_request(request).await
        }
        Conn::Http2(sender) => {
            sender.ready().await.ok()?;
            sender.send_request(request).await
        }
        Conn::Tcp(..) => return None,
    };
    result.ok()
}

/// Whether `segments` appear in `data` in order (Envoy's payload matcher).
fn matches_in_order(segments: &[Vec<u8>], data: &[u8]) -> bool {
    let mut from = 0;
    for segment in segments {
        match memchr::memmem::find(&data[from..], segment) {
            Some(at) => from += at + segment.len(),
            None => return false,
        }
    }
    true
}

fn request_headers(
    method: &Method,
    uri: http::Uri,
    host: &str,
    version: ProbeProtocol,
) -> Option<http::request::Builder> {
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    if version == ProbeProtocol::Http1 {
        builder = builder.header(header::HOST, HeaderValue::from_str(host).ok()?);
    }
    Some(builder.header(header::USER_AGENT, USER_AGENT.clone()))
}

fn uri(scheme: &str, authority: &str, path: &str) -> Option<http::Uri> {
    http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()
}

async fn http_probe(
    checker: &Checker,
    http: &HttpProbe,
    target: &Target,
    conn: &mut Option<Conn>,
    state: &HostState,
) -> Verdict {
    let network = Verdict::Failed(Failure::Network);
    if http_sender(checker, target.addr, http.protocol, conn)
        .await
        .is_none()
    {
        return network;
    }
    let host = checker.hostname(target, &http.host);
    let scheme = if checker.connector.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let uri = match http.protocol {
        ProbeProtocol::Http1 => http::Uri::try_from(http.path.as_str()).ok(),
        ProbeProtocol::Http2 => uri(scheme, host, &http.path),
    };
    let Some(mut builder) =
        uri.and_then(|uri| request_headers(&http.method, uri, host, http.protocol))
    else {
        return network;
    };
    if !http.send.is_empty() {
        builder = builder.header(header::CONTENT_LENGTH, http.send.len());
    }
    let Ok(mut request) = builder.body(Full::new(Bytes::from(http.send.clone()))) else {
        return network;
    };
    http.headers.apply(request.headers_mut());
    let Some(response) = send(conn, request).await else {
        *conn = None;
        return network;
    };
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let limit = match http.response_buffer_size {
        0 => usize::MAX,
        n => n as usize,
    };
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            *conn = None;
            return network;
        };
        if let Ok(data) = frame.into_data()
            && !http.receive.is_empty()
            && kept.len() < limit
        {
            let room = limit - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    if closes(&headers, http.protocol) {
        *conn = None;
    }
    http_verdict(checker, http, status, &headers, &kept, state)
}

/// A response that ends its connection.
fn closes(headers: &HeaderMap, protocol: ProbeProtocol) -> bool {
    let says_close = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    };
    says_close("connection") || (protocol == ProbeProtocol::Http1 && says_close("proxy-connection"))
}

fn http_verdict(
    checker: &Checker,
    http: &HttpProbe,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    state: &HostState,
) -> Verdict {
    let immediate = headers.contains_key(X_IMMEDIATE_FAIL);
    if !http.receive.is_empty() && !matches_in_order(&http.receive, body) {
        if immediate {
            state.set_flag(HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL, true);
        }
        return Verdict::Failed(Failure::Active { retriable: false });
    }
    let code = status.as_u16();
    if !http.expected(code) {
        if immediate {
            state.set_flag(HostState::EXCLUDED_VIA_IMMEDIATE_HC_FAIL, true);
        }
        return Verdict::Failed(Failure::Active {
            retriable: http.retriable(code),
        });
    }
    let degraded = headers.contains_key(X_ENVOY_DEGRADED);
    if let Some(matcher) = &http.service_name {
        checker.stats.verify_cluster.inc();
        let cluster = headers
            .get(X_HEALTHCHECKED_CLUSTER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !matcher.matches(cluster) {
            return Verdict::Failed(Failure::Active { retriable: false });
        }
    }
    Verdict::Healthy { degraded }
}

async fn tcp_probe(
    checker: &Checker,
    tcp: &TcpProbe,
    target: &Target,
    conn: &mut Option<Conn>,
) -> Verdict {
    let network = Verdict::Failed(Failure::Network);
    if !matches!(conn, Some(Conn::Tcp(..))) {
        let Some(io) = connect(checker, target.addr).await else {
            *conn = None;
            return network;
        };
        if tcp.receive.is_empty() {
            // Connecting is the whole check; the connection is closed at once.
            *conn = None;
            return Verdict::Healthy { degraded: false };
        }
        *conn = Some(Conn::Tcp(Box::new(io), BytesMut::new()));
    }
    let Some(Conn::Tcp(io, buffer)) = conn.as_mut() else {
        return network;
    };
    if !tcp.send.is_empty() && io.write_all(&tcp.send).await.is_err() {
        *conn = None;
        return network;
    }
    loop {
        if matches_in_order(&tcp.receive, buffer) {
            buffer.clear();
            return Verdict::Healthy { degraded: false };
        }
        match io.read_buf(buffer).await {
            Ok(0) | Err(_) => {
                *conn = None;
                return network;
            }
            Ok(_) => {}
        }
    }
}

/// `grpc-timeout` as gRPC writes it: milliseconds while they fit in eight digits.
fn grpc_timeout(timeout: Duration) -> String {
    let ms = timeout.as_millis();
    if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

/// A `grpc.health.v1.HealthCheckRequest` in one gRPC frame.
fn grpc_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 4);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        let mut len = service.len();
        while len >= 0x80 {
            message.push((len as u8) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

/// The `status` of a `grpc.health.v1.HealthCheckResponse` (0 when absent); `None` when the
/// bytes are not one uncompressed frame holding such a message.
fn grpc_serving_status(mut body: &[u8]) -> Option<u64> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.advance(5);
    if body.len() != len {
        return None;
    }
    let mut status = 0;
    let mut message = body;
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match key & 7 {
            0 => {
                let value = varint(&mut message)?;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            2 => {
                let len = varint(&mut message)? as usize;
                if message.len() < len {
                    return None;
                }
                message.advance(len);
            }
            1 if message.len() >= 8 => message.advance(8),
            5 if message.len() >= 4 => message.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.first()?;
        bytes.advance(1);
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

async fn grpc_probe(
    checker: &Checker,
    grpc: &GrpcProbe,
    target: &Target,
    conn: &mut Option<Conn>,
) -> Verdict {
    let network = Verdict::Failed(Failure::Network);
    let failed = Verdict::Failed(Failure::Active { retriable: false });
    if http_sender(checker, target.addr, ProbeProtocol::Http2, conn)
        .await
        .is_none()
    {
        return network;
    }
    let authority = checker.hostname(target, &grpc.authority);
    let scheme = if checker.connector.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let Some(uri) = uri(scheme, authority, "/grpc.health.v1.Health/Check") else {
        return network;
    };
    let Ok(mut request) = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header("grpc-timeout", grpc_timeout(checker.config.timeout))
        .header(header::USER_AGENT, USER_AGENT.clone())
        .body(Full::new(grpc_request(&grpc.service_name)))
    else {
        return network;
    };
    grpc.metadata.apply(request.headers_mut());
    let Some(response) = send(conn, request).await else {
        *conn = None;
        return network;
    };
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        *conn = None;
        return network;
    };
    if parts.status != StatusCode::OK {
        return failed;
    }
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let content_type_ok = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !content_type_ok {
        return failed;
    }
    let status = trailers
        .as_ref()
        .and_then(grpc_status)
        .or_else(|| grpc_status(&parts.headers));
    const SERVING: u64 = 1;
    match (status, grpc_serving_status(&body)) {
        (Some(0), Some(SERVING)) => Verdict::Healthy { degraded: false },
        _ => failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let state = HostState::default();
        state.set_flag(HostState::FAILED_ACTIVE_HC, true);
        state.set_flag(HostState::PENDING_ACTIVE_HC, true);
        assert_eq!(on_success(&state, false, 3), Transition::Changed);
        assert!(!state.has(HostState::FAILED_ACTIVE_HC | HostState::PENDING_ACTIVE_HC));
        // Timeouts count toward the threshold; a wrong answer fails at once.
        assert_eq!(on_failure(&state, Failure::Timeout, 2), Transition::Pending);
        assert_eq!(on_failure(&state, Failure::Timeout, 2), Transition::Changed);
        assert!(state.has(HostState::ACTIVE_HC_TIMEOUT));
        assert_eq!(on_success(&state, false, 2), Transition::Pending);
        assert_eq!(on_success(&state, false, 2), Transition::Changed);
        assert!(!state.has(HostState::ACTIVE_HC_TIMEOUT));
        let active = Failure::Active { retriable: false };
        assert_eq!(on_failure(&state, active, 5), Transition::Changed);
        assert_eq!(on_success(&state, true, 1), Transition::Changed);
        assert!(state.has(HostState::DEGRADED_ACTIVE_HC));
        assert_eq!(on_success(&state, false, 1), Transition::Changed);
        assert_eq!(on_success(&state, false, 1), Transition::Unchanged);
    }

    #[test]
    fn payloads_match_in_order() {
        let segments = vec![b"ab".to_vec(), b"cd".to_vec()];
        assert!(matches_in_order(&segments, b"xxabyycd"));
        assert!(!matches_in_order(&segments, b"cdab"));
        assert!(matches_in_order(&[], b""));
    }

    #[test]
    fn grpc_frames() {
        assert_eq!(&grpc_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&grpc_request("s")[..], &[0, 0, 0, 0, 3, 0x0a, 1, b's']);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(grpc_serving_status(&[1, 0, 0, 0, 0]), None);
        assert_eq!(grpc_timeout(Duration::from_secs(1)), "1000m");
    }

    #[test]
    fn intervals_jitter_upward_only() {
        let base = Duration::from_millis(100);
        for _ in 0..100 {
            let d = with_jitter(base, Duration::from_millis(10), 50);
            assert!(d >= base && d < Duration::from_millis(160), "{d:?}");
        }
        assert_eq!(
            with_jitter(Duration::ZERO, Duration::ZERO, 0),
            Duration::from_millis(1)
        );
    }
}
