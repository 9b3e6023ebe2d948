//! Forwarding a request upstream: the cluster (named, from a header, or weighted), upgrades, the
//! upstream request (rewrites, `Host`, timeouts, route header mutations), then, in Envoy's
//! order, a host from the load balancer and the circuit breakers of the route's priority,
//! mirrors, and attempts: the request sent under the route, idle and per-try timeouts, and —
//! when the retry policy says so — another attempt, to another host, after a back-off. Every
//! attempt is reported to the cluster's outcome hook; the response of the last one goes back
//! downstream. A request answered here without an attempt is logged as it was when answered.

use std::borrow::Cow;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use rand::Rng;
use remora_config::route::{ClusterSpec, Forward, HostRewrite};
use tokio::time::Instant;

use super::hash_key::request_hash_key;
use super::mirror;
use super::retry::{NoRetry, Retries, Tried};
use super::{RouteRequest, unforwarded};
use crate::body::outgoing::OutgoingBody;
use crate::body::replay::SharedBody;
use crate::body::request::{RequestBody, RequestEnd};
use crate::config::UpstreamProtocol;
use crate::error::{ProxyError, ResponseFlag};
use crate::http::headers;
use crate::http::local_reply::LocalReply;
use crate::http::response_body::{ResponseBody, UpstreamBody};
use crate::http::stream_timer::{SpareSleeps, StreamTimeout, StreamTimer};
use crate::stats::{ClusterStats, GaugeGuard, Stat};
use crate::upstream::pool::{Lease, LocalAddress, PoolError};
use crate::upstream::{Cluster, Host, HostGauge, LbContext, Outcome};

static X_EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
static X_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static X_ORIGINAL_HOST: HeaderName = HeaderName::from_static("x-envoy-original-host");
static X_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static X_IS_TIMEOUT_RETRY: HeaderName = HeaderName::from_static("x-envoy-is-timeout-retry");
static X_RQ_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
static X_PER_TRY_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
/// Request headers the router reads and removes, as Envoy's does (retry state, timeouts, the
/// alternative stat name); `x-envoy-expected-rq-timeout-ms` is set anew.
const CONSUMED_HEADERS: [&str; 10] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-alt-stat-name",
];
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static X_IMMEDIATE_HC_FAIL: HeaderName =
    HeaderName::from_static("x-envoy-immediate-health-check-fail");

/// The cluster a forward goes to.
fn cluster_name<'a>(forward: &'a Forward, request: &http::request::Parts) -> Cow<'a, str> {
    match &forward.cluster {
        ClusterSpec::Name(name) => Cow::Borrowed(name),
        // Copied: the request's headers change before the name is last used.
        ClusterSpec::Header(name) => Cow::Owned(
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        ),
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
            Cow::Borrowed(chosen)
        }
    }
}

/// A `grpc-timeout` header's value (`1S`, `250m`, ...), as gRPC writes it.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// A copy of a request head for an attempt that may be retried, without its extensions (they
/// go with the first attempt).
fn copy_head(head: &http::request::Parts) -> http::request::Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = head.method.clone();
    copy.uri = head.uri.clone();
    copy.version = head.version;
    copy.headers = head.headers.clone();
    copy
}

/// A millisecond count from a request header (`x-envoy-upstream-rq-timeout-ms` and friends).
fn header_ms(headers: &HeaderMap, name: &HeaderName) -> Option<Duration> {
    let ms: u64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms))
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
        trace,
        started,
        authority,
        client,
        internal,
        path_and_query,
        sleeps,
        ..
    } = request;
    let hcm = &manager.config;
    // The router's dynamic stats, with whether they go under `internal.` or `external.`.
    let dynamic = hcm.dynamic_stats.then_some(internal);
    let name = cluster_name(forward, &parts);
    let Some(cluster) = snapshot.cluster(&name) else {
        manager.stats.no_cluster.inc();
        let status = StatusCode::from_u16(forward.cluster_not_found_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut reply = LocalReply::new(status);
        reply.flag = Some(ResponseFlag::NoClusterFound);
        reply.details = "cluster_not_found".into();
        tracing::debug!(cluster = %name, "cluster not found");
        reply.from_router = true;
        return Err(unforwarded(log, &parts, reply));
    };
    // Logged from here on, also when no host can be had (as Envoy logs it).
    if let Some(entry) = log.as_mut() {
        entry.upstream_cluster = Some(cluster.config.clone());
    }

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
                reply.details = "upgrade_failed".into();
                tracing::debug!(%kind, "upgrade not allowed");
                return Err(unforwarded(log, &parts, reply));
            }
            // Over HTTP/2 an upgrade is an extended CONNECT (RFC 8441), which Remora does
            // not send yet: refused with a reason, not forwarded as a plain request whose
            // tunnel bytes the downstream would then send as garbage.
            if cluster.pools.protocol() == UpstreamProtocol::Http2 {
                let mut reply = LocalReply::new(StatusCode::NOT_IMPLEMENTED);
                reply.body = bytes::Bytes::from_static(
                    b"upgrade to an HTTP/2 cluster (extended CONNECT) is not supported",
                );
                reply.details = "upgrade_failed".into();
                return Err(unforwarded(log, &parts, reply));
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
            match http::uri::PathAndQuery::try_from(rewritten) {
                Ok(rewritten) => rewritten,
                Err(e) => {
                    let reply = LocalReply::from(ProxyError::downstream(
                        ResponseFlag::NoRouteFound,
                        format!("bad rewritten path: {e}"),
                    ));
                    return Err(unforwarded(log, &parts, reply));
                }
            }
        }
        None => path_and_query.clone(),
    };
    // Origin-form; the pool adds the authority where the protocol wants it (HTTP/2).
    parts.uri = Uri::from(upstream_pq);
    if !parts.headers.contains_key(header::HOST)
        && let Some(value) = authority
    {
        parts.headers.insert(header::HOST, value.clone());
    }
    if let HostRewrite::Literal(value) = &forward.host_rewrite {
        rewrite_host(&mut parts.headers, value.clone());
    }

    // Timeouts: the route's, unless the request asks (`x-envoy-upstream-rq-timeout-ms`, or a
    // `grpc-timeout` where the route lets it), and the retry policy's per-try timeout.
    // Control headers survive only from internal requests; most requests have none, and then
    // none is looked up.
    let control = headers::has_envoy_headers(&parts.headers);
    let asked_timeout = control
        .then(|| header_ms(&parts.headers, &X_RQ_TIMEOUT_MS))
        .flatten();
    let route_timeout = match asked_timeout {
        Some(asked) => (!asked.is_zero()).then_some(asked),
        None => match &forward.grpc_route_timeout {
            Some(policy) => match grpc_timeout(&parts.headers) {
                Some(asked) => Some(policy.apply(asked)).filter(|t| !t.is_zero()),
                None => forward.timeout,
            },
            None => forward.timeout,
        },
    };
    let mut retries = if upgrading {
        None
    } else {
        Retries::new(forward.retry.as_deref(), &parts.headers, control)
    };
    let per_try_timeout = control
        .then(|| header_ms(&parts.headers, &X_PER_TRY_TIMEOUT_MS))
        .flatten()
        .or_else(|| retries.as_ref().and_then(|r| r.policy().per_try_timeout))
        .filter(|t| !t.is_zero());
    let per_try_idle = retries
        .as_ref()
        .and_then(|r| r.policy().per_try_idle_timeout);
    // The router consumes its control headers: they do not go upstream.
    if control {
        headers::remove_envoy_headers(&mut parts.headers, &CONSUMED_HEADERS);
    }
    let expected = match (route_timeout, per_try_timeout) {
        (Some(route), Some(per_try)) => Some(route.min(per_try)),
        (route, per_try) => route.or(per_try),
    };
    if expected == forward.timeout && forward.timeout_header.is_some() {
        if let Some(value) = &forward.timeout_header {
            parts.headers.insert(&X_EXPECTED_TIMEOUT, value.clone());
        }
    } else if let Some(expected) = expected {
        parts.headers.insert(
            &X_EXPECTED_TIMEOUT,
            headers::number(expected.as_millis() as u64),
        );
    }
    let table = &route.table;
    headers::apply_levels(
        [
            &table.request_headers,
            &route.vhost().request_headers,
            &route_entry.request_headers,
        ],
        table.most_specific_header_mutations_wins,
        &mut parts.headers,
    );

    // A host, once the request is final, as in Envoy: a hash policy reads its headers as
    // they will be sent, and a request refused here is logged with them.
    let hash_key = request_hash_key(
        cluster,
        &forward.hash_policies,
        &parts,
        &path_and_query,
        downstream.destination,
        client,
    );
    let lb_context = LbContext {
        hash: hash_key.hash,
        original_dst: Some(downstream.destination),
        ..LbContext::default()
    };
    let Some(first_host) = cluster.choose(&lb_context) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        let reply = no_healthy_upstream(&name);
        return Err(unforwarded(log, &parts, reply));
    };
    // `max_requests` of the route's priority: the place is held by the response body until it
    // ends (as Envoy counts it).
    let limits = cluster.breakers.for_priority(forward.high_priority);
    let Some(request_place) = limits.try_request() else {
        cluster.stats.upstream_rq_active_overflow.inc();
        let mut reply =
            ProxyError::upstream(ResponseFlag::UpstreamOverflow, "max_requests reached")
                .into_router_reply();
        reply.details = "upstream_reset_before_response_started{overflow}".into();
        return Err(unforwarded(log, &parts, reply));
    };
    let rq_active = (
        request_place,
        GaugeGuard::cluster(&cluster.stats, |stats| &stats.upstream_rq_active),
    );
    // What the body reader counts, for the access log or else the span.
    let bytes_received = log
        .as_ref()
        .map(|entry| entry.bytes_received.clone())
        .or_else(|| trace.as_ref().and_then(|t| t.bytes_received()));
    let mut trace = trace;
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

    // The downstream body: read once, with the HCM's request timeout; shared when retries or
    // mirrors may read it again.
    let timed_out = hcm
        .request_timeout
        .map(|_| Arc::new(AtomicBool::new(false)));
    let body_deadline = hcm.request_timeout.map(|t| started + t);
    // The route and per-try timeouts start once the request has been sent in full, as in
    // Envoy: at once for a request without a body, else when its body ends.
    let has_body = !http_body::Body::is_end_stream(&body);
    let timed = log.as_ref().is_some_and(|entry| entry.timed());
    let request_end = (has_body && (route_timeout.is_some() || per_try_timeout.is_some() || timed))
        .then(|| Arc::new(RequestEnd::timed(timed)));
    if let Some(entry) = log.as_mut().filter(|_| timed) {
        entry.timings.body_end.clone_from(&request_end);
    }
    // Only a body can fail on the client's side.
    let body_failed = has_body.then(|| Arc::new(AtomicBool::new(false)));
    let downstream_body = RequestBody::new(
        body,
        body_deadline,
        timed_out.clone(),
        request_end.clone(),
        body_failed.clone(),
        bytes_received,
        body_filters,
    );
    let mirroring = !forward.mirrors.is_empty() && !upgrading;
    let mut direct = None;
    let shared = match has_body && (retries.is_some() || mirroring) {
        true => Some(SharedBody::new(downstream_body, forward.buffer_limit)),
        false => {
            direct = Some(downstream_body);
            None
        }
    };
    if mirroring {
        mirror::send(
            &forward.mirrors,
            snapshot,
            mirror::Copy {
                method: &parts.method,
                uri: &parts.uri,
                version: parts.version,
                headers: &parts.headers,
                body: shared.as_ref(),
                timeout: route_timeout,
                internal,
            },
        );
    }

    // The stream's bound: a `grpc-timeout` where the route lets it set the bound, else the
    // route's `max_stream_duration`, else the connection manager's.
    let asked_duration = match &forward.stream_duration.grpc {
        Some(policy) => grpc_timeout(&parts.headers).map(|asked| policy.apply(asked)),
        None => None,
    };
    let max_duration = asked_duration
        .or(forward.stream_duration.max)
        .or(hcm.max_stream_duration)
        .filter(|d| !d.is_zero());

    // Attempts.
    let mut clock = Clock::new(
        route_timeout,
        forward.idle_timeout.unwrap_or(hcm.stream_idle_timeout),
        request_end,
        max_duration.map(|d| {
            (
                started + d,
                &manager.stats.downstream_rq_max_duration_reached,
            )
        }),
        (&cluster.stats, &manager.stats.downstream_rq_idle_timeout),
        sleeps,
    );
    let pools = cluster.pools_for(forward.high_priority);
    let mut tried: Vec<Arc<Host>> = Vec::new();
    let mut host = first_host;
    let mut attempt: u32 = 1;
    let mut after_timeout = false;
    let mut parts = Some(parts);
    let mut sent_at;
    let outcome = loop {
        // Each attempt sends the head itself and, when a retry may follow, keeps a copy for
        // the next one. Sending the original rather than the copy matters: hyper reads the
        // response into the header map of the request it sent, and the original's has the
        // room a recycled map grew to, where a copy's would have to grow (and rehash) again.
        let mut attempt_parts = parts
            .take()
            .expect("the head is kept until the last attempt");
        if retries.is_some() {
            parts = Some(copy_head(&attempt_parts));
        }
        let version = attempt_parts.version;
        let headers_mut = &mut attempt_parts.headers;
        if let HostRewrite::Auto = forward.host_rewrite
            && !host.hostname.is_empty()
            && let Ok(value) = HeaderValue::from_str(&host.hostname)
        {
            rewrite_host(headers_mut, value);
        }
        if forward.attempt_count_upstream {
            headers_mut.insert(&X_ATTEMPT_COUNT, headers::number(attempt.into()));
        }
        if forward.timeout_retry_header && attempt > 1 {
            headers_mut.insert(
                &X_IS_TIMEOUT_RETRY,
                HeaderValue::from_static(if after_timeout { "true" } else { "false" }),
            );
        }
        // The trace context goes upstream (the upstream span's, with spawn_upstream_span: one
        // for the last attempt).
        if let Some(trace) = trace.as_deref_mut() {
            let body_empty = attempt == 1 && !has_body;
            trace.on_upstream(headers_mut, &name, host.addr, version, body_empty);
        }
        // The access log shows the request as forwarded (generated x-request-id, appended XFF).
        if let Some(entry) = log.as_mut() {
            entry.capture_request(&attempt_parts);
            entry.upstream_host = Some(host.addr);
            entry.upstream_request_attempt_count = attempt;
        }
        let outgoing = match (&shared, direct.take()) {
            (Some(shared), _) => OutgoingBody::Shared(shared.reader()),
            (None, Some(body)) => OutgoingBody::Direct(body),
            (None, None) => OutgoingBody::Empty,
        };
        let request = Request::from_parts(attempt_parts, outgoing);

        let host_active = HostGauge::new(&host.state, |s| &s.rq_active);
        // Asked for only by a log, which shows it also for an attempt that timed out.
        let local = log.as_ref().map(|_| LocalAddress::default());
        sent_at = Instant::now();
        if let Some(entry) = log.as_mut().filter(|_| timed) {
            entry.timings.sent = Some(sent_at.into_std());
        }
        let sent = clock
            .run(
                pin!(pools.send(&host, request, local.as_ref())),
                per_try_timeout,
                per_try_idle,
            )
            .await;
        if let (Some(entry), Some(local)) = (log.as_mut(), local) {
            entry.upstream_local = local.into_inner().unwrap_or_else(|p| p.into_inner());
        }
        if let Ok(Ok(_)) = &sent {
            cluster.record_response_time(&host, sent_at);
        }
        // Envoy counts a request upstream once it has a connection: not when it overflowed or
        // its connection could not be made.
        if !matches!(
            &sent,
            Ok(Err(PoolError::Overflow | PoolError::Connect { .. }))
        ) {
            cluster.stats.upstream_rq_total.inc();
            host.stats().rq_total.inc();
        }
        let (considered, result) = classify(
            sent,
            (cluster, dynamic),
            &host,
            &manager.stats.downstream_rq_timeout,
            body_failed.as_deref(),
            timed_out.as_deref(),
            attempt > 1,
        );
        // No retry policy, nothing to reconsider, or a body that outgrew its buffer and
        // cannot be sent again: this attempt's outcome is the request's.
        let replayable = shared.as_ref().is_none_or(SharedBody::replayable);
        let (Some(state), true) = (retries.as_mut(), replayable) else {
            break result.map(|(response, lease)| (response, lease, host_active, host));
        };
        let view = match (&considered, &result) {
            (Considered::Never, _) => {
                break result.map(|(response, lease)| (response, lease, host_active, host));
            }
            (Considered::Response, Ok((response, _))) => Tried::Response {
                status: response.status(),
                headers: response.headers(),
            },
            (Considered::Failure(tried), _) => match tried {
                Tried::ConnectFailure => Tried::ConnectFailure,
                Tried::Overflow => Tried::Overflow,
                Tried::Reset { sent, refused } => Tried::Reset {
                    sent: *sent,
                    refused: *refused,
                },
                Tried::Response { .. } => Tried::Overflow,
            },
            (Considered::Response, Err(_)) => Tried::Overflow,
        };
        let decision = state.decide(&view, limits, pools.pending().0, &cluster.stats);
        let back_off = match decision {
            Ok(back_off) => back_off,
            Err(why) => {
                if let Some(entry) = log.as_mut() {
                    match why {
                        NoRetry::LimitExceeded => {
                            entry.flags.insert(ResponseFlag::UpstreamRetryLimitExceeded)
                        }
                        NoRetry::Overflow => entry.flags.insert(ResponseFlag::UpstreamOverflow),
                        NoRetry::NotRetriable => {}
                    }
                }
                break result.map(|(response, lease)| (response, lease, host_active, host));
            }
        };
        after_timeout = matches!(&result, Err(reply) if reply.flag == Some(ResponseFlag::UpstreamRequestTimeout));
        // Give up this attempt (its connection closes if the response was not read).
        drop(result);
        drop(host_active);
        if let Err(expired) = clock.sleep(back_off).await {
            break Err(clock.expired_reply(expired, cluster, &host));
        }
        tried.push(host.clone());
        host = match choose_again(cluster, &lb_context, &tried, state.policy()) {
            Some(next) => next,
            None => {
                cluster.stats.upstream_cx_none_healthy.inc();
                break Err(no_healthy_upstream(&name));
            }
        };
        attempt += 1;
    };
    let (mut response, lease, host_active, _host) = match outcome {
        Ok(done) => done,
        Err(mut reply) => {
            if forward.attempt_count_response && reply.from_router {
                reply
                    .headers
                    .insert(&X_ATTEMPT_COUNT, headers::number(attempt.into()));
            }
            return Err(reply);
        }
    };
    if let Some(trace) = trace {
        trace.on_upstream_response();
    }
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(downstream_upgrade) = downstream_upgrade
    {
        super::upgrade::spawn(
            downstream_upgrade,
            hyper::upgrade::on(&mut response),
            forward.idle_timeout.unwrap_or(hcm.stream_idle_timeout),
            manager.stats.clone(),
        );
    }
    let response_headers = response.headers_mut();
    headers::remove_hop_by_hop(response_headers, status == StatusCode::SWITCHING_PROTOCOLS);
    // A 1xx or 204 has no body whatever the upstream's head says, and an HTTP/2 client resets
    // a stream whose 204 carries a length (hyper drops the length toward HTTP/1.1 only).
    if status == StatusCode::NO_CONTENT || status.is_informational() {
        response_headers.remove(header::CONTENT_LENGTH);
    }
    // One clock read for the service time and the idle timeouts, which restart here.
    let now = Instant::now();
    if let Some(entry) = log.as_mut().filter(|_| timed) {
        entry.timings.response_started = Some(now.into_std());
    }
    let elapsed = now.saturating_duration_since(started).as_millis() as u64;
    response_headers.insert(&X_SERVICE_TIME, headers::number(elapsed));
    response_headers.insert(header::SERVER, manager.server_header.clone());
    hash_key.set_cookies(response_headers);
    if forward.attempt_count_response {
        response_headers.insert(&X_ATTEMPT_COUNT, headers::number(attempt.into()));
    }
    headers::apply_levels(
        [
            &table.response_headers,
            &route.vhost().response_headers,
            &route_entry.response_headers,
        ],
        table.most_specific_header_mutations_wins,
        response_headers,
    );
    // Headers count as activity for the idle timeouts; a complete response needs no timer.
    let timer = match clock.into_timer() {
        _ if http_body::Body::is_end_stream(response.body()) => None,
        timer => match per_try_idle {
            Some(idle) => Some(StreamTimer::add_per_try_idle(
                now,
                timer,
                idle,
                (&cluster.stats, &manager.stats.downstream_rq_idle_timeout),
                sleeps,
            )),
            None => timer.map(|mut timer| {
                timer.touch_at(now);
                timer
            }),
        },
    };
    Ok(response.map(|body| {
        ResponseBody::Upstream(Box::new(UpstreamBody::new(
            body,
            timer,
            (rq_active.0, rq_active.1, host_active),
            lease,
            (
                dynamic.map(|internal| cluster.responses.time(internal)),
                sent_at,
            ),
        )))
    }))
}

/// Envoy's 503 when a cluster has no host to take the request (flag UH).
fn no_healthy_upstream(cluster: &str) -> LocalReply {
    tracing::debug!(%cluster, "no healthy host");
    let mut reply = ProxyError::upstream(ResponseFlag::NoHealthyUpstream, "no healthy upstream")
        .into_router_reply();
    reply.details = "no_healthy_upstream".into();
    reply
}

/// Replaces `Host`, keeping the original in `x-envoy-original-host`, as Envoy does.
fn rewrite_host(headers: &mut HeaderMap, value: HeaderValue) {
    if let Some(original) = headers.insert(header::HOST, value)
        && !headers.contains_key(&X_ORIGINAL_HOST)
    {
        headers.insert(&X_ORIGINAL_HOST, original);
    }
}

/// A host for a retry: the policy's `previous_hosts` predicate asks the load balancer again
/// (up to `host_selection_retry_max_attempts` times) while it picks a host already tried.
fn choose_again(
    cluster: &Cluster,
    context: &LbContext<'_>,
    tried: &[Arc<Host>],
    policy: &remora_config::retry::RetryPolicy,
) -> Option<Arc<Host>> {
    // `previous_priorities`: every `n` attempts, the priorities tried so far are left out.
    let excluded_priorities = match policy.host_selection.previous_priorities_every {
        Some(n) if n > 0 => {
            let counted = tried.len() - tried.len() % n as usize;
            tried[..counted]
                .iter()
                .filter(|host| host.priority < 64)
                .fold(0u64, |mask, host| mask | 1 << host.priority)
        }
        _ => 0,
    };
    let context = LbContext {
        tried,
        excluded_priorities,
        ..*context
    };
    let mut host = cluster.choose(&context)?;
    if policy.host_selection.avoid_previous_hosts {
        for _ in 0..policy.host_selection.max_attempts {
            if !tried.iter().any(|t| t.addr == host.addr) {
                break;
            }
            host = cluster.choose(&context)?;
        }
    }
    Some(host)
}

/// An upstream response with the HTTP/1.1 connection it arrived on.
type Answer = (Response<Incoming>, Option<Lease>);
type Sent = Result<Result<Answer, PoolError>, Expired>;

/// How an attempt's outcome may lead to a retry.
enum Considered {
    /// Never: a downstream fault, or the route ran out of time.
    Never,
    /// As the response it got.
    Response,
    /// As this failure.
    Failure(Tried<'static>),
}

/// What an attempt came to: for the retry decision, and as the response or local reply it
/// would end the request with. Counts the outcome for the host.
fn classify(
    sent: Sent,
    (cluster, dynamic): (&Cluster, Option<bool>),
    host: &Host,
    downstream_timeouts: &Stat,
    body_failed: Option<&AtomicBool>,
    timed_out: Option<&AtomicBool>,
    retried: bool,
) -> (Considered, Result<Answer, LocalReply>) {
    let fail = |flag: ResponseFlag, details: &'static str| {
        let mut reply = ProxyError::upstream(flag, details).into_router_reply();
        reply.details = details.into();
        Err(reply)
    };
    let reset = |flag: ResponseFlag, reason: &str| Err(reset_reply(flag, reason, retried, None));
    match sent {
        Ok(Ok((response, lease))) => {
            let status = response.status().as_u16();
            if let Some(internal) = dynamic {
                cluster.responses.count(status, internal);
            }
            cluster.record_outcome(host, Outcome::Status(status));
            if headers::contains_by_scan(response.headers(), &X_IMMEDIATE_HC_FAIL) {
                cluster.immediate_health_check_fail(host);
            }
            (Considered::Response, Ok((response, lease)))
        }
        Err(Expired::Stream(StreamTimeout::MaxDuration)) => {
            (Considered::Never, Err(duration_timeout_reply()))
        }
        Err(Expired::Stream(timeout)) => {
            cluster.record_outcome(
                host,
                Outcome::Timeout {
                    route: timeout != StreamTimeout::Idle,
                },
            );
            (Considered::Never, fail(timeout.flag(), timeout.details()))
        }
        Err(Expired::PerTry { idle }) => {
            if idle {
                cluster.stats.upstream_rq_per_try_idle_timeout.inc();
            } else {
                cluster.stats.upstream_rq_per_try_timeout.inc();
            }
            host.stats().rq_timeout.inc();
            cluster.record_outcome(host, Outcome::Timeout { route: true });
            (
                Considered::Failure(Tried::Reset {
                    sent: true,
                    refused: false,
                }),
                fail(
                    ResponseFlag::UpstreamRequestTimeout,
                    if idle {
                        "upstream_per_try_idle_timeout"
                    } else {
                        "upstream_per_try_timeout"
                    },
                ),
            )
        }
        Ok(Err(PoolError::Overflow)) => (
            Considered::Failure(Tried::Overflow),
            reset(ResponseFlag::UpstreamOverflow, "overflow"),
        ),
        Ok(Err(PoolError::Connect { reason, transport })) => {
            cluster.record_outcome(host, Outcome::ConnectFailed { http: true });
            tracing::debug!(%reason, "upstream connect failed");
            let reason = if reason.ends_with("connect timeout") {
                "connection timeout"
            } else {
                "remote connection failure"
            };
            let flag = ResponseFlag::UpstreamConnectionFailure;
            (
                Considered::Failure(Tried::ConnectFailure),
                Err(reset_reply(flag, reason, retried, transport)),
            )
        }
        Ok(Err(PoolError::Request(error))) => {
            cluster.record_outcome(host, Outcome::Reset);
            // The downstream's own request failed first: its fault, not the upstream's.
            if body_failed.is_some_and(|failed| failed.load(Ordering::Acquire)) {
                return (
                    Considered::Never,
                    Err(ProxyError::downstream(
                        ResponseFlag::DownstreamProtocolError,
                        "malformed request body",
                    )
                    .into()),
                );
            }
            if timed_out.is_some_and(|t| t.load(Ordering::Acquire)) {
                downstream_timeouts.inc();
                let mut reply =
                    LocalReply::new(StatusCode::REQUEST_TIMEOUT).with_body("request timeout");
                reply.details = "request_overall_timeout".into();
                return (Considered::Never, Err(reply));
            }
            tracing::debug!(%error, "upstream request failed");
            let refused = refused_stream(&error);
            // A stream the upstream reset (HTTP/2) is a remote reset; a response head that
            // does not parse, a protocol error (a 502, flag UPE); a connection that closed
            // under the request, a connection termination (flag UC).
            let (flag, reason) = match stream_reset(&error) {
                Some(_) if refused => (
                    ResponseFlag::UpstreamRemoteReset,
                    "remote refused stream reset",
                ),
                Some(_) => (ResponseFlag::UpstreamRemoteReset, "remote reset"),
                None if error.is_parse() || error.is_parse_too_large() => {
                    cluster.stats.upstream_cx_protocol_error.inc();
                    (ResponseFlag::UpstreamProtocolError, "protocol error")
                }
                None => (
                    ResponseFlag::UpstreamConnectionTermination,
                    "connection termination",
                ),
            };
            (
                Considered::Failure(Tried::Reset {
                    sent: !error.is_canceled(),
                    refused,
                }),
                reset(flag, reason),
            )
        }
    }
}

/// Envoy 1.40's answer when a stream outlives its `max_stream_duration` before response
/// headers: the connection manager's 504 (no route headers, no response flag in the access
/// log), `DEADLINE_EXCEEDED` for gRPC.
fn duration_timeout_reply() -> LocalReply {
    let mut reply =
        LocalReply::new(StatusCode::GATEWAY_TIMEOUT).with_body("downstream duration timeout");
    reply.details = "max_duration_timeout".into();
    reply.grpc_status = Some(4);
    reply
}

/// Envoy's local reply when an attempt failed before response headers: 503 with the reset
/// reason (after retries, "retried and the latest reset reason").
/// The details name the reason, and what the transport said when it failed (as Envoy's do:
/// `{remote_connection_failure|delayed_connect_error: Connection refused}`).
fn reset_reply(
    flag: ResponseFlag,
    reason: &str,
    retried: bool,
    transport: Option<Arc<str>>,
) -> LocalReply {
    let status = match flag {
        ResponseFlag::UpstreamProtocolError => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut reply = LocalReply::new(status).with_body(format!(
        "upstream connect error or disconnect/reset before headers. {}reset reason: {reason}",
        if retried {
            "retried and the latest "
        } else {
            ""
        }
    ));
    reply.flag = Some(flag);
    reply.details = match &transport {
        Some(transport) => {
            format!("upstream_reset_before_response_started{{{reason}|{transport}}}").into()
        }
        None => format!("upstream_reset_before_response_started{{{reason}}}").into(),
    };
    reply.transport_failure = transport;
    reply.from_router = true;
    if flag == ResponseFlag::UpstreamOverflow {
        reply.headers.insert(
            HeaderName::from_static("x-envoy-overloaded"),
            HeaderValue::from_static("true"),
        );
    }
    reply
}

/// The HTTP/2 reset reason of a stream the upstream reset, if that is what failed.
fn stream_reset(error: &hyper::Error) -> Option<h2::Reason> {
    crate::error::source_of::<h2::Error>(error)?.reason()
}

/// Whether an HTTP/2 upstream refused the stream (REFUSED_STREAM): it never processed it.
fn refused_stream(error: &hyper::Error) -> bool {
    stream_reset(error) == Some(h2::Reason::REFUSED_STREAM)
}

/// Which timer ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// The route timeout or the stream idle timeout: the request is over.
    Stream(StreamTimeout),
    /// This attempt's per-try timeout (`idle`: the per-try idle timeout, before headers).
    PerTry { idle: bool },
}

/// The timers of one forwarded request across its attempts. The route timeout (from when the
/// request has been received in full) and the stream idle timeout span all attempts and the
/// back-offs between them; the per-try timeouts restart with each attempt.
struct Clock<'s> {
    timer: Option<StreamTimer>,
    /// Set while the request body is still arriving: the route timeout starts when it ends.
    request_end: Option<Arc<RequestEnd>>,
    route_timeout: Option<Duration>,
    idle: Option<Duration>,
    stats: (&'s Arc<ClusterStats>, &'s Arc<Stat>),
    sleeps: &'s Arc<SpareSleeps>,
}

impl<'s> Clock<'s> {
    fn new(
        route_timeout: Option<Duration>,
        idle: Option<Duration>,
        request_end: Option<Arc<RequestEnd>>,
        max_duration: Option<(Instant, &Arc<Stat>)>,
        stats: (&'s Arc<ClusterStats>, &'s Arc<Stat>),
        sleeps: &'s Arc<SpareSleeps>,
    ) -> Self {
        let now = Instant::now();
        let route_deadline = match request_end {
            None => route_timeout.map(|t| now + t),
            Some(_) => None,
        };
        let mut timer = StreamTimer::new(now, route_deadline, idle, stats.0, stats.1, sleeps);
        if let Some((end, counter)) = max_duration {
            timer = Some(StreamTimer::add_max_duration(
                timer, end, counter, stats, sleeps,
            ));
        }
        Clock {
            timer,
            request_end,
            route_timeout,
            idle,
            stats,
            sleeps,
        }
    }

    /// The request has been received in full: the route timeout starts.
    fn start_route(&mut self) {
        self.request_end = None;
        let Some(timeout) = self.route_timeout else {
            return;
        };
        match &mut self.timer {
            Some(timer) => timer.start_route(timeout),
            None => {
                let now = Instant::now();
                self.timer = StreamTimer::new(
                    now,
                    Some(now + timeout),
                    self.idle,
                    self.stats.0,
                    self.stats.1,
                    self.sleeps,
                )
            }
        }
    }

    /// Runs one attempt under the timers; the per-try timeouts start once the request has
    /// been received in full. The caller pins `attempt`, so it is stored once, in the
    /// caller's frame.
    async fn run<F: Future>(
        &mut self,
        mut attempt: Pin<&mut F>,
        per_try: Option<Duration>,
        per_try_idle: Option<Duration>,
    ) -> Result<F::Output, Expired> {
        let per_try_limit = match (per_try, per_try_idle) {
            (Some(a), Some(b)) => Some((a.min(b), b < a)),
            (Some(a), None) => Some((a, false)),
            (None, Some(b)) => Some((b, true)),
            (None, None) => None,
        };
        let mut per_try_at = match (&self.request_end, per_try_limit) {
            (None, Some((limit, _))) => Some(Instant::now() + limit),
            _ => None,
        };
        loop {
            let expired = async {
                match self.timer.as_mut() {
                    Some(timer) => timer.expired().await,
                    None => std::future::pending().await,
                }
            };
            let ended = async {
                match &self.request_end {
                    Some(end) => end.ended().await,
                    None => std::future::pending().await,
                }
            };
            let per_try_expired = async {
                match per_try_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                result = &mut attempt => return Ok(result),
                timeout = expired => return Err(Expired::Stream(timeout)),
                () = per_try_expired => {
                    let idle = per_try_limit.is_some_and(|(_, idle)| idle);
                    return Err(Expired::PerTry { idle });
                }
                () = ended => {
                    self.start_route();
                    if let Some((limit, _)) = per_try_limit {
                        per_try_at = Some(Instant::now() + limit);
                    }
                }
            }
        }
    }

    /// Waits out a back-off, unless the route runs out of time first.
    async fn sleep(&mut self, back_off: Duration) -> Result<(), Expired> {
        self.run(pin!(tokio::time::sleep(back_off)), None, None)
            .await
    }

    /// The local reply for a request whose timers ran out between attempts.
    fn expired_reply(&self, expired: Expired, cluster: &Cluster, host: &Host) -> LocalReply {
        let timeout = match expired {
            Expired::Stream(StreamTimeout::MaxDuration) => return duration_timeout_reply(),
            Expired::Stream(timeout) => timeout,
            Expired::PerTry { .. } => StreamTimeout::Route,
        };
        cluster.record_outcome(
            host,
            Outcome::Timeout {
                route: timeout != StreamTimeout::Idle,
            },
        );
        let mut reply =
            ProxyError::upstream(timeout.flag(), timeout.to_string()).into_router_reply();
        reply.details = timeout.details().into();
        reply
    }

    /// The timer for the response body. A response that came before the request ended: its
    /// route timeout starts now.
    fn into_timer(mut self) -> Option<StreamTimer> {
        if self.request_end.is_some() {
            self.start_route();
        }
        self.timer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let mut headers = HeaderMap::new();
        for (text, expected) in [
            ("2S", Duration::from_secs(2)),
            ("250m", Duration::from_millis(250)),
            ("1M", Duration::from_secs(60)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            headers.insert(&GRPC_TIMEOUT, HeaderValue::from_static(text));
            assert_eq!(grpc_timeout(&headers), Some(expected), "{text}");
        }
        for bad in ["", "S", "5", "123456789S", "5x"] {
            headers.insert(&GRPC_TIMEOUT, HeaderValue::from_static(bad));
            assert_eq!(grpc_timeout(&headers), None, "{bad}");
        }
    }
}
