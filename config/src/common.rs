//! Small messages many areas share (`envoy.config.core.v3` and `envoy.type.v3`): durations,
//! addresses, CIDR ranges, header names and mutations, data sources, fractions, TCP keepalive,
//! HTTP/1 and HTTP/2 protocol options, config sources — each read into its model type.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::r#type::v3 as type_pb;
use xds_api::type_urls;

use crate::error::{ConfigError, ConfigResult, err, field, item};
use crate::unsupported;

/// A protobuf duration as a std duration (negative is an error).
pub fn duration(value: &prost_types::Duration, path: &str) -> ConfigResult<Duration> {
    if value.seconds < 0 || value.nanos < 0 {
        return err(path, "must not be negative");
    }
    Ok(Duration::new(value.seconds as u64, value.nanos as u32))
}

pub fn opt_duration(
    value: &Option<prost_types::Duration>,
    path: &str,
) -> ConfigResult<Option<Duration>> {
    value
        .as_ref()
        .map(|value| duration(value, path))
        .transpose()
}

/// Envoy's timeout convention: unset takes `default`, an explicit zero disables it.
pub fn timeout_or(
    value: &Option<prost_types::Duration>,
    path: &str,
    default: Option<Duration>,
) -> ConfigResult<Option<Duration>> {
    Ok(match opt_duration(value, path)? {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => default,
    })
}

/// Unpacks an `Any` holding `M`, checking Envoy's `type.googleapis.com/` type URL.
pub fn unpack<M: Message + prost::Name + Default>(
    any: &prost_types::Any,
    path: &str,
) -> ConfigResult<M> {
    let expected = format!("{}{}", type_urls::PREFIX, M::full_name());
    if any.type_url != expected {
        return err(
            path,
            format!("expected {expected} but found {}", any.type_url),
        );
    }
    M::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(path, format!("cannot decode {expected}: {e}")))
}

/// Where an endpoint lives: an IP, or a name to resolve (STRICT_DNS, LOGICAL_DNS).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    Dns { host: String, port: u16 },
}

/// An `Address` that must be an IP and port.
pub fn socket_address(address: &Option<core_pb::Address>, path: &str) -> ConfigResult<SocketAddr> {
    match endpoint_address(address, path)? {
        EndpointAddress::Ip(addr) => Ok(addr),
        EndpointAddress::Dns { host, .. } => err(
            format!("{path}.socket_address.address"),
            format!("{host:?} is not an IP address"),
        ),
    }
}

/// An `Address`: a TCP socket address with an IP or a host name.
pub fn endpoint_address(
    address: &Option<core_pb::Address>,
    path: &str,
) -> ConfigResult<EndpointAddress> {
    use core_pb::address::Address as Kind;
    let Some(core_pb::Address { address }) = address else {
        return err(path, "address is required");
    };
    let socket = match address {
        Some(Kind::SocketAddress(socket)) => socket,
        Some(Kind::Pipe(_)) => return err(field(path, "pipe"), "pipes are not supported"),
        Some(Kind::EnvoyInternalAddress(_)) => {
            return err(
                field(path, "envoy_internal_address"),
                "internal addresses are not supported",
            );
        }
        None => return err(path, "socket_address is required"),
    };
    let path = field(path, "socket_address");
    let core_pb::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        port_specifier,
    } = socket;
    unsupported!(&path, resolver_name, ipv4_compat);
    if *protocol != core_pb::socket_address::Protocol::Tcp as i32 {
        return err(field(&path, "protocol"), "only TCP is supported");
    }
    let port = match port_specifier {
        Some(core_pb::socket_address::PortSpecifier::PortValue(port)) => *port,
        Some(core_pb::socket_address::PortSpecifier::NamedPort(_)) => {
            return err(field(&path, "named_port"), "named ports are not supported");
        }
        None => 0,
    };
    let port = u16::try_from(port)
        .map_err(|_| ConfigError::new(field(&path, "port_value"), "must be ≤ 65535"))?;
    if address.is_empty() {
        return err(field(&path, "address"), "must not be empty");
    }
    Ok(match address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(SocketAddr::new(ip, port)),
        Err(_) => EndpointAddress::Dns {
            host: address.clone(),
            port,
        },
    })
}

/// An IP prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRange {
    pub addr: IpAddr,
    pub len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                (u32::from(net) & mask) == (u32::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => net.to_ipv4_mapped().is_some_and(|net| {
                self.len >= 96
                    && CidrRange {
                        addr: net.into(),
                        len: self.len - 96,
                    }
                    .contains(ip.into())
            }),
            _ => false,
        }
    }
}

pub fn cidr(range: &core_pb::CidrRange, path: &str) -> ConfigResult<CidrRange> {
    let core_pb::CidrRange {
        address_prefix,
        prefix_len,
    } = range;
    let addr: IpAddr = address_prefix.parse().map_err(|_| {
        ConfigError::new(
            field(path, "address_prefix"),
            format!("{address_prefix:?} is not an IP address"),
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = prefix_len.unwrap_or(max);
    if len > max {
        return err(field(path, "prefix_len"), format!("must be ≤ {max}"));
    }
    Ok(CidrRange {
        addr,
        len: len as u8,
    })
}

pub fn cidrs(
    ranges: &[core_pb::CidrRange],
    path: &str,
    name: &str,
) -> ConfigResult<Vec<CidrRange>> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| cidr(r, &item(path, name, i)))
        .collect()
}

/// A header name as configured, lower-cased as HTTP/2 and Envoy want it.
pub fn header_name(name: &str, path: &str) -> ConfigResult<HeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::new(path, format!("{name:?} is not a valid header name")))
}

/// How an added header meets one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// One header to add.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderAdd {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: AppendAction,
    /// Add it even when the value is empty.
    pub keep_empty: bool,
}

/// Headers to remove, then to add, at one level (route configuration, virtual host, route).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderMutations {
    pub remove: Vec<HeaderName>,
    pub add: Vec<HeaderAdd>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies one level's header mutations: removals, then additions.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for add in &self.add {
            if add.value.is_empty() && !add.keep_empty {
                continue;
            }
            match add.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(add.name.clone(), add.value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), add.value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(add.name.clone(), add.value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&add.name) {
                        headers.insert(add.name.clone(), add.value.clone());
                    }
                }
            }
        }
    }
}

/// `*_headers_to_add` and `*_headers_to_remove` of one level; `add_field` and `remove_field`
/// name them in errors.
pub fn header_mutations(
    add: &[core_pb::HeaderValueOption],
    remove: &[String],
    path: &str,
    add_field: &str,
    remove_field: &str,
) -> ConfigResult<HeaderMutations> {
    let mut out = HeaderMutations::default();
    for (i, name) in remove.iter().enumerate() {
        let p = item(path, remove_field, i);
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            return err(p, "pseudo-headers and host cannot be removed");
        }
        out.remove.push(header_name(name, &p)?);
    }
    for (i, option) in add.iter().enumerate() {
        let p = item(path, add_field, i);
        let core_pb::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = option;
        let Some(core_pb::HeaderValue {
            key,
            value,
            raw_value,
        }) = header
        else {
            return err(field(&p, "header"), "required");
        };
        let hp = field(&p, "header");
        unsupported!(&hp, raw_value);
        if key.starts_with(':') || key.eq_ignore_ascii_case("host") {
            return err(field(&hp, "key"), "pseudo-headers and host cannot be added");
        }
        let name = header_name(key, &field(&hp, "key"))?;
        if value.replace("%%", "").contains('%') {
            return err(
                field(&hp, "value"),
                "header value substitutions (%...%) are not supported",
            );
        }
        let value = HeaderValue::from_str(&value.replace("%%", "%"))
            .map_err(|_| ConfigError::new(field(&hp, "value"), "not a valid header value"))?;
        use core_pb::header_value_option::HeaderAppendAction as A;
        let action = match (append, A::try_from(*append_action)) {
            // The deprecated `append`, read as Envoy reads it when `append_action` is unset.
            (Some(true), Ok(A::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
            (Some(false), Ok(A::AppendIfExistsOrAdd)) => AppendAction::OverwriteIfExistsOrAdd,
            (Some(_), _) => {
                return err(
                    field(&p, "append"),
                    "set append or append_action, not both (append is deprecated)",
                );
            }
            (None, Ok(A::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
            (None, Ok(A::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(A::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => return err(field(&p, "append_action"), "unknown value"),
        };
        out.add.push(HeaderAdd {
            name,
            value,
            action,
            keep_empty: *keep_empty_value,
        });
    }
    Ok(out)
}

/// Where bytes come from: a file (read by whoever uses them, on the proxy's machine) or inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    File(std::path::PathBuf),
    Inline(Vec<u8>),
}

impl DataSource {
    /// The bytes, reading a file now.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            DataSource::File(path) => std::fs::read(path),
            DataSource::Inline(bytes) => Ok(bytes.clone()),
        }
    }
}

pub fn data_source(source: &core_pb::DataSource, path: &str) -> ConfigResult<DataSource> {
    use core_pb::data_source::Specifier;
    let core_pb::DataSource {
        watched_directory,
        specifier,
    } = source;
    unsupported!(path, watched_directory);
    match specifier {
        Some(Specifier::Filename(file)) if !file.is_empty() => Ok(DataSource::File(file.into())),
        Some(Specifier::Filename(_)) => err(field(path, "filename"), "must not be empty"),
        Some(Specifier::InlineString(text)) => Ok(DataSource::Inline(text.clone().into_bytes())),
        Some(Specifier::InlineBytes(bytes)) => Ok(DataSource::Inline(bytes.clone())),
        Some(Specifier::EnvironmentVariable(_)) => err(
            field(path, "environment_variable"),
            "is not supported (use filename, inline_bytes or inline_string)",
        ),
        None => err(
            path,
            "one of filename, inline_bytes or inline_string is required",
        ),
    }
}

/// A `FractionalPercent` as a share in millionths (at most a million).
pub fn per_million(fraction: &type_pb::FractionalPercent, path: &str) -> ConfigResult<u32> {
    use type_pb::fractional_percent::DenominatorType;
    let type_pb::FractionalPercent {
        numerator,
        denominator,
    } = fraction;
    let scale = match DenominatorType::try_from(*denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => return err(field(path, "denominator"), "unknown value"),
    };
    Ok(numerator.saturating_mul(scale).min(1_000_000))
}

/// A `RuntimeFractionalPercent` in millionths; `absent` when no default is given. A runtime key
/// names a value Remora's runtime never has, so the default is what applies, as in Envoy with
/// an empty runtime.
pub fn runtime_fraction(
    fraction: Option<&core_pb::RuntimeFractionalPercent>,
    path: &str,
    absent: u32,
) -> ConfigResult<u32> {
    let Some(core_pb::RuntimeFractionalPercent {
        default_value,
        runtime_key: _,
    }) = fraction
    else {
        return Ok(absent);
    };
    match default_value {
        Some(value) => per_million(value, &field(path, "default_value")),
        None => Ok(absent),
    }
}

/// TCP keepalive on a socket. A value left unset keeps the operating system's default, as in
/// Envoy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

pub fn tcp_keepalive(proto: &core_pb::TcpKeepalive, path: &str) -> ConfigResult<TcpKeepalive> {
    let core_pb::TcpKeepalive {
        keepalive_probes,
        keepalive_time,
        keepalive_interval,
    } = proto;
    let seconds = |value: &Option<u32>, name: &str| -> ConfigResult<Option<Duration>> {
        match value {
            Some(0) => err(field(path, name), "must be at least 1 second"),
            Some(s) => Ok(Some(Duration::from_secs(u64::from(*s)))),
            None => Ok(None),
        }
    };
    if *keepalive_probes == Some(0) {
        return err(field(path, "keepalive_probes"), "must be at least 1");
    }
    Ok(TcpKeepalive {
        probes: *keepalive_probes,
        time: seconds(keepalive_time, "keepalive_time")?,
        interval: seconds(keepalive_interval, "keepalive_interval")?,
    })
}

/// The `Http2ProtocolOptions` Remora applies, downstream (HCM) and upstream (cluster). A window
/// or stream limit left unset keeps hyper's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Http2Options {
    pub max_concurrent_streams: Option<u32>,
    pub initial_stream_window_size: Option<u32>,
    pub initial_connection_window_size: Option<u32>,
    /// `connection_keepalive`: PING every `interval`, close when none is answered in `timeout`.
    pub keepalive: Option<Http2Keepalive>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// `Http2ProtocolOptions`, with Envoy's bounds.
pub fn http2_options(
    proto: &core_pb::Http2ProtocolOptions,
    path: &str,
) -> ConfigResult<Http2Options> {
    let core_pb::Http2ProtocolOptions {
        hpack_table_size,
        max_concurrent_streams,
        initial_stream_window_size,
        initial_connection_window_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
        connection_keepalive,
    } = proto;
    unsupported!(
        path,
        hpack_table_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
    );
    let bounded = |value: Option<u32>, name: &str, min: u32| -> ConfigResult<Option<u32>> {
        match value {
            Some(v) if v < min || v > i32::MAX as u32 => {
                err(field(path, name), format!("must be in {min}..{}", i32::MAX))
            }
            other => Ok(other),
        }
    };
    let keepalive = match connection_keepalive {
        None => None,
        Some(core_pb::KeepaliveSettings {
            interval,
            timeout,
            interval_jitter,
            connection_idle_interval,
        }) => {
            let kpath = field(path, "connection_keepalive");
            unsupported!(&kpath, interval_jitter, connection_idle_interval);
            let timeout =
                opt_duration(timeout, &field(&kpath, "timeout"))?.filter(|t| !t.is_zero());
            let Some(timeout) = timeout else {
                return err(field(&kpath, "timeout"), "is required and must be positive");
            };
            // Envoy: without an interval, PINGs are sent only on connections idle that long;
            // hyper pings on a fixed interval, so the timeout stands in for it.
            let interval = opt_duration(interval, &field(&kpath, "interval"))?
                .filter(|i| !i.is_zero())
                .unwrap_or(timeout);
            Some(Http2Keepalive { interval, timeout })
        }
    };
    Ok(Http2Options {
        max_concurrent_streams: bounded(*max_concurrent_streams, "max_concurrent_streams", 1)?,
        initial_stream_window_size: bounded(
            *initial_stream_window_size,
            "initial_stream_window_size",
            65535,
        )?,
        initial_connection_window_size: bounded(
            *initial_connection_window_size,
            "initial_connection_window_size",
            65535,
        )?,
        keepalive,
    })
}

/// Envoy's default `max_headers_count`, which is also hyper's HTTP/1 header limit when none is
/// set (the proxy leaves hyper's default alone then: an explicit limit costs a vector per head).
pub const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;

/// The `HttpProtocolOptions` Remora applies, for downstream (HCM) and upstream (cluster)
/// connections alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHttpOptions {
    /// A connection unused this long is closed (Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    pub max_headers_count: u32,
    /// The longest a stream may last, response included (`None`: no bound).
    pub max_stream_duration: Option<Duration>,
    /// Requests a connection carries before it is closed (`None`: no bound).
    pub max_requests_per_connection: Option<u32>,
}

impl Default for CommonHttpOptions {
    fn default() -> Self {
        CommonHttpOptions {
            idle_timeout: Some(Duration::from_secs(3600)),
            max_headers_count: DEFAULT_MAX_HEADERS_COUNT,
            max_stream_duration: None,
            max_requests_per_connection: None,
        }
    }
}

pub fn common_http_options(
    proto: &core_pb::HttpProtocolOptions,
    path: &str,
) -> ConfigResult<CommonHttpOptions> {
    let core_pb::HttpProtocolOptions {
        idle_timeout,
        max_connection_duration,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    } = proto;
    unsupported!(
        path,
        max_connection_duration,
        max_response_headers_kb,
        headers_with_underscores_action,
    );
    Ok(CommonHttpOptions {
        idle_timeout: timeout_or(
            idle_timeout,
            &field(path, "idle_timeout"),
            Some(Duration::from_secs(3600)),
        )?,
        max_headers_count: max_headers_count
            .unwrap_or(DEFAULT_MAX_HEADERS_COUNT)
            .max(1),
        max_stream_duration: opt_duration(
            max_stream_duration,
            &field(path, "max_stream_duration"),
        )?
        .filter(|d| !d.is_zero()),
        max_requests_per_connection: max_requests_per_connection.filter(|n| *n > 0),
    })
}

/// The `Http1ProtocolOptions` Remora applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Http1Options {
    /// A request with both `Content-Length` and `Transfer-Encoding: chunked` is accepted (the
    /// length is dropped) instead of refused with 400.
    pub allow_chunked_length: bool,
    /// HTTP/1.0 requests are served instead of refused with 426.
    pub accept_http_10: bool,
    /// The `Host` given to an HTTP/1.0 request that has none (empty: none is given).
    pub default_host_for_http_10: String,
    /// Methods outside the codec's known list are accepted.
    pub allow_custom_methods: bool,
}

pub fn http1_options(
    proto: &core_pb::Http1ProtocolOptions,
    path: &str,
) -> ConfigResult<Http1Options> {
    let core_pb::Http1ProtocolOptions {
        allow_absolute_url,
        accept_http_10,
        default_host_for_http_10,
        header_key_format,
        enable_trailers,
        allow_chunked_length,
        override_stream_error_on_invalid_http_message,
        send_fully_qualified_url,
        use_balsa_parser,
        allow_custom_methods,
    } = proto;
    unsupported!(
        path,
        header_key_format,
        enable_trailers,
        override_stream_error_on_invalid_http_message,
        send_fully_qualified_url,
        use_balsa_parser,
    );
    if !default_host_for_http_10.is_empty() && !*accept_http_10 {
        return err(
            field(path, "default_host_for_http_10"),
            "only applies with accept_http_10: true",
        );
    }
    // `allow_absolute_url` defaults to true in Envoy, and absolute URLs are what hyper accepts
    // too; turning it off is not supported.
    if *allow_absolute_url == Some(false) {
        return err(
            field(path, "allow_absolute_url"),
            "only true (the default) is supported",
        );
    }
    Ok(Http1Options {
        allow_chunked_length: *allow_chunked_length,
        accept_http_10: *accept_http_10,
        default_host_for_http_10: default_host_for_http_10.clone(),
        allow_custom_methods: *allow_custom_methods,
    })
}

/// A gRPC service's `initial_metadata`: headers sent with every call (text values only).
pub fn initial_metadata(
    metadata: &[core_pb::HeaderValue],
    path: &str,
) -> ConfigResult<Vec<(HeaderName, http::HeaderValue)>> {
    let mut headers = Vec::new();
    for (index, header) in metadata.iter().enumerate() {
        let hpath = item(path, "initial_metadata", index);
        let core_pb::HeaderValue {
            key,
            value,
            raw_value,
        } = header;
        crate::unsupported!(&hpath, raw_value);
        let name = header_name(key, &field(&hpath, "key"))?;
        if name.as_str().ends_with("-bin") {
            return err(
                field(&hpath, "key"),
                "binary metadata (-bin) is not supported",
            );
        }
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| ConfigError::new(field(&hpath, "value"), "not a valid header value"))?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// An `ads: {}` config source with its initial fetch timeout (zero: wait forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSource {
    pub initial_fetch_timeout: Duration,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource {
            initial_fetch_timeout: Duration::from_secs(15),
        }
    }
}

/// The cluster a `GrpcService`'s `envoy_grpc` target names (`path` is the service's): the
/// only target Remora dials, through that cluster's own connect path.
pub fn envoy_grpc_target(
    target: &Option<core_pb::grpc_service::TargetSpecifier>,
    path: &str,
) -> ConfigResult<String> {
    use core_pb::grpc_service::{EnvoyGrpc, TargetSpecifier};
    let Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
        cluster_name,
        authority,
        max_receive_message_length,
        skip_envoy_headers,
    })) = target
    else {
        return err(path, "envoy_grpc is required");
    };
    let epath = field(path, "envoy_grpc");
    unsupported!(
        &epath,
        authority,
        max_receive_message_length,
        skip_envoy_headers
    );
    if cluster_name.is_empty() {
        return err(field(&epath, "cluster_name"), "required");
    }
    Ok(cluster_name.clone())
}

/// A `GrpcService` that is an `envoy_grpc` target and nothing more: its cluster.
pub fn envoy_grpc_only(service: &core_pb::GrpcService, path: &str) -> ConfigResult<String> {
    let core_pb::GrpcService {
        timeout,
        initial_metadata,
        target_specifier,
    } = service;
    unsupported!(path, timeout, initial_metadata);
    envoy_grpc_target(target_specifier, path)
}

/// `resource_api_version` and `transport_api_version`: Remora speaks v3 (AUTO means v3).
pub fn api_version(value: i32, path: &str) -> ConfigResult<()> {
    match core_pb::ApiVersion::try_from(value) {
        Ok(core_pb::ApiVersion::Auto | core_pb::ApiVersion::V3) => Ok(()),
        Ok(core_pb::ApiVersion::V2) => err(path, "V2 is not supported: Remora speaks xDS v3 only"),
        Err(_) => err(path, "unknown value"),
    }
}

pub fn config_source(
    source: &Option<core_pb::ConfigSource>,
    path: &str,
) -> ConfigResult<ConfigSource> {
    let Some(core_pb::ConfigSource {
        initial_fetch_timeout,
        resource_api_version,
        config_source_specifier,
    }) = source
    else {
        return err(path, "config source is required");
    };
    use core_pb::config_source::ConfigSourceSpecifier as S;
    match config_source_specifier {
        Some(S::Ads(core_pb::AggregatedConfigSource {})) => {}
        _ => return err(path, "only `ads: {}` config sources are supported"),
    }
    api_version(*resource_api_version, &field(path, "resource_api_version"))?;
    let initial_fetch_timeout = match initial_fetch_timeout {
        Some(value) => duration(value, &field(path, "initial_fetch_timeout"))?,
        None => Duration::from_secs(15),
    };
    Ok(ConfigSource {
        initial_fetch_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges_match_both_families_and_mapped_addresses() {
        let range = |addr: &str, len| CidrRange {
            addr: addr.parse().unwrap(),
            len,
        };
        assert!(range("10.0.0.0", 8).contains("10.1.2.3".parse().unwrap()));
        assert!(!range("10.0.0.0", 8).contains("11.1.2.3".parse().unwrap()));
        assert!(range("0.0.0.0", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(range("::ffff:10.0.0.0", 104).contains("10.9.9.9".parse().unwrap()));
        assert!(!range("::1", 128).contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_deprecated_append_flag_is_read_as_its_append_action() {
        let option = |key: &str, append| core_pb::HeaderValueOption {
            header: Some(core_pb::HeaderValue {
                key: key.into(),
                value: "new".into(),
                ..Default::default()
            }),
            append,
            ..Default::default()
        };
        let mutations = header_mutations(
            &[
                option("x-kept", Some(true)),
                option("x-replaced", Some(false)),
            ],
            &[],
            "r",
            "request_headers_to_add",
            "request_headers_to_remove",
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-kept", HeaderValue::from_static("old"));
        headers.insert("x-replaced", HeaderValue::from_static("old"));
        mutations.apply(&mut headers);
        let values = |name| headers.get_all(name).iter().collect::<Vec<_>>();
        assert_eq!(values("x-kept"), ["old", "new"]);
        assert_eq!(values("x-replaced"), ["new"]);
    }

    #[test]
    fn initial_metadata_is_text_headers() {
        let header = |key: &str, value: &str| core_pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        let headers =
            initial_metadata(&[header("Authorization", "Bearer t")], "g").expect("accepted");
        assert_eq!(headers[0].0.as_str(), "authorization");
        assert_eq!(headers[0].1, "Bearer t");
        let error = initial_metadata(&[header("x", "ok"), header("trace-bin", "AAAA")], "g")
            .expect_err("binary");
        assert_eq!(error.path, "g.initial_metadata[1].key");
        let error = initial_metadata(&[header("x", "line\nbreak")], "g").expect_err("value");
        assert_eq!(error.path, "g.initial_metadata[0].value");
    }

    #[test]
    fn api_versions_other_than_v3_are_refused() {
        assert!(api_version(0, "x").is_ok());
        assert!(api_version(2, "x").is_ok());
        let error = api_version(1, "x.resource_api_version").unwrap_err();
        assert!(error.to_string().contains("V2 is not supported"), "{error}");
    }

    #[test]
    fn tcp_keepalive_keeps_unset_values_unset() {
        let proto = core_pb::TcpKeepalive {
            keepalive_probes: Some(3),
            keepalive_time: None,
            keepalive_interval: Some(7),
        };
        let keepalive = tcp_keepalive(&proto, "k").unwrap();
        assert_eq!(keepalive.probes, Some(3));
        assert_eq!(keepalive.time, None);
        assert_eq!(keepalive.interval, Some(Duration::from_secs(7)));
        let zero = core_pb::TcpKeepalive {
            keepalive_time: Some(0),
            ..Default::default()
        };
        assert_eq!(
            tcp_keepalive(&zero, "k").unwrap_err().path,
            "k.keepalive_time"
        );
    }
}
