//! The strictness gate: every field set in a bootstrap or an xDS resource must be one Remora
//! honours. Anything else is an error naming its full path, e.g.
//! `static_resources.clusters[0].outlier_detection: field is not supported`.
//!
//! The walk reads wire bytes against the field tables `xds_api::schema` generates at build
//! time (no reflection pool: this runs on every xDS update), follows `Any` into its typed
//! payload, and also rejects unknown field numbers.

use xds_api::schema::{self, FieldKind, FieldSchema, MessageSchema, WireValue};

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
        &[
            "tls_certificates",
            "validation_context",
            "alpn_protocols",
            "tls_params",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            "tls_minimum_protocol_version",
            "tls_maximum_protocol_version",
        ],
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
        &[
            "node",
            "static_resources",
            "dynamic_resources",
            "admin",
            "layered_runtime",
        ],
    ),
    ("envoy.config.bootstrap.v3.LayeredRuntime", &["layers"]),
    (
        "envoy.config.bootstrap.v3.RuntimeLayer",
        &["name", "static_layer", "admin_layer"],
    ),
    ("envoy.config.bootstrap.v3.RuntimeLayer.AdminLayer", &[]),
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
        &["address", "access_log_path", "ignore_global_conn_limit"],
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
        &[
            "text_format",
            "text_format_source",
            "json_format",
            "omit_empty_values",
        ],
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
            "typed_per_filter_config",
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
            "typed_per_filter_config",
            "cors",
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
            "typed_per_filter_config",
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
            "grpc",
        ],
    ),
    (
        "envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions",
        &[],
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
            "upgrade_configs",
            "cors",
        ],
    ),
    ("envoy.config.route.v3.CorsPolicy", CORS_POLICY_FIELDS),
    ("envoy.extensions.filters.http.cors.v3.Cors", &[]),
    (
        "envoy.config.core.v3.RuntimeFractionalPercent",
        &["default_value", "runtime_key"],
    ),
    (
        "envoy.type.v3.FractionalPercent",
        &["numerator", "denominator"],
    ),
    (
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        CORS_POLICY_FIELDS,
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &["upgrade_type", "enabled"],
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

/// The two CorsPolicy messages (route-level and the filter's) carry the same settings.
const CORS_POLICY_FIELDS: &[&str] = &[
    "allow_origin_string_match",
    "allow_methods",
    "allow_headers",
    "expose_headers",
    "max_age",
    "allow_credentials",
    "filter_enabled",
    "shadow_enabled",
    "allow_private_network_access",
    "forward_not_matching_preflights",
];

fn supported_fields(message: &str) -> Option<&'static [&'static str]> {
    SUPPORTED
        .iter()
        .find(|(name, _)| *name == message)
        .map(|(_, fields)| *fields)
}

/// Checks a prost message of type `M` against the supported-field table; `root` prefixes paths.
pub fn check<M: prost::Message + prost::Name>(message: &M, root: &str) -> Result<(), ConfigError> {
    check_bytes(&M::full_name(), &message.encode_to_vec(), root)
}

/// Checks wire bytes of the message `full_name` (e.g. an xDS resource payload).
pub fn check_bytes(full_name: &str, bytes: &[u8], root: &str) -> Result<(), ConfigError> {
    let schema = schema::message(full_name)
        .ok_or_else(|| ConfigError::new(root, format!("unknown message type {full_name}")))?;
    check_message(schema, bytes, root)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// The fields of one message as read from the wire: declared fields with every occurrence in
/// wire order, grouped by field number in ascending order.
type Occurrences<'a> = Vec<(&'static FieldSchema, Vec<WireValue<'a>>)>;

fn read_fields<'a>(
    schema: &MessageSchema,
    bytes: &'a [u8],
    path: &str,
) -> Result<Occurrences<'a>, ConfigError> {
    let mut fields: Occurrences<'a> = Vec::new();
    let mut unknown: Option<u32> = None;
    for field in schema::fields(bytes) {
        let field = field.map_err(|error| {
            ConfigError::new(path, format!("cannot decode {}: {error}", schema.name))
        })?;
        let Some(declared) = schema.field(field.number) else {
            unknown = Some(unknown.map_or(field.number, |lowest| lowest.min(field.number)));
            continue;
        };
        match fields
            .iter_mut()
            .find(|(seen, _)| seen.number == field.number)
        {
            Some((_, values)) => values.push(field.value),
            None => fields.push((declared, vec![field.value])),
        }
    }
    if let Some(number) = unknown {
        return Err(ConfigError::new(
            path,
            format!("field number {number} is not known to Remora"),
        ));
    }
    fields.sort_by_key(|(field, _)| field.number);
    Ok(fields)
}

/// Whether a field read from the wire counts as set, as proto3 defines presence: a singular
/// scalar without explicit presence only when its last value is not the default.
fn is_set(field: &FieldSchema, values: &[WireValue]) -> bool {
    field.repeated || field.presence || values.last().is_some_and(|value| !value.is_default())
}

fn message_bytes<'a>(value: &WireValue<'a>, path: &str) -> Result<&'a [u8], ConfigError> {
    match *value {
        WireValue::Bytes(bytes) => Ok(bytes),
        _ => Err(ConfigError::new(
            path,
            "cannot decode: a message field has a scalar wire type",
        )),
    }
}

/// The last value of field `number` in `bytes` as raw wire bytes (proto3: last one wins).
fn last_bytes(bytes: &[u8], number: u32) -> Option<&[u8]> {
    schema::fields(bytes)
        .map_while(Result::ok)
        .filter(|field| field.number == number)
        .filter_map(|field| match field.value {
            WireValue::Bytes(bytes) => Some(bytes),
            _ => None,
        })
        .last()
}

fn check_message(schema: &MessageSchema, bytes: &[u8], path: &str) -> Result<(), ConfigError> {
    let full_name = schema.name;
    if full_name.starts_with("google.protobuf.") && full_name != "google.protobuf.Any" {
        return Ok(());
    }
    let fields = read_fields(schema, bytes, path)?;
    if full_name == "google.protobuf.Any" {
        return check_any(bytes, path);
    }
    let Some(supported) = supported_fields(full_name) else {
        return Err(ConfigError::new(
            path,
            format!("{full_name} is not supported"),
        ));
    };
    for (field, values) in &fields {
        if !is_set(field, values) {
            continue;
        }
        let field_path = join(path, field.name);
        if !supported.contains(&field.name) {
            return Err(ConfigError::new(field_path, "field is not supported"));
        }
        if let Some(reason) = unsupported_value(full_name, field.name, values) {
            return Err(ConfigError::new(field_path, reason));
        }
        match field.kind {
            FieldKind::Scalar => {}
            FieldKind::Message(_) => {
                let inner = field.kind.message().expect("message kind has a schema");
                for (index, value) in values.iter().enumerate() {
                    let item_path = if field.repeated {
                        format!("{field_path}[{index}]")
                    } else {
                        field_path.clone()
                    };
                    check_message(inner, message_bytes(value, &item_path)?, &item_path)?;
                }
            }
            FieldKind::Map { value } => {
                let Some(value_schema) = value.map(|index| &schema::MESSAGES[index]) else {
                    continue;
                };
                for entry in values {
                    let entry = message_bytes(entry, &field_path)?;
                    let key = last_bytes(entry, 1)
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let entry_path = format!("{field_path}[{key:?}]");
                    let value = last_bytes(entry, 2).unwrap_or_default();
                    check_message(value_schema, value, &entry_path)?;
                }
            }
        }
    }
    Ok(())
}

/// Fields accepted only at the value that matches what Remora does anyway.
fn unsupported_value(message: &str, field: &str, values: &[WireValue]) -> Option<&'static str> {
    // A `google.protobuf.BoolValue`: its field 1, false when absent.
    let wrapped_bool = |values: &[WireValue]| {
        let Some(WireValue::Bytes(wrapper)) = values.last() else {
            return false;
        };
        schema::fields(wrapper)
            .map_while(Result::ok)
            .filter(|inner| inner.number == 1)
            .last()
            .is_some_and(|inner| !inner.value.is_default())
    };
    match (message, field) {
        // Remora never emits Envoy's per-request dynamic stats (zone, canary, virtual clusters).
        ("envoy.extensions.filters.http.router.v3.Router", "dynamic_stats")
            if wrapped_bool(values) =>
        {
            Some("only `false` is supported: Remora does not emit dynamic stats")
        }
        _ => None,
    }
}

/// An `Any`: its payload is checked as the message its type URL names.
fn check_any(bytes: &[u8], path: &str) -> Result<(), ConfigError> {
    let type_url = last_bytes(bytes, 1)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let name = xds_api::type_urls::message_name(&type_url);
    let Some(schema) = schema::message(name) else {
        return Err(ConfigError::new(
            path,
            format!("unsupported type {type_url:?}"),
        ));
    };
    check_message(schema, last_bytes(bytes, 2).unwrap_or_default(), path)
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

    fn cluster_yaml(extra: &str) -> Bootstrap {
        xds_api::json::from_yaml_str(&format!(
            "static_resources:\n  clusters:\n  - name: a\n    connect_timeout: 1s\n{extra}"
        ))
        .expect("valid proto yaml")
    }

    #[test]
    fn map_values_are_checked_under_their_key() {
        let bootstrap = cluster_yaml(
            r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {}
"#,
        );
        let error = check(&bootstrap, "").expect_err("use_downstream_protocol_config");
        assert_eq!(
            error.path,
            "static_resources.clusters[0].typed_extension_protocol_options\
             [\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].use_downstream_protocol_config"
        );
        let supported = cluster_yaml(
            r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"#,
        );
        assert!(check(&supported, "").is_ok());
    }

    #[test]
    fn unknown_field_numbers_are_named() {
        let cluster = xds_api::envoy::config::cluster::v3::Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let mut bytes = prost::Message::encode_to_vec(&cluster);
        // Field 999, varint 1: not declared by Cluster.
        bytes.extend_from_slice(&[0xb8, 0x3e, 0x01]);
        let error = check_bytes("envoy.config.cluster.v3.Cluster", &bytes, "cluster")
            .expect_err("unknown field");
        assert_eq!(error.path, "cluster");
        assert!(error.to_string().contains("field number 999"), "{error}");
        let error = check_bytes(
            "envoy.config.cluster.v3.Cluster",
            &bytes[..bytes.len() - 1],
            "c",
        )
        .expect_err("truncated");
        assert!(error.to_string().contains("cannot decode"), "{error}");
    }

    #[test]
    fn scalars_at_their_default_are_not_set() {
        // `ignore_health_on_host_removal` (field 32, bool) is unsupported, but an explicit
        // `false` on the wire is proto3's "not set" and must pass; `true` must not.
        let cluster = xds_api::envoy::config::cluster::v3::Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let base = prost::Message::encode_to_vec(&cluster);
        let with = |value: u8| [base.as_slice(), &[0x80, 0x02, value]].concat();
        assert!(check_bytes("envoy.config.cluster.v3.Cluster", &with(0), "").is_ok());
        let error =
            check_bytes("envoy.config.cluster.v3.Cluster", &with(1), "").expect_err("true is set");
        assert_eq!(error.path, "ignore_health_on_host_removal");
    }
}
