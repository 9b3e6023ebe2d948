//! The HTTP connection manager: serves one downstream connection with hyper (HTTP/1.1 with
//! keep-alive and pipelining, h2c, or auto-detect), and for each request looks up the current
//! route table, applies the route's action, and forwards to the chosen cluster's pool.
//!
//! Header handling follows Envoy: `x-request-id`, `x-forwarded-for`/`-proto` per
//! `use_remote_address`, `x-envoy-expected-rq-timeout-ms`, `x-envoy-upstream-service-time`,
//! `server`; local replies carry Envoy's statuses (404 NR, 503 UH/UF/UO, 504 UT/SI). Once
//! response headers are sent, the route timeout and stream idle timeout keep running in the
//! response body (see [`crate::http::body`]).

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::time::Instant;

use crate::config::{Codec, HttpConnectionManager, RouteSource, UpstreamProtocol};
use crate::drain::{Phase, Watch};
use crate::error::{ProxyError, ResponseFlag};
use crate::filter_chain::ConnectionInfo;
use crate::http::access_log::{self, ActiveLog, Entry, PendingLine};
use crate::http::body::{
    DownstreamSlots, RequestBody, RequestEnd, ResponseBody, StreamTimeout, StreamTimer,
    UpstreamBody,
};
use crate::http::cors;
use crate::http::router::{
    Action, ClusterSpec, HostRewrite, Route, RouteTable, VirtualHost, strip_port,
};
use crate::lb::{HostGauge, LbContext};
use crate::pool::PoolError;
use crate::server::Server;
use crate::stats::{GaugeGuard, HttpStats, Stat};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");

/// Per-connection state shared by its requests.
struct Connection {
    server: Arc<Server>,
    hcm: Arc<HttpConnectionManager>,
    stats: Arc<HttpStats>,
    peer: SocketAddr,
    destination: SocketAddr,
    /// `https` on TLS-terminated connections, else `http`.
    scheme: &'static str,
    server_header: HeaderValue,
    requests: AtomicU64,
    /// Requests whose response has not ended (the connection idle timeout waits for none).
    in_flight: Arc<Stat>,
    /// The HCM's access logs, bound to their writers (empty: nothing is recorded).
    logs: Arc<[ActiveLog]>,
}

/// Serves one downstream connection until it closes, idles out, or is drained.
pub async fn serve<S>(
    server: Arc<Server>,
    hcm: Arc<HttpConnectionManager>,
    stats: Arc<HttpStats>,
    stream: S,
    info: ConnectionInfo,
    mut watch: Watch,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    stats.downstream_cx_total.inc();
    let _active = GaugeGuard::new(&stats.downstream_cx_active);
    let logs = hcm
        .active_logs
        .get_or_init(|| {
            if hcm.access_logs.is_empty() {
                return Arc::from([]);
            }
            let dropped = server
                .registry
                .counter("access_log.dropped_lines".to_string());
            access_log::activate(&hcm.access_logs, &dropped)
        })
        .clone();
    let connection = Arc::new(Connection {
        server_header: HeaderValue::from_str(&hcm.server_name)
            .unwrap_or_else(|_| HeaderValue::from_static("envoy")),
        server,
        hcm: hcm.clone(),
        stats,
        peer: info.source,
        destination: info.destination,
        scheme: if info.transport_protocol == "tls" {
            "https"
        } else {
            "http"
        },
        requests: AtomicU64::new(0),
        in_flight: Arc::default(),
        logs,
    });
    let service_connection = connection.clone();
    let service =
        hyper::service::service_fn(move |request| handle(service_connection.clone(), request));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size((hcm.max_request_headers_kb as usize * 1024).max(8192))
        .header_read_timeout(hcm.request_headers_timeout)
        .half_close(false)
        .keep_alive(true);
    // hyper parses into a stack array of its default size (100, Envoy's default count) unless
    // given a limit; any explicit limit, even 100, costs it a filled vector per request.
    if hcm.max_headers_count as usize != crate::http::HYPER_DEFAULT_MAX_HEADERS {
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
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut draining = false;
    let mut phase = Phase::Running;
    let idle = hcm.idle_timeout;
    let mut last_seen = 0;
    let mut idle_tick = tokio::time::interval(idle.unwrap_or(Duration::from_secs(3600)));
    idle_tick.tick().await;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            next = watch.next(phase) => {
                phase = next;
                if phase == Phase::Closed {
                    break;
                }
                if !draining {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = idle_tick.tick(), if idle.is_some() && !draining => {
                let seen = connection.requests.load(Ordering::Relaxed);
                if seen == last_seen && connection.in_flight.get() == 0 {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                last_seen = seen;
            }
        }
    }
}

async fn handle(
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    connection.requests.fetch_add(1, Ordering::Relaxed);
    let stats = &connection.stats;
    stats.downstream_rq_total.inc();
    let active = GaugeGuard::new(&stats.downstream_rq_active);
    let in_flight = GaugeGuard::new(&connection.in_flight);
    let mut entry = (!connection.logs.is_empty()).then(|| log_entry(&connection, &request));
    let mut cors_headers = None;
    let mut response = match proxy(&connection, request, &mut entry, &mut cors_headers).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(%error, "local reply");
            if let Some(entry) = entry.as_mut() {
                entry.flag = Some(error.flag.code());
            }
            local_reply(&connection, &error)
        }
    };
    // A CORS request from an allowed origin: its response says so, local replies included.
    if let Some(cors_headers) = cors_headers {
        response.headers_mut().extend(cors_headers);
    }
    stats.response(response.status().as_u16());
    let log = entry.map(|mut entry| {
        entry.status = response.status().as_u16();
        entry.response = response.headers().clone();
        Box::new(PendingLine {
            entry,
            logs: connection.logs.clone(),
        })
    });
    // Held until the response body ends (a streamed body keeps the request active, as in Envoy,
    // and its access log line waits for the last byte).
    response.body_mut().hold(DownstreamSlots {
        active,
        in_flight,
        log,
    });
    Ok(response)
}

/// The access log record of a request, as it arrived.
fn log_entry(connection: &Connection, request: &Request<Incoming>) -> Entry {
    Entry {
        started: std::time::Instant::now(),
        start_time: std::time::SystemTime::now(),
        version: request.version(),
        request: request.headers().clone(),
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        authority: authority_of(request)
            .and_then(|a| a.to_str().ok().map(str::to_string))
            .unwrap_or_default(),
        status: 0,
        flag: None,
        response: HeaderMap::new(),
        bytes_received: Arc::default(),
        bytes_sent: 0,
        upstream_host: None,
        upstream_cluster: None,
        peer: connection.peer,
        local: connection.destination,
    }
}

fn local_reply(connection: &Connection, error: &ProxyError) -> Response<ResponseBody> {
    let (status, body) = error.flag.local_reply();
    let mut response = reply(connection, status, body.as_bytes().to_vec());
    // Envoy marks requests dropped by a circuit breaker.
    if error.flag == ResponseFlag::UpstreamOverflow {
        response
            .headers_mut()
            .insert(&X_OVERLOADED, HeaderValue::from_static("true"));
    }
    response
}

fn reply(connection: &Connection, status: u16, body: Vec<u8>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let headers = response.headers_mut();
    if !body.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::SERVER, connection.server_header.clone());
    *response.body_mut() = ResponseBody::full(body);
    response
}

fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&crate::uuid::v4()).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The request's authority as a header value (cheap to clone: it shares the parsed buffer).
fn authority_of(request: &Request<Incoming>) -> Option<HeaderValue> {
    match request.headers().get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// The authority lower-cased, with the port stripped if the HCM says so.
fn normalize_host<'a>(connection: &Connection, raw: &'a str) -> Cow<'a, str> {
    let strip = connection.hcm.strip_any_host_port
        || (connection.hcm.strip_matching_host_port
            && raw.ends_with(&format!(":{}", connection.destination.port())));
    let raw = if strip { strip_port(raw) } else { raw };
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    }
}

fn apply_request_mutations(
    table: &RouteTable,
    vhost: &VirtualHost,
    route: &Route,
    headers: &mut HeaderMap,
) {
    if table.most_specific_header_mutations_wins {
        table.request_headers.apply(headers);
        vhost.request_headers.apply(headers);
        route.request_headers.apply(headers);
    } else {
        route.request_headers.apply(headers);
        vhost.request_headers.apply(headers);
        table.request_headers.apply(headers);
    }
}

fn apply_response_mutations(
    table: &RouteTable,
    vhost: &VirtualHost,
    route: &Route,
    headers: &mut HeaderMap,
) {
    if table.most_specific_header_mutations_wins {
        table.response_headers.apply(headers);
        vhost.response_headers.apply(headers);
        route.response_headers.apply(headers);
    } else {
        route.response_headers.apply(headers);
        vhost.response_headers.apply(headers);
        table.response_headers.apply(headers);
    }
}

/// Strips the hop-by-hop headers, as Envoy does: `connection` and `upgrade` stay on an upgrade,
/// `te` stays when it is `trailers`.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let candidates: [&HeaderName; 6] = [
        &header::CONNECTION,
        &header::UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
    ];
    // One pass over the names instead of a hash lookup per candidate: most messages carry
    // none or one of them, and this runs twice per request.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(index) = candidates.iter().position(|candidate| *candidate == name) {
            present |= 1 << index;
        }
    }
    for (index, name) in candidates.into_iter().enumerate() {
        if present & (1 << index) == 0 {
            continue;
        }
        let keep = if *name == header::TE {
            headers
                .get(name)
                .is_some_and(|te| te.as_bytes() == b"trailers")
        } else {
            keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE)
        };
        if !keep {
            headers.remove(name);
        }
    }
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

fn current_table(connection: &Connection) -> Option<Arc<RouteTable>> {
    match &connection.hcm.routes {
        RouteSource::Inline(table) => Some(table.clone()),
        RouteSource::Rds { name, .. } => connection.server.routes.load().get(name).cloned(),
    }
}

async fn proxy(
    connection: &Connection,
    mut request: Request<Incoming>,
    log: &mut Option<Entry>,
    cors_headers: &mut Option<HeaderMap>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let started = Instant::now();
    let hcm = &connection.hcm;
    let Some(table) = current_table(connection) else {
        connection.stats.no_route.inc();
        return Err(ProxyError::config(
            ResponseFlag::NoRouteFound,
            "route configuration not (yet) available",
        ));
    };
    let authority = authority_of(&request);
    let host = normalize_host(
        connection,
        authority
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    );
    let host: &str = &host;
    let original_pq = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let path_and_query = original_pq.as_str();
    let Some((vhost, route)) = table.route(host, path_and_query, request.headers()) else {
        connection.stats.no_route.inc();
        return Err(ProxyError::config(
            ResponseFlag::NoRouteFound,
            format!("no route for {host}{path_and_query}"),
        ));
    };
    let forward = match &route.action {
        Action::Direct { status, body } => {
            let mut response = reply(
                connection,
                *status,
                body.as_ref().map(|b| b.to_vec()).unwrap_or_default(),
            );
            apply_response_mutations(&table, vhost, route, response.headers_mut());
            return Ok(response);
        }
        Action::Redirect(redirect) => {
            let scheme = request.uri().scheme_str().unwrap_or(connection.scheme);
            let location = redirect.location(route, scheme, host, path_and_query);
            let mut response = reply(connection, redirect.status, Vec::new());
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            apply_response_mutations(&table, vhost, route, response.headers_mut());
            return Ok(response);
        }
        Action::Forward(forward) => forward,
    };
    // The CORS filter, before the router: it applies to routes that forward.
    if hcm.cors {
        let policies = cors::Policies::of(&route.cors, &vhost.cors, &table.cors);
        match policies.on_request(request.method(), request.headers(), &connection.stats) {
            cors::Decision::Preflight(status, headers) => {
                let mut response = reply(connection, status.as_u16(), Vec::new());
                response.headers_mut().extend(headers);
                return Ok(response);
            }
            cors::Decision::Forward(origin) => {
                *cors_headers = origin.map(|origin| policies.response_headers(origin));
            }
        }
    }
    // Cluster.
    let header_cluster;
    let cluster_name: &str = match &forward.cluster {
        ClusterSpec::Name(name) => name,
        ClusterSpec::Header(name) => {
            header_cluster = request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            &header_cluster
        }
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
    };
    let Some(cluster) = connection.server.clusters.get(cluster_name) else {
        connection.stats.no_cluster.inc();
        let status = forward.cluster_not_found_status;
        return Ok(reply(connection, status, Vec::new()));
    };
    let Some(upstream_host) = cluster.choose(&LbContext {
        original_dst: Some(connection.destination),
    }) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return Err(ProxyError::upstream(
            ResponseFlag::NoHealthyUpstream,
            format!("no healthy host in {cluster_name}"),
        ));
    };
    // `max_requests`: the slot is held by the response body until it ends (as Envoy counts it).
    let Some(rq_active) = GaugeGuard::try_acquire(
        &cluster.stats.upstream_rq_active,
        u64::from(cluster.config.thresholds.max_requests),
    ) else {
        cluster.stats.upstream_rq_active_overflow.inc();
        return Err(ProxyError::upstream(
            ResponseFlag::UpstreamOverflow,
            "max_requests reached",
        ));
    };

    // Upgrade (WebSocket etc.): only those the route, or else the HCM, allows.
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    let upgrading = match &upgrade {
        Some(kind) if request.version() == Version::HTTP_11 => {
            if !forward.allows_upgrade(kind, &hcm.upgrades) {
                return Ok(reply(connection, 403, b"upgrade failed".to_vec()));
            }
            true
        }
        _ => false,
    };
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));

    // Build the upstream request.
    let (mut parts, body) = request.into_parts();
    let upstream_pq = match forward.rewrite_path(route, path_and_query) {
        Some(rewritten) => http::uri::PathAndQuery::try_from(rewritten).map_err(|e| {
            ProxyError::downstream(
                ResponseFlag::NoRouteFound,
                format!("bad rewritten path: {e}"),
            )
        })?,
        None => original_pq.clone(),
    };
    // Origin-form; the pool adds the authority where the protocol wants it (HTTP/2).
    parts.uri = Uri::from(upstream_pq);
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers, upgrading);
    match &forward.host_rewrite {
        HostRewrite::Literal(value) => {
            headers.insert(header::HOST, value.clone());
        }
        HostRewrite::Auto if !upstream_host.hostname.is_empty() => {
            if let Ok(value) = HeaderValue::from_str(&upstream_host.hostname) {
                headers.insert(header::HOST, value);
            }
        }
        _ => {
            if !headers.contains_key(header::HOST)
                && let Some(value) = authority.clone()
            {
                headers.insert(header::HOST, value);
            }
        }
    }
    if hcm.use_remote_address {
        headers.insert(
            &X_FORWARDED_PROTO,
            HeaderValue::from_static(connection.scheme),
        );
        if !hcm.skip_xff_append {
            let peer = connection.peer.ip().to_string();
            let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(existing) => format!("{existing},{peer}"),
                None => peer,
            };
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(&X_FORWARDED_FOR, value);
            }
        }
    } else if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            &X_FORWARDED_PROTO,
            HeaderValue::from_static(connection.scheme),
        );
    }
    if hcm.generate_request_id {
        let external = headers.contains_key(&X_REQUEST_ID);
        if !external || (hcm.use_remote_address && !hcm.preserve_external_request_id) {
            headers.insert(&X_REQUEST_ID, request_id());
        }
    }
    let request_id = headers.get(&X_REQUEST_ID).cloned();
    if let Some(value) = &forward.timeout_header {
        headers.insert(&X_EXPECTED_TIMEOUT, value.clone());
    }
    apply_request_mutations(&table, vhost, route, headers);
    // The access log shows the request as forwarded (generated x-request-id, appended XFF).
    if let Some(entry) = log.as_mut() {
        entry.request = headers.clone();
        entry.upstream_host = Some(upstream_host.addr);
        entry.upstream_cluster = Some(cluster_name.to_string());
    }
    parts.version = match cluster.pools.protocol() {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    let timed_out = hcm
        .request_timeout
        .map(|_| Arc::new(AtomicBool::new(false)));
    let body_deadline = hcm.request_timeout.map(|t| started + t);
    // The route timeout starts once the request has been sent in full, as in Envoy: at once
    // for a request without a body, else when its body ends.
    let request_end = (forward.timeout.is_some() && !http_body::Body::is_end_stream(&body))
        .then(|| Arc::new(RequestEnd::default()));
    let upstream_request = Request::from_parts(
        parts,
        RequestBody::new(
            body,
            body_deadline,
            timed_out.clone(),
            request_end.clone(),
            log.as_ref().map(|entry| entry.bytes_received.clone()),
        ),
    );

    // Send. One timer per request: the route deadline and the stream idle timeout (the
    // route's, else the HCM's) bound the wait for headers, then move into the response body.
    let host_active = HostGauge::new(&upstream_host.stats, |s| &s.rq_active);
    let (outcome, timer) = send_upstream(
        cluster.pools.send(&upstream_host, upstream_request),
        forward.timeout,
        forward.idle_timeout.unwrap_or(hcm.stream_idle_timeout),
        request_end,
        (
            &cluster.stats.upstream_rq_timeout,
            &connection.stats.downstream_rq_idle_timeout,
        ),
    )
    .await;
    // Envoy counts a request upstream once it has a connection: not when it overflowed or
    // its connection could not be made.
    let overflowed = matches!(&outcome, Ok(Err(PoolError::Overflow)));
    if !overflowed && !matches!(&outcome, Ok(Err(PoolError::Connect(_)))) {
        cluster.stats.upstream_rq_total.inc();
        upstream_host.stats.rq_total.inc();
    }
    let result = outcome.map_err(|timeout| {
        upstream_host.stats.rq_error.inc();
        let flag = match timeout {
            StreamTimeout::Route => {
                upstream_host.stats.rq_timeout.inc();
                ResponseFlag::UpstreamRequestTimeout
            }
            StreamTimeout::Idle => ResponseFlag::StreamIdleTimeout,
        };
        ProxyError::upstream(flag, timeout.to_string())
    })?;
    let (mut response, lease) = match result {
        Ok(sent) => sent,
        Err(error) if overflowed => {
            return Err(ProxyError::upstream(
                ResponseFlag::UpstreamOverflow,
                error.to_string(),
            ));
        }
        Err(error) => {
            upstream_host.stats.rq_error.inc();
            if timed_out
                .as_ref()
                .is_some_and(|t| t.load(Ordering::Acquire))
            {
                connection.stats.downstream_rq_timeout.inc();
                return Ok(reply(connection, 408, b"request timeout".to_vec()));
            }
            let flag = match error {
                PoolError::Connect(_) => ResponseFlag::UpstreamConnectionFailure,
                _ => ResponseFlag::UpstreamRemoteReset,
            };
            return Err(ProxyError::upstream(flag, error.to_string()));
        }
    };
    let status = response.status();
    cluster.stats.response(status.as_u16());
    if status.is_server_error() {
        upstream_host.stats.rq_error.inc();
    } else {
        upstream_host.stats.rq_success.inc();
    }
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
    let headers = response.headers_mut();
    remove_hop_by_hop(headers, status == StatusCode::SWITCHING_PROTOCOLS);
    let elapsed = started.elapsed().as_millis() as u64;
    headers.insert(&X_SERVICE_TIME, HeaderValue::from(elapsed));
    headers.insert(header::SERVER, connection.server_header.clone());
    if hcm.always_set_request_id_in_response
        && let Some(id) = request_id
    {
        headers.insert(&X_REQUEST_ID, id);
    }
    apply_response_mutations(&table, vhost, route, headers);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    /// The names left, sorted: removal does not keep the map's order.
    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let all = [
            ("host", "a"),
            ("connection", "keep-alive, upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-app", "1"),
        ];
        let mut map = headers(&all);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(names(&map), ["host", "x-app"]);

        let mut map = headers(&all);
        remove_hop_by_hop(&mut map, true);
        assert_eq!(names(&map), ["connection", "host", "upgrade", "x-app"]);

        let mut map = headers(&[("te", "trailers"), ("x-app", "1")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(names(&map), ["te", "x-app"]);

        let mut map = headers(&[("x-app", "1"), ("x-app", "2")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(map.get_all("x-app").iter().count(), 2);
    }
}
