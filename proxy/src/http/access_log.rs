//! HTTP access logs, as Envoy writes them: the HCM's `access_log` entries with the stdout,
//! stderr and file loggers, in Envoy's default format, a `text_format` made of the command
//! operators listed in [`Token`], or a `json_format` (one JSON object per line, keys sorted,
//! typed values as Envoy renders them). One line per request, written when its response has
//! ended (so `%DURATION%` and `%BYTES_SENT%` cover the body).
//!
//! Workers never block on the log: lines go through a bounded queue to one writer thread per
//! destination; when the queue is full (a stuck stdout), lines are dropped and counted in
//! `access_log.dropped`, rather than stalling requests.
//!
//! SIGUSR1 reopens every log file, as Envoy does, so logrotate can move a file away: the line
//! after the signal goes to a fresh file at the configured path.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, HeaderName, Version};

use crate::stats::Stat;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// One configured access log: a destination and a parsed format.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub target: Target,
    pub format: LogFormat,
}

/// A parsed `log_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// Text; `omit_empty` writes nothing, instead of `-`, for a value that is not there.
    Text {
        tokens: Vec<Token>,
        omit_empty: bool,
    },
    /// `json_format`; `omit_empty` leaves out null values and objects left empty.
    Json {
        fields: JsonObject,
        omit_empty: bool,
    },
}

/// A `json_format` object: keys in order (sorted, as Envoy writes them) and their formats.
pub type JsonObject = Vec<(String, JsonField)>;

/// One value of a `json_format` object.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonField {
    /// A format string. Made of one operator alone, it renders as that operator's own type
    /// (a number for `%RESPONSE_CODE%`, null when a header is absent); otherwise as a string.
    Format(Vec<Token>),
    /// A number, boolean or null written as is.
    Literal(serde_json::Value),
    Object(JsonObject),
    List(Vec<JsonField>),
}

/// Reads a `json_format` struct: strings are formats, structs and lists nest, other values
/// are literals.
pub fn parse_json_format(
    fields: &std::collections::BTreeMap<String, prost_types::Value>,
) -> Result<JsonObject, String> {
    fields
        .iter()
        .map(|(key, value)| {
            let field = parse_json_value(value).map_err(|error| format!("{key}{error}"))?;
            Ok((key.clone(), field))
        })
        .collect()
}

/// One value; an error starts with where it is below this value (`.key`, `[i]`, or `: `).
fn parse_json_value(value: &prost_types::Value) -> Result<JsonField, String> {
    use prost_types::value::Kind;
    Ok(match &value.kind {
        Some(Kind::StringValue(format)) => {
            JsonField::Format(parse_format(format).map_err(|error| format!(": {error}"))?)
        }
        Some(Kind::StructValue(nested)) => JsonField::Object(
            parse_json_format(&nested.fields).map_err(|error| format!(".{error}"))?,
        ),
        Some(Kind::ListValue(list)) => JsonField::List(
            list.values
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    parse_json_value(item).map_err(|error| format!("[{index}]{error}"))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::NumberValue(number)) => JsonField::Literal(
            // Whole numbers print without a fraction, as Envoy prints them.
            if number.fract() == 0.0 && number.abs() < 9.0e15 {
                serde_json::Value::from(*number as i64)
            } else {
                serde_json::Number::from_f64(*number)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            },
        ),
        Some(Kind::BoolValue(flag)) => JsonField::Literal(serde_json::Value::Bool(*flag)),
        Some(Kind::NullValue(_)) | None => JsonField::Literal(serde_json::Value::Null),
    })
}

/// A piece of a format: literal text or a command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Text(String),
    StartTime,
    /// `%REQ(NAME?ALT):MAX%`; `:method`, `:path`, `:authority`, `:scheme` are pseudo-headers.
    Request {
        name: String,
        alt: Option<String>,
        max: Option<usize>,
    },
    Response {
        name: String,
        max: Option<usize>,
    },
    Protocol,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    DownstreamRemoteAddress,
    DownstreamLocalAddress,
}

/// Parses an Envoy format string; an unknown operator is an error naming it.
pub fn parse_format(format: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        if start > 0 {
            tokens.push(Token::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            return Err(format!("unterminated command operator in {format:?}"));
        };
        let operator = &after[..end];
        tokens.push(match operator {
            // `%%` is a literal percent sign.
            "" => Token::Text("%".into()),
            _ => parse_operator(operator)?,
        });
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        tokens.push(Token::Text(rest.to_string()));
    }
    Ok(tokens)
}

fn parse_operator(operator: &str) -> Result<Token, String> {
    let simple = match operator {
        "START_TIME" => Some(Token::StartTime),
        "PROTOCOL" => Some(Token::Protocol),
        "RESPONSE_CODE" => Some(Token::ResponseCode),
        "RESPONSE_FLAGS" => Some(Token::ResponseFlags),
        "BYTES_RECEIVED" => Some(Token::BytesReceived),
        "BYTES_SENT" => Some(Token::BytesSent),
        "DURATION" => Some(Token::Duration),
        "UPSTREAM_HOST" => Some(Token::UpstreamHost),
        "UPSTREAM_CLUSTER" => Some(Token::UpstreamCluster),
        "DOWNSTREAM_REMOTE_ADDRESS" => Some(Token::DownstreamRemoteAddress),
        "DOWNSTREAM_LOCAL_ADDRESS" => Some(Token::DownstreamLocalAddress),
        _ => None,
    };
    if let Some(token) = simple {
        return Ok(token);
    }
    let header_operator = |prefix: &str| -> Option<(String, Option<String>, Option<usize>)> {
        let inner = operator.strip_prefix(prefix)?;
        let (args, max) = match inner.split_once(')') {
            Some((args, "")) => (args, None),
            Some((args, tail)) => (args, Some(tail.strip_prefix(':')?.parse().ok()?)),
            None => return None,
        };
        let (name, alt) = match args.split_once('?') {
            Some((name, alt)) => (name, Some(alt.to_ascii_lowercase())),
            None => (args, None),
        };
        Some((name.to_ascii_lowercase(), alt, max))
    };
    if let Some((name, alt, max)) = header_operator("REQ(") {
        return Ok(Token::Request { name, alt, max });
    }
    if let Some((name, None, max)) = header_operator("RESP(") {
        return Ok(Token::Response { name, max });
    }
    Err(format!("command operator %{operator}% is not supported"))
}

/// What one request leaves for its access log line.
#[derive(Debug)]
pub struct Entry {
    pub started: Instant,
    pub start_time: SystemTime,
    pub version: Version,
    pub request: HeaderMap,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub status: u16,
    pub flag: Option<&'static str>,
    pub response: HeaderMap,
    pub bytes_received: Arc<std::sync::atomic::AtomicU64>,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// A request's pending log line: written when dropped, i.e. when the response has ended.
#[derive(Debug)]
pub struct PendingLine {
    pub entry: Entry,
    pub logs: Arc<[ActiveLog]>,
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        for log in self.logs.iter() {
            log.sink.send(render_line(&log.format, &self.entry));
        }
    }
}

/// A configured log bound to its writer.
#[derive(Debug)]
pub struct ActiveLog {
    format: LogFormat,
    sink: Arc<Sink>,
}

/// Binds configured logs to writers (one writer thread per destination, shared).
pub fn activate(configs: &[AccessLogConfig], dropped: &Arc<Stat>) -> Arc<[ActiveLog]> {
    configs
        .iter()
        .map(|config| ActiveLog {
            format: config.format.clone(),
            sink: Sink::for_target(&config.target, dropped),
        })
        .collect()
}

/// A destination's queue; its writer thread ends when the last holder drops it.
#[derive(Debug)]
pub struct Sink {
    queue: SyncSender<String>,
    dropped: Arc<Stat>,
}

/// Lines queued per destination before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

impl Sink {
    fn for_target(target: &Target, dropped: &Arc<Stat>) -> Arc<Sink> {
        static SINKS: OnceLock<Mutex<HashMap<Target, Weak<Sink>>>> = OnceLock::new();
        let mut sinks = SINKS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = sinks.get(target).and_then(Weak::upgrade) {
            return sink;
        }
        let (queue, lines) = std::sync::mpsc::sync_channel::<String>(QUEUE_LINES);
        let destination = target.clone();
        let spawned = std::thread::Builder::new()
            .name("remora-access-log".into())
            .spawn(move || write_lines(&destination, &lines));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the access log writer");
        }
        let sink = Arc::new(Sink {
            queue,
            dropped: dropped.clone(),
        });
        sinks.insert(target.clone(), Arc::downgrade(&sink));
        sink
    }

    fn send(&self, line: String) {
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
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

fn write_lines(target: &Target, lines: &std::sync::mpsc::Receiver<String>) {
    let mut opened = REOPEN_GENERATION.load(Ordering::Relaxed);
    let mut out: Box<dyn std::io::Write> = match target {
        Target::Stdout => Box::new(std::io::stdout()),
        Target::Stderr => Box::new(std::io::stderr()),
        Target::File(path) => match open_log(path) {
            Some(file) => file,
            None => return,
        },
    };
    while let Ok(line) = lines.recv() {
        // Batch what is already queued into one write.
        let mut batch = line;
        while let Ok(more) = lines.try_recv() {
            batch.push_str(&more);
        }
        let generation = REOPEN_GENERATION.load(Ordering::Relaxed);
        if let (Target::File(path), true) = (target, generation != opened) {
            opened = generation;
            // A path that cannot be opened now keeps the old file: no line is lost.
            if let Some(file) = open_log(path) {
                out = file;
            }
        }
        if out
            .write_all(batch.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn render_line(format: &LogFormat, entry: &Entry) -> String {
    match format {
        LogFormat::Text { tokens, omit_empty } => render(tokens, entry, *omit_empty),
        LogFormat::Json { fields, omit_empty } => {
            let mut line =
                serde_json::Value::Object(json_object(fields, entry, *omit_empty)).to_string();
            line.push('\n');
            line
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
            tokens => serde_json::Value::String(render(tokens, entry, omit_empty)),
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
        Token::Duration => Value::from(entry.started.elapsed().as_millis() as u64),
        Token::Request { name, alt, max } => text(
            request_value(entry, name)
                .or_else(|| alt.as_deref().and_then(|alt| request_value(entry, alt))),
            *max,
        ),
        Token::Response { name, max } => {
            text(entry.response.get(name).and_then(|v| v.to_str().ok()), *max)
        }
        Token::UpstreamHost => entry
            .upstream_host
            .map_or(Value::Null, |host| Value::String(host.to_string())),
        Token::UpstreamCluster => text(entry.upstream_cluster.as_deref(), None),
        other => Value::String(render(std::slice::from_ref(other), entry, false)),
    }
}

fn render(format: &[Token], entry: &Entry, omit_empty: bool) -> String {
    let mut line = String::with_capacity(256);
    for token in format {
        match token {
            Token::Text(text) => line.push_str(text),
            Token::StartTime => push_time(&mut line, entry.start_time),
            Token::Request { name, alt, max } => {
                let value = request_value(entry, name)
                    .or_else(|| alt.as_deref().and_then(|alt| request_value(entry, alt)));
                push_value(&mut line, value, *max, omit_empty);
            }
            Token::Response { name, max } => {
                let value = entry.response.get(name).and_then(|v| v.to_str().ok());
                push_value(&mut line, value, *max, omit_empty);
            }
            Token::Protocol => line.push_str(match entry.version {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_11 => "HTTP/1.1",
                Version::HTTP_2 => "HTTP/2",
                _ => "-",
            }),
            Token::ResponseCode => {
                let _ = write!(line, "{}", entry.status);
            }
            Token::ResponseFlags => line.push_str(entry.flag.unwrap_or("-")),
            Token::BytesReceived => {
                let received = entry
                    .bytes_received
                    .load(std::sync::atomic::Ordering::Relaxed);
                let _ = write!(line, "{received}");
            }
            Token::BytesSent => {
                let _ = write!(line, "{}", entry.bytes_sent);
            }
            Token::Duration => {
                let _ = write!(line, "{}", entry.started.elapsed().as_millis());
            }
            Token::UpstreamHost => match entry.upstream_host {
                Some(host) => {
                    let _ = write!(line, "{host}");
                }
                None if omit_empty => {}
                None => line.push('-'),
            },
            Token::UpstreamCluster => push_value(
                &mut line,
                entry.upstream_cluster.as_deref(),
                None,
                omit_empty,
            ),
            Token::DownstreamRemoteAddress => {
                let _ = write!(line, "{}", entry.peer);
            }
            Token::DownstreamLocalAddress => {
                let _ = write!(line, "{}", entry.local);
            }
        }
    }
    line
}

fn request_value<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    match name {
        ":method" => Some(entry.method.as_str()),
        ":path" => Some(entry.path.as_str()),
        ":authority" => Some(entry.authority.as_str()).filter(|a| !a.is_empty()),
        _ => HeaderName::from_bytes(name.as_bytes())
            .ok()
            .and_then(|name| entry.request.get(name))
            .and_then(|v| v.to_str().ok()),
    }
}

/// A value, cut to `max` bytes; `-` when there is none (nothing with `omit_empty`).
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
fn push_time(line: &mut String, time: SystemTime) {
    let millis = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    if let Ok(stamp) = jiff::Timestamp::from_millisecond(millis as i64) {
        let _ = write!(line, "{stamp:.3}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_parses_and_unknown_operators_are_named() {
        let tokens = parse_format(DEFAULT_FORMAT).expect("default format");
        assert!(tokens.contains(&Token::Request {
            name: "x-envoy-original-path".into(),
            alt: Some(":path".into()),
            max: None
        }));
        assert_eq!(
            parse_format("%REQ(USER-AGENT):10% 100%%").unwrap(),
            vec![
                Token::Request {
                    name: "user-agent".into(),
                    alt: None,
                    max: Some(10)
                },
                Token::Text(" 100".into()),
                Token::Text("%".into()),
            ]
        );
        let error = parse_format("%FILTER_STATE(x)%").unwrap_err();
        assert!(error.contains("%FILTER_STATE(x)%"), "{error}");
        assert!(parse_format("%START_TIME").is_err());
    }

    #[test]
    fn json_format_keeps_literals_and_nesting_and_names_a_bad_operator_by_its_place() {
        use prost_types::value::Kind;
        let value = |kind| prost_types::Value { kind: Some(kind) };
        let mut nested = std::collections::BTreeMap::new();
        nested.insert(
            "code".to_string(),
            value(Kind::StringValue("%RESPONSE_CODE%".into())),
        );
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("whole".to_string(), value(Kind::NumberValue(7.0)));
        fields.insert("half".to_string(), value(Kind::NumberValue(0.5)));
        fields.insert(
            "inner".to_string(),
            value(Kind::StructValue(prost_types::Struct { fields: nested })),
        );
        let object = parse_json_format(&fields).expect("valid");
        assert_eq!(
            object,
            vec![
                (
                    "half".to_string(),
                    JsonField::Literal(serde_json::json!(0.5))
                ),
                (
                    "inner".to_string(),
                    JsonField::Object(vec![(
                        "code".to_string(),
                        JsonField::Format(vec![Token::ResponseCode])
                    )])
                ),
                (
                    "whole".to_string(),
                    JsonField::Literal(serde_json::json!(7))
                ),
            ]
        );
        let list = |values| value(Kind::ListValue(prost_types::ListValue { values }));
        let mut bad = std::collections::BTreeMap::new();
        bad.insert(
            "x".to_string(),
            list(vec![
                value(Kind::BoolValue(true)),
                value(Kind::StringValue("%NOPE%".into())),
            ]),
        );
        let error = parse_json_format(&bad).unwrap_err();
        assert!(error.starts_with("x[1]: "), "{error}");
        assert!(error.contains("%NOPE%"), "{error}");
    }

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
}
