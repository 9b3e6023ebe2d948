//! The strictness gate: every field set in a bootstrap or an xDS resource must be one Remora
//! honours. Anything else is an error naming its full path, e.g.
//! `static_resources.clusters[0].outlier_detection: field is not supported`.
//!
//! The walk is reflective (prost-reflect over the descriptors `xds-api` builds), follows `Any`
//! into its typed payload, and also rejects unknown field numbers on the wire.

use prost_reflect::{DynamicMessage, MapKey, ReflectMessage, Value};

use super::ConfigError;

/// Supported fields per message (full proto name). A message missing from this table is
/// unsupported as a whole; `google.protobuf.*` messages are leaves.
const SUPPORTED: &[(&str, &[&str])] = &[
    (
        "envoy.config.core.v3.TransportSocket",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &["common_tls_context", "require_client_certificate"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &["tls_certificates", "validation_context", "alpn_protocols"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &["trusted_ca"],
    ),
    (
        "envoy.config.bootstrap.v3.Bootstrap",
        &["node", "static_resources", "dynamic_resources", "admin"],
    ),
    (
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
        &["listeners", "clusters"],
    ),
    (
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources",
        &["lds_config", "cds_config", "ads_config"],
    ),
    (
        "envoy.config.bootstrap.v3.Admin",
        &["address", "access_log_path"],
    ),
    (
        "envoy.config.core.v3.Node",
        &["id", "cluster", "metadata", "locality", "user_agent_name"],
    ),
    (
        "envoy.config.core.v3.Locality",
        &["region", "zone", "sub_zone"],
    ),
    ("envoy.config.core.v3.Address", &["socket_address"]),
    (
        "envoy.config.core.v3.SocketAddress",
        &["protocol", "address", "port_value"],
    ),
    (
        "envoy.config.core.v3.ConfigSource",
        &["ads", "initial_fetch_timeout", "resource_api_version"],
    ),
    ("envoy.config.core.v3.AggregatedConfigSource", &[]),
    (
        "envoy.config.core.v3.ApiConfigSource",
        &[
            "api_type",
            "transport_api_version",
            "grpc_services",
            "set_node_on_first_message_only",
        ],
    ),
    (
        "envoy.config.core.v3.GrpcService",
        &["envoy_grpc", "timeout"],
    ),
    (
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name"],
    ),
    (
        "envoy.config.core.v3.CidrRange",
        &["address_prefix", "prefix_len"],
    ),
    (
        "envoy.config.core.v3.HeaderValueOption",
        &["header", "append_action", "keep_empty_value"],
    ),
    ("envoy.config.core.v3.HeaderValue", &["key", "value"]),
    (
        "envoy.config.core.v3.DataSource",
        &["filename", "inline_bytes", "inline_string"],
    ),
    (
        "envoy.config.core.v3.HttpProtocolOptions",
        &["idle_timeout", "max_headers_count"],
    ),
    ("envoy.config.core.v3.Http1ProtocolOptions", &[]),
    (
        "envoy.config.core.v3.Http2ProtocolOptions",
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
            "connection_keepalive",
        ],
    ),
    (
        "envoy.config.core.v3.KeepaliveSettings",
        &["interval", "timeout"],
    ),
    (
        "envoy.config.core.v3.TcpKeepalive",
        &["keepalive_probes", "keepalive_time", "keepalive_interval"],
    ),
    (
        "envoy.config.listener.v3.Listener",
        &[
            "name",
            "address",
            "stat_prefix",
            "filter_chains",
            "use_original_dst",
            "default_filter_chain",
            "listener_filters",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "traffic_direction",
        ],
    ),
    (
        "envoy.config.listener.v3.FilterChain",
        &["filter_chain_match", "filters", "name", "transport_socket"],
    ),
    (
        "envoy.config.listener.v3.FilterChainMatch",
        &[
            "destination_port",
            "prefix_ranges",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
            "server_names",
            "transport_protocol",
            "application_protocols",
        ],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    (
        "envoy.config.listener.v3.ListenerFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        &[],
    ),
    (
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        &[],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "idle_timeout",
            "max_connect_attempts",
        ],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster",
        &["clusters"],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
        &["name", "weight"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            "codec_type",
            "stat_prefix",
            "rds",
            "route_config",
            "http_filters",
            "common_http_protocol_options",
            "http_protocol_options",
            "http2_protocol_options",
            "server_name",
            "max_request_headers_kb",
            "stream_idle_timeout",
            "request_timeout",
            "request_headers_timeout",
            "drain_timeout",
            "use_remote_address",
            "xff_num_trusted_hops",
            "skip_xff_append",
            "generate_request_id",
            "preserve_external_request_id",
            "always_set_request_id_in_response",
            "upgrade_configs",
            "strip_matching_host_port",
            "strip_any_host_port",
            "access_log",
        ],
    ),
    (
        "envoy.config.accesslog.v3.AccessLog",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        &["log_format"],
    ),
    (
        "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
        &["log_format"],
    ),
    (
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        &["path", "log_format"],
    ),
    (
        "envoy.config.core.v3.SubstitutionFormatString",
        &["text_format", "text_format_source"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["config_source", "route_config_name"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    (
        "envoy.extensions.filters.http.router.v3.Router",
        &["dynamic_stats"],
    ),
    (
        "envoy.config.route.v3.RouteConfiguration",
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "most_specific_header_mutations_wins",
            "ignore_port_in_host_matching",
            "validate_clusters",
        ],
    ),
    (
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.RouteMatch",
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "case_sensitive",
            "headers",
            "query_parameters",
        ],
    ),
    (
        "envoy.config.route.v3.HeaderMatcher",
        &[
            "name",
            "invert_match",
            "treat_missing_header_as_empty",
            "exact_match",
            "safe_regex_match",
            "range_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
        ],
    ),
    (
        "envoy.config.route.v3.QueryParameterMatcher",
        &["name", "string_match", "present_match"],
    ),
    (
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "cluster_not_found_response_code",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
            "timeout",
            "idle_timeout",
        ],
    ),
    ("envoy.config.route.v3.WeightedCluster", &["clusters"]),
    (
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &["name", "weight"],
    ),
    (
        "envoy.config.route.v3.RedirectAction",
        &[
            "host_redirect",
            "port_redirect",
            "response_code",
            "strip_query",
            "https_redirect",
            "scheme_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
        ],
    ),
    (
        "envoy.config.route.v3.DirectResponseAction",
        &["status", "body"],
    ),
    ("envoy.type.matcher.v3.RegexMatcher", &["regex"]),
    (
        "envoy.type.matcher.v3.RegexMatchAndSubstitute",
        &["pattern", "substitution"],
    ),
    (
        "envoy.type.matcher.v3.StringMatcher",
        &[
            "exact",
            "prefix",
            "suffix",
            "safe_regex",
            "contains",
            "ignore_case",
        ],
    ),
    ("envoy.type.v3.Int64Range", &["start", "end"]),
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "name",
            "type",
            "eds_cluster_config",
            "connect_timeout",
            "lb_policy",
            "load_assignment",
            "circuit_breakers",
            "typed_extension_protocol_options",
            "http2_protocol_options",
            "dns_refresh_rate",
            "dns_lookup_family",
            "upstream_connection_options",
            "transport_socket",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &["eds_config", "service_name"],
    ),
    ("envoy.config.cluster.v3.CircuitBreakers", &["thresholds"]),
    (
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
        ],
    ),
    (
        "envoy.config.cluster.v3.UpstreamConnectionOptions",
        &["tcp_keepalive"],
    ),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints"],
    ),
    (
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            "locality",
            "lb_endpoints",
            "load_balancing_weight",
            "priority",
        ],
    ),
    (
        "envoy.config.endpoint.v3.LbEndpoint",
        &["endpoint", "health_status", "load_balancing_weight"],
    ),
    (
        "envoy.config.endpoint.v3.Endpoint",
        &["address", "hostname"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &["explicit_http_config", "common_http_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
];

fn supported_fields(message: &str) -> Option<&'static [&'static str]> {
    SUPPORTED
        .iter()
        .find(|(name, _)| *name == message)
        .map(|(_, fields)| *fields)
}

/// Checks a prost message of type `M` against the supported-field table; `root` prefixes paths.
pub fn check<M: prost::Message + prost::Name>(message: &M, root: &str) -> Result<(), ConfigError> {
    let descriptor = xds_api::descriptor_pool()
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| {
            ConfigError::new(root, format!("unknown message type {}", M::full_name()))
        })?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|error| ConfigError::new(root, format!("cannot decode: {error}")))?;
    check_dynamic(&dynamic, root)
}

/// Checks wire bytes of the message `full_name` (e.g. an xDS resource payload).
pub fn check_bytes(full_name: &str, bytes: &[u8], root: &str) -> Result<(), ConfigError> {
    let descriptor = xds_api::descriptor_pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ConfigError::new(root, format!("unknown message type {full_name}")))?;
    let dynamic = DynamicMessage::decode(descriptor, bytes)
        .map_err(|error| ConfigError::new(root, format!("cannot decode: {error}")))?;
    check_dynamic(&dynamic, root)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn check_dynamic(message: &DynamicMessage, path: &str) -> Result<(), ConfigError> {
    let descriptor = message.descriptor();
    let full_name = descriptor.full_name();
    if full_name.starts_with("google.protobuf.") && full_name != "google.protobuf.Any" {
        return Ok(());
    }
    if let Some(unknown) = message.unknown_fields().next() {
        return Err(ConfigError::new(
            path,
            format!("field number {} is not known to Remora", unknown.number()),
        ));
    }
    if full_name == "google.protobuf.Any" {
        return check_any(message, path);
    }
    let Some(supported) = supported_fields(full_name) else {
        return Err(ConfigError::new(
            path,
            format!("{full_name} is not supported"),
        ));
    };
    for (field, value) in message.fields() {
        let field_path = join(path, field.name());
        if !supported.contains(&field.name()) {
            return Err(ConfigError::new(field_path, "field is not supported"));
        }
        if let Some(reason) = unsupported_value(full_name, field.name(), value) {
            return Err(ConfigError::new(field_path, reason));
        }
        check_value(value, &field_path)?;
    }
    Ok(())
}

/// Fields accepted only at the value that matches what Remora does anyway.
fn unsupported_value(message: &str, field: &str, value: &Value) -> Option<&'static str> {
    let wrapped_bool = |value: &Value| {
        value
            .as_message()
            .and_then(|inner| inner.get_field_by_name("value"))
            .and_then(|inner| inner.as_bool())
    };
    match (message, field) {
        // Remora never emits Envoy's per-request dynamic stats (zone, canary, virtual clusters).
        ("envoy.extensions.filters.http.router.v3.Router", "dynamic_stats")
            if wrapped_bool(value) != Some(false) =>
        {
            Some("only `false` is supported: Remora does not emit dynamic stats")
        }
        _ => None,
    }
}

fn check_value(value: &Value, path: &str) -> Result<(), ConfigError> {
    match value {
        Value::Message(inner) => check_dynamic(inner, path),
        Value::List(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(index, item)| check_value(item, &format!("{path}[{index}]"))),
        Value::Map(entries) => entries.iter().try_for_each(|(key, item)| {
            let key = match key {
                MapKey::String(text) => text.clone(),
                other => format!("{other:?}"),
            };
            check_value(item, &format!("{path}[{key:?}]"))
        }),
        _ => Ok(()),
    }
}

fn check_any(message: &DynamicMessage, path: &str) -> Result<(), ConfigError> {
    let type_url = message
        .get_field_by_name("type_url")
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default();
    let bytes = message
        .get_field_by_name("value")
        .and_then(|value| value.as_bytes().cloned())
        .unwrap_or_default();
    let name = xds_api::type_urls::message_name(&type_url);
    let Some(descriptor) = xds_api::descriptor_pool().get_message_by_name(name) else {
        return Err(ConfigError::new(
            path,
            format!("unsupported type {type_url:?}"),
        ));
    };
    let inner = DynamicMessage::decode(descriptor, bytes.as_ref())
        .map_err(|error| ConfigError::new(path, format!("cannot decode {type_url}: {error}")))?;
    check_dynamic(&inner, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_api::envoy::config::bootstrap::v3::Bootstrap;

    #[test]
    fn unsupported_field_is_named_with_its_path() {
        let bootstrap: Bootstrap = xds_api::json::from_yaml_str(
            r#"
static_resources:
  clusters:
  - name: a
    connect_timeout: 1s
    outlier_detection: {interval: 1s}
"#,
        )
        .expect("valid proto yaml");
        let error = check(&bootstrap, "").expect_err("outlier_detection is not supported");
        assert_eq!(error.path, "static_resources.clusters[0].outlier_detection");
    }

    #[test]
    fn router_dynamic_stats_is_accepted_only_when_off() {
        let router = |value: bool| {
            format!(
                r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: x
          route_config: {{}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: {value}
"#
            )
        };
        let off: Bootstrap =
            xds_api::json::from_yaml_str(&router(false)).expect("valid proto yaml");
        assert!(check(&off, "").is_ok());
        let on: Bootstrap = xds_api::json::from_yaml_str(&router(true)).expect("valid proto yaml");
        let error = check(&on, "").expect_err("dynamic stats are not emitted");
        assert!(
            error
                .path
                .ends_with("http_filters[0].typed_config.dynamic_stats"),
            "{}",
            error.path
        );
    }

    #[test]
    fn fields_inside_any_are_checked() {
        let bootstrap: Bootstrap = xds_api::json::from_yaml_str(
            r#"
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 1}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: x
          via: proxy
          route_config: {}
"#,
        )
        .expect("valid proto yaml");
        let error = check(&bootstrap, "").expect_err("via is not supported");
        assert_eq!(
            error.path,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.via"
        );
    }
}
