//! The HTTP connection manager (codec, limits, timeouts, `x-forwarded-*`, request ids,
//! upgrades, HTTP/1 and HTTP/2 options, RDS) and its HTTP filter chain.

use std::time::Duration;

use remora_config::common::Http2Keepalive;
use remora_config::filters::{FilterConfig, PerRouteConfig};
use remora_config::hcm::{Codec, HttpConnectionManager, RouteSource};
use remora_config::listener::NetworkFilter;

use crate::support::*;

pub fn hcm(bootstrap: &remora_config::bootstrap::Bootstrap) -> HttpConnectionManager {
    match &bootstrap.listeners[0].filter_chains[0].filter {
        NetworkFilter::Http(hcm) => (**hcm).clone(),
        NetworkFilter::TcpProxy(_) => panic!("the first listener has an HCM"),
    }
}

const ROUTER: &str = r#"{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#;
const CORS: &str = r#"{name: envoy.filters.http.cors, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}"#;

#[test]
fn hcm_fields_are_refused_by_path() {
    check_rejections(
        HCM,
        &[
            ("via: proxy", "via", UNSUPPORTED),
            (
                "tracing: {provider: {name: envoy.tracers.datadog}}",
                "tracing.provider.typed_config",
                "required",
            ),
            ("add_user_agent: true", "add_user_agent", UNSUPPORTED),
            (
                "server_header_transformation: PASS_THROUGH",
                "server_header_transformation",
                UNSUPPORTED,
            ),
            (
                "delayed_close_timeout: 1s",
                "delayed_close_timeout",
                UNSUPPORTED,
            ),
            (
                "normalize_path: true",
                "normalize_path",
                "only false is supported",
            ),
            ("merge_slashes: true", "merge_slashes", UNSUPPORTED),
            (
                "forward_client_cert_details: SANITIZE_SET",
                "forward_client_cert_details",
                UNSUPPORTED,
            ),
            (
                "proxy_100_continue: true",
                "proxy_100_continue",
                UNSUPPORTED,
            ),
            (
                "internal_address_config: {unix_sockets: true}",
                "internal_address_config.unix_sockets",
                UNSUPPORTED,
            ),
            (
                "append_x_forwarded_port: true",
                "append_x_forwarded_port",
                UNSUPPORTED,
            ),
            (
                "strip_trailing_host_dot: true",
                "strip_trailing_host_dot",
                UNSUPPORTED,
            ),
            (
                "path_with_escaped_slashes_action: REJECT_REQUEST",
                "path_with_escaped_slashes_action",
                "only KEEP_UNCHANGED is supported",
            ),
            (
                "stream_error_on_invalid_http_message: true",
                "stream_error_on_invalid_http_message",
                UNSUPPORTED,
            ),
            (
                "http1_safe_max_connection_duration: true",
                "http1_safe_max_connection_duration",
                UNSUPPORTED,
            ),
            ("stat_prefix: \"\"", "stat_prefix", "must not be empty"),
            (
                "codec_type: HTTP3",
                "codec_type",
                "only AUTO, HTTP1 and HTTP2 are supported",
            ),
            ("route_config: null", "", "route_config or rds is required"),
            (
                "max_request_headers_kb: 0",
                "max_request_headers_kb",
                "must be in 1..8192",
            ),
            (
                "max_request_headers_kb: 9000",
                "max_request_headers_kb",
                "must be in 1..8192",
            ),
            (
                "request_timeout: -1s",
                "request_timeout",
                "must not be negative",
            ),
            (
                "stream_idle_timeout: -1s",
                "stream_idle_timeout",
                "must not be negative",
            ),
            (
                "request_headers_timeout: -0.5s",
                "request_headers_timeout",
                "must not be negative",
            ),
            (
                "drain_timeout: -1s",
                "drain_timeout",
                "must not be negative",
            ),
            // CONNECT is a method, not an upgrade, and Remora does not proxy it.
            (
                "upgrade_configs: [{upgrade_type: CONNECT}]",
                "upgrade_configs[0].upgrade_type",
                "CONNECT is not supported: Remora does not proxy CONNECT requests",
            ),
            (
                "upgrade_configs: [{upgrade_type: \"\"}]",
                "upgrade_configs[0].upgrade_type",
                "must not be empty",
            ),
            (
                "upgrade_configs: [{upgrade_type: websocket, filters: [{name: x}]}]",
                "upgrade_configs[0].filters",
                UNSUPPORTED,
            ),
        ],
    );
}

#[test]
fn rds_is_over_ads_only() {
    let rds = |source: &str| {
        format!("{{route_config: null, rds: {{route_config_name: r, config_source: {source}}}}}")
    };
    check_rejections(
        HCM,
        &[
            (
                "{route_config: null, rds: {route_config_name: \"\", config_source: {ads: {}}}}",
                "rds.route_config_name",
                "must not be empty",
            ),
            (
                &rds("{path: /etc/rds.yaml}"),
                "rds.config_source",
                "only `ads: {}` config sources",
            ),
            (
                &rds("{ads: {}, resource_api_version: V2}"),
                "rds.config_source.resource_api_version",
                "V2 is not supported",
            ),
            (
                "{route_config: null, rds: {route_config_name: r}}",
                "rds.config_source",
                "config source is required",
            ),
        ],
    );
    let hcm = hcm(&accepted(HCM, &rds("{ads: {}, initial_fetch_timeout: 3s}")));
    match &hcm.routes {
        RouteSource::Rds { name, source } => {
            assert_eq!(name, "r");
            assert_eq!(source.initial_fetch_timeout, Duration::from_secs(3));
        }
        RouteSource::Inline(_) => panic!("rds"),
    }
    assert_eq!(hcm.rds_name(), Some("r"));
}

#[test]
fn http_protocol_options_keep_envoys_bounds() {
    check_rejections(
        HCM,
        &[
            (
                "http2_protocol_options: {initial_stream_window_size: 1000}",
                "http2_protocol_options.initial_stream_window_size",
                "must be in 65535..",
            ),
            (
                "http2_protocol_options: {initial_connection_window_size: 3000000000}",
                "http2_protocol_options.initial_connection_window_size",
                "must be in 65535..2147483647",
            ),
            (
                "http2_protocol_options: {max_concurrent_streams: 0}",
                "http2_protocol_options.max_concurrent_streams",
                "must be in 1..",
            ),
            (
                "http2_protocol_options: {connection_keepalive: {interval: 1s}}",
                "http2_protocol_options.connection_keepalive.timeout",
                "is required and must be positive",
            ),
            (
                "http2_protocol_options: {connection_keepalive: {timeout: 1s, interval_jitter: {value: 10}}}",
                "http2_protocol_options.connection_keepalive.interval_jitter",
                UNSUPPORTED,
            ),
            (
                "http2_protocol_options: {allow_connect: true}",
                "http2_protocol_options.allow_connect",
                UNSUPPORTED,
            ),
            (
                "http2_protocol_options: {hpack_table_size: 0}",
                "http2_protocol_options.hpack_table_size",
                UNSUPPORTED,
            ),
            (
                "http2_protocol_options: {custom_settings_parameters: [{identifier: 9, value: 1}]}",
                "http2_protocol_options.custom_settings_parameters",
                UNSUPPORTED,
            ),
            (
                "http_protocol_options: {allow_absolute_url: false}",
                "http_protocol_options.allow_absolute_url",
                "only true (the default) is supported",
            ),
            (
                "http_protocol_options: {enable_trailers: true}",
                "http_protocol_options.enable_trailers",
                UNSUPPORTED,
            ),
            (
                "http_protocol_options: {header_key_format: {proper_case_words: {}}}",
                "http_protocol_options.header_key_format",
                UNSUPPORTED,
            ),
            (
                "common_http_protocol_options: {headers_with_underscores_action: REJECT_REQUEST}",
                "common_http_protocol_options.headers_with_underscores_action",
                UNSUPPORTED,
            ),
            (
                "common_http_protocol_options: {idle_timeout: -1s}",
                "common_http_protocol_options.idle_timeout",
                "must not be negative",
            ),
        ],
    );
}

#[test]
fn hcm_defaults_are_envoys() {
    let hcm = hcm(&accepted(HCM, ""));
    assert_eq!(hcm.stat_prefix, "ingress");
    assert_eq!(hcm.codec, Codec::Auto);
    assert_eq!(hcm.server_name, "envoy");
    assert!(!hcm.use_remote_address && !hcm.skip_xff_append);
    assert_eq!(hcm.xff_num_trusted_hops, 0);
    assert!(hcm.generate_request_id);
    assert!(!hcm.preserve_external_request_id && !hcm.always_set_request_id_in_response);
    assert_eq!(hcm.request_timeout, None);
    assert_eq!(hcm.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(hcm.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(hcm.request_headers_timeout, None);
    assert_eq!(hcm.drain_timeout, Duration::from_secs(5));
    assert_eq!(
        (hcm.max_request_headers_kb, hcm.max_headers_count),
        (60, 100)
    );
    assert!(!hcm.http1.allow_chunked_length);
    assert_eq!(hcm.http2, Default::default());
    assert!(hcm.upgrades.is_empty());
    assert!(!hcm.strip_any_host_port && !hcm.strip_matching_host_port);
    assert!(hcm.access_logs.is_empty());
    assert!(matches!(hcm.routes, RouteSource::Inline(_)));
}

#[test]
fn hcm_settings_reach_the_model() {
    let hcm = hcm(&accepted(
        HCM,
        r#"
codec_type: HTTP2
server_name: remora
use_remote_address: true
skip_xff_append: true
xff_num_trusted_hops: 2
generate_request_id: false
preserve_external_request_id: true
always_set_request_id_in_response: true
request_timeout: 0.5s
stream_idle_timeout: 0s
request_headers_timeout: 0.25s
drain_timeout: 1s
max_request_headers_kb: 2
strip_any_host_port: true
common_http_protocol_options: {idle_timeout: 0.5s, max_headers_count: 20}
http_protocol_options: {allow_chunked_length: true}
http2_protocol_options:
  max_concurrent_streams: 7
  initial_stream_window_size: 100000
  initial_connection_window_size: 200000
  connection_keepalive: {interval: 0.2s, timeout: 5s}
upgrade_configs: [{upgrade_type: WebSocket}, {upgrade_type: h2c, enabled: false}]
"#,
    ));
    assert_eq!(hcm.codec, Codec::Http2);
    assert_eq!(hcm.server_name, "remora");
    assert!(hcm.use_remote_address && hcm.skip_xff_append);
    assert_eq!(hcm.xff_num_trusted_hops, 2);
    assert!(!hcm.generate_request_id);
    assert!(hcm.preserve_external_request_id && hcm.always_set_request_id_in_response);
    assert_eq!(hcm.request_timeout, Some(Duration::from_millis(500)));
    assert_eq!(hcm.stream_idle_timeout, None, "0s disables it");
    assert_eq!(
        hcm.request_headers_timeout,
        Some(Duration::from_millis(250))
    );
    assert_eq!(hcm.drain_timeout, Duration::from_secs(1));
    assert_eq!(hcm.max_request_headers_kb, 2);
    assert!(hcm.strip_any_host_port);
    assert_eq!(hcm.idle_timeout, Some(Duration::from_millis(500)));
    assert_eq!(hcm.max_headers_count, 20);
    assert!(hcm.http1.allow_chunked_length);
    assert_eq!(hcm.http2.max_concurrent_streams, Some(7));
    assert_eq!(hcm.http2.initial_stream_window_size, Some(100_000));
    assert_eq!(hcm.http2.initial_connection_window_size, Some(200_000));
    assert_eq!(
        hcm.http2.keepalive,
        Some(Http2Keepalive {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5)
        })
    );
    assert_eq!(
        hcm.upgrades,
        ["websocket"],
        "lower-cased; a disabled one is left out"
    );
    let hcm = self::hcm(&accepted(
        HCM,
        "{strip_matching_host_port: true, codec_type: HTTP1, http2_protocol_options: {connection_keepalive: {timeout: 3s}}}",
    ));
    assert!(hcm.strip_matching_host_port && !hcm.strip_any_host_port);
    assert_eq!(hcm.codec, Codec::Http1);
    assert_eq!(
        hcm.http2.keepalive.map(|k| k.interval),
        Some(Duration::from_secs(3)),
        "without an interval, the timeout stands in for it"
    );
    let hcm = self::hcm(&accepted(
        HCM,
        "common_http_protocol_options: {idle_timeout: 0s}",
    ));
    assert_eq!(hcm.idle_timeout, None);
}

#[test]
fn http_filter_chains_end_with_the_router() {
    check_rejections(
        HCM,
        &[
            (
                &format!("http_filters!: [{{name: envoy.filters.http.lua}}, {ROUTER}]"),
                "http_filters[0]",
                "http filter \"envoy.filters.http.lua\" is not supported (no typed_config; Remora has envoy.extensions.filters.http.compressor.v3.Compressor, envoy.extensions.filters.http.cors.v3.Cors, envoy.extensions.filters.http.fault.v3.HTTPFault, envoy.extensions.filters.http.health_check.v3.HealthCheck, envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, envoy.extensions.filters.http.rbac.v3.RBAC, envoy.extensions.filters.http.router.v3.Router)",
            ),
            (
                &format!(
                    "http_filters!: [{{name: hc, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck}}}}, {ROUTER}]"
                ),
                "http_filters[0].typed_config.pass_through_mode",
                "required",
            ),
            (
                &format!(
                    "http_filters!: [{{name: hc, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, pass_through_mode: true, cache_time: 1s}}}}, {ROUTER}]"
                ),
                "http_filters[0].typed_config.cache_time",
                UNSUPPORTED,
            ),
            (
                &format!(
                    "http_filters!: [{{name: hc, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, pass_through_mode: false, cluster_min_healthy_percentages: {{app: {{value: 120}}}}}}}}, {ROUTER}]"
                ),
                "http_filters[0].typed_config.cluster_min_healthy_percentages[\"app\"].value",
                "120 is not a percentage (0 to 100)",
            ),
            (
                &format!("http_filters!: [{ROUTER}, {CORS}]"),
                "http_filters[0]",
                "the router must be the last http filter",
            ),
            (
                &format!("http_filters!: [{CORS}]"),
                "http_filters",
                "the router filter is required, last",
            ),
            (
                "http_filters!: []",
                "http_filters",
                "the router filter is required, last",
            ),
            (
                &format!("http_filters!: [{CORS}, {CORS}, {ROUTER}]"),
                "http_filters[1].name",
                "filter name \"envoy.filters.http.cors\" appears twice",
            ),
            (
                &format!(
                    "http_filters!: [{{typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}}}, {ROUTER}]"
                ),
                "http_filters[0].name",
                "must not be empty",
            ),
            (
                &format!(
                    "http_filters!: [{{name: envoy.filters.http.cors, disabled: true}}, {ROUTER}]"
                ),
                "http_filters[0].disabled",
                UNSUPPORTED,
            ),
            (
                // A per-route config type is not a filter.
                &format!(
                    "http_filters!: [{{name: c, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy}}}}, {ROUTER}]"
                ),
                "http_filters[0]",
                "http filter \"c\" is not supported (type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy;",
            ),
            (
                "http_filters: [{typed_config: {suppress_envoy_headers: true}}]",
                "http_filters[0].typed_config.suppress_envoy_headers",
                UNSUPPORTED,
            ),
            (
                "http_filters: [{typed_config: {start_child_span: true}}]",
                "http_filters[0].typed_config.start_child_span",
                UNSUPPORTED,
            ),
            (
                "http_filters: [{typed_config: {upstream_log: [{name: u}]}}]",
                "http_filters[0].typed_config.upstream_log",
                UNSUPPORTED,
            ),
        ],
    );
}

#[test]
fn http_filters_keep_their_configured_order_and_optional_unknown_ones_are_left_out() {
    let names = |hcm: &HttpConnectionManager| -> Vec<String> {
        hcm.filters.iter().map(|f| f.name.clone()).collect()
    };
    let hcm = hcm(&accepted(
        HCM,
        "http_filters!: [{name: envoy.filters.http.lua, is_optional: true}, {name: my-cors, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}, {name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, dynamic_stats: false}}]",
    ));
    assert_eq!(names(&hcm), ["my-cors", "envoy.filters.http.router"]);
    assert!(matches!(hcm.filters[0].config, FilterConfig::Cors(_)));
    assert!(matches!(hcm.filters[1].config, FilterConfig::Router(_)));
    // Well-known names stand for their type without a typed_config, as in Envoy.
    let hcm = self::hcm(&accepted(
        HCM,
        "http_filters!: [{name: envoy.filters.http.cors}, {name: envoy.filters.http.router}]",
    ));
    assert_eq!(
        names(&hcm),
        ["envoy.filters.http.cors", "envoy.filters.http.router"]
    );
    // An optional filter of a kind Remora has is still read, and still checked.
    check_rejections(
        HCM,
        &[(
            &format!(
                "http_filters!: [{{name: envoy.filters.http.cors, is_optional: true, disabled: true}}, {ROUTER}]"
            ),
            "http_filters[0].disabled",
            UNSUPPORTED,
        )],
    );
}

#[test]
fn per_filter_configs_are_read_at_every_level() {
    let policy = |extra: &str| {
        format!(
            "typed_per_filter_config: {{envoy.filters.http.cors: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy{extra}}}}}"
        )
    };
    let key = "typed_per_filter_config[\"envoy.filters.http.cors\"]";
    check_rejections(
        ROUTES,
        &[(
            "typed_per_filter_config: {x: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}",
            "typed_per_filter_config[\"x\"]",
            "per-route config of type \"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\" is not supported (Remora reads: envoy.extensions.filters.http.cors.v3.CorsPolicy, envoy.extensions.filters.http.fault.v3.HTTPFault, envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, envoy.extensions.filters.http.rbac.v3.RBACPerRoute)",
        )],
    );
    check_rejections(
        VHOST,
        &[
            (
                &policy(", allow_origin_string_match: [{prefix: \"\"}]"),
                &format!("{key}.allow_origin_string_match[0]"),
                "the match string must not be empty",
            ),
            (
                &policy(", allow_origin_string_match: [{safe_regex: {regex: \"(\"}}]"),
                &format!("{key}.allow_origin_string_match[0].safe_regex.regex"),
                "invalid regex",
            ),
            (
                "cors: {allow_origin_string_match: [{suffix: \"\"}]}",
                "cors.allow_origin_string_match[0]",
                "the match string must not be empty",
            ),
        ],
    );
    check_rejections(
        ROUTE,
        &[
            (
                &policy(", allow_methods: \"GET\\nPOST\""),
                &format!("{key}.allow_methods"),
                "not a valid header value",
            ),
            (
                &policy(", filter_enabled: {default_value: {numerator: 1, denominator: 9}}"),
                &format!("{key}.filter_enabled.default_value.denominator"),
                "unknown value",
            ),
            (
                "route: {cors: {max_age: \"1\\n\"}}",
                "route.cors.max_age",
                "not a valid header value",
            ),
        ],
    );
    let bootstrap = accepted_all(&[
        (ROUTES, &policy(", allow_methods: GET")),
        (
            VHOST,
            &policy(
                ", allow_origin_string_match: [{exact: \"https://a.example\"}], shadow_enabled: {default_value: {numerator: 25}}",
            ),
        ),
        (
            ROUTE,
            &policy(", filter_enabled: {default_value: {numerator: 5, denominator: TEN_THOUSAND}}"),
        ),
    ]);
    let hcm = hcm(&bootstrap);
    let RouteSource::Inline(table) = &hcm.routes else {
        panic!("inline routes")
    };
    let cors =
        |configs: &remora_config::filters::PerFilterConfigs| match remora_config::filters::find(
            configs,
            "envoy.filters.http.cors",
        ) {
            Some(PerRouteConfig::Cors(policy)) => policy.clone(),
            _ => panic!("a CORS policy"),
        };
    assert_eq!(cors(&table.per_filter).allow_methods, "GET");
    let vhost = cors(&table.vhosts[0].per_filter);
    assert!(vhost.allow_origins[0].matches("https://a.example"));
    assert_eq!(vhost.shadow_per_million, 250_000);
    assert_eq!(
        vhost.enabled_per_million, 1_000_000,
        "enabled unless told otherwise"
    );
    assert_eq!(
        cors(&table.vhosts[0].routes[0].per_filter).enabled_per_million,
        500
    );
    // The deprecated `cors` fields of a virtual host and a route action.
    let bootstrap = accepted_all(&[
        (
            VHOST,
            "cors: {allow_origin_string_match: [{exact: \"https://v.example\"}]}",
        ),
        (ROUTE, "route: {cors: {allow_methods: PUT}}"),
    ]);
    let hcm = self::hcm(&bootstrap);
    let RouteSource::Inline(table) = &hcm.routes else {
        panic!("inline routes")
    };
    assert!(table.vhosts[0].cors.as_ref().unwrap().allow_origins[0].matches("https://v.example"));
    assert_eq!(
        table.vhosts[0].routes[0]
            .cors
            .as_ref()
            .unwrap()
            .allow_methods,
        "PUT"
    );
}

/// The compressor filter: its libraries read, request compression and zstd dictionaries
/// refused by path.
#[test]
fn compressor_filters_read_their_library_and_name_what_they_refuse() {
    const GZIP: &str = "{\"@type\": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip, compression_level: BEST_SPEED}";
    let filter = |extra: &str, library: &str| {
        format!(
            "http_filters!: [{{name: c, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor, compressor_library: {{name: lib, typed_config: {library}}}{extra}}}}}, {{name: envoy.filters.http.router, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]"
        )
    };
    accepted(
        HCM,
        &filter(
            ", response_direction_config: {common_config: {min_content_length: 100, content_type: [text/plain]}}",
            GZIP,
        ),
    );
    check_rejections(
        HCM,
        &[
            (
                &filter(", request_direction_config: {}", GZIP),
                "http_filters[0].typed_config.request_direction_config",
                "request compression is not supported",
            ),
            (
                &filter(
                    "",
                    "{\"@type\": type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd, dictionary: {inline_string: x}}",
                ),
                "http_filters[0].typed_config.compressor_library.typed_config.dictionary",
                UNSUPPORTED,
            ),
            (
                &filter(
                    "",
                    "{\"@type\": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip, window_bits: 10}",
                ),
                "http_filters[0].typed_config.compressor_library.typed_config.window_bits",
                UNSUPPORTED,
            ),
            (
                &filter(
                    "",
                    "{\"@type\": type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli, encoder_mode: TEXT}",
                ),
                "http_filters[0].typed_config.compressor_library.typed_config.encoder_mode",
                UNSUPPORTED,
            ),
            (
                &filter(
                    "",
                    "{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}",
                ),
                "http_filters[0].typed_config.compressor_library.typed_config",
                "compression library",
            ),
        ],
    );
}
