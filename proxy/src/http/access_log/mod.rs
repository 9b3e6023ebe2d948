//! HTTP access logs, as Envoy writes them: the HCM's `access_log` entries with the stdout,
//! stderr and file loggers, in Envoy's default format, a `text_format` made of the command
//! operators listed in [`Token`], or a `json_format` (one JSON object per line, keys sorted,
//! typed values as Envoy renders them). One line per request, written when its response has
//! ended (so `%DURATION%` and `%BYTES_SENT%` cover the body).
//!
//! Formats come parsed from the config (`remora_config::access_log`); this module renders and
//! writes them. Workers never block on the log: lines are appended to one bounded buffer per
//! destination, which its writer thread writes out [`FLUSH_INTERVAL`] after the first line
//! waiting, or once [`FLUSH_BYTES`] are, as Envoy's file logger flushes on an interval. A
//! worker wakes the writer for the first line of a batch and for a full one, never per line
//! (a wakeup per request had cost more than the rest of the log). When the buffer is full (a stuck stdout), lines are dropped and counted in
//! `access_log.dropped`, rather than stalling requests. [`flush_all`] writes what is waiting
//! (at shutdown).
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
    AccessLogConfig, GrpcStatusFormat, HeaderField, JsonField, JsonObject, LogFormat, PeerField,
    Target, Timing, Token,
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
    /// When its phases ended, for `%REQUEST_DURATION%` and the like (kept only when a format
    /// reads them: see [`Entry::timed`]).
    pub timings: Timings,
    /// The logs' header filters' verdicts on the request as captured.
    header_checks: Vec<bool>,
    logs: Arc<AccessLogs>,
}

/// A header value as a line shows it: as sent, UTF-8 included (as Envoy writes the bytes);
/// absent (`-`) only when it is not UTF-8. `from_utf8` also checks ASCII faster than
/// `HeaderValue::to_str`, which refuses anything but visible ASCII.
fn header_text(value: &HeaderValue) -> Option<&str> {
    std::str::from_utf8(value.as_bytes()).ok()
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
    pub fn push_to(&self, line: &mut String) {
        let digits = crate::hex::lower::<32>(self.id);
        let digits = if self.wide {
            &digits[..]
        } else {
            &digits[16..]
        };
        line.extend(digits.iter().map(|&digit| char::from(digit)));
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut digits = String::with_capacity(32);
        self.push_to(&mut digits);
        f.write_str(&digits)
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

    fn request(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        named(&self.values[..self.request_len], names, name)
    }

    fn response(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        let end = (self.request_len + self.response_len).min(self.values.len());
        named(&self.values[self.request_len..end], names, name)
    }

    fn trailer(&self, names: &[HeaderName], name: &HeaderName) -> Option<&str> {
        let start = (self.request_len + self.response_len).min(self.values.len());
        named(&self.values[start..], names, name)
    }

    fn clear_request(&mut self) {
        self.values.drain(..self.request_len);
        self.request_len = 0;
        self.request_captured = true;
    }
}

/// The value captured for `name`, one of `names`, as text.
fn named<'a>(
    values: &'a [Option<HeaderValue>],
    names: &[HeaderName],
    name: &HeaderName,
) -> Option<&'a str> {
    let index = names.iter().position(|known| known == name)?;
    header_text(values.get(index)?.as_ref()?)
}

impl Entry {
    /// The record of a request as it arrived, for `logs`. Its headers are captured later
    /// ([`Entry::capture_request`]): Envoy's log reads them as the request left.
    pub fn new<B>(
        request: &http::Request<B>,
        (started, peer, local): (Instant, SocketAddr, SocketAddr),
        logs: &Arc<AccessLogs>,
    ) -> Self {
        Entry {
            started,
            took: None,
            start_time: SystemTime::now(),
            version: request.version(),
            method: request.method().clone(),
            path: request.uri().path_and_query().cloned(),
            authority: request
                .headers()
                .get(http::header::HOST)
                .cloned()
                .or_else(|| {
                    let authority = request.uri().authority()?;
                    HeaderValue::from_str(authority.as_str()).ok()
                }),
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
            trace_id: None,
            upstream_request_attempt_count: 0,
            peer_certificate: None,
            server_name: None,
            route: None,
            details: std::borrow::Cow::Borrowed(""),
            transport_failure: None,
            upstream_local: None,
            trace_forced: false,
            timings: Timings::default(),
            header_checks: logs.header_checks.on_nothing(),
            logs: logs.clone(),
        }
    }

    /// The record of a `tcp_proxy` connection, for `logs`: what Envoy's TCP proxy logs, with
    /// no request (`"- - -"`, response code 0) and its bytes in both directions.
    pub fn for_connection(at: (Instant, SocketAddr, SocketAddr), logs: &Arc<AccessLogs>) -> Self {
        let mut entry = Entry::new(&http::Request::new(()), at, logs);
        entry.connection_only = true;
        entry.path = None;
        entry.headers.request_captured = true;
        entry
    }

    /// Records the request as it is now, in place of any earlier capture: its headers, and
    /// its `:path` and `:authority` (`Host`) as they are sent upstream, rewrites included.
    /// Envoy's log reads the request's headers when it writes the line, so it shows what
    /// the connection manager and the router did to them (a generated `x-request-id`, a
    /// rewritten path), also for a request answered locally.
    pub fn capture_request(&mut self, head: &http::request::Parts) {
        self.headers
            .set_request(&self.logs.request_headers, &head.headers);
        if !self.logs.header_checks.is_empty() {
            self.logs.header_checks.judge(head, &mut self.header_checks);
        }
        if let Some(path) = head.uri.path_and_query() {
            self.path = Some(path.clone());
        }
        if let Some(host) = head.headers.get(http::header::HOST) {
            self.authority = Some(host.clone());
        }
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
    pub entry: Entry,
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
    format: LogFormat,
    filter: Option<Filter>,
    sink: Arc<Sink>,
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
            format: config.format.clone(),
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
    fn send(&self, format: &LogFormat, entry: &Entry) {
        thread_local! {
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            render_line(format, entry, line);
            self.append(line);
            // A rare huge line (a long header value) does not stay reserved for good.
            if line.capacity() > MAX_KEPT_LINE {
                *line = String::new();
            }
        });
    }

    fn append(&self, line: &str) {
        let mut pending = lock(&self.shared.pending);
        if pending.bytes.len() + line.len() > MAX_BUFFERED {
            drop(pending);
            self.dropped.inc();
            return;
        }
        // The first line of a batch starts the writer's interval; a full batch ends it early.
        let before = pending.bytes.len();
        pending.bytes.extend_from_slice(line.as_bytes());
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

fn render_line(format: &LogFormat, entry: &Entry, line: &mut String) {
    match format {
        LogFormat::Text { tokens, omit_empty } => render(tokens, entry, *omit_empty, line),
        LogFormat::Json { fields, omit_empty } => {
            let object = serde_json::Value::Object(json_object(fields, entry, *omit_empty));
            let _ = write!(line, "{object}");
            line.push('\n');
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
        Some(value) => {
            let mut out = String::new();
            push_value(&mut out, Some(value), max, false);
            Value::String(out)
        }
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
        Token::UpstreamHost => entry
            .upstream_host
            .map_or(Value::Null, |host| Value::String(host.to_string())),
        Token::UpstreamCluster => text(entry.cluster_name(), None),
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
        Token::UpstreamLocalAddress => entry
            .upstream_local
            .map_or(Value::Null, |local| Value::String(local.to_string())),
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
    let mut line = String::new();
    render(format, entry, omit_empty, &mut line);
    line
}

/// Appends `format` for `entry` to `line`. Numbers and addresses are written directly, not
/// through `fmt` (which had cost as much as the rest of a line).
fn render(format: &[Token], entry: &Entry, omit_empty: bool, line: &mut String) {
    let mut number = itoa::Buffer::new();
    for token in format {
        match token {
            Token::Text(text) => line.push_str(text),
            Token::StartTime => push_time(line, entry.start_time),
            Token::Request { name, alt, max } => {
                let value = request_value(entry, name)
                    .or_else(|| alt.as_ref().and_then(|alt| request_value(entry, alt)));
                push_value(line, value, *max, omit_empty);
            }
            Token::Response { name, max } => {
                push_value(line, response_value(entry, name), *max, omit_empty);
            }
            Token::Trailer { name, max } => {
                push_value(line, trailer_value(entry, name), *max, omit_empty);
            }
            Token::GrpcStatus(format) => match entry.grpc_status() {
                Some(status) => line.push_str(&grpc_status_text(status, *format)),
                None => push_value(line, None, None, omit_empty),
            },
            Token::Protocol => line.push_str(match entry.version {
                _ if entry.connection_only => "-",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2",
                _ => "-",
            }),
            Token::ResponseCode => line.push_str(number.format(entry.status)),
            Token::ResponseFlags => match entry.flags.render() {
                Some(flags) => line.push_str(&flags),
                None => line.push('-'),
            },
            Token::BytesReceived => {
                let received = entry.bytes_received.load(Ordering::Relaxed);
                line.push_str(number.format(received));
            }
            Token::BytesSent => line.push_str(number.format(entry.bytes_sent)),
            Token::Duration => {
                let millis = entry.took().as_millis() as u64;
                line.push_str(number.format(millis));
            }
            Token::UpstreamHost => match entry.upstream_host {
                Some(host) => push_addr(line, host),
                None if omit_empty => {}
                None => line.push('-'),
            },
            Token::UpstreamCluster => push_value(line, entry.cluster_name(), None, omit_empty),
            Token::RouteName => push_value(line, entry.route_name(), None, omit_empty),
            Token::ResponseCodeDetails => {
                let details = (!entry.details.is_empty()).then(|| envoy_details(&entry.details));
                push_value(line, details.as_deref(), None, omit_empty);
            }
            Token::UpstreamTransportFailureReason => {
                let reason = entry.transport_failure.as_deref().map(envoy_details);
                push_value(line, reason.as_deref(), None, omit_empty);
            }
            Token::ConnectionTerminationDetails => push_value(line, None, None, omit_empty),
            Token::UpstreamLocalAddress => match entry.upstream_local {
                Some(local) => push_addr(line, local),
                None => push_value(line, None, None, omit_empty),
            },
            Token::RequestedServerName => {
                push_value(line, entry.server_name.as_deref(), None, omit_empty);
            }
            Token::DownstreamRemoteAddress => push_addr(line, entry.peer),
            Token::DownstreamLocalAddress => push_addr(line, entry.local),
            Token::DownstreamPeer(field) => {
                push_peer(line, entry.peer_certificate.as_deref(), *field, omit_empty);
            }
            Token::TraceId => match entry.trace_id {
                Some(id) => id.push_to(line),
                None => push_value(line, None, None, omit_empty),
            },
            Token::UpstreamRequestAttemptCount => {
                line.push_str(number.format(entry.upstream_request_attempt_count));
            }
            Token::Timing(timing) => match entry.timing(*timing) {
                Some(millis) => line.push_str(number.format(millis)),
                None => push_value(line, None, None, omit_empty),
            },
        }
    }
}

/// Details as Envoy writes them: whitespace as `_`, so a line splits on spaces.
fn envoy_details(details: &str) -> String {
    details
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

/// `address:port` as `SocketAddr` displays it; an IPv4 address without `fmt`.
fn push_addr(line: &mut String, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        let _ = write!(line, "{addr}");
        return;
    };
    let mut number = itoa::Buffer::new();
    for (index, octet) in v4.ip().octets().into_iter().enumerate() {
        if index > 0 {
            line.push('.');
        }
        line.push_str(number.format(octet));
    }
    line.push(':');
    line.push_str(number.format(v4.port()));
}

impl Entry {
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

    fn route_name(&self) -> Option<&str> {
        self.route
            .as_ref()
            .map(|route| route.route().name.as_str())
            .filter(|name| !name.is_empty())
    }

    fn cluster_name(&self) -> Option<&str> {
        self.upstream_cluster
            .as_ref()
            .map(|cluster| cluster.name.as_str())
    }
}

fn request_value<'a>(entry: &'a Entry, field: &HeaderField) -> Option<&'a str> {
    if entry.connection_only {
        return None;
    }
    if let Some((method, target)) = &entry.refused {
        return match field {
            HeaderField::Method => Some(method),
            HeaderField::Path => Some(target),
            _ => None,
        };
    }
    match field {
        HeaderField::Method => Some(entry.method.as_str()),
        HeaderField::Path => Some(entry.path.as_ref().map_or("/", PathAndQuery::as_str)),
        HeaderField::Authority => entry
            .authority
            .as_ref()
            .and_then(header_text)
            .filter(|a| !a.is_empty()),
        HeaderField::Header(name) => entry.headers.request(&entry.logs.request_headers, name),
        HeaderField::Absent => None,
    }
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

/// A value, cut to `max` bytes; `-` when there is none (nothing with `omit_empty`).
/// A fact of the downstream's certificate; several SANs are joined with `,`, as Envoy does.
fn push_peer(
    line: &mut String,
    peer: Option<&crate::tls::PeerCertificate>,
    field: PeerField,
    omit_empty: bool,
) {
    let Some(peer) = peer else {
        return push_value(line, None, None, omit_empty);
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
    push_value(line, value.as_deref(), None, omit_empty);
}

fn push_value(line: &mut String, value: Option<&str>, max: Option<usize>, omit_empty: bool) {
    match value {
        Some(value) => {
            let value = match max {
                Some(max) => value.get(..max.min(value.len())).unwrap_or(value),
                None => value,
            };
            line.push_str(value);
        }
        None if omit_empty => {}
        None => line.push('-'),
    }
}

/// `2026-11-25T18:40:00.123Z`, Envoy's default `%START_TIME%`.
/// The date and time to the second are formatted once per second on each thread (lines of
/// the same second share them); the milliseconds are appended.
fn push_time(line: &mut String, time: SystemTime) {
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
        line.push_str(text);
        line.push('.');
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        line.extend(digits.map(|d| char::from(b'0' + d as u8)));
        line.push('Z');
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_rendered_as_envoy_does() {
        let mut line = String::new();
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_095_400_123);
        push_time(&mut line, time);
        assert_eq!(line, "2025-11-25T18:30:00.123Z");
        line.clear();
        push_time(
            &mut line,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400),
        );
        assert_eq!(line, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_of_one_second_share_its_text_and_keep_their_own_milliseconds() {
        let second = UNIX_EPOCH + Duration::from_secs(1_764_095_400);
        let at = |millis| second + Duration::from_millis(millis);
        let mut line = String::new();
        for (time, expected) in [
            (at(7), "2025-11-25T18:30:00.007Z"),
            (at(999), "2025-11-25T18:30:00.999Z"),
            (at(1_050), "2025-11-25T18:30:01.050Z"),
            (at(0), "2025-11-25T18:30:00.000Z"),
        ] {
            line.clear();
            push_time(&mut line, time);
            assert_eq!(line, expected);
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
        captured.set_request(&names, &headers);
        assert_eq!(captured.request(&names, &names[0]), None, "not UTF-8");
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
            let mut line = String::new();
            push_addr(&mut line, addr);
            assert_eq!(line, addr.to_string());
        }
    }
}
