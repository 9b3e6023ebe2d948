//! HTTP access logs, as Envoy writes them: the HCM's `access_log` entries with the stdout,
//! stderr and file loggers, in Envoy's default format, a `text_format` made of the command
//! operators listed in [`Token`], or a `json_format` (one JSON object per line, keys sorted,
//! typed values as Envoy renders them). One line per request, written when its response has
//! ended (so `%DURATION%` and `%BYTES_SENT%` cover the body).
//!
//! Formats come parsed from the config (`remora_config::access_log`); this module renders and
//! writes them. A request keeps only the header values its logs' formats name ([`Entry`]),
//! and a text format is bound to where those values are kept when the config is read
//! (`Format`), so a line is rendered without looking a name up.
//!
//! Workers never block on the log: lines are appended to one bounded buffer per destination,
//! which its writer thread writes out [`FLUSH_INTERVAL`] after the first line waiting, or once
//! [`FLUSH_BYTES`] are, as Envoy's file logger flushes on an interval. A worker wakes the
//! writer for the first line of a batch and for a full one, never per line (a wakeup per
//! request had cost more than the rest of the log). When the buffer is full (a stuck stdout),
//! lines are dropped and counted in `access_log.dropped_lines`, rather than stalling requests.
//! [`flush_all`] writes what is waiting (at shutdown).
//!
//! A log's `filter` picks the lines it writes ([`filter`]).
//!
//! SIGUSR1 reopens every log file, as Envoy does, so logrotate can move a file away: the line
//! after the signal goes to a fresh file at the configured path.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use remora_config::access_log::{
    AccessLogConfig, AddressPart, Endpoint, GrpcStatusFormat, HeaderField, JsonField, JsonObject,
    LogFormat, PeerField, Target, Timing, Token,
};

use crate::config::{ConfigError, ConfigResult};
use crate::stats::{Registry, Stat};
use filter::{Filter, HeaderChecks};

mod filter;

/// What one request leaves for its access log line. It keeps only what its logs' formats
/// read: of the headers, the values of the names they name (see [`AccessLogs`]), not copies of
/// whole header maps, which had cost a logged request more than rendering its line.
#[derive(Debug)]
pub struct Entry {
    pub started: Instant,
    /// How long the request took, as `downstream_rq_time` recorded it (else measured when
    /// the line is written).
    pub took: Option<Duration>,
    pub start_time: SystemTime,
    pub version: Version,
    /// The request's `:method`, `:path` and `:authority`: as it arrived, then as captured with
    /// its headers.
    pub method: Method,
    pub path: Option<PathAndQuery>,
    pub authority: Option<HeaderValue>,
    /// A head the codec refused: its method and target as sent, in place of the three above.
    pub refused: Option<(String, String)>,
    /// A `tcp_proxy` connection's line: no request, so `-` for its fields and the protocol.
    connection_only: bool,
    /// The request headers the formats read, as the request was forwarded (or, without an
    /// upstream, as the connection manager left it), and the response headers they read.
    pub headers: Captured,
    pub status: u16,
    pub flags: crate::error::ResponseFlags,
    pub bytes_received: Arc<std::sync::atomic::AtomicU64>,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// The cluster the router chose (its config, whose name the log prints).
    pub upstream_cluster: Option<Arc<remora_config::cluster::Cluster>>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`: the trusted client the connection manager settled on
    /// (`headers::Origin::client`); until the request's headers are read, the peer.
    pub client: Option<SocketAddr>,
    /// `%TRACE_ID%`: the request's trace id, when the connection manager traces.
    pub trace_id: Option<TraceId>,
    /// `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`: upstream attempts made (the router counts them).
    pub upstream_request_attempt_count: u32,
    /// `%DOWNSTREAM_PEER_*%`: the downstream's TLS certificate, if it presented one.
    pub peer_certificate: Option<Arc<crate::tls::PeerCertificate>>,
    /// `%REQUESTED_SERVER_NAME%`: the SNI the downstream asked for.
    pub server_name: Option<Arc<str>>,
    /// `%ROUTE_NAME%`: the route the request matched.
    pub route: Option<crate::http::selected::Selected>,
    /// `%RESPONSE_CODE_DETAILS%`: `via_upstream`, or why the reply was made here.
    pub details: std::borrow::Cow<'static, str>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub transport_failure: Option<Arc<str>>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`: the local address of the connection the response came on.
    pub upstream_local: Option<SocketAddr>,
    /// Whether its trace was forced (what `traceable_filter` checks).
    pub trace_forced: bool,
    /// A filter took it for the proxy's own health check (what `not_health_check_filter`
    /// leaves out).
    pub health_check: bool,
    /// When its phases ended, for `%REQUEST_DURATION%` and the like (kept only when a format
    /// reads them: see [`Entry::timed`]).
    pub timings: Timings,
    /// The logs' header filters' verdicts on the request as captured.
    header_checks: Vec<bool>,
    logs: Arc<AccessLogs>,
}

/// A header value as a JSON line shows it: as sent, UTF-8 included; absent (`null`) when it is
/// not UTF-8, which JSON cannot hold. (A text line writes the bytes as sent, as Envoy does.)
/// `from_utf8` also checks ASCII faster than `HeaderValue::to_str`, which refuses anything but
/// visible ASCII.
fn utf8(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()
}

/// A trace id as `%TRACE_ID%` prints it: 32 hex digits, or 16 for a 64-bit id. Kept as a
/// number and printed only when a format asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId {
    pub id: u128,
    pub wide: bool,
}

impl TraceId {
    /// Appends the id's digits to `line` (no formatter: a log line is written per request).
    pub fn push_to(&self, line: &mut Vec<u8>) {
        let digits = crate::hex::lower::<32>(self.id);
        line.extend_from_slice(self.significant(&digits));
    }

    /// The digits `%TRACE_ID%` shows of all 32.
    fn significant<'a>(&self, digits: &'a [u8; 32]) -> &'a [u8] {
        if self.wide { digits } else { &digits[16..] }
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = crate::hex::lower::<32>(self.id);
        f.write_str(std::str::from_utf8(self.significant(&digits)).unwrap_or_default())
    }
}

/// The values of the headers an entry's logs read (`None`: absent): the request's, in the order
/// of [`AccessLogs`]' request names, then the response's, then its trailers', in one vector
/// allocated once.
#[derive(Debug, Default)]
pub struct Captured {
    values: Vec<Option<HeaderValue>>,
    /// How many of `values` are the request's.
    request_len: usize,
    /// How many, after the request's, are the response head's.
    response_len: usize,
    /// Whether the request's have been captured (or, for a refused head, left out) yet.
    request_captured: bool,
}

impl Captured {
    /// Nothing captured yet, with room for the request's and the response's values.
    fn with_room(request_names: usize, response_names: usize, trailer_names: usize) -> Self {
        Captured {
            values: Vec::with_capacity(request_names + response_names + trailer_names),
            ..Captured::default()
        }
    }

    /// The request's values as `headers` has them now, in place of the last ones.
    fn set_request(&mut self, names: &[HeaderName], headers: &HeaderMap) {
        self.values.splice(
            ..self.request_len,
            names.iter().map(|name| headers.get(name).cloned()),
        );
        self.request_len = names.len();
        self.request_captured = true;
    }

    /// The response's values, in place of any earlier ones (its trailers' among them).
    fn set_response(&mut self, names: &[HeaderName], headers: &HeaderMap) {
        self.values.truncate(self.request_len);
        self.values
            .extend(names.iter().map(|name| headers.get(name).cloned()));
        self.response_len = names.len();
    }

    /// The response trailers' values, which come after its head.
    fn set_trailers(&mut self, names: &[HeaderName], trailers: &HeaderMap) {
        self.values.truncate(self.request_len + self.response_len);
        self.values
            .extend(names.iter().map(|name| trailers.get(name).cloned()));
    }

    /// The request's value for `name`, one of `names`, as text (see [`utf8`]).
    fn request(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        utf8(self.request_slot(slot_of(names, name)?)?)
    }

    /// The response head's value for `name`, one of `names`, as text.
    fn response(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        utf8(self.response_slot(slot_of(names, name)?)?)
    }

    /// The trailers' value for `name`, one of `names`, as text.
    fn trailer(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        utf8(self.trailer_slot(slot_of(names, name)?)?)
    }

    /// The request's value in `slot`, as sent.
    fn request_slot(&self, slot: usize) -> Option<&[u8]> {
        value_in(&self.values[..self.request_len], slot)
    }

    /// The response head's value in `slot`, as sent.
    fn response_slot(&self, slot: usize) -> Option<&[u8]> {
        let end = (self.request_len + self.response_len).min(self.values.len());
        value_in(&self.values[self.request_len..end], slot)
    }

    /// The response trailers' value in `slot`, as sent.
    fn trailer_slot(&self, slot: usize) -> Option<&[u8]> {
        let start = (self.request_len + self.response_len).min(self.values.len());
        value_in(&self.values[start..], slot)
    }

    fn clear_request(&mut self) {
        self.values.drain(..self.request_len);
        self.request_len = 0;
        self.request_captured = true;
    }
}

/// The value captured in `slot` of `values`, as sent.
fn value_in(values: &[Option<HeaderValue>], slot: usize) -> Option<&[u8]> {
    values.get(slot)?.as_ref().map(HeaderValue::as_bytes)
}

impl Entry {
    /// The record of a request as it arrived, for `logs`, boxed: it travels with the request
    /// and then with its response body, and a pointer moves for less than the record would.
    /// Its headers, `:path` and `:authority` are captured later ([`Entry::capture_request`]):
    /// Envoy's log reads them as the request left.
    pub fn new<B>(
        request: &http::Request<B>,
        (started, peer, local): (Instant, SocketAddr, SocketAddr),
        logs: &Arc<AccessLogs>,
    ) -> Box<Self> {
        Box::new(Entry {
            started,
            took: None,
            start_time: SystemTime::now(),
            version: request.version(),
            method: request.method().clone(),
            path: None,
            authority: None,
            refused: None,
            connection_only: false,
            headers: Captured::with_room(
                logs.request_headers.len(),
                logs.response_headers.len(),
                logs.trailer_headers.len(),
            ),
            status: 0,
            flags: crate::error::ResponseFlags::default(),
            bytes_received: Arc::default(),
            bytes_sent: 0,
            upstream_host: None,
            upstream_cluster: None,
            peer,
            local,
            client: None,
            trace_id: None,
            upstream_request_attempt_count: 0,
            peer_certificate: None,
            server_name: None,
            route: None,
            details: std::borrow::Cow::Borrowed(""),
            transport_failure: None,
            upstream_local: None,
            trace_forced: false,
            health_check: false,
            timings: Timings::default(),
            header_checks: logs.header_checks.on_nothing(),
            logs: logs.clone(),
        })
    }

    /// The record of a `tcp_proxy` connection, for `logs`: what Envoy's TCP proxy logs, with
    /// no request (`"- - -"`, response code 0) and its bytes in both directions.
    pub fn for_connection(
        at: (Instant, SocketAddr, SocketAddr),
        logs: &Arc<AccessLogs>,
    ) -> Box<Self> {
        let mut entry = Entry::new(&http::Request::new(()), at, logs);
        entry.connection_only = true;
        entry.headers.request_captured = true;
        entry
    }

    /// Records the request as it is now, in place of any earlier capture: its headers, and
    /// its `:path` and `:authority` (`Host`, else the URI's) as they are sent upstream,
    /// rewrites included. Envoy's log reads the request's headers when it writes the line, so
    /// it shows what the connection manager and the router did to them (a generated
    /// `x-request-id`, a rewritten path), also for a request answered locally.
    pub fn capture_request(&mut self, head: &http::request::Parts) {
        self.headers
            .set_request(&self.logs.request_headers, &head.headers);
        if !self.logs.header_checks.is_empty() {
            self.logs.header_checks.judge(head, &mut self.header_checks);
        }
        self.path = head.uri.path_and_query().cloned();
        self.authority = match head.headers.get(http::header::HOST) {
            Some(host) => Some(host.clone()),
            None => head
                .uri
                .authority()
                .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok()),
        };
    }

    /// Whether [`Entry::capture_request`] has run (or the head was refused, and its headers
    /// are left out).
    pub fn request_captured(&self) -> bool {
        self.headers.request_captured
    }

    /// Records the response's status and headers.
    pub fn capture_response(&mut self, status: u16, headers: &HeaderMap) {
        self.status = status;
        self.headers
            .set_response(&self.logs.response_headers, headers);
    }

    /// Records the response's trailers (what `%TRAILER(..)%` and `%GRPC_STATUS%` read).
    pub fn capture_trailers(&mut self, trailers: &HeaderMap) {
        if !self.logs.trailer_headers.is_empty() {
            self.headers
                .set_trailers(&self.logs.trailer_headers, trailers);
        }
    }

    /// A head the codec refused: logged with its method and target as sent, and no headers.
    pub fn record_refusal(&mut self, method: &str, target: &str) {
        self.refused = Some((method.to_owned(), target.to_owned()));
        self.authority = None;
        self.headers.clear_request();
        self.header_checks = self.logs.header_checks.on_nothing();
    }
}

/// When a request's phases ended, as the connection manager and the router saw them.
#[derive(Debug, Default)]
pub struct Timings {
    /// The request had no body: it was received in full with its head.
    pub bodiless: bool,
    /// The end of its body, as the router's reader saw it.
    pub body_end: Option<Arc<crate::body::request::RequestEnd>>,
    /// When its last attempt was handed to the upstream connection.
    pub sent: Option<Instant>,
    /// When the upstream response's head came.
    pub response_started: Option<Instant>,
}

/// A request's pending log line: written when dropped, i.e. when the response has ended.
#[derive(Debug)]
pub struct PendingLine {
    pub entry: Box<Entry>,
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        for log in self.entry.logs.logs.iter() {
            if log
                .filter
                .as_ref()
                .is_none_or(|filter| filter.admits(&self.entry))
            {
                log.sink.send(&log.format, &self.entry);
            }
        }
    }
}

/// A connection manager's (or the admin's) access logs, bound to their writers, with the
/// header names their formats and filters read: all an [`Entry`] keeps of a request's and a
/// response's headers, besides its header filters' verdicts.
#[derive(Debug, Default)]
pub struct AccessLogs {
    logs: Vec<ActiveLog>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    trailer_headers: Vec<HeaderName>,
    header_checks: HeaderChecks,
    /// Whether a format reads the phases' times ([`Timings`]).
    timed: bool,
}

impl AccessLogs {
    /// No logs: requests record nothing.
    pub fn none() -> Arc<AccessLogs> {
        Arc::default()
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }
}

/// The header names `format` reads, added to `logs`' request, response and trailer names once
/// each.
fn names_read(format: &LogFormat, logs: &mut AccessLogs) {
    fn add(names: &mut Vec<HeaderName>, field: &HeaderField) {
        if let HeaderField::Header(name) = field
            && !names.contains(name)
        {
            names.push(name.clone());
        }
    }
    fn tokens(tokens: &[Token], logs: &mut AccessLogs) {
        for token in tokens {
            match token {
                Token::Request { name, alt, .. } => {
                    add(&mut logs.request_headers, name);
                    if let Some(alt) = alt {
                        add(&mut logs.request_headers, alt);
                    }
                }
                Token::Response { name, .. } => add(&mut logs.response_headers, name),
                Token::Trailer { name, .. } => add(&mut logs.trailer_headers, name),
                Token::GrpcStatus(_) => {
                    let status = HeaderField::Header(GRPC_STATUS.clone());
                    add(&mut logs.response_headers, &status);
                    add(&mut logs.trailer_headers, &status);
                    let content_type = HeaderField::Header(http::header::CONTENT_TYPE);
                    add(&mut logs.request_headers, &content_type);
                }
                _ => {}
            }
        }
    }
    fn json(field: &JsonField, logs: &mut AccessLogs) {
        match field {
            JsonField::Format(format) => tokens(format, logs),
            JsonField::Literal(_) => {}
            JsonField::Object(object) => {
                for (_, field) in object {
                    json(field, logs);
                }
            }
            JsonField::List(items) => {
                for item in items {
                    json(item, logs);
                }
            }
        }
    }
    match format {
        LogFormat::Text { tokens: format, .. } => tokens(format, logs),
        LogFormat::Json { fields, .. } => {
            for (_, field) in fields {
                json(field, logs);
            }
        }
    }
}

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `format` has a duration operator of a phase ([`Token::Timing`]).
fn reads_timings(format: &LogFormat) -> bool {
    fn json(field: &JsonField) -> bool {
        match field {
            JsonField::Format(tokens) => timed(tokens),
            JsonField::Literal(_) => false,
            JsonField::Object(object) => object.iter().any(|(_, field)| json(field)),
            JsonField::List(items) => items.iter().any(json),
        }
    }
    fn timed(tokens: &[Token]) -> bool {
        tokens.iter().any(|token| matches!(token, Token::Timing(_)))
    }
    match format {
        LogFormat::Text { tokens, .. } => timed(tokens),
        LogFormat::Json { fields, .. } => fields.iter().any(|(_, field)| json(field)),
    }
}

/// A filter's (the connection manager's, a `tcp_proxy`'s) logs bound to their writers, with
/// their dropped lines counted in `access_log.dropped_lines`; none when it has none.
pub fn for_filter(
    configs: &[AccessLogConfig],
    registry: &Registry,
    path: &str,
) -> ConfigResult<Arc<AccessLogs>> {
    if configs.is_empty() {
        return Ok(AccessLogs::none());
    }
    let dropped = registry.counter("access_log.dropped_lines".to_string());
    activate(configs, &dropped, path)
}

/// A configured log bound to its writer.
#[derive(Debug)]
pub struct ActiveLog {
    format: Format,
    filter: Option<Filter>,
    sink: Arc<Sink>,
}

/// A log's format as its lines are rendered: a text format's header operators bound to the
/// slots of the values an [`Entry`] captures, so that a line finds each value by index rather
/// than by comparing names; a JSON format as configured.
#[derive(Debug)]
enum Format {
    Text {
        pieces: Vec<Piece>,
        omit_empty: bool,
    },
    Json {
        fields: JsonObject,
        omit_empty: bool,
    },
}

/// One operator of a text format.
#[derive(Debug)]
enum Piece {
    /// `%REQ(NAME?ALT):MAX%`.
    Request {
        field: Field,
        alt: Option<Field>,
        max: Option<usize>,
    },
    /// `%RESP(NAME):MAX%`: the slot of its value among the response head's (`None`: never
    /// one, as for a pseudo-header).
    Response {
        slot: Option<usize>,
        max: Option<usize>,
    },
    /// `%TRAILER(NAME):MAX%`: the same among the trailers'.
    Trailer {
        slot: Option<usize>,
        max: Option<usize>,
    },
    /// Literal text, copied in place (half a line's pieces are literal).
    Text(Box<[u8]>),
    /// An operator that reads no header.
    Token(Token),
}

/// Where a request operator's value is kept.
#[derive(Debug, Clone, Copy)]
enum Field {
    Method,
    Path,
    Authority,
    /// The slot of its value among the request's captured ones.
    Header(usize),
    Absent,
}

impl Field {
    /// `field` as an entry of `logs` keeps it.
    fn bind(field: &HeaderField, logs: &AccessLogs) -> Field {
        match field {
            HeaderField::Method => Field::Method,
            HeaderField::Path => Field::Path,
            HeaderField::Authority => Field::Authority,
            HeaderField::Header(name) => {
                slot_of(&logs.request_headers, name).map_or(Field::Absent, Field::Header)
            }
            HeaderField::Absent => Field::Absent,
        }
    }
}

impl Format {
    /// `format` bound to the header names `logs` captures (which must hold all it reads).
    fn bind(format: &LogFormat, logs: &AccessLogs) -> Format {
        let slot = |names: &[HeaderName], field: &HeaderField| match field {
            HeaderField::Header(name) => slot_of(names, name),
            _ => None,
        };
        match format {
            LogFormat::Text { tokens, omit_empty } => Format::Text {
                pieces: tokens
                    .iter()
                    .map(|token| match token {
                        Token::Request { name, alt, max } => Piece::Request {
                            field: Field::bind(name, logs),
                            alt: alt.as_ref().map(|alt| Field::bind(alt, logs)),
                            max: *max,
                        },
                        Token::Response { name, max } => Piece::Response {
                            slot: slot(&logs.response_headers, name),
                            max: *max,
                        },
                        Token::Trailer { name, max } => Piece::Trailer {
                            slot: slot(&logs.trailer_headers, name),
                            max: *max,
                        },
                        Token::Text(text) => Piece::Text(text.as_bytes().into()),
                        other => Piece::Token(other.clone()),
                    })
                    .collect(),
                omit_empty: *omit_empty,
            },
            LogFormat::Json { fields, omit_empty } => Format::Json {
                fields: fields.clone(),
                omit_empty: *omit_empty,
            },
        }
    }
}

/// Where `name` is among `names`.
fn slot_of(names: &[HeaderName], name: &HeaderName) -> Option<usize> {
    names.iter().position(|known| known == name)
}

/// Binds configured logs to writers (one writer thread per destination, shared). A file that
/// cannot be opened for appending is an error naming the log (`path` is its owner's).
pub fn activate(
    configs: &[AccessLogConfig],
    dropped: &Arc<Stat>,
    path: &str,
) -> ConfigResult<Arc<AccessLogs>> {
    for (index, config) in configs.iter().enumerate() {
        if let Target::File(file) = &config.target {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(|e| {
                    ConfigError::new(
                        format!("{path}.access_log[{index}].typed_config.path"),
                        format!("cannot open {}: {e}", file.display()),
                    )
                })?;
        }
    }
    let mut logs = AccessLogs::default();
    for config in configs {
        names_read(&config.format, &mut logs);
        logs.timed |= reads_timings(&config.format);
        let filter = config
            .filter
            .as_ref()
            .map(|filter| Filter::build(filter, &mut logs.header_checks));
        if filter.as_ref().is_some_and(Filter::reads_request_id)
            && !logs
                .request_headers
                .contains(&crate::http::headers::X_REQUEST_ID)
        {
            logs.request_headers
                .push(crate::http::headers::X_REQUEST_ID.clone());
        }
        logs.logs.push(ActiveLog {
            format: Format::bind(&config.format, &logs),
            filter,
            sink: Sink::for_target(&config.target, dropped),
        });
    }
    Ok(Arc::new(logs))
}

/// A destination's buffer; its writer thread writes what is left and ends when the last
/// holder drops it.
#[derive(Debug)]
pub struct Sink {
    shared: Arc<Shared>,
    dropped: Arc<Stat>,
}

/// How long a line may wait in its buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes waiting that wake the writer before the interval is up.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// The line buffer a thread keeps between lines, at most.
const MAX_KEPT_LINE: usize = 16 * 1024;
/// Bytes buffered per destination before new lines are dropped.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

/// What a destination's workers and writer share.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: enough bytes, a flush asked for, or the last sink gone.
    wake: Condvar,
    /// Wakes [`flush_all`] when a flush it asked for is written.
    written: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Flushes asked for, and the last one written.
    asked: u64,
    done: u64,
    closed: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Every live destination, by target: one writer each however many logs name it.
fn sinks() -> MutexGuard<'static, HashMap<Target, Weak<Sink>>> {
    static SINKS: OnceLock<Mutex<HashMap<Target, Weak<Sink>>>> = OnceLock::new();
    lock(SINKS.get_or_init(Default::default))
}

impl Sink {
    fn for_target(target: &Target, dropped: &Arc<Stat>) -> Arc<Sink> {
        let mut sinks = sinks();
        if let Some(sink) = sinks.get(target).and_then(Weak::upgrade) {
            return sink;
        }
        let shared = Arc::new(Shared::default());
        let destination = target.clone();
        let writer = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("remora-access-log".into())
            .spawn(move || write_lines(&destination, &writer));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the access log writer");
        }
        let sink = Arc::new(Sink {
            shared,
            dropped: dropped.clone(),
        });
        sinks.insert(target.clone(), Arc::downgrade(&sink));
        sink
    }

    /// Renders `entry` in `format` and appends the line (rendered into a buffer each thread
    /// reuses, so a line costs no allocation).
    fn send(&self, format: &Format, entry: &Entry) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            render_line(format, entry, line);
            self.append(line);
            // A rare huge line (a long header value) does not stay reserved for good.
            if line.capacity() > MAX_KEPT_LINE {
                *line = Vec::new();
            }
        });
    }

    /// A writer of lines to `path` on the access logs' writer threads (one per destination),
    /// for other event logs (outlier ejections).
    pub fn for_path(path: &std::path::Path) -> Arc<Sink> {
        Sink::for_target(&Target::File(path.to_path_buf()), &Arc::default())
    }

    /// Queues one whole line (with its newline) for the destination.
    pub fn append(&self, line: &[u8]) {
        let mut pending = lock(&self.shared.pending);
        if pending.bytes.len() + line.len() > MAX_BUFFERED {
            drop(pending);
            self.dropped.inc();
            return;
        }
        // The first line of a batch starts the writer's interval; a full batch ends it early.
        let before = pending.bytes.len();
        pending.bytes.extend_from_slice(line);
        let wake = before == 0 || (before < FLUSH_BYTES && pending.bytes.len() >= FLUSH_BYTES);
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Asks the writer to write what is waiting, and waits (at most `timeout`) until it has.
    fn flush(&self, timeout: Duration) {
        let mut pending = lock(&self.shared.pending);
        pending.asked += 1;
        let asked = pending.asked;
        self.shared.wake.notify_one();
        let deadline = Instant::now() + timeout;
        while pending.done < asked && !pending.closed {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            pending = self
                .shared
                .written
                .wait_timeout(pending, left)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
    }
}

/// Writes every destination's waiting lines, each waited for at most `timeout` (at shutdown,
/// so the last requests' lines are not lost).
pub fn flush_all(timeout: Duration) {
    let live: Vec<Arc<Sink>> = sinks().values().filter_map(Weak::upgrade).collect();
    for sink in live {
        sink.flush(timeout);
    }
}

/// Bumped by [`reopen_files`]; each file writer compares it with the generation it opened.
static REOPEN_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Makes every file writer reopen its path before its next line (SIGUSR1).
pub fn reopen_files() {
    REOPEN_GENERATION.fetch_add(1, Ordering::Relaxed);
}

fn open_log(path: &std::path::Path) -> Option<Box<dyn std::io::Write>> {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(file) => Some(Box::new(file)),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "cannot open the access log");
            None
        }
    }
}

fn write_lines(target: &Target, shared: &Shared) {
    let mut opened = REOPEN_GENERATION.load(Ordering::Relaxed);
    let mut out: Box<dyn std::io::Write> = match target {
        Target::Stdout => Box::new(std::io::stdout()),
        Target::Stderr => Box::new(std::io::stderr()),
        Target::File(path) => match open_log(path) {
            Some(file) => file,
            None => return,
        },
    };
    // The buffer written last, emptied and handed back so its capacity is reused.
    let mut spare = Vec::new();
    loop {
        let (mut batch, asked, closed) = {
            let mut pending = lock(&shared.pending);
            // Idle: asleep until a first line (or a flush, or the end).
            while pending.bytes.is_empty() && !pending.closed && pending.asked == pending.done {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            let deadline = Instant::now() + FLUSH_INTERVAL;
            while !pending.closed
                && pending.asked == pending.done
                && pending.bytes.len() < FLUSH_BYTES
            {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                pending = shared
                    .wake
                    .wait_timeout(pending, left)
                    .unwrap_or_else(|poison| poison.into_inner())
                    .0;
            }
            let batch = std::mem::replace(&mut pending.bytes, std::mem::take(&mut spare));
            (batch, pending.asked, pending.closed)
        };
        if !batch.is_empty() {
            let generation = REOPEN_GENERATION.load(Ordering::Relaxed);
            if let (Target::File(path), true) = (target, generation != opened) {
                opened = generation;
                // A path that cannot be opened now keeps the old file: no line is lost.
                if let Some(file) = open_log(path) {
                    out = file;
                }
            }
            if let Err(error) = out.write_all(&batch).and_then(|()| out.flush()) {
                tracing::warn!(%error, "cannot write the access log; its lines are dropped");
            }
        }
        batch.clear();
        spare = batch;
        lock(&shared.pending).done = asked;
        shared.written.notify_all();
        if closed {
            return;
        }
    }
}

fn render_line(format: &Format, entry: &Entry, line: &mut Vec<u8>) {
    match format {
        Format::Text { pieces, omit_empty } => render_text(pieces, entry, *omit_empty, line),
        Format::Json { fields, omit_empty } => {
            let object = serde_json::Value::Object(json_object(fields, entry, *omit_empty));
            // Writing to a vector cannot fail.
            let _ = serde_json::to_writer(&mut *line, &object);
            line.push(b'\n');
        }
    }
}

fn json_object(
    fields: &JsonObject,
    entry: &Entry,
    omit_empty: bool,
) -> serde_json::Map<String, serde_json::Value> {
    let mut object = serde_json::Map::new();
    for (key, field) in fields {
        let value = json_value(field, entry, omit_empty);
        if !(omit_empty && is_empty(&value)) {
            object.insert(key.clone(), value);
        }
    }
    object
}

/// What `omit_empty_values` leaves out, as Envoy does: nulls, and objects left with nothing.
fn is_empty(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => true,
        serde_json::Value::Object(object) => object.is_empty(),
        _ => false,
    }
}

fn json_value(field: &JsonField, entry: &Entry, omit_empty: bool) -> serde_json::Value {
    match field {
        JsonField::Format(tokens) => match tokens.as_slice() {
            [token] => typed_value(token, entry),
            tokens => serde_json::Value::String(rendered(tokens, entry, omit_empty)),
        },
        JsonField::Literal(value) => value.clone(),
        JsonField::Object(nested) => {
            serde_json::Value::Object(json_object(nested, entry, omit_empty))
        }
        JsonField::List(items) => items
            .iter()
            .map(|item| json_value(item, entry, omit_empty))
            .filter(|value| !(omit_empty && is_empty(value)))
            .collect(),
    }
}

/// One operator alone as a JSON value, typed as Envoy types it.
fn typed_value(token: &Token, entry: &Entry) -> serde_json::Value {
    use serde_json::Value;
    let text = |value: Option<&str>, max: Option<usize>| match value {
        // Cut to `max` bytes; whole if that would split a character.
        Some(value) => Value::String(
            value
                .get(..max.unwrap_or(usize::MAX).min(value.len()))
                .unwrap_or(value)
                .to_owned(),
        ),
        None => Value::Null,
    };
    match token {
        Token::Text(literal) => Value::String(literal.clone()),
        Token::ResponseCode => Value::from(entry.status),
        Token::BytesReceived => Value::from(entry.bytes_received.load(Ordering::Relaxed)),
        Token::BytesSent => Value::from(entry.bytes_sent),
        Token::Duration => Value::from(entry.took().as_millis() as u64),
        Token::Request { name, alt, max } => text(
            request_value(entry, name)
                .or_else(|| alt.as_ref().and_then(|alt| request_value(entry, alt))),
            *max,
        ),
        Token::Response { name, max } => text(response_value(entry, name), *max),
        Token::Trailer { name, max } => text(trailer_value(entry, name), *max),
        Token::GrpcStatus(GrpcStatusFormat::Number) => {
            entry.grpc_status().map_or(Value::Null, Value::from)
        }
        Token::GrpcStatus(format) => match entry.grpc_status() {
            Some(status) => Value::String(grpc_status_text(status, *format).into_owned()),
            None => Value::Null,
        },
        Token::Address(endpoint, part) => match (entry.address(*endpoint), part) {
            (None, _) => Value::Null,
            (Some(address), AddressPart::Port) => Value::from(address.port()),
            (Some(address), AddressPart::WithoutPort) => Value::String(address.ip().to_string()),
            (Some(address), AddressPart::Whole) => Value::String(address.to_string()),
        },
        Token::UpstreamCluster => text(entry.cluster_name(false), None),
        Token::UpstreamClusterRaw => text(entry.cluster_name(true), None),
        Token::RouteName => text(entry.route_name(), None),
        Token::ResponseCodeDetails => match entry.details.is_empty() {
            true => Value::Null,
            false => Value::String(envoy_details(&entry.details)),
        },
        Token::UpstreamTransportFailureReason => entry
            .transport_failure
            .as_deref()
            .map_or(Value::Null, |reason| Value::String(envoy_details(reason))),
        Token::ConnectionTerminationDetails => Value::Null,
        Token::RequestedServerName => text(entry.server_name.as_deref(), None),
        Token::TraceId => entry
            .trace_id
            .map_or(Value::Null, |id| Value::String(id.to_string())),
        Token::UpstreamRequestAttemptCount => Value::from(entry.upstream_request_attempt_count),
        Token::Timing(timing) => entry.timing(*timing).map_or(Value::Null, Value::from),
        other => Value::String(rendered(std::slice::from_ref(other), entry, false)),
    }
}

/// [`render`] into a new string.
fn rendered(format: &[Token], entry: &Entry, omit_empty: bool) -> String {
    let mut line = Vec::new();
    for token in format {
        render(token, entry, omit_empty, &mut line);
    }
    // Its header values are the UTF-8 ones ([`request_value`]); the rest is text.
    String::from_utf8(line)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// Appends a text format's line for `entry` to `line`. Header values are written as sent,
/// UTF-8 or not, as Envoy writes them.
fn render_text(pieces: &[Piece], entry: &Entry, omit_empty: bool, line: &mut Vec<u8>) {
    for piece in pieces {
        match piece {
            Piece::Request { field, alt, max } => {
                let value = entry
                    .request_field(*field)
                    .or_else(|| alt.and_then(|alt| entry.request_field(alt)));
                push_value(line, value, *max, omit_empty);
            }
            Piece::Response { slot, max } => {
                let value = slot.and_then(|slot| entry.headers.response_slot(slot));
                push_value(line, value, *max, omit_empty);
            }
            Piece::Trailer { slot, max } => {
                let value = slot.and_then(|slot| entry.headers.trailer_slot(slot));
                push_value(line, value, *max, omit_empty);
            }
            Piece::Text(text) => line.extend_from_slice(text),
            Piece::Token(token) => render(token, entry, omit_empty, line),
        }
    }
}

/// A value as its bytes.
fn text(value: Option<&str>) -> Option<&[u8]> {
    value.map(str::as_bytes)
}

/// Appends one operator for `entry` to `line`. Numbers and addresses are written directly,
/// not through `fmt` (which had cost as much as the rest of a line).
fn render(token: &Token, entry: &Entry, omit_empty: bool, line: &mut Vec<u8>) {
    let mut number = itoa::Buffer::new();
    match token {
        Token::Text(text) => line.extend_from_slice(text.as_bytes()),
        Token::StartTime => push_time(line, entry.start_time),
        Token::StartTimeFormat(format) => push_formatted_time(line, entry.start_time, format),
        Token::Request { name, alt, max } => {
            let value = request_value(entry, name)
                .or_else(|| alt.as_ref().and_then(|alt| request_value(entry, alt)));
            push_value(line, text(value), *max, omit_empty);
        }
        Token::Response { name, max } => {
            push_value(line, text(response_value(entry, name)), *max, omit_empty);
        }
        Token::Trailer { name, max } => {
            push_value(line, text(trailer_value(entry, name)), *max, omit_empty);
        }
        Token::GrpcStatus(format) => match entry.grpc_status() {
            Some(status) => line.extend_from_slice(grpc_status_text(status, *format).as_bytes()),
            None => push_absent(line, omit_empty),
        },
        Token::Protocol => line.extend_from_slice(match entry.version {
            _ if entry.connection_only => b"-",
            Version::HTTP_10 => b"HTTP/1.0",
            Version::HTTP_11 => b"HTTP/1.1",
            Version::HTTP_2 => b"HTTP/2",
            _ => b"-",
        }),
        Token::ResponseCode => line.extend_from_slice(number.format(entry.status).as_bytes()),
        Token::ResponseFlags => match entry.flags.render() {
            Some(flags) => line.extend_from_slice(flags.as_bytes()),
            None => line.push(b'-'),
        },
        Token::BytesReceived => {
            let received = entry.bytes_received.load(Ordering::Relaxed);
            line.extend_from_slice(number.format(received).as_bytes());
        }
        Token::BytesSent => line.extend_from_slice(number.format(entry.bytes_sent).as_bytes()),
        Token::Duration => {
            let millis = entry.took().as_millis() as u64;
            line.extend_from_slice(number.format(millis).as_bytes());
        }
        Token::Address(endpoint, part) => match entry.address(*endpoint) {
            Some(address) => push_address_part(line, address, *part),
            None => push_absent(line, omit_empty),
        },
        Token::UpstreamCluster => {
            push_value(line, text(entry.cluster_name(false)), None, omit_empty)
        }
        Token::UpstreamClusterRaw => {
            push_value(line, text(entry.cluster_name(true)), None, omit_empty)
        }
        Token::RouteName => push_value(line, text(entry.route_name()), None, omit_empty),
        Token::ResponseCodeDetails => {
            let details = (!entry.details.is_empty()).then(|| envoy_details(&entry.details));
            push_value(line, text(details.as_deref()), None, omit_empty);
        }
        Token::UpstreamTransportFailureReason => {
            let reason = entry.transport_failure.as_deref().map(envoy_details);
            push_value(line, text(reason.as_deref()), None, omit_empty);
        }
        Token::ConnectionTerminationDetails => push_absent(line, omit_empty),
        Token::RequestedServerName => {
            push_value(line, text(entry.server_name.as_deref()), None, omit_empty);
        }
        Token::DownstreamPeer(field) => {
            push_peer(line, entry.peer_certificate.as_deref(), *field, omit_empty);
        }
        Token::TraceId => match entry.trace_id {
            Some(id) => id.push_to(line),
            None => push_absent(line, omit_empty),
        },
        Token::UpstreamRequestAttemptCount => {
            let attempts = number.format(entry.upstream_request_attempt_count);
            line.extend_from_slice(attempts.as_bytes());
        }
        Token::Timing(timing) => match entry.timing(*timing) {
            Some(millis) => line.extend_from_slice(number.format(millis).as_bytes()),
            None => push_absent(line, omit_empty),
        },
    }
}

/// Details as Envoy writes them: whitespace as `_`, so a line splits on spaces.
fn envoy_details(details: &str) -> String {
    details
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

/// What of `address` an operator asks for: all of it, its IP or its port.
fn push_address_part(line: &mut Vec<u8>, address: SocketAddr, part: AddressPart) {
    match (part, address) {
        (AddressPart::Whole, _) => push_addr(line, address),
        (AddressPart::Port, _) => {
            line.extend_from_slice(itoa::Buffer::new().format(address.port()).as_bytes());
        }
        (AddressPart::WithoutPort, SocketAddr::V4(v4)) => push_ipv4(line, *v4.ip()),
        (AddressPart::WithoutPort, SocketAddr::V6(v6)) => {
            // Writing to a vector cannot fail.
            let _ = std::io::Write::write_fmt(line, format_args!("{}", v6.ip()));
        }
    }
}

/// An IPv4 address, dotted, without `fmt`.
fn push_ipv4(line: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    let mut number = itoa::Buffer::new();
    for (index, octet) in ip.octets().into_iter().enumerate() {
        if index > 0 {
            line.push(b'.');
        }
        line.extend_from_slice(number.format(octet).as_bytes());
    }
}

/// `address:port` as `SocketAddr` displays it; an IPv4 address without `fmt`.
fn push_addr(line: &mut Vec<u8>, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        // Writing to a vector cannot fail.
        let _ = std::io::Write::write_fmt(line, format_args!("{addr}"));
        return;
    };
    push_ipv4(line, *v4.ip());
    line.push(b':');
    line.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
}

impl Entry {
    /// The address an operator's endpoint names, if the request got that far.
    fn address(&self, endpoint: Endpoint) -> Option<SocketAddr> {
        match endpoint {
            Endpoint::DownstreamRemote => Some(self.client.unwrap_or(self.peer)),
            Endpoint::DownstreamDirectRemote => Some(self.peer),
            Endpoint::DownstreamLocal => Some(self.local),
            Endpoint::UpstreamRemote => self.upstream_host,
            Endpoint::UpstreamLocal => self.upstream_local,
        }
    }

    fn took(&self) -> Duration {
        self.took.unwrap_or_else(|| self.started.elapsed())
    }

    /// The status of a gRPC request (`application/grpc`, or `application/grpc+` a subtype),
    /// as Envoy reads it for the log: the trailers' `grpc-status`, else the head's, else the
    /// HTTP status's gRPC equivalent.
    fn grpc_status(&self) -> Option<u64> {
        const GRPC: &str = "application/grpc";
        let content_type = self
            .headers
            .request(&self.logs.request_headers, &http::header::CONTENT_TYPE)?;
        let grpc = content_type
            .strip_prefix(GRPC)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'));
        if !grpc || self.connection_only {
            return None;
        }
        let given = self
            .headers
            .trailer(&self.logs.trailer_headers, &GRPC_STATUS)
            .or_else(|| {
                self.headers
                    .response(&self.logs.response_headers, &GRPC_STATUS)
            });
        match given {
            // Envoy's "invalid code" is -1 as an unsigned number.
            Some(text) => Some(text.trim().parse().unwrap_or(u64::MAX)),
            None if self.status == 0 => None,
            None => Some(match self.status {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502 | 503 | 504 => 14,
                _ => 2,
            }),
        }
    }

    /// Whether a format reads [`Entry::timings`], which the router then records.
    pub fn timed(&self) -> bool {
        self.logs.timed
    }

    /// A phase's end in whole milliseconds from the start (the response's last byte, from
    /// its first, for [`Timing::ResponseTx`]); `None` when the request never got there.
    fn timing(&self, timing: Timing) -> Option<u64> {
        let millis = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis();
        let timings = &self.timings;
        if self.connection_only {
            return None;
        }
        let body_end = || timings.body_end.as_ref()?.ended_at();
        let millis = match timing {
            Timing::Request if timings.bodiless => 0,
            Timing::Request => millis(self.started, body_end()?),
            Timing::RequestTx => {
                let sent = timings.sent?;
                let last = match timings.bodiless {
                    true => sent,
                    false => body_end()?.max(sent),
                };
                millis(self.started, last)
            }
            Timing::Response => millis(self.started, timings.response_started?),
            Timing::ResponseTx => millis(timings.response_started?, self.started + self.took()),
        };
        Some(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    /// A request operator's value, as sent.
    fn request_field(&self, field: Field) -> Option<&[u8]> {
        if self.connection_only {
            return None;
        }
        if let Some((method, target)) = &self.refused {
            return match field {
                Field::Method => Some(method.as_bytes()),
                Field::Path => Some(target.as_bytes()),
                _ => None,
            };
        }
        match field {
            Field::Method => Some(self.method.as_str().as_bytes()),
            Field::Path => Some(
                self.path
                    .as_ref()
                    .map_or("/", PathAndQuery::as_str)
                    .as_bytes(),
            ),
            Field::Authority => self
                .authority
                .as_ref()
                .map(HeaderValue::as_bytes)
                .filter(|authority| !authority.is_empty()),
            Field::Header(slot) => self.headers.request_slot(slot),
            Field::Absent => None,
        }
    }

    fn route_name(&self) -> Option<&str> {
        self.route
            .as_ref()
            .map(|route| route.route().name.as_str())
            .filter(|name| !name.is_empty())
    }

    /// The cluster's name as `%UPSTREAM_CLUSTER%` prints it (its stats name), or `raw`.
    fn cluster_name(&self, raw: bool) -> Option<&str> {
        self.upstream_cluster.as_ref().map(|cluster| match raw {
            true => cluster.name.as_str(),
            false => cluster.stats_name.as_str(),
        })
    }
}

/// A request operator's value as text, for a JSON log (which holds only UTF-8).
fn request_value<'a>(entry: &'a Entry, field: &HeaderField) -> Option<&'a str> {
    utf8(entry.request_field(Field::bind(field, &entry.logs))?)
}

fn response_value<'a>(entry: &'a Entry, field: &HeaderField) -> Option<&'a str> {
    match field {
        HeaderField::Header(name) => entry.headers.response(&entry.logs.response_headers, name),
        _ => None,
    }
}

fn trailer_value<'a>(entry: &'a Entry, field: &HeaderField) -> Option<&'a str> {
    match field {
        HeaderField::Header(name) => entry.headers.trailer(&entry.logs.trailer_headers, name),
        _ => None,
    }
}

/// A gRPC status as `%GRPC_STATUS(format)%` writes it: Envoy's names (camel case), absl's
/// (snake case), or the number; a code with no name as its number.
fn grpc_status_text(status: u64, format: GrpcStatusFormat) -> Cow<'static, str> {
    const NAMES: [(&str, &str); 17] = [
        ("OK", "OK"),
        ("Canceled", "CANCELLED"),
        ("Unknown", "UNKNOWN"),
        ("InvalidArgument", "INVALID_ARGUMENT"),
        ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
        ("NotFound", "NOT_FOUND"),
        ("AlreadyExists", "ALREADY_EXISTS"),
        ("PermissionDenied", "PERMISSION_DENIED"),
        ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
        ("FailedPrecondition", "FAILED_PRECONDITION"),
        ("Aborted", "ABORTED"),
        ("OutOfRange", "OUT_OF_RANGE"),
        ("Unimplemented", "UNIMPLEMENTED"),
        ("Internal", "INTERNAL"),
        ("Unavailable", "UNAVAILABLE"),
        ("DataLoss", "DATA_LOSS"),
        ("Unauthenticated", "UNAUTHENTICATED"),
    ];
    let named = usize::try_from(status)
        .ok()
        .and_then(|index| NAMES.get(index));
    match (format, named) {
        (GrpcStatusFormat::Camel, Some((camel, _))) => Cow::Borrowed(camel),
        (GrpcStatusFormat::Snake, Some((_, snake))) => Cow::Borrowed(snake),
        _ => Cow::Owned(status.to_string()),
    }
}

/// A fact of the downstream's certificate; several SANs are joined with `,`, as Envoy does.
fn push_peer(
    line: &mut Vec<u8>,
    peer: Option<&crate::tls::PeerCertificate>,
    field: PeerField,
    omit_empty: bool,
) {
    let Some(peer) = peer else {
        return push_absent(line, omit_empty);
    };
    let joined = |values: &[String]| (!values.is_empty()).then(|| values.join(","));
    let time = |seconds: i64| {
        UNIX_EPOCH.checked_add(std::time::Duration::from_secs(u64::try_from(seconds).ok()?))
    };
    let value = match field {
        PeerField::UriSan => joined(peer.uri_sans()),
        PeerField::DnsSan => joined(peer.dns_sans()),
        PeerField::IpSan => joined(peer.ip_sans()),
        PeerField::EmailSan => joined(peer.email_sans()),
        PeerField::Subject => Some(peer.subject().to_string()),
        PeerField::Issuer => Some(peer.issuer().to_string()),
        PeerField::Serial => Some(peer.serial().to_string()),
        PeerField::ValidFrom | PeerField::ValidUntil => {
            let (start, end) = peer.validity();
            let at = if field == PeerField::ValidFrom {
                start
            } else {
                end
            };
            match time(at) {
                Some(at) => return push_time(line, at),
                None => None,
            }
        }
    };
    push_value(line, text(value.as_deref()), None, omit_empty);
}

/// A value, cut to `max` bytes (as Envoy cuts); `-` when there is none (nothing with
/// `omit_empty`).
fn push_value(line: &mut Vec<u8>, value: Option<&[u8]>, max: Option<usize>, omit_empty: bool) {
    match value {
        Some(value) => {
            let end = max.unwrap_or(usize::MAX).min(value.len());
            line.extend_from_slice(&value[..end]);
        }
        None => push_absent(line, omit_empty),
    }
}

/// What a line shows for a value that is not there: `-`, or nothing with `omit_empty`.
fn push_absent(line: &mut Vec<u8>, omit_empty: bool) {
    if !omit_empty {
        line.push(b'-');
    }
}

/// `2026-11-25T18:40:00.123Z`, Envoy's default `%START_TIME%`.
/// The date and time to the second are formatted once per second on each thread (lines of
/// the same second share them); the milliseconds are appended.
fn push_time(line: &mut Vec<u8>, time: SystemTime) {
    thread_local! {
        /// The last second formatted, as `2026-11-25T18:40:00`.
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (second, millis) = (since_epoch.as_secs(), since_epoch.subsec_millis());
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            let Ok(stamp) = jiff::Timestamp::from_second(second as i64) else {
                return;
            };
            text.clear();
            let _ = write!(text, "{stamp:.0}");
            text.pop(); // the `Z`, which goes after the milliseconds
            *cached = second;
        }
        line.extend_from_slice(text.as_bytes());
        let digits = [millis / 100, millis / 10 % 10, millis % 10].map(|d| b'0' + d as u8);
        line.extend_from_slice(&[b'.', digits[0], digits[1], digits[2], b'Z']);
    });
}

/// `time` in UTC by a `START_TIME(FORMAT)` format (checked when the config was read).
fn push_formatted_time(line: &mut Vec<u8>, time: SystemTime, format: &str) {
    if let Ok(stamp) = jiff::Timestamp::try_from(time)
        && let Ok(text) = jiff::fmt::strtime::format(format, stamp)
    {
        line.extend_from_slice(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_rendered_as_envoy_does() {
        let mut line = Vec::new();
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_095_400_123);
        push_time(&mut line, time);
        assert_eq!(line, b"2025-11-25T18:30:00.123Z");
        line.clear();
        push_time(
            &mut line,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400),
        );
        assert_eq!(line, b"2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn start_time_with_a_format_is_rendered_in_utc() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_095_400_123);
        let format = |envoy: &str| {
            let tokens = remora_config::access_log::parse_format(envoy).unwrap();
            let [Token::StartTimeFormat(format)] = &tokens[..] else {
                panic!("{tokens:?}");
            };
            let mut line = Vec::new();
            push_formatted_time(&mut line, time, format);
            String::from_utf8(line).unwrap()
        };
        assert_eq!(
            format("%START_TIME(%Y-%m-%dT%H:%M:%S%z)%"),
            "2025-11-25T18:30:00+0000"
        );
        assert_eq!(format("%START_TIME(%s.%3f)%"), "1764095400.123");
        assert_eq!(format("%START_TIME(%E3S|%f)%"), "00.123|123000000");
    }

    #[test]
    fn lines_of_one_second_share_its_text_and_keep_their_own_milliseconds() {
        let second = UNIX_EPOCH + Duration::from_secs(1_764_095_400);
        let at = |millis| second + Duration::from_millis(millis);
        let mut line = Vec::new();
        for (time, expected) in [
            (at(7), "2025-11-25T18:30:00.007Z"),
            (at(999), "2025-11-25T18:30:00.999Z"),
            (at(1_050), "2025-11-25T18:30:01.050Z"),
            (at(0), "2025-11-25T18:30:00.000Z"),
        ] {
            line.clear();
            push_time(&mut line, time);
            assert_eq!(line, expected.as_bytes());
        }
    }

    #[test]
    fn an_entry_keeps_the_named_headers_first_values_as_sent() {
        let names = [
            HeaderName::from_static("user-agent"),
            HeaderName::from_static("x-name"),
            HeaderName::from_static("x-absent"),
        ];
        let mut headers = HeaderMap::new();
        headers.append("x-name", HeaderValue::from_static("first"));
        headers.append("x-name", HeaderValue::from_static("second"));
        headers.insert(
            "user-agent",
            HeaderValue::from_bytes("café/1".as_bytes()).unwrap(),
        );
        headers.insert("x-other", HeaderValue::from_static("not kept"));
        let mut captured = Captured::with_room(names.len(), 0, 0);
        captured.set_request(&names, &headers);
        assert_eq!(captured.request(&names, &names[0]), Some("café/1"));
        assert_eq!(captured.request(&names, &names[1]), Some("first"));
        assert_eq!(captured.request(&names, &names[2]), None);
        let other = HeaderName::from_static("x-other");
        assert_eq!(
            captured.request(&names, &other),
            None,
            "not a name the formats read"
        );
        headers.insert("user-agent", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        headers.remove("x-name");
        captured.set_request(&names, &headers);
        assert_eq!(captured.request(&names, &names[0]), None, "not UTF-8");
        assert_eq!(captured.request(&names, &names[1]), None, "removed since");
        assert_eq!(captured.request_slot(0), Some(&b"\xff\xfe"[..]), "as sent");
    }

    #[test]
    fn request_and_response_values_are_kept_apart_and_replaced_in_place() {
        let request_names = [
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("user-agent"),
        ];
        let response_names = [HeaderName::from_static("x-envoy-upstream-service-time")];
        let one = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            headers
        };
        let mut captured = Captured::with_room(request_names.len(), 1, 0);
        assert!(!captured.request_captured);
        assert_eq!(captured.request(&request_names, &request_names[1]), None);
        captured.set_request(&request_names, &one("user-agent", "arrived"));
        assert!(captured.request_captured);
        assert_eq!(
            captured.request(&request_names, &request_names[1]),
            Some("arrived")
        );
        // The router captures the request as forwarded, once per attempt.
        captured.set_request(&request_names, &one("x-request-id", "forwarded"));
        captured.set_request(&request_names, &one("x-request-id", "retried"));
        assert_eq!(
            captured.request(&request_names, &request_names[0]),
            Some("retried")
        );
        assert_eq!(captured.request(&request_names, &request_names[1]), None);
        captured.set_response(&response_names, &one("x-envoy-upstream-service-time", "7"));
        assert_eq!(
            captured.response(&response_names, &response_names[0]),
            Some("7")
        );
        assert_eq!(
            captured.request(&request_names, &request_names[0]),
            Some("retried")
        );
        // A refused head keeps no request headers, and the response's stay where they were.
        captured.clear_request();
        assert_eq!(captured.request(&request_names, &request_names[0]), None);
        assert_eq!(
            captured.response(&response_names, &response_names[0]),
            Some("7")
        );
    }

    /// `formats` bound as `activate` binds them (without writers), and an entry of a request
    /// with `request_headers`, answered 200 with `x-served-by: upstream-1`.
    fn bound_entry(
        formats: &[LogFormat],
        request_headers: &[(&str, &[u8])],
    ) -> (Vec<Format>, Box<Entry>) {
        let mut logs = AccessLogs::default();
        for format in formats {
            names_read(format, &mut logs);
        }
        let bound = formats.iter().map(|f| Format::bind(f, &logs)).collect();
        let logs = Arc::new(logs);
        let mut request = http::Request::get("/asked?q=1").body(()).unwrap();
        for (name, value) in request_headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut entry = Entry::new(&request, (Instant::now(), addr, addr), &logs);
        let (head, ()) = request.into_parts();
        entry.capture_request(&head);
        let mut response = HeaderMap::new();
        response.insert("x-served-by", HeaderValue::from_static("upstream-1"));
        entry.capture_response(200, &response);
        (bound, entry)
    }

    fn line_of(format: &Format, entry: &Entry) -> Vec<u8> {
        let mut line = Vec::new();
        render_line(format, entry, &mut line);
        line
    }

    #[test]
    fn a_text_line_finds_each_header_by_its_slot_and_writes_it_as_sent() {
        let text = |format: &str, omit_empty| LogFormat::Text {
            tokens: remora_config::access_log::parse_format(format).unwrap(),
            omit_empty,
        };
        let formats = [
            text(
                "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(USER-AGENT)% %REQ(X-ABSENT)% \
                 %RESP(X-SERVED-BY)% %RESP(:STATUS)% %TRAILER(X-DONE)% %REQ(:AUTHORITY)%",
                false,
            ),
            text("[%REQ(X-ABSENT)%][%REQ(X-NAME):3%][%REQ(:METHOD)%]", true),
        ];
        let (bound, entry) = bound_entry(
            &formats,
            &[
                ("user-agent", b"caf\xe9/1"),
                ("x-name", b"abcdef"),
                ("host", b"example.test"),
            ],
        );
        assert_eq!(
            line_of(&bound[0], &entry),
            b"/asked?q=1 caf\xe9/1 - upstream-1 - - example.test".to_vec(),
            "a header not UTF-8 is written as sent, as Envoy writes it"
        );
        assert_eq!(line_of(&bound[1], &entry), b"[][abc][GET]".to_vec());
        // The alternative is read only when the first name has no value.
        let (bound, entry) = bound_entry(&formats, &[("x-envoy-original-path", b"/original")]);
        assert!(line_of(&bound[0], &entry).starts_with(b"/original - - upstream-1"));
    }

    #[test]
    fn a_json_line_leaves_out_a_header_that_is_not_utf8() {
        let mut fields = std::collections::BTreeMap::new();
        for (key, format) in [
            ("agent", "%REQ(USER-AGENT)%"),
            ("mixed", "<%REQ(USER-AGENT)%>"),
        ] {
            fields.insert(
                key.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(format.into())),
                },
            );
        }
        let format = LogFormat::Json {
            fields: remora_config::access_log::parse_json_format(&fields).unwrap(),
            omit_empty: false,
        };
        let (bound, entry) =
            bound_entry(std::slice::from_ref(&format), &[("user-agent", b"caf\xe9")]);
        let line: serde_json::Value = serde_json::from_slice(&line_of(&bound[0], &entry)).unwrap();
        assert_eq!(line, serde_json::json!({"agent": null, "mixed": "<->"}));
        let (bound, entry) = bound_entry(&[format], &[("user-agent", "café".as_bytes())]);
        let line: serde_json::Value = serde_json::from_slice(&line_of(&bound[0], &entry)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"agent": "café", "mixed": "<café>"})
        );
    }

    #[test]
    fn addresses_are_written_as_socket_addr_displays_them() {
        for addr in [
            "127.0.0.1:80",
            "10.255.0.9:65535",
            "0.0.0.0:0",
            "[::1]:8080",
            "[2001:db8::8:1]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut line = Vec::new();
            push_addr(&mut line, addr);
            assert_eq!(line, addr.to_string().as_bytes());
        }
    }
}
