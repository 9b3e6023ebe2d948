//! The HTTP connection manager (`envoy.filters.network.http_connection_manager`): codec and
//! its limits, timeouts, request ids and `x-forwarded-*` handling, upgrades, access logs, the
//! HTTP filter chain and where the routes come from (inline or RDS).

use std::sync::Arc;
use std::time::Duration;

use xds_api::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;

use crate::access_log::{AccessLogConfig, access_log};
use crate::common::{
    CidrRange, ConfigSource, Http1Options, Http2Options, cidrs, common_http_options, config_source,
    http1_options, http2_options, opt_duration, timeout_or,
};
use crate::error::{ConfigResult, err, field, item};
use crate::filters::{HttpFilter, http_filters};
use crate::route::{Files, RouteTable, route_table, upgrade_kind};
use crate::tracing::Tracing;
use crate::unsupported;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub enum RouteSource {
    Inline(Arc<RouteTable>),
    Rds { name: String, source: ConfigSource },
}

#[derive(Debug, Clone)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: RouteSource,
    /// The HTTP filters in configured order; the router is last.
    pub filters: Vec<HttpFilter>,
    /// The router's `dynamic_stats` (Envoy's default: on).
    pub dynamic_stats: bool,
    pub server_name: String,
    pub use_remote_address: bool,
    pub skip_xff_append: bool,
    /// How many of the rightmost `x-forwarded-for` addresses come from trusted proxies: the
    /// client is the next one to the left (Envoy's algorithm).
    pub xff_num_trusted_hops: u32,
    /// `internal_address_config.cidr_ranges`: a request whose one client address is in these
    /// is internal (Envoy 1.40 counts no address internal without them).
    pub internal_addresses: Vec<CidrRange>,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub request_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection`: the request that reaches it
    /// is a connection's last (HTTP/1.1 `connection: close`, HTTP/2 a drain).
    pub max_requests_per_connection: Option<u32>,
    pub request_headers_timeout: Option<Duration>,
    /// How long a draining HTTP/2 connection still takes new streams before its final GOAWAY.
    pub drain_timeout: Duration,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    /// `common_http_protocol_options.max_stream_duration`: how long a stream may last.
    pub max_stream_duration: Option<Duration>,
    pub http1: Http1Options,
    pub http2: Http2Options,
    /// Upgrade types allowed by default (lower case).
    pub upgrades: Vec<String>,
    pub strip_any_host_port: bool,
    pub strip_matching_host_port: bool,
    pub access_logs: Vec<AccessLogConfig>,
    /// `tracing`: spans and the sampling decision (absent: no tracing at all).
    pub tracing: Option<Tracing>,
}

impl HttpConnectionManager {
    /// The RDS route configuration it waits for, if any.
    pub fn rds_name(&self) -> Option<&str> {
        match &self.routes {
            RouteSource::Rds { name, .. } => Some(name),
            RouteSource::Inline(_) => None,
        }
    }
}

pub fn http_connection_manager(
    proto: &hcm_pb::HttpConnectionManager,
    path: &str,
    files: Files,
) -> ConfigResult<HttpConnectionManager> {
    let hcm_pb::HttpConnectionManager {
        codec_type,
        stat_prefix,
        http_filters: filters,
        add_user_agent,
        tracing,
        common_http_protocol_options,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        server_name,
        server_header_transformation,
        max_request_headers_kb,
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        drain_timeout,
        delayed_close_timeout,
        access_log: access_logs,
        use_remote_address,
        xff_num_trusted_hops,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        strip_trailing_host_dot,
        append_x_forwarded_port,
        append_local_overload,
        route_specifier,
        strip_port_mode,
    } = proto;
    unsupported!(
        path,
        add_user_agent,
        http1_safe_max_connection_duration,
        server_header_transformation,
        delayed_close_timeout,
        via,
        forward_client_cert_details,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        merge_slashes,
        stream_error_on_invalid_http_message,
        strip_trailing_host_dot,
        append_x_forwarded_port,
        append_local_overload,
    );
    // Paths pass as they came; a config may say so (Istio writes KEEP_UNCHANGED on every HCM).
    if *normalize_path == Some(true) {
        return err(field(path, "normalize_path"), "only false is supported");
    }
    use hcm_pb::http_connection_manager::PathWithEscapedSlashesAction as Slashes;
    if !matches!(
        Slashes::try_from(*path_with_escaped_slashes_action),
        Ok(Slashes::ImplementationSpecificDefault | Slashes::KeepUnchanged)
    ) {
        return err(
            field(path, "path_with_escaped_slashes_action"),
            "only KEEP_UNCHANGED is supported",
        );
    }
    if stat_prefix.is_empty() {
        return err(field(path, "stat_prefix"), "must not be empty");
    }
    use hcm_pb::http_connection_manager::CodecType;
    let codec = match CodecType::try_from(*codec_type) {
        Ok(CodecType::Auto) => Codec::Auto,
        Ok(CodecType::Http1) => Codec::Http1,
        Ok(CodecType::Http2) => Codec::Http2,
        _ => {
            return err(
                field(path, "codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            );
        }
    };
    use hcm_pb::http_connection_manager::RouteSpecifier;
    let routes =
        match route_specifier {
            Some(RouteSpecifier::RouteConfig(config)) => RouteSource::Inline(Arc::new(
                route_table(config, &field(path, "route_config"), files)?,
            )),
            Some(RouteSpecifier::Rds(hcm_pb::Rds {
                config_source: source,
                route_config_name,
            })) => {
                let rpath = field(path, "rds");
                if route_config_name.is_empty() {
                    return err(field(&rpath, "route_config_name"), "must not be empty");
                }
                RouteSource::Rds {
                    name: route_config_name.clone(),
                    source: config_source(source, &field(&rpath, "config_source"))?,
                }
            }
            None => return err(path, "route_config or rds is required"),
        };
    let filters = http_filters(filters, path)?;
    let internal_addresses = match internal_address_config {
        None => Vec::new(),
        Some(hcm_pb::http_connection_manager::InternalAddressConfig {
            unix_sockets,
            cidr_ranges,
        }) => {
            let ipath = field(path, "internal_address_config");
            // Remora listens on no unix sockets, so there is nothing this could apply to.
            unsupported!(&ipath, unix_sockets);
            cidrs(cidr_ranges, &ipath, "cidr_ranges")?
        }
    };
    let mut upgrades = Vec::new();
    for (index, upgrade) in upgrade_configs.iter().enumerate() {
        let upath = item(path, "upgrade_configs", index);
        let hcm_pb::http_connection_manager::UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = upgrade;
        unsupported!(&upath, filters);
        let kind = upgrade_kind(upgrade_type, &field(&upath, "upgrade_type"))?;
        if enabled.unwrap_or(true) {
            upgrades.push(kind);
        }
    }
    let common = common_http_protocol_options
        .as_ref()
        .map(|options| common_http_options(options, &field(path, "common_http_protocol_options")))
        .transpose()?
        .unwrap_or_default();

    let access_logs = access_logs
        .iter()
        .enumerate()
        .map(|(i, log)| access_log(log, &item(path, "access_log", i)))
        .collect::<ConfigResult<Vec<_>>>()?;
    let tracing = tracing
        .as_ref()
        .map(|tracing| crate::tracing::tracing(tracing, &field(path, "tracing")))
        .transpose()?;
    let dynamic_stats = match filters.last().map(|filter| &filter.config) {
        Some(crate::filters::FilterConfig::Router(router)) => router.dynamic_stats,
        _ => true,
    };
    Ok(HttpConnectionManager {
        tracing,
        access_logs,
        stat_prefix: stat_prefix.clone(),
        codec,
        routes,
        filters,
        dynamic_stats,
        server_name: if server_name.is_empty() {
            "envoy".into()
        } else {
            server_name.clone()
        },
        use_remote_address: use_remote_address.unwrap_or(false),
        skip_xff_append: *skip_xff_append,
        xff_num_trusted_hops: *xff_num_trusted_hops,
        internal_addresses,
        generate_request_id: generate_request_id.unwrap_or(true),
        preserve_external_request_id: *preserve_external_request_id,
        always_set_request_id_in_response: *always_set_request_id_in_response,
        request_timeout: timeout_or(request_timeout, &field(path, "request_timeout"), None)?,
        stream_idle_timeout: timeout_or(
            stream_idle_timeout,
            &field(path, "stream_idle_timeout"),
            Some(Duration::from_secs(300)),
        )?,
        idle_timeout: common.idle_timeout,
        max_requests_per_connection: common.max_requests_per_connection,
        request_headers_timeout: timeout_or(
            request_headers_timeout,
            &field(path, "request_headers_timeout"),
            None,
        )?,
        drain_timeout: opt_duration(drain_timeout, &field(path, "drain_timeout"))?
            .unwrap_or(Duration::from_secs(5)),
        max_request_headers_kb: match max_request_headers_kb {
            Some(kb) if (1..=8192).contains(kb) => *kb,
            Some(_) => return err(field(path, "max_request_headers_kb"), "must be in 1..8192"),
            None => 60,
        },
        max_headers_count: common.max_headers_count,
        max_stream_duration: common.max_stream_duration,
        http1: http_protocol_options
            .as_ref()
            .map(|options| http1_options(options, &field(path, "http_protocol_options")))
            .transpose()?
            .unwrap_or_default(),
        http2: http2_protocol_options
            .as_ref()
            .map(|options| http2_options(options, &field(path, "http2_protocol_options")))
            .transpose()?
            .unwrap_or_default(),
        upgrades,
        strip_any_host_port: matches!(
            strip_port_mode,
            Some(hcm_pb::http_connection_manager::StripPortMode::StripAnyHostPort(true))
        ),
        strip_matching_host_port: *strip_matching_host_port,
    })
}
