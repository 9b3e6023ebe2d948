//! Forwarding a request upstream: the cluster (named, from a header, or weighted), a host from
//! its load balancer, the `max_requests` breaker, upgrades, the upstream request (rewrites,
//! `Host`, route header mutations), sending it under the route and stream idle timeouts, and
//! the upstream response on its way back. Every attempt is reported to the cluster's outcome
//! hook.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use rand::Rng;
use remora_config::route::{ClusterSpec, Forward, HostRewrite};
use tokio::time::Instant;

use super::RouteRequest;
use crate::config::UpstreamProtocol;
use crate::error::{ProxyError, ResponseFlag};
use crate::http::body::{
    RequestBody, RequestEnd, ResponseBody, StreamTimeout, StreamTimer, UpstreamBody,
};
use crate::http::headers;
use crate::http::local_reply::LocalReply;
use crate::stats::{GaugeGuard, Stat};
use crate::upstream::pool::PoolError;
use crate::upstream::{HostGauge, LbContext, Outcome};

static X_EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
static X_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static X_ORIGINAL_HOST: HeaderName = HeaderName::from_static("x-envoy-original-host");

/// The cluster a forward goes to.
fn cluster_name<'a>(forward: &'a Forward, request: &'a http::request::Parts) -> &'a str {
    match &forward.cluster {
        ClusterSpec::Name(name) => name,
        ClusterSpec::Header(name) => request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        ClusterSpec::Weighted { clusters, total } => {
            let mut ticket = rand::rng().random_range(0..*total);
            let mut chosen = clusters.first().map(|(n, _)| n.as_str()).unwrap_or("");
            for (name, weight) in clusters {
                if ticket < u64::from(*weight) {
                    chosen = name;
                    break;
                }
                ticket -= u64::from(*weight);
            }
            chosen
        }
    }
}

/// Sends the request to the route's cluster and returns the upstream response.
pub(super) async fn forward(
    request: RouteRequest<'_>,
    forward: &Forward,
) -> Result<Response<ResponseBody>, LocalReply> {
    let RouteRequest {
        manager,
        mut parts,
        body,
        body_filters,
        route,
        snapshot,
        downstream,
        log,
        started,
        authority,
        path_and_query,
        ..
    } = request;
    let hcm = &manager.config;
    let name = cluster_name(forward, &parts).to_string();
    let Some(cluster) = snapshot.cluster(&name) else {
        manager.stats.no_cluster.inc();
        let status = StatusCode::from_u16(forward.cluster_not_found_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut reply = LocalReply::new(status);
        reply.flag = Some(ResponseFlag::NoClusterFound);
        reply.details = format!("cluster {name:?} not found").into();
        reply.from_router = true;
        return Err(reply);
    };
    let Some(upstream_host) = cluster.choose(&LbContext {
        original_dst: Some(downstream.destination),
        ..LbContext::default()
    }) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return Err(ProxyError::upstream(
            ResponseFlag::NoHealthyUpstream,
            format!("no healthy host in {name}"),
        )
        .into_router_reply());
    };
    // `max_requests`: the slot is held by the response body until it ends (as Envoy counts it).
    let Some(rq_active) = GaugeGuard::try_acquire(
        &cluster.stats.upstream_rq_active,
        u64::from(cluster.config.thresholds.max_requests),
    ) else {
        cluster.stats.upstream_rq_active_overflow.inc();
        return Err(
            ProxyError::upstream(ResponseFlag::UpstreamOverflow, "max_requests reached")
                .into_router_reply(),
        );
    };

    // Upgrade (WebSocket etc.): only those the route, or else the HCM, allows.
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    let upgrading = match &upgrade {
        Some(kind) if parts.version == Version::HTTP_11 => {
            if !forward.allows_upgrade(kind, &hcm.upgrades) {
                let mut reply = LocalReply::new(StatusCode::FORBIDDEN);
                reply.details = format!("upgrade_failed: {kind} not allowed").into();
                return Err(reply);
            }
            true
        }
        _ => false,
    };
    // hyper leaves the connection's upgrade in the request's extensions.
    let downstream_upgrade = upgrading
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();

    // The upstream request.
    let route_entry = route.route();
    let upstream_pq = match forward.rewrite_path(route_entry, path_and_query.as_str()) {
        Some(rewritten) => {
            // As Envoy: a rewritten path leaves the original in `x-envoy-original-path`.
            if let Ok(original) = HeaderValue::from_str(path_and_query.as_str()) {
                parts.headers.insert(&X_ORIGINAL_PATH, original);
            }
            http::uri::PathAndQuery::try_from(rewritten).map_err(|e| {
                LocalReply::from(ProxyError::downstream(
                    ResponseFlag::NoRouteFound,
                    format!("bad rewritten path: {e}"),
                ))
            })?
        }
        None => path_and_query.clone(),
    };
    // Origin-form; the pool adds the authority where the protocol wants it (HTTP/2).
    parts.uri = Uri::from(upstream_pq);
    let request_headers = &mut parts.headers;
    let rewritten_host = match &forward.host_rewrite {
        HostRewrite::Literal(value) => Some(value.clone()),
        HostRewrite::Auto if !upstream_host.hostname.is_empty() => {
            HeaderValue::from_str(&upstream_host.hostname).ok()
        }
        _ => None,
    };
    match rewritten_host {
        // As Envoy: a rewritten host leaves the original in `x-envoy-original-host`.
        Some(value) => {
            if let Some(original) = request_headers.insert(header::HOST, value) {
                request_headers.insert(&X_ORIGINAL_HOST, original);
            }
        }
        None => {
            if !request_headers.contains_key(header::HOST)
                && let Some(value) = authority
            {
                request_headers.insert(header::HOST, value);
            }
        }
    }
    if let Some(value) = &forward.timeout_header {
        request_headers.insert(&X_EXPECTED_TIMEOUT, value.clone());
    }
    let table = &route.table;
    headers::apply_levels(
        [
            &table.request_headers,
            &route.vhost().request_headers,
            &route_entry.request_headers,
        ],
        table.most_specific_header_mutations_wins,
        request_headers,
    );
    // The access log shows the request as forwarded (generated x-request-id, appended XFF).
    if let Some(entry) = log.as_mut() {
        entry.request = request_headers.clone();
        entry.upstream_host = Some(upstream_host.addr);
        entry.upstream_cluster = Some(name.clone());
    }
    parts.version = match cluster.pools.protocol() {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    // Envoy's HTTP/1 encoder marks a bodiless request `content-length: 0` unless its method
    // carries no body by definition.
    if parts.version == Version::HTTP_11
        && http_body::Body::is_end_stream(&body)
        && !matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::TRACE | Method::CONNECT
        )
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
        && !parts.headers.contains_key(header::TRANSFER_ENCODING)
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    let timed_out = hcm
        .request_timeout
        .map(|_| Arc::new(AtomicBool::new(false)));
    let body_deadline = hcm.request_timeout.map(|t| started + t);
    // The route timeout starts once the request has been sent in full, as in Envoy: at once
    // for a request without a body, else when its body ends.
    let request_end = (forward.timeout.is_some() && !http_body::Body::is_end_stream(&body))
        .then(|| Arc::new(RequestEnd::default()));
    let body_failed = Arc::new(AtomicBool::new(false));
    let upstream_body = RequestBody::new(
        body,
        body_deadline,
        timed_out.clone(),
        request_end.clone(),
        body_failed.clone(),
        log.as_ref().map(|entry| entry.bytes_received.clone()),
        body_filters,
    );
    let upstream_request = Request::from_parts(parts, upstream_body);

    // Send. One timer per request: the route deadline and the stream idle timeout (the
    // route's, else the HCM's) bound the wait for headers, then move into the response body.
    let host_active = HostGauge::new(&upstream_host.state, |s| &s.rq_active);
    let (sent, timer) = send_upstream(
        cluster.pools.send(&upstream_host, upstream_request),
        forward.timeout,
        forward.idle_timeout.unwrap_or(hcm.stream_idle_timeout),
        request_end,
        (
            &cluster.stats.upstream_rq_timeout,
            &manager.stats.downstream_rq_idle_timeout,
        ),
    )
    .await;
    // Envoy counts a request upstream once it has a connection: not when it overflowed or
    // its connection could not be made.
    let overflowed = matches!(&sent, Ok(Err(PoolError::Overflow)));
    if !overflowed && !matches!(&sent, Ok(Err(PoolError::Connect(_)))) {
        cluster.stats.upstream_rq_total.inc();
        upstream_host.stats().rq_total.inc();
    }
    let result = sent.map_err(|timeout| {
        let flag = match timeout {
            StreamTimeout::Route => {
                cluster.record_outcome(&upstream_host, Outcome::Timeout { route: true });
                ResponseFlag::UpstreamRequestTimeout
            }
            StreamTimeout::Idle => {
                cluster.record_outcome(&upstream_host, Outcome::Timeout { route: false });
                ResponseFlag::StreamIdleTimeout
            }
        };
        ProxyError::upstream(flag, timeout.to_string()).into_router_reply()
    })?;
    let (mut response, lease) = match result {
        Ok(sent) => sent,
        Err(error) if overflowed => {
            return Err(
                ProxyError::upstream(ResponseFlag::UpstreamOverflow, error.to_string())
                    .into_router_reply(),
            );
        }
        Err(error) => {
            // The downstream's own request failed first: its fault, not the upstream's.
            if body_failed.load(Ordering::Acquire) {
                cluster.record_outcome(&upstream_host, Outcome::Reset);
                return Err(ProxyError::downstream(
                    ResponseFlag::DownstreamProtocolError,
                    "malformed request body",
                )
                .into());
            }
            if timed_out
                .as_ref()
                .is_some_and(|t| t.load(Ordering::Acquire))
            {
                cluster.record_outcome(&upstream_host, Outcome::Reset);
                manager.stats.downstream_rq_timeout.inc();
                let mut reply =
                    LocalReply::new(StatusCode::REQUEST_TIMEOUT).with_body("request timeout");
                reply.details = "downstream request timeout".into();
                return Err(reply);
            }
            let (outcome, flag) = match error {
                PoolError::Connect(_) => (
                    Outcome::ConnectFailed { http: true },
                    ResponseFlag::UpstreamConnectionFailure,
                ),
                _ => (Outcome::Reset, ResponseFlag::UpstreamRemoteReset),
            };
            cluster.record_outcome(&upstream_host, outcome);
            return Err(ProxyError::upstream(flag, error.to_string()).into_router_reply());
        }
    };
    let status = response.status();
    cluster.stats.response(status.as_u16());
    cluster.record_outcome(&upstream_host, Outcome::Status(status.as_u16()));
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(downstream_upgrade) = downstream_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = tokio::join!(downstream_upgrade, upstream_upgrade) {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
    let response_headers = response.headers_mut();
    headers::remove_hop_by_hop(response_headers, status == StatusCode::SWITCHING_PROTOCOLS);
    let elapsed = started.elapsed().as_millis() as u64;
    response_headers.insert(&X_SERVICE_TIME, HeaderValue::from(elapsed));
    response_headers.insert(header::SERVER, manager.server_header.clone());
    headers::apply_levels(
        [
            &table.response_headers,
            &route.vhost().response_headers,
            &route_entry.response_headers,
        ],
        table.most_specific_header_mutations_wins,
        response_headers,
    );
    // Headers count as activity for the idle timeout; a complete response needs no timer.
    let timer = match timer {
        Some(mut timer) if !http_body::Body::is_end_stream(response.body()) => {
            timer.touch();
            Some(timer)
        }
        _ => None,
    };
    Ok(response.map(|body| {
        ResponseBody::Upstream(UpstreamBody::new(
            body,
            timer,
            (rq_active, host_active),
            lease,
        ))
    }))
}

/// Waits for the upstream response headers under the request's timer, which it creates: the
/// route timeout (started at once, or when `request_end` fires for a request with a body) and
/// the stream idle timeout. Returns the outcome and the timer, which then moves into the
/// response body.
async fn send_upstream<F>(
    sending: F,
    route_timeout: Option<Duration>,
    idle: Option<Duration>,
    mut request_end: Option<Arc<RequestEnd>>,
    (route_timeouts, idle_timeouts): (&Arc<Stat>, &Arc<Stat>),
) -> (Result<F::Output, StreamTimeout>, Option<StreamTimer>)
where
    F: Future,
{
    tokio::pin!(sending);
    let route_deadline = match request_end {
        None => route_timeout.map(|t| Instant::now() + t),
        Some(_) => None,
    };
    let mut timer = StreamTimer::new(route_deadline, idle, route_timeouts, idle_timeouts);
    let outcome = loop {
        let expired = async {
            match timer.as_mut() {
                Some(timer) => timer.expired().await,
                None => std::future::pending().await,
            }
        };
        let ended = async {
            match &request_end {
                Some(end) => end.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            result = &mut sending => break Ok(result),
            timeout = expired => break Err(timeout),
            () = ended => {
                request_end = None;
                let timeout = route_timeout.unwrap_or_default();
                start_route_timer(&mut timer, timeout, idle, route_timeouts, idle_timeouts);
            }
        }
    };
    // A response that came before the request ended: its timeout starts now.
    if request_end.is_some()
        && let Some(timeout) = route_timeout
    {
        start_route_timer(&mut timer, timeout, idle, route_timeouts, idle_timeouts);
    }
    (outcome, timer)
}

/// Starts the route timeout on a request's timer, creating the timer if nothing needed one yet.
fn start_route_timer(
    timer: &mut Option<StreamTimer>,
    timeout: Duration,
    idle: Option<Duration>,
    route_timeouts: &Arc<Stat>,
    idle_timeouts: &Arc<Stat>,
) {
    match timer {
        Some(timer) => timer.start_route(timeout),
        None => {
            *timer = StreamTimer::new(
                Some(Instant::now() + timeout),
                idle,
                route_timeouts,
                idle_timeouts,
            )
        }
    }
}
