//! Access log config: where lines go (stdout, stderr, a file) and their format, Envoy's
//! default, a `text_format` of the command operators in [`Token`], or a `json_format`. The
//! proxy's `http::access_log` renders and writes the lines.

use std::path::PathBuf;

use xds_api::envoy::config::accesslog::v3 as accesslog_pb;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::extensions::access_loggers::{file::v3 as file_pb, stream::v3 as stream_pb};
use xds_api::type_urls;

use crate::common::unpack;
use crate::error::{ConfigError, ConfigResult, err, field};
use crate::unsupported;

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// One configured access log: a destination, a parsed format, and which requests it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub target: Target,
    pub format: LogFormat,
    /// `filter`: none writes every request.
    pub filter: Option<LogFilter>,
}

/// Which requests (or `tcp_proxy` connections) a log writes: Envoy's `AccessLogFilter`.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFilter {
    /// The response code (0 when none was sent) against a value.
    StatusCode(Comparison),
    /// How long the request took, in whole milliseconds, against a value.
    Duration(Comparison),
    /// Not a health check. Only Envoy's `health_check` filter marks requests as health
    /// checks, and Remora has none, so every request passes.
    NotHealthCheck,
    /// Traced because it was forced (`x-envoy-force-trace`, recorded in its request id), which
    /// is what Envoy's filter checks, not whether the request was sampled.
    Traceable,
    /// `numerator` in `denominator` requests, chosen by the request id's first eight hex
    /// digits where there is one (so that every log and proxy on the path picks the same
    /// requests), else at random.
    Runtime {
        numerator: u64,
        denominator: u64,
        independent_randomness: bool,
    },
    And(Vec<LogFilter>),
    Or(Vec<LogFilter>),
    /// The request's headers (as forwarded) match.
    Header(crate::matcher::HeaderMatch),
    /// Any of these response flags (Envoy's short codes) was set; any flag at all when empty.
    ResponseFlags(Vec<String>),
}

/// `ComparisonFilter`: a figure compared with a value (its runtime key's default: Remora's
/// runtime has no keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub op: CompareOp,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Comparison {
    pub fn holds_for(self, figure: u64) -> bool {
        match self.op {
            CompareOp::Eq => figure == self.value,
            CompareOp::Ge => figure >= self.value,
            CompareOp::Le => figure <= self.value,
            CompareOp::Ne => figure != self.value,
        }
    }
}

/// Envoy 1.40's response flag codes, the names `response_flag_filter` accepts.
const RESPONSE_FLAG_CODES: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// An `AccessLogFilter` at `path`.
pub fn log_filter(proto: &accesslog_pb::AccessLogFilter, path: &str) -> ConfigResult<LogFilter> {
    use accesslog_pb::access_log_filter::FilterSpecifier as F;
    let comparison = |c: &Option<accesslog_pb::ComparisonFilter>, path: String| {
        let cpath = field(&path, "comparison");
        let Some(accesslog_pb::ComparisonFilter { op, value }) = c else {
            return err(cpath, "required");
        };
        let op = match accesslog_pb::comparison_filter::Op::try_from(*op) {
            Ok(accesslog_pb::comparison_filter::Op::Eq) => CompareOp::Eq,
            Ok(accesslog_pb::comparison_filter::Op::Ge) => CompareOp::Ge,
            Ok(accesslog_pb::comparison_filter::Op::Le) => CompareOp::Le,
            Ok(accesslog_pb::comparison_filter::Op::Ne) => CompareOp::Ne,
            Err(_) => return err(field(&cpath, "op"), format!("unknown operator {op}")),
        };
        let Some(core_pb::RuntimeUInt32 {
            default_value,
            runtime_key: _,
        }) = value
        else {
            return err(field(&cpath, "value"), "required");
        };
        Ok(Comparison {
            op,
            value: u64::from(*default_value),
        })
    };
    let several = |filters: &[accesslog_pb::AccessLogFilter], path: String| {
        let fpath = field(&path, "filters");
        if filters.len() < 2 {
            return err(fpath, "needs at least two filters");
        }
        filters
            .iter()
            .enumerate()
            .map(|(i, filter)| log_filter(filter, &format!("{fpath}[{i}]")))
            .collect::<ConfigResult<Vec<_>>>()
    };
    Ok(match &proto.filter_specifier {
        Some(F::StatusCodeFilter(f)) => LogFilter::StatusCode(comparison(
            &f.comparison,
            field(path, "status_code_filter"),
        )?),
        Some(F::DurationFilter(f)) => {
            LogFilter::Duration(comparison(&f.comparison, field(path, "duration_filter"))?)
        }
        Some(F::NotHealthCheckFilter(_)) => LogFilter::NotHealthCheck,
        Some(F::TraceableFilter(_)) => LogFilter::Traceable,
        Some(F::RuntimeFilter(f)) => {
            let accesslog_pb::RuntimeFilter {
                runtime_key: _,
                percent_sampled,
                use_independent_randomness,
            } = f;
            let rpath = field(path, "runtime_filter");
            // Envoy's default: 0%.
            let (numerator, denominator) = match percent_sampled {
                None => (0, 100),
                Some(xds_api::envoy::r#type::v3::FractionalPercent {
                    numerator,
                    denominator,
                }) => {
                    use xds_api::envoy::r#type::v3::fractional_percent::DenominatorType as D;
                    let denominator = match D::try_from(*denominator) {
                        Ok(D::Hundred) => 100,
                        Ok(D::TenThousand) => 10_000,
                        Ok(D::Million) => 1_000_000,
                        Err(_) => {
                            return err(
                                field(&field(&rpath, "percent_sampled"), "denominator"),
                                "unknown value",
                            );
                        }
                    };
                    (u64::from(*numerator), denominator)
                }
            };
            LogFilter::Runtime {
                numerator,
                denominator,
                independent_randomness: *use_independent_randomness,
            }
        }
        Some(F::AndFilter(f)) => LogFilter::And(several(&f.filters, field(path, "and_filter"))?),
        Some(F::OrFilter(f)) => LogFilter::Or(several(&f.filters, field(path, "or_filter"))?),
        Some(F::HeaderFilter(f)) => {
            let hpath = field(&field(path, "header_filter"), "header");
            let Some(header) = &f.header else {
                return err(hpath, "required");
            };
            LogFilter::Header(crate::matcher::header_matcher(header, &hpath)?)
        }
        Some(F::ResponseFlagFilter(f)) => {
            let fpath = field(&field(path, "response_flag_filter"), "flags");
            for (i, flag) in f.flags.iter().enumerate() {
                if !RESPONSE_FLAG_CODES.contains(&flag.as_str()) {
                    return err(
                        format!("{fpath}[{i}]"),
                        format!("{flag:?} is not one of Envoy's response flags"),
                    );
                }
            }
            LogFilter::ResponseFlags(f.flags.clone())
        }
        None => {
            return err(
                path,
                "no filter this proxy knows: status_code, duration, not_health_check, traceable, \
                 runtime, and, or, header and response_flag filters are supported (not \
                 grpc_status, metadata, log_type or extension filters)",
            );
        }
    })
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

/// Which end of which connection an address operator names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `DOWNSTREAM_REMOTE_*`: the trusted client, as Envoy's connection manager settles it
    /// (the peer, or the address `x-forwarded-for` names, with port 0).
    DownstreamRemote,
    /// `DOWNSTREAM_DIRECT_REMOTE_*`: the connection's peer.
    DownstreamDirectRemote,
    /// `DOWNSTREAM_LOCAL_*`: the address the connection came in on.
    DownstreamLocal,
    /// `UPSTREAM_HOST`, `UPSTREAM_REMOTE_*`: the upstream host the request went to.
    UpstreamRemote,
    /// `UPSTREAM_LOCAL_*`: the local end of the upstream connection the response came on.
    UpstreamLocal,
}

/// What of an address an operator prints: `ADDRESS` (`ip:port`), `ADDRESS_WITHOUT_PORT` or
/// `PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressPart {
    Whole,
    WithoutPort,
    Port,
}

/// `%DOWNSTREAM_REMOTE_ADDRESS%` and its kin: the endpoint and the part, if `operator` is one.
fn address_operator(operator: &str) -> Option<Token> {
    if operator == "UPSTREAM_HOST" {
        return Some(Token::Address(Endpoint::UpstreamRemote, AddressPart::Whole));
    }
    let (endpoint, part) = [
        ("DOWNSTREAM_REMOTE_", Endpoint::DownstreamRemote),
        (
            "DOWNSTREAM_DIRECT_REMOTE_",
            Endpoint::DownstreamDirectRemote,
        ),
        ("DOWNSTREAM_LOCAL_", Endpoint::DownstreamLocal),
        ("UPSTREAM_REMOTE_", Endpoint::UpstreamRemote),
        ("UPSTREAM_LOCAL_", Endpoint::UpstreamLocal),
    ]
    .into_iter()
    .find_map(|(prefix, endpoint)| Some((endpoint, operator.strip_prefix(prefix)?)))?;
    let part = match part {
        "ADDRESS" => AddressPart::Whole,
        "ADDRESS_WITHOUT_PORT" => AddressPart::WithoutPort,
        "PORT" => AddressPart::Port,
        _ => return None,
    };
    Some(Token::Address(endpoint, part))
}

/// A piece of a format: literal text or a command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Text(String),
    StartTime,
    /// `%START_TIME(FORMAT)%`, the format translated for `jiff::fmt::strtime`.
    StartTimeFormat(String),
    /// `%REQ(NAME?ALT):MAX%`.
    Request {
        name: HeaderField,
        alt: Option<HeaderField>,
        max: Option<usize>,
    },
    /// `%RESP(NAME):MAX%`.
    Response {
        name: HeaderField,
        max: Option<usize>,
    },
    /// `%TRAILER(NAME):MAX%`: a response trailer.
    Trailer {
        name: HeaderField,
        max: Option<usize>,
    },
    /// `%GRPC_STATUS(FORMAT)%`: a gRPC request's status, from the response's trailers, else
    /// its headers, else inferred from the HTTP status; `-` for other requests.
    GrpcStatus(GrpcStatusFormat),
    Protocol,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    /// `%REQUEST_DURATION%` and the other phases of a request, in milliseconds from its start.
    Timing(Timing),
    /// An address of the downstream or upstream connection, whole or in part.
    Address(Endpoint, AddressPart),
    /// `%UPSTREAM_CLUSTER%`: the cluster's `alt_stat_name` if it has one, else its name.
    UpstreamCluster,
    /// `%UPSTREAM_CLUSTER_RAW%`: the cluster's name.
    UpstreamClusterRaw,
    /// `%ROUTE_NAME%`: the name of the route matched (`-` without a name or a route).
    RouteName,
    /// `%RESPONSE_CODE_DETAILS%`: why the response is what it is (`via_upstream`,
    /// `route_not_found`, ...), spaces written as `_`.
    ResponseCodeDetails,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`: what the transport said when the upstream
    /// connection failed.
    UpstreamTransportFailureReason,
    /// `%CONNECTION_TERMINATION_DETAILS%`: why a network filter closed the connection. Never
    /// set on a request's line here: the network filters that close connections (RBAC) do
    /// so before the connection manager sees a request.
    ConnectionTerminationDetails,
    /// `%REQUESTED_SERVER_NAME%`: the SNI the downstream's TLS hello asked for.
    RequestedServerName,
    /// The request's trace id (`-` when not traced).
    TraceId,
    /// How many times the router sent the request upstream (retries included).
    UpstreamRequestAttemptCount,
    /// `%DOWNSTREAM_PEER_*%`: what the downstream's TLS certificate says (`-` without one).
    DownstreamPeer(PeerField),
}

/// How `%GRPC_STATUS%` writes a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatusFormat {
    /// `CAMEL_STRING`, the default: `OK`, `Unavailable`.
    Camel,
    /// `SNAKE_STRING`: `OK`, `UNAVAILABLE`.
    Snake,
    /// `NUMBER`: `14`.
    Number,
}

/// A phase of a request, as Envoy's duration operators time it (whole milliseconds; `-` when
/// the request never reached that point, such as the response phases of a local reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// `%REQUEST_DURATION%`: from the start to the request's last byte received.
    Request,
    /// `%REQUEST_TX_DURATION%`: from the start to the request's last byte sent upstream.
    RequestTx,
    /// `%RESPONSE_DURATION%`: from the start to the upstream response's first byte.
    Response,
    /// `%RESPONSE_TX_DURATION%`: from the upstream response's first byte to the last byte
    /// sent downstream.
    ResponseTx,
}

/// The header a `%REQ(..)%` or `%RESP(..)%` reads, resolved once when the config is read rather
/// than for every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderField {
    /// The request's `:method`.
    Method,
    /// The request's `:path`.
    Path,
    /// The request's `:authority` (its `Host` in HTTP/1.1).
    Authority,
    Header(http::HeaderName),
    /// A pseudo-header with no value to log (`:scheme`, any in a response) or a name no header
    /// can have: always empty.
    Absent,
}

impl HeaderField {
    /// What `%REQ(name)%` reads; `name` in any case.
    pub fn request(name: &str) -> HeaderField {
        match name.to_ascii_lowercase().as_str() {
            ":method" => HeaderField::Method,
            ":path" => HeaderField::Path,
            ":authority" => HeaderField::Authority,
            name => HeaderField::header(name),
        }
    }

    /// What `%RESP(name)%` reads; `name` in any case.
    pub fn response(name: &str) -> HeaderField {
        HeaderField::header(&name.to_ascii_lowercase())
    }

    fn header(lowercase: &str) -> HeaderField {
        http::HeaderName::from_bytes(lowercase.as_bytes())
            .map_or(HeaderField::Absent, HeaderField::Header)
    }
}

/// A fact of the downstream's certificate, for `%DOWNSTREAM_PEER_*%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerField {
    UriSan,
    DnsSan,
    IpSan,
    EmailSan,
    Subject,
    Issuer,
    Serial,
    ValidFrom,
    ValidUntil,
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
        let Some(end) = operator_end(after) else {
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

/// Where the `%` that closes the operator `after` starts with is: past its parenthesised
/// argument, which may hold `%` (`START_TIME(%Y-%m-%d)`), and its `:MAX`, as Envoy's parser
/// reads it; for anything else, the next `%`.
fn operator_end(after: &str) -> Option<usize> {
    let name = after
        .bytes()
        .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
        .count();
    if name > 0
        && after[name..].starts_with('(')
        && let Some(close) = after[name..].find(')')
    {
        let past = name + close + 1;
        let tail = &after[past..];
        let max = match tail.strip_prefix(':') {
            Some(digits) => 1 + digits.bytes().take_while(u8::is_ascii_digit).count(),
            None => 0,
        };
        if tail[max..].starts_with('%') {
            return Some(past + max);
        }
    }
    after.find('%')
}

/// Envoy's `START_TIME(...)` format (strftime's specifiers, `%f`/`%3f` for the fraction of a
/// second, `%s` for the Unix time, Abseil's `%Ez` and `%E3S`) as `jiff`'s strftime reads it;
/// checked by formatting one time, so a specifier neither knows is refused here.
fn start_time_format(envoy: &str) -> Result<String, String> {
    let mut format = String::with_capacity(envoy.len() + 4);
    let mut rest = envoy;
    while let Some(at) = rest.find('%') {
        format.push_str(&rest[..at]);
        let spec = &rest[at + 1..];
        let digits = spec.bytes().take_while(u8::is_ascii_digit).count();
        let (translated, used) = if spec.starts_with('%') {
            ("%%".to_string(), 1)
        } else if spec.starts_with('f') {
            ("%9f".to_string(), 1)
        } else if digits > 0 && spec[digits..].starts_with('f') {
            (format!("%{}f", &spec[..digits]), digits + 1)
        } else if spec.starts_with("Ez") {
            ("%:z".to_string(), 2)
        } else if spec.starts_with("E*S") {
            ("%S%.f".to_string(), 3)
        } else if let [b'E', precision @ b'1'..=b'9', b'S', ..] = spec.as_bytes() {
            (format!("%S%.{}f", *precision as char), 3)
        } else {
            ("%".to_string(), 0)
        };
        format.push_str(&translated);
        rest = &spec[used..];
    }
    format.push_str(rest);
    jiff::fmt::strtime::format(&format, jiff::Timestamp::UNIX_EPOCH)
        .map(|_| format)
        .map_err(|error| format!("START_TIME format {envoy:?} is not supported: {error}"))
}

fn parse_operator(operator: &str) -> Result<Token, String> {
    if let Some(args) = operator
        .strip_prefix("START_TIME(")
        .and_then(|args| args.strip_suffix(')'))
    {
        return match args {
            "" => Ok(Token::StartTime),
            args => start_time_format(args).map(Token::StartTimeFormat),
        };
    }
    let simple = match operator {
        "START_TIME" => Some(Token::StartTime),
        "PROTOCOL" => Some(Token::Protocol),
        "RESPONSE_CODE" => Some(Token::ResponseCode),
        "RESPONSE_FLAGS" => Some(Token::ResponseFlags),
        "BYTES_RECEIVED" => Some(Token::BytesReceived),
        "BYTES_SENT" => Some(Token::BytesSent),
        "DURATION" => Some(Token::Duration),
        "REQUEST_DURATION" => Some(Token::Timing(Timing::Request)),
        "REQUEST_TX_DURATION" => Some(Token::Timing(Timing::RequestTx)),
        "RESPONSE_DURATION" => Some(Token::Timing(Timing::Response)),
        "RESPONSE_TX_DURATION" => Some(Token::Timing(Timing::ResponseTx)),
        "GRPC_STATUS" | "GRPC_STATUS()" | "GRPC_STATUS(CAMEL_STRING)" => {
            Some(Token::GrpcStatus(GrpcStatusFormat::Camel))
        }
        "GRPC_STATUS(SNAKE_STRING)" => Some(Token::GrpcStatus(GrpcStatusFormat::Snake)),
        "GRPC_STATUS(NUMBER)" | "GRPC_STATUS_NUMBER" => {
            Some(Token::GrpcStatus(GrpcStatusFormat::Number))
        }
        "UPSTREAM_CLUSTER" => Some(Token::UpstreamCluster),
        "UPSTREAM_CLUSTER_RAW" => Some(Token::UpstreamClusterRaw),
        "ROUTE_NAME" => Some(Token::RouteName),
        "RESPONSE_CODE_DETAILS" => Some(Token::ResponseCodeDetails),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Some(Token::UpstreamTransportFailureReason),
        "CONNECTION_TERMINATION_DETAILS" => Some(Token::ConnectionTerminationDetails),
        "REQUESTED_SERVER_NAME" => Some(Token::RequestedServerName),
        "TRACE_ID" => Some(Token::TraceId),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Some(Token::UpstreamRequestAttemptCount),
        "DOWNSTREAM_PEER_URI_SAN" => Some(Token::DownstreamPeer(PeerField::UriSan)),
        "DOWNSTREAM_PEER_DNS_SAN" => Some(Token::DownstreamPeer(PeerField::DnsSan)),
        "DOWNSTREAM_PEER_IP_SAN" => Some(Token::DownstreamPeer(PeerField::IpSan)),
        "DOWNSTREAM_PEER_EMAIL_SAN" => Some(Token::DownstreamPeer(PeerField::EmailSan)),
        "DOWNSTREAM_PEER_SUBJECT" => Some(Token::DownstreamPeer(PeerField::Subject)),
        "DOWNSTREAM_PEER_ISSUER" => Some(Token::DownstreamPeer(PeerField::Issuer)),
        "DOWNSTREAM_PEER_SERIAL" => Some(Token::DownstreamPeer(PeerField::Serial)),
        "DOWNSTREAM_PEER_CERT_V_START" => Some(Token::DownstreamPeer(PeerField::ValidFrom)),
        "DOWNSTREAM_PEER_CERT_V_END" => Some(Token::DownstreamPeer(PeerField::ValidUntil)),
        _ => address_operator(operator),
    };
    if let Some(token) = simple {
        return Ok(token);
    }
    let header_operator = |prefix: &str| -> Option<(&str, Option<&str>, Option<usize>)> {
        let inner = operator.strip_prefix(prefix)?;
        let (args, max) = match inner.split_once(')') {
            Some((args, "")) => (args, None),
            Some((args, tail)) => (args, Some(tail.strip_prefix(':')?.parse().ok()?)),
            None => return None,
        };
        let (name, alt) = match args.split_once('?') {
            Some((name, alt)) => (name, Some(alt)),
            None => (args, None),
        };
        Some((name, alt, max))
    };
    // `REQUEST_HEADER`, `RESPONSE_HEADER` and `RESPONSE_TRAILER` are Envoy's longer names.
    if let Some((name, alt, max)) =
        header_operator("REQ(").or_else(|| header_operator("REQUEST_HEADER("))
    {
        return Ok(Token::Request {
            name: HeaderField::request(name),
            alt: alt.map(HeaderField::request),
            max,
        });
    }
    if let Some((name, None, max)) =
        header_operator("RESP(").or_else(|| header_operator("RESPONSE_HEADER("))
    {
        return Ok(Token::Response {
            name: HeaderField::response(name),
            max,
        });
    }
    if let Some((name, None, max)) =
        header_operator("TRAILER(").or_else(|| header_operator("RESPONSE_TRAILER("))
    {
        return Ok(Token::Trailer {
            name: HeaderField::response(name),
            max,
        });
    }
    Err(format!("command operator %{operator}% is not supported"))
}

/// One `access_log` entry: the stdout, stderr or file logger with Envoy's default format, a
/// text format or a JSON format. A file is opened by the proxy when the config is built.
pub fn access_log(proto: &accesslog_pb::AccessLog, path: &str) -> ConfigResult<AccessLogConfig> {
    use accesslog_pb::access_log::ConfigType;
    let accesslog_pb::AccessLog {
        name: _,
        filter,
        config_type,
    } = proto;
    let filter = filter
        .as_ref()
        .map(|filter| log_filter(filter, &field(path, "filter")))
        .transpose()?;
    let Some(ConfigType::TypedConfig(any)) = config_type else {
        return err(field(path, "typed_config"), "required");
    };
    let typed = field(path, "typed_config");
    let (target, format) = match any.type_url.as_str() {
        type_urls::STDOUT_ACCESS_LOG => {
            let stream_pb::StdoutAccessLog { access_log_format } = unpack(any, &typed)?;
            let format = access_log_format.map(|f| match f {
                stream_pb::stdout_access_log::AccessLogFormat::LogFormat(format) => format,
            });
            (Target::Stdout, format)
        }
        type_urls::STDERR_ACCESS_LOG => {
            let stream_pb::StderrAccessLog { access_log_format } = unpack(any, &typed)?;
            let format = access_log_format.map(|f| match f {
                stream_pb::stderr_access_log::AccessLogFormat::LogFormat(format) => format,
            });
            (Target::Stderr, format)
        }
        type_urls::FILE_ACCESS_LOG => {
            let file_pb::FileAccessLog {
                path: file,
                access_log_format,
            } = unpack(any, &typed)?;
            if file.is_empty() {
                return err(field(&typed, "path"), "must not be empty");
            }
            use core_pb::substitution_format_string::Format as SubstitutionFormat;
            use file_pb::file_access_log::AccessLogFormat as F;
            let format = match access_log_format {
                None => None,
                Some(F::LogFormat(format)) => Some(format),
                // The deprecated spellings of a text and a JSON format (Remora's JSON format
                // keeps value types, as typed_json_format asks).
                Some(F::Format(text)) => Some(core_pb::SubstitutionFormatString {
                    format: Some(SubstitutionFormat::TextFormat(text)),
                    ..Default::default()
                }),
                Some(F::JsonFormat(json) | F::TypedJsonFormat(json)) => {
                    Some(core_pb::SubstitutionFormatString {
                        format: Some(SubstitutionFormat::JsonFormat(json)),
                        ..Default::default()
                    })
                }
            };
            (Target::File(file.into()), format)
        }
        other => return err(typed, format!("access logger {other} is not supported")),
    };
    let format = log_format(format, &field(&typed, "log_format"))?;
    Ok(AccessLogConfig {
        target,
        format,
        filter,
    })
}

/// A `SubstitutionFormatString` (absent: Envoy's default format).
pub fn log_format(
    format: Option<core_pb::SubstitutionFormatString>,
    path: &str,
) -> ConfigResult<LogFormat> {
    use core_pb::substitution_format_string::Format;
    let Some(core_pb::SubstitutionFormatString {
        omit_empty_values,
        content_type,
        json_format_options,
        format,
    }) = format
    else {
        return Ok(LogFormat::Text {
            tokens: parse_format(DEFAULT_FORMAT).map_err(|e| ConfigError::new(path, e))?,
            omit_empty: false,
        });
    };
    unsupported!(path, content_type, json_format_options);
    let omit_empty = omit_empty_values;
    let text = match format {
        None => DEFAULT_FORMAT.to_string(),
        Some(Format::TextFormat(text)) => text,
        Some(Format::TextFormatSource(source)) => {
            let spath = field(path, "text_format_source");
            match crate::common::data_source(&source, &spath)? {
                crate::common::DataSource::Inline(bytes) => {
                    String::from_utf8(bytes).map_err(|_| ConfigError::new(&spath, "not UTF-8"))?
                }
                crate::common::DataSource::File(_) => {
                    return err(spath, "only inline_string and inline_bytes are supported");
                }
            }
        }
        Some(Format::JsonFormat(object)) => {
            let fields = parse_json_format(&object.fields)
                .map_err(|e| ConfigError::new(field(path, "json_format"), e))?;
            return Ok(LogFormat::Json { fields, omit_empty });
        }
    };
    let tokens = parse_format(&text).map_err(|e| ConfigError::new(path, e))?;
    Ok(LogFormat::Text { tokens, omit_empty })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_parses_and_unknown_operators_are_named() {
        let tokens = parse_format(DEFAULT_FORMAT).expect("default format");
        assert!(tokens.contains(&Token::Request {
            name: HeaderField::Header(http::HeaderName::from_static("x-envoy-original-path")),
            alt: Some(HeaderField::Path),
            max: None
        }));
        assert_eq!(
            parse_format("%REQ(USER-AGENT):10% %REQ(:Scheme)% %RESP(bad name)% 100%%").unwrap(),
            vec![
                Token::Request {
                    name: HeaderField::Header(http::header::USER_AGENT),
                    alt: None,
                    max: Some(10)
                },
                Token::Text(" ".into()),
                Token::Request {
                    name: HeaderField::Absent,
                    alt: None,
                    max: None
                },
                Token::Text(" ".into()),
                Token::Response {
                    name: HeaderField::Absent,
                    max: None
                },
                Token::Text(" 100".into()),
                Token::Text("%".into()),
            ]
        );
        let error = parse_format("%FILTER_STATE(x)%").unwrap_err();
        assert!(error.contains("%FILTER_STATE(x)%"), "{error}");
        let error = parse_format("%FILTER_STATE(a%b)%").unwrap_err();
        assert!(error.contains("%FILTER_STATE(a%b)%"), "{error}");
        assert!(parse_format("%START_TIME").is_err());
    }

    #[test]
    fn address_operators_name_an_endpoint_and_a_part() {
        assert_eq!(
            parse_format("%UPSTREAM_HOST%%UPSTREAM_REMOTE_ADDRESS%%DOWNSTREAM_DIRECT_REMOTE_PORT%")
                .unwrap(),
            vec![
                Token::Address(Endpoint::UpstreamRemote, AddressPart::Whole),
                Token::Address(Endpoint::UpstreamRemote, AddressPart::Whole),
                Token::Address(Endpoint::DownstreamDirectRemote, AddressPart::Port),
            ]
        );
        assert_eq!(
            parse_format("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%").unwrap(),
            vec![Token::Address(
                Endpoint::DownstreamRemote,
                AddressPart::WithoutPort
            )]
        );
        assert!(parse_format("%UPSTREAM_LOCAL_ADDRESS_AND_MORE%").is_err());
    }

    #[test]
    fn start_time_takes_a_format_with_percent_signs_and_header_operators_their_long_names() {
        assert_eq!(
            parse_format("[%START_TIME(%Y-%m-%dT%H:%M:%S%z)%] %START_TIME()%").unwrap(),
            vec![
                Token::Text("[".into()),
                Token::StartTimeFormat("%Y-%m-%dT%H:%M:%S%z".into()),
                Token::Text("] ".into()),
                Token::StartTime,
            ]
        );
        let format = |envoy: &str| match parse_format(&format!("%START_TIME({envoy})%")) {
            Ok(tokens) => match &tokens[..] {
                [Token::StartTimeFormat(format)] => Ok(format.clone()),
                other => panic!("{other:?}"),
            },
            Err(error) => Err(error),
        };
        assert_eq!(format("%s.%3f").unwrap(), "%s.%3f");
        assert_eq!(format("%H:%M:%S.%f").unwrap(), "%H:%M:%S.%9f");
        assert_eq!(format("%E3S %Ez 100%%").unwrap(), "%S%.3f %:z 100%%");
        let error = format("%Y %~").unwrap_err();
        assert!(error.contains("START_TIME format \"%Y %~\""), "{error}");

        let long = parse_format(
            "%REQUEST_HEADER(X-A?X-B):5% %RESPONSE_HEADER(X-C)% %RESPONSE_TRAILER(X-D)%",
        )
        .unwrap();
        let short = parse_format("%REQ(X-A?X-B):5% %RESP(X-C)% %TRAILER(X-D)%").unwrap();
        assert_eq!(long, short);
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
}
