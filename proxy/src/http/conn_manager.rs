//! The HTTP connection manager: serves one downstream connection with hyper (HTTP/1.1 with
//! keep-alive and pipelining, h2c, or auto-detect) and runs each request through its stages:
//!
//! 1. codec checks: a head refused by [`crate::http::codec_guard`] gets its reply; the HTTP/1.0
//!    policy and the one `Host` are settled,
//! 2. request headers as Envoy's connection manager sets them ([`crate::http::headers`]),
//! 3. the route, looked up in the route table of the config snapshot the request loaded,
//! 4. the HTTP filters' request phase, in order ([`crate::http::filter`]),
//! 5. the router, the terminal filter ([`crate::http::router`]),
//! 6. the filters' response phase in reverse order, for upstream responses and local replies
//!    alike ([`crate::http::local_reply`]),
//! 7. completion when the response body ends: filters told, the access log line written.
//!
//! Once response headers are sent, the route timeout and stream idle timeout keep running in
//! the response body (see [`crate::http::body`]).

// A local reply is an error value that is also a response (headers included); it is built
// only off the fast path, and boxing it would cost every such reply an allocation.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;

use crate::config::{Codec, HttpConnectionManager};
use crate::drain::{Phase, Watch};
use crate::error::ResponseFlag;
use crate::filter_chain::ConnectionInfo;
use crate::http::access_log::{Entry, PendingLine};
use crate::http::codec_guard::{
    GuardedIo, PATH_NORMALIZATION_FAILED, REQUEST_HEADER_TIMEOUT, Refusal, Refusals, Rules,
    ServedIo, Wire,
};
use crate::http::filter::{ConnectionState, FilterState, Stream};
use crate::http::headers;
use crate::http::local_reply::LocalReply;
use crate::http::response_body::{DownstreamSlots, ResponseBody, StreamEnding};
use crate::http::router::{self, RouteRequest};
use crate::http::selected::Selected;
use crate::http::stream_timer::SpareSleeps;
use crate::http::tracing::ActiveTrace;
use crate::http::tracing::propagation::Carried;
use crate::http::tracing::request_id::Reason;
use crate::stats::{GaugeGuard, Stat};
use remora_config::route::PseudoHeaders;

use super::manager::Manager;

/// Per-connection state shared by its requests.
struct Connection {
    manager: Arc<Manager>,
    info: ConnectionInfo,
    /// `https` on TLS-terminated connections, else `http`.
    scheme: &'static str,
    requests: AtomicU64,
    /// A request arrived over HTTP/2 (the drain grace period applies).
    http2: AtomicBool,
    /// The request that reached `max_requests_per_connection` arrived over HTTP/2: the
    /// connection drains (GOAWAY), as Envoy's does.
    last_request: tokio::sync::Notify,
    /// Requests whose response has not ended (the connection idle timeout waits for none).
    in_flight: Arc<Stat>,
    /// A request head the codec guard refused, waiting for its reply.
    refusals: Arc<Refusals>,
    /// What the HTTP filters keep for the whole connection.
    filter_state: ConnectionState,
    /// Timers of finished requests, kept for the next ones.
    sleeps: Arc<SpareSleeps>,
    /// Holds up `downstream_cx_http1_active` or `_http2_active` from the first request on.
    protocol_active: std::sync::OnceLock<GaugeGuard>,
}

/// Polls `future` outside tokio's budget: a poll that must leave the task's waker behind
/// cannot be one the budget turns into a no-op.
fn poll_unconstrained<F: Future + ?Sized>(
    future: std::pin::Pin<&mut F>,
    cx: &mut std::task::Context<'_>,
) -> Poll<F::Output> {
    std::pin::pin!(tokio::task::unconstrained(future)).poll(cx)
}

/// What ends one wait of a connection's loop.
enum ConnectionEvent {
    /// The connection ended; `protocol_error`: because the client broke the protocol.
    Ended {
        protocol_error: Option<ProtocolError>,
    },
    Phase(Phase),
    IdleTick,
    GraceOver,
    /// An HTTP/2 request reached `max_requests_per_connection`.
    LastRequest,
}

/// Serves one downstream connection until it closes, idles out, or is drained.
pub async fn serve<S>(manager: Arc<Manager>, stream: S, info: ConnectionInfo, mut watch: Watch)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let hcm = manager.config.clone();
    let stats = manager.stats.clone();
    let opened = Instant::now();
    stats.downstream_cx_total.inc();
    let _active = GaugeGuard::new(&stats.downstream_cx_active);
    let _tls_active = info.tls_terminated.then(|| {
        stats.downstream_cx_ssl_total.inc();
        GaugeGuard::new(&stats.downstream_cx_ssl_active)
    });
    let in_flight = Arc::new(Stat::default());
    let wire = Arc::new(Wire {
        rx_bytes: stats.downstream_cx_rx_bytes_total.clone(),
        tx_bytes: stats.downstream_cx_tx_bytes_total.clone(),
        in_flight: in_flight.clone(),
        ..Wire::default()
    });
    let filter_state = ConnectionState::new(manager.filters.len());
    let connection = Arc::new(Connection {
        scheme: if info.transport_protocol == "tls" {
            "https"
        } else {
            "http"
        },
        manager,
        info,
        requests: AtomicU64::new(0),
        http2: AtomicBool::new(false),
        last_request: tokio::sync::Notify::new(),
        in_flight,
        refusals: Arc::default(),
        filter_state,
        sleeps: Arc::default(),
        protocol_active: std::sync::OnceLock::new(),
    });
    let rules = Rules {
        max_head_bytes: hcm.max_request_headers_kb as usize * 1024,
        headers_timeout: hcm.request_headers_timeout,
        max_headers: hcm.max_headers_count as usize,
        allow_chunked_length: hcm.http1.allow_chunked_length,
        allow_custom_methods: hcm.http1.allow_custom_methods,
    };
    let stream = GuardedIo::new(
        stream,
        rules,
        connection.refusals.clone(),
        wire.clone(),
        hcm.codec == Codec::Http2,
    );
    let service_connection = connection.clone();
    let service =
        hyper::service::service_fn(move |request| handle(service_connection.clone(), request));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Room for any head the guard passes: it refuses larger ones itself.
        .max_buf_size(rules.max_head_bytes + 16 * 1024)
        .header_read_timeout(hcm.request_headers_timeout)
        .half_close(false)
        .keep_alive(true);
    // hyper parses into a stack array of its default size (100, Envoy's default count) unless
    // given a limit; any explicit limit, even 100, costs it a filled vector per request.
    if hcm.max_headers_count != remora_config::common::DEFAULT_MAX_HEADERS_COUNT {
        builder.http1().max_headers(hcm.max_headers_count as usize);
    }
    let http2 = &hcm.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(hcm.max_request_headers_kb * 1024)
        .max_concurrent_streams(http2.max_concurrent_streams.unwrap_or(1024))
        .initial_stream_window_size(http2.initial_stream_window_size)
        .initial_connection_window_size(http2.initial_connection_window_size)
        .keep_alive_interval(http2.keepalive.map(|k| k.interval));
    if let Some(keepalive) = http2.keepalive {
        builder.http2().keep_alive_timeout(keepalive.timeout);
    }
    let builder = match hcm.codec {
        Codec::Auto => builder,
        Codec::Http1 => builder.http1_only(),
        Codec::Http2 => builder.http2_only(),
    };
    let io: ServedIo<S> = TokioIo::new(stream);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // Draining: HTTP/1.1 finishes the request in hand and closes; HTTP/2 keeps taking streams
    // for `drain_timeout` (Envoy's grace for streams racing the GOAWAY), then sends GOAWAY.
    let mut drain_started: Option<Instant> = None;
    let mut shut_down = false;
    let grace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(grace);
    let mut phase = Phase::Running;
    let idle = hcm.idle_timeout;
    let idle_period = idle.unwrap_or(Duration::from_secs(3600));
    let mut last_seen = 0;
    let idle_tick = tokio::time::sleep(idle_period);
    tokio::pin!(idle_tick);
    let mut drain_probe = watch.probe();
    let last_request = connection.last_request.notified();
    tokio::pin!(last_request);
    loop {
        let event = {
            // The drain signal and the idle tick wake this task when they fire, so they are
            // polled once, to leave the task's waker with them, and then only once they say
            // they fired, not on each of the many wakes (reads, writes) of a busy connection.
            let next_phase = watch.next(phase);
            tokio::pin!(next_phase);
            let mut armed = false;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    let protocol_error = result.err().and_then(|error| protocol_error(&*error));
                    return Poll::Ready(ConnectionEvent::Ended { protocol_error });
                }
                if (!armed || drain_probe.moved())
                    && let Poll::Ready(next) = poll_unconstrained(next_phase.as_mut(), cx)
                {
                    return Poll::Ready(ConnectionEvent::Phase(next));
                }
                if idle.is_some()
                    && drain_started.is_none()
                    && (!armed || idle_tick.is_elapsed())
                    && poll_unconstrained(idle_tick.as_mut(), cx).is_ready()
                {
                    return Poll::Ready(ConnectionEvent::IdleTick);
                }
                if drain_started.is_none()
                    && hcm.max_requests_per_connection.is_some()
                    && last_request.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(ConnectionEvent::LastRequest);
                }
                armed = true;
                if drain_started.is_some() && !shut_down && grace.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(ConnectionEvent::GraceOver);
                }
                Poll::Pending
            })
            .await
        };
        let start_drain = match event {
            ConnectionEvent::Ended { protocol_error } => {
                if let Some(error) = protocol_error {
                    stats.downstream_cx_protocol_error.inc();
                    // A head hyper could not parse was a stream, reset before it began (an
                    // HTTP/2 error resets the streams it ends, counted as they go).
                    if error == ProtocolError::Http1Head {
                        stats.downstream_rq_rx_reset.inc();
                    }
                }
                break;
            }
            ConnectionEvent::Phase(next) => {
                phase = next;
                if drain_started.is_none() {
                    stats.downstream_cx_drain_close.inc();
                }
                if phase == Phase::Closed {
                    break;
                }
                true
            }
            ConnectionEvent::IdleTick => {
                idle_tick.as_mut().reset(Instant::now() + idle_period);
                let seen = connection.requests.load(Ordering::Relaxed);
                let idle_now = seen == last_seen && connection.in_flight.get() == 0;
                last_seen = seen;
                if idle_now && drain_started.is_none() {
                    stats.downstream_cx_idle_timeout.inc();
                }
                idle_now
            }
            // No grace, unlike a listener's drain: streams after the last one are refused
            // at once, as Envoy's GOAWAY refuses them.
            ConnectionEvent::LastRequest => {
                drain_started = Some(Instant::now());
                shut_down = true;
                conn.as_mut().graceful_shutdown();
                false
            }
            ConnectionEvent::GraceOver => {
                shut_down = true;
                conn.as_mut().graceful_shutdown();
                false
            }
        };
        if start_drain && drain_started.is_none() {
            let now = Instant::now();
            drain_started = Some(now);
            if connection.http2.load(Ordering::Relaxed) && !hcm.drain_timeout.is_zero() {
                grace.as_mut().reset(now + hcm.drain_timeout);
            } else {
                shut_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    // A refused head's reply closed the connection: in Envoy, the codec's protocol error,
    // which resets the refused request's stream, or the connection manager's refusal of a
    // path it cannot normalize or of a head that took too long (a reset too).
    match connection.refusals.refused().map(|refusal| refusal.details) {
        Some(PATH_NORMALIZATION_FAILED) => stats.downstream_rq_failed_path_normalization.inc(),
        Some(REQUEST_HEADER_TIMEOUT) => {
            stats.downstream_rq_header_timeout.inc();
            stats.downstream_rq_rx_reset.inc();
        }
        Some(_) => {
            stats.downstream_cx_protocol_error.inc();
            stats.downstream_rq_rx_reset.inc();
        }
        None => {}
    }
    count_destroy(&stats, &wire);
    stats
        .downstream_cx_length_ms
        .record_duration(opened.elapsed());
}

/// Counts a connection's end as Envoy does: by the side that closed it (the peer, if a read
/// saw its end first) and whether requests were still in flight then.
fn count_destroy(stats: &crate::stats::HttpStats, wire: &Wire) {
    stats.downstream_cx_destroy.inc();
    let (side, side_active) = if wire.peer_ended.load(Ordering::Relaxed) {
        (
            &stats.downstream_cx_destroy_remote,
            wire.peer_ended_active
                .load(Ordering::Relaxed)
                .then_some(&stats.downstream_cx_destroy_remote_active_rq),
        )
    } else {
        (
            &stats.downstream_cx_destroy_local,
            (wire.in_flight.get() > 0).then_some(&stats.downstream_cx_destroy_local_active_rq),
        )
    };
    side.inc();
    if let Some(side_active) = side_active {
        side_active.inc();
        stats.downstream_cx_destroy_active_rq.inc();
    }
}

/// How a client broke the protocol, ending its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProtocolError {
    /// A request head hyper could not parse.
    Http1Head,
    /// A frame h2 refused.
    Http2,
}

/// Whether a connection's error is the client breaking the protocol, which Envoy counts as
/// `downstream_cx_protocol_error`, and how.
fn protocol_error(error: &(dyn std::error::Error + 'static)) -> Option<ProtocolError> {
    use crate::error::source_of;
    if source_of::<hyper::Error>(error).is_some_and(|e| e.is_parse() || e.is_parse_too_large()) {
        return Some(ProtocolError::Http1Head);
    }
    let h2 = source_of::<h2::Error>(error)?;
    let refused = h2.is_library() && h2.reason().is_some_and(|r| r != h2::Reason::NO_ERROR);
    refused.then_some(ProtocolError::Http2)
}

/// The request's authority as a header value (cheap to clone: it shares the parsed buffer).
fn authority_of(parts: &http::request::Parts) -> Option<HeaderValue> {
    match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// The authority lower-cased, with the port stripped if the HCM says so.
fn normalize_host<'a>(
    hcm: &HttpConnectionManager,
    destination: SocketAddr,
    raw: &'a str,
) -> Cow<'a, str> {
    let strip = hcm.strip_any_host_port
        || (hcm.strip_matching_host_port && raw.ends_with(&format!(":{}", destination.port())));
    let raw = if strip {
        remora_config::route::strip_port(raw)
    } else {
        raw
    };
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    }
}

/// What Envoy's HTTP/1 codec and connection manager settle about a request before anything
/// else reads it: the HTTP/1.0 policy, the one `Host`, an h2c upgrade (ignored), and an
/// `expect: 100-continue` (answered here, so not forwarded). `carried` is kept true to the
/// headers. Returns whether the request asks to upgrade the connection.
fn check_request(
    hcm: &HttpConnectionManager,
    parts: &mut http::request::Parts,
    carried: &mut headers::Present,
) -> Result<bool, LocalReply> {
    if parts.version == Version::HTTP_2 {
        headers::coalesce_inline(&mut parts.headers);
        return Ok(false);
    }
    if parts.version == Version::HTTP_10 {
        if !hcm.http1.accept_http_10 {
            return Err(codec_reply(
                StatusCode::UPGRADE_REQUIRED,
                "Upgrade Required",
                "low_version",
            ));
        }
        let default_host = &hcm.http1.default_host_for_http_10;
        if !carried.host
            && parts.uri.authority().is_none()
            && let Ok(host) = HeaderValue::from_str(default_host)
            && !default_host.is_empty()
        {
            parts.headers.insert(header::HOST, host);
            carried.host = true;
        }
    }
    // An absolute-form target names the host (RFC 9112 section 3.2.2): it replaces any `Host`.
    if let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
        carried.host = true;
    }
    headers::coalesce_inline(&mut parts.headers);
    // Envoy serves an h2c upgrade request as the plain HTTP/1.1 request it also is.
    if carried.upgrade
        && parts
            .headers
            .get(header::UPGRADE)
            .is_some_and(|upgrade| upgrade.as_bytes().eq_ignore_ascii_case(b"h2c"))
    {
        parts.headers.remove(header::UPGRADE);
        parts.headers.remove(&HTTP2_SETTINGS);
        carried.upgrade = false;
    }
    if !carried.upgrade && carried.connection {
        if !headers::sanitize_connection(&mut parts.headers) {
            return Err(codec_reply(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "http1.connection_header_rejected",
            ));
        }
        // `Connection` may have named any header (Host, x-request-id, ...) and so removed it.
        *carried = headers::Present::scan(&parts.headers);
    }
    if !carried.host {
        let mut reply = LocalReply::new(StatusCode::BAD_REQUEST);
        reply.flag = Some(ResponseFlag::DownstreamProtocolError);
        reply.details = "missing_host_header".into();
        return Err(reply);
    }
    if carried.expect
        && parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        parts.headers.remove(header::EXPECT);
    }
    Ok(carried.upgrade && parts.version == Version::HTTP_11)
}

static HTTP2_SETTINGS: http::HeaderName = http::HeaderName::from_static("http2-settings");

/// Envoy's reply to a request its HTTP/1 codec refuses: the reason phrase as body, and the
/// connection closed after it.
fn codec_reply(status: StatusCode, body: &'static str, details: &'static str) -> LocalReply {
    let mut reply = LocalReply::new(status).with_body(body);
    reply.flag = Some(ResponseFlag::DownstreamProtocolError);
    reply.details = details.into();
    reply
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
}

fn refusal_reply(refusal: &Refusal) -> LocalReply {
    let mut reply = codec_reply(refusal.status, refusal.body, refusal.details);
    // The connection manager's own timeout, not a protocol error: no flag, as in Envoy.
    if refusal.details == REQUEST_HEADER_TIMEOUT {
        reply.flag = None;
    }
    reply
}

async fn handle(
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let index = connection.requests.fetch_add(1, Ordering::Relaxed);
    // As the client sent it: the router may give `parts` the upstream's version.
    let downstream_version = request.version();
    // A head the codec guard refused reaches here as a stand-in; its refusal is the answer.
    let refused = connection.refusals.take(index);
    let http2 = downstream_version == Version::HTTP_2;
    if http2 {
        connection.http2.store(true, Ordering::Relaxed);
    }
    let manager = &connection.manager;
    let hcm = &manager.config;
    let stats = &manager.stats;
    stats.downstream_rq_total.inc();
    let (rq_total, cx_total, cx_active) = if http2 {
        (
            &stats.downstream_rq_http2_total,
            &stats.downstream_cx_http2_total,
            &stats.downstream_cx_http2_active,
        )
    } else {
        (
            &stats.downstream_rq_http1_total,
            &stats.downstream_cx_http1_total,
            &stats.downstream_cx_http1_active,
        )
    };
    rq_total.inc();
    // The codec is known from the first request (Envoy counts it when it makes the codec).
    if index == 0 {
        cx_total.inc();
        let _ = connection.protocol_active.set(GaugeGuard::new(cx_active));
    }
    let active = GaugeGuard::new(&stats.downstream_rq_active);
    let in_flight = GaugeGuard::new(&connection.in_flight);
    let ending = StreamEnding::new(stats);
    let mut log = (!manager.logs.is_empty()).then(|| {
        let at = (
            started.into_std(),
            connection.info.source,
            connection.info.destination,
        );
        let mut entry = Entry::new(&request, at, &manager.logs);
        entry.timings.bodiless = http_body::Body::is_end_stream(request.body());
        entry
            .peer_certificate
            .clone_from(&connection.info.peer_certificate);
        entry.server_name.clone_from(&connection.info.server_name);
        entry
    });
    if let (Some(refusal), Some(entry)) = (&refused, log.as_mut()) {
        entry.record_refusal(&refusal.method, &refusal.target);
    }
    let (mut parts, body) = request.into_parts();
    // A gRPC request gets local replies the gRPC way.
    let grpc = remora_config::route::is_grpc(&parts.headers);
    let mut state = FilterState::default();
    let mut route: Option<Selected> = None;
    let mut request_id = None;
    let mut trace: Option<ActiveTrace> = None;
    // The trusted client, once headers are read (until then, the connection's peer).
    let mut client = connection.info.source.ip();
    let outcome = async {
        if let Some(refusal) = &refused {
            return Err(refusal_reply(refusal));
        }
        let mut present = headers::Present::scan(&parts.headers);
        let upgrading = check_request(hcm, &mut parts, &mut present)?;
        let origin = headers::on_request(
            hcm,
            &mut parts.headers,
            &present,
            connection.info.source,
            connection.scheme,
            upgrading,
        );
        client = origin.client.ip();
        if let Some(entry) = log.as_mut() {
            entry.client = Some(origin.client);
        }
        // Never added here: a request without `x-envoy-*` headers has none to look for.
        let force_trace = present.envoy
            && headers::contains_by_scan(&parts.headers, &headers::X_ENVOY_FORCE_TRACE);
        if hcm.always_set_request_id_in_response || force_trace {
            request_id = parts.headers.get(&headers::X_REQUEST_ID).cloned();
        }
        let snapshot = manager.store.load();
        let Some(table) = manager.table(&snapshot) else {
            stats.rq_total.inc();
            stats.no_route.inc();
            let mut reply = LocalReply::from(crate::error::ProxyError::config(
                ResponseFlag::NoRouteFound,
                "route configuration not (yet) available",
            ));
            reply.details = "route configuration not (yet) available".into();
            return Err(reply);
        };
        let authority = authority_of(&parts);
        let raw_host = authority
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let host = normalize_host(hcm, connection.info.destination, raw_host);
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        // Envoy's `:scheme` follows x-forwarded-proto (as the connection manager left it).
        let scheme = origin.forwarded_proto;
        let pseudo = PseudoHeaders {
            method: parts.method.as_str(),
            path: path_and_query.as_str(),
            authority: raw_host,
            scheme,
        };
        route = Selected::find(
            table,
            &host,
            path_and_query.as_str(),
            &pseudo,
            &parts.headers,
        );
        if let Some(entry) = log.as_mut() {
            entry.route.clone_from(&route);
        }
        if let Some(tracer) = &manager.tracer {
            let carried = Carried::of(&present, &parts.headers, force_trace);
            let active = tracer.start(
                (&mut parts, carried),
                route.as_ref(),
                connection.info.source,
                connection.scheme,
                log.as_ref().map(|entry| entry.bytes_received.clone()),
            );
            if let Some(entry) = log.as_mut() {
                entry.trace_id = Some(active.trace_id());
                entry.trace_forced = active.reason == Reason::ServiceForced;
            }
            trace = Some(active);
        } else if let Some(tracing) = &hcm.tracing {
            let reason = crate::http::tracing::decide_only(tracing, &mut parts, route.as_ref());
            if let Some(entry) = log.as_mut() {
                entry.trace_forced = reason == Reason::ServiceForced;
            }
        }
        // The id goes back as the tracing decision left it (Envoy also answers with the id of
        // a request it was told to trace).
        if request_id.is_some() {
            request_id = parts.headers.get(&headers::X_REQUEST_ID).cloned();
        }
        let mut body_filters = Vec::new();
        let mut reply = None;
        if !manager.filters.is_empty() {
            let mut stream = Stream::new(
                &mut parts,
                route.as_ref(),
                stats,
                (&connection.info, client),
                &mut state,
                &connection.filter_state,
            );
            reply = manager.filters.on_request(&mut stream).await;
            if reply.is_none() {
                body_filters = manager.filters.request_body(&mut stream);
            }
        }
        // Settled after the filters: the health check filter marks what is not traced.
        if let Some(trace) = trace.as_mut() {
            trace.settle(state.is_health_check(), stats);
        }
        if let Some(reply) = reply {
            return Err(reply);
        }
        // The router takes the request: one the filters answered never reaches it.
        stats.rq_total.inc();
        let Some(selected) = route.as_ref() else {
            stats.no_route.inc();
            tracing::debug!(%host, %path_and_query, "no route");
            let mut reply = LocalReply::from(crate::error::ProxyError::config(
                ResponseFlag::NoRouteFound,
                "no route",
            ));
            reply.details = "route_not_found".into();
            return Err(reply);
        };
        router::route(RouteRequest {
            manager,
            // The filters' response phase reads the request head again; without filters the
            // router may have it whole.
            parts: {
                let head = match manager.filters.is_empty() {
                    true => Request::new(()).into_parts().0,
                    false => head_only(&parts),
                };
                std::mem::replace(&mut parts, head)
            },
            body,
            body_filters,
            route: selected,
            snapshot: &snapshot,
            downstream: &connection.info,
            scheme: connection.scheme,
            log: &mut log,
            trace: trace.as_mut(),
            started,
            sleeps: &connection.sleeps,
            authority: authority.as_ref(),
            host: &host,
            // Hash policies (source IP, generated cookies) hash the trusted client address.
            client: origin.client,
            internal: origin.internal,
            path_and_query,
        })
        .await
    }
    .await;
    let mut flags = crate::error::ResponseFlags::default();
    let mut response = match outcome {
        Ok(response) => {
            if let Some(entry) = log.as_mut() {
                entry.details = "via_upstream".into();
            }
            response
        }
        Err(reply) => {
            tracing::debug!(status = %reply.status, details = %reply.details, "local reply");
            if let Some(entry) = log.as_mut() {
                entry.details.clone_from(&reply.details);
                entry.transport_failure.clone_from(&reply.transport_failure);
            }
            if let Some(flag) = reply.flag {
                flags.insert(flag);
                if let Some(entry) = log.as_mut() {
                    entry.flags.insert(flag);
                }
            }
            let from_router = reply.from_router;
            let mut response = if grpc {
                reply.into_grpc_response(&manager.server_header)
            } else {
                reply.into_response(&manager.server_header)
            };
            if from_router && let Some(selected) = &route {
                let table = &selected.table;
                headers::apply_levels(
                    [
                        &table.response_headers,
                        &selected.vhost().response_headers,
                        &selected.route().response_headers,
                    ],
                    table.most_specific_header_mutations_wins,
                    response.headers_mut(),
                );
            }
            response
        }
    };
    // `always_set_request_id_in_response` (or a forced trace) covers local replies too, as in
    // Envoy.
    if let Some(id) = request_id {
        response.headers_mut().insert(&headers::X_REQUEST_ID, id);
    }
    // Flags the filters set (a delay) come first, as they were set first. The access log
    // entry also has the router's (a retry overflow beside the final failure).
    let so_far = log.as_ref().map_or(flags, |entry| entry.flags);
    let mut ordered = crate::error::ResponseFlags::default();
    for flag in state.flags().iter().copied().chain(so_far.iter()) {
        ordered.insert(flag);
    }
    if let Some(entry) = log.as_mut() {
        entry.flags = ordered;
        entry.health_check = state.is_health_check();
    }
    // The filters' response phase, in reverse order, for every response.
    let mut body_filters = Vec::new();
    let mut completion = None;
    if !manager.filters.is_empty() {
        let (head, body) = response.into_parts();
        let mut head = Response::from_parts(head, ());
        let mut stream = Stream::new(
            &mut parts,
            route.as_ref(),
            stats,
            (&connection.info, client),
            &mut state,
            &connection.filter_state,
        );
        manager.filters.on_response(&mut stream, &mut head);
        body_filters = manager.filters.response_body(&mut stream);
        let (head, ()) = head.into_parts();
        response = Response::from_parts(head, body);
        completion = Some(manager.filters.completion(state));
    }
    // The request that reaches `max_requests_per_connection` is the connection's last: over
    // HTTP/1.1 the response says so and the connection closes after it, HTTP/2 drains (GOAWAY);
    // as Envoy does.
    // While `/healthcheck/fail` holds, every connection closes after its response too (Envoy
    // drain-closes them), so a load balancer's connections move away.
    let last_request = hcm
        .max_requests_per_connection
        .is_some_and(|max| index + 1 >= u64::from(max));
    if last_request || manager.lifecycle.health_check_failed() {
        if hcm
            .max_requests_per_connection
            .is_some_and(|max| index + 1 == u64::from(max))
        {
            stats.downstream_cx_max_requests_reached.inc();
        }
        if downstream_version == Version::HTTP_2 {
            connection.last_request.notify_one();
        } else {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    // An HTTP/1.0 upstream's response goes to an HTTP/1.1 client as HTTP/1.1, as Envoy's
    // codec writes it: hyper would write the status line and framing of the version it carries
    // (no chunking, the connection closed after the body).
    if downstream_version == Version::HTTP_11 && response.version() == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_11;
    }
    stats.response(response.status().as_u16());
    let status = response.status().as_u16();
    let trace = trace.and_then(|mut trace| {
        trace.on_response(response.headers_mut(), status, ordered);
        trace.into_completion()
    });
    let line = log.map(|mut entry| {
        // A request the router never forwarded is logged as the connection manager and the
        // filters left it (the router captures the ones it forwards, and its own replies).
        if !entry.request_captured() {
            entry.capture_request(&parts);
        }
        entry.capture_response(response.status().as_u16(), response.headers());
        PendingLine { entry }
    });
    // Held until the response body ends (a streamed body keeps the request active, as in
    // Envoy, and its access log line waits for the last byte).
    response.body_mut().hold(
        DownstreamSlots {
            active,
            in_flight,
            ending,
            log: line,
            completion,
            trace,
            started,
            ended_at: None,
        },
        body_filters,
    );
    Ok(response)
}

/// What stays of the request head for the response phase once the router took the request:
/// method, URI and version (cheap to copy), no headers. A filter that needs request headers
/// for the response keeps them in its stream state.
fn head_only(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    request.into_parts().0
}
