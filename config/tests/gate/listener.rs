//! Listeners (address, listener filters, filter chains), filter chain matches and `tcp_proxy`.

use std::time::Duration;

use remora_config::listener::{NetworkFilter, SourceType};
use remora_config::tcp_proxy::{TcpClusters, TcpProxy};

use crate::support::*;

const TCP_FILTER: &str = r#"{name: t, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: echo}}"#;

const RBAC_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const RBAC_FILTER: &str = r#"{name: envoy.filters.network.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC, stat_prefix: r}}"#;

#[test]
fn rbac_filters_go_before_the_terminal_filter() {
    let bootstrap = accepted(
        CHAIN,
        &format!("filters!: [{RBAC_FILTER}, {RBAC_FILTER}, {TCP_FILTER}]"),
    );
    let chain = &bootstrap.listeners[0].filter_chains[0];
    assert_eq!(chain.rbac.len(), 2);
    assert!(matches!(chain.filter, NetworkFilter::TcpProxy(_)));
    assert!(
        accepted(CHAIN, "").listeners[0].filter_chains[0]
            .rbac
            .is_empty()
    );
}

#[test]
fn listener_fields_are_refused_by_path() {
    check_rejections(
        LISTENER,
        &[
            (
                "per_connection_buffer_limit_bytes: 1024",
                "per_connection_buffer_limit_bytes",
                UNSUPPORTED,
            ),
            ("transparent: true", "transparent", UNSUPPORTED),
            ("freebind: true", "freebind", UNSUPPORTED),
            ("tcp_backlog_size: 10", "tcp_backlog_size", UNSUPPORTED),
            (
                "additional_addresses: [{}]",
                "additional_addresses",
                UNSUPPORTED,
            ),
            ("api_listener: {}", "api_listener", UNSUPPORTED),
            ("drain_type: MODIFY_ONLY", "drain_type", UNSUPPORTED),
            (
                "access_log: [{name: a, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}}]",
                "access_log",
                UNSUPPORTED,
            ),
            (
                "enable_reuse_port: false",
                "enable_reuse_port",
                "only true (the default) is supported",
            ),
            (
                "bind_to_port: false",
                "bind_to_port",
                "only true (the default) is supported",
            ),
            (
                "address: {socket_address: {address: ingress.example}}",
                "address.socket_address.address",
                "\"ingress.example\" is not an IP address",
            ),
            ("address: null", "address", "address is required"),
            (
                "address: {socket_address: {protocol: UDP}}",
                "address.socket_address.protocol",
                "only TCP is supported",
            ),
            (
                "address!: {socket_address: {address: 127.0.0.1, named_port: http}}",
                "address.socket_address.named_port",
                "named ports are not supported",
            ),
            (
                "address: {socket_address: {resolver_name: r}}",
                "address.socket_address.resolver_name",
                UNSUPPORTED,
            ),
            (
                "address: {socket_address: {ipv4_compat: true}}",
                "address.socket_address.ipv4_compat",
                UNSUPPORTED,
            ),
            (
                "address!: {envoy_internal_address: {server_listener_name: x}}",
                "address.envoy_internal_address",
                "internal addresses are not supported",
            ),
            (
                "listener_filters_timeout: -1s",
                "listener_filters_timeout",
                "must not be negative",
            ),
            (
                "listener_filters: [{name: envoy.filters.listener.http_inspector}]",
                "listener_filters[0]",
                "listener filter \"envoy.filters.listener.http_inspector\" () is not supported",
            ),
            (
                "listener_filters: [{name: envoy.filters.listener.tls_inspector, filter_disabled: {any_match: true}}]",
                "listener_filters[0].filter_disabled",
                UNSUPPORTED,
            ),
            (
                "filter_chains!: []",
                "filter_chains",
                "at least one filter chain is required",
            ),
            (
                &format!("filter_chains: [{{}}, {{filters: [{TCP_FILTER}]}}]"),
                "filter_chains[0].filter_chain_match",
                "multiple filter chains with the same matching rules",
            ),
            (
                "default_filter_chain: {filters: []}",
                "default_filter_chain.filters",
                "zero or more envoy.filters.network.rbac followed by exactly one tcp_proxy",
            ),
        ],
    );
}

#[test]
fn filter_chain_fields_are_refused_by_path() {
    check_rejections(
        CHAIN,
        &[
            ("use_proxy_proto: true", "use_proxy_proto", UNSUPPORTED),
            (
                "transport_socket_connect_timeout: 1s",
                "transport_socket_connect_timeout",
                UNSUPPORTED,
            ),
            (
                "metadata: {filter_metadata: {a: {}}}",
                "metadata",
                UNSUPPORTED,
            ),
            (
                &format!("filters!: [{TCP_FILTER}, {TCP_FILTER}]"),
                "filters[0]",
                "zero or more envoy.filters.network.rbac followed by exactly one tcp_proxy",
            ),
            (
                &format!("filters!: [{RBAC_FILTER}]"),
                "filters[0]",
                "zero or more envoy.filters.network.rbac followed by exactly one tcp_proxy",
            ),
            (
                &format!("filters!: [{TCP_FILTER}, {RBAC_FILTER}]"),
                "filters[0]",
                "zero or more envoy.filters.network.rbac followed by exactly one tcp_proxy",
            ),
            (
                &format!(
                    "filters!: [{{name: r, typed_config: {{\"@type\": {RBAC_URL}, stat_prefix: r, rules: {{policies: {{p: {{permissions: [{{header: {{name: a}}}}], principals: [{{any: true}}]}}}}}}}}}}, {TCP_FILTER}]"
                ),
                r#"filters[0].typed_config.rules.policies["p"].permissions[0].header"#,
                "header rules are not supported by the RBAC network filter",
            ),
            (
                "filters!: [{name: x}]",
                "filters[0].typed_config",
                "typed_config is required",
            ),
            (
                "filters!: [{name: x, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}]",
                "filters[0].typed_config",
                "network filter \"type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector\" is not supported",
            ),
        ],
    );
}

#[test]
fn filter_chain_match_fields_are_refused_by_path() {
    let m = "filter_chain_match";
    check_rejections(
        CHAIN,
        &[
            (
                "filter_chain_match: {suffix_len: 1}",
                &format!("{m}.suffix_len"),
                UNSUPPORTED,
            ),
            (
                "filter_chain_match: {address_suffix: \"::1\"}",
                &format!("{m}.address_suffix"),
                UNSUPPORTED,
            ),
            (
                "filter_chain_match: {destination_port: 0}",
                &format!("{m}.destination_port"),
                "must be in 1..65535",
            ),
            (
                "filter_chain_match: {destination_port: 70000}",
                &format!("{m}.destination_port"),
                "must be in 1..65535",
            ),
            (
                "filter_chain_match: {prefix_ranges: [{address_prefix: nope}]}",
                &format!("{m}.prefix_ranges[0].address_prefix"),
                "\"nope\" is not an IP address",
            ),
            (
                "filter_chain_match: {prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 33}]}",
                &format!("{m}.prefix_ranges[0].prefix_len"),
                "must be ≤ 32",
            ),
            (
                "filter_chain_match: {source_prefix_ranges: [{address_prefix: \"::\", prefix_len: 129}]}",
                &format!("{m}.source_prefix_ranges[0].prefix_len"),
                "must be ≤ 128",
            ),
            (
                "filter_chain_match: {direct_source_prefix_ranges: [{address_prefix: 10.0.0.0/8}]}",
                &format!("{m}.direct_source_prefix_ranges[0].address_prefix"),
                "is not an IP address",
            ),
            (
                "filter_chain_match: {source_ports: [80, 70000]}",
                &format!("{m}.source_ports[1]"),
                "must be ≤ 65535",
            ),
            (
                "filter_chain_match: {source_type: 7}",
                &format!("{m}.source_type"),
                "unknown value",
            ),
        ],
    );
}

#[test]
fn listener_settings_reach_the_model() {
    let listener = accepted(LISTENER, "").listeners[0].clone();
    assert_eq!(listener.address, "127.0.0.1:10000".parse().unwrap());
    assert_eq!(
        listener.stat_prefix, "127.0.0.1:10000",
        "Envoy's default stat prefix"
    );
    assert!(!listener.use_original_dst && !listener.tls_inspector && !listener.inbound);
    assert_eq!(listener.listener_filters_timeout, Duration::from_secs(15));
    assert!(!listener.continue_on_listener_filters_timeout);
    assert!(listener.default_filter_chain.is_none());

    let listener = accepted(
        LISTENER,
        r#"
stat_prefix: edge
traffic_direction: INBOUND
listener_filters_timeout: 2s
continue_on_listener_filters_timeout: true
enable_reuse_port: true
bind_to_port: true
listener_filters:
- name: envoy.filters.listener.tls_inspector
- name: dst
  typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
"#,
    )
    .listeners[0]
        .clone();
    assert_eq!(listener.stat_prefix, "edge");
    assert!(listener.inbound);
    assert!(listener.tls_inspector && listener.use_original_dst);
    assert_eq!(listener.listener_filters_timeout, Duration::from_secs(2));
    assert!(listener.continue_on_listener_filters_timeout);
    assert!(accepted(LISTENER, "use_original_dst: true").listeners[0].use_original_dst);

    // A default chain alone is enough, and is listed last.
    let listener = accepted_all(&[
        (
            LISTENER,
            &format!("{{filter_chains: [{{filter_chain_match: {{destination_port: 81}}}}], default_filter_chain: {{filters: [{TCP_FILTER}]}}}}"),
        ),
    ])
    .listeners[0]
        .clone();
    let kinds: Vec<bool> = listener
        .chains()
        .map(|chain| matches!(chain.filter, NetworkFilter::TcpProxy(_)))
        .collect();
    assert_eq!(kinds, [false, true]);
    assert_eq!(
        listener.default_filter_chain.as_ref().unwrap().path,
        "static_resources.listeners[0].default_filter_chain"
    );
}

#[test]
fn filter_chain_matches_reach_the_model() {
    let bootstrap = accepted(
        CHAIN,
        r#"
name: matched
filter_chain_match:
  destination_port: 443
  prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}, {address_prefix: "::1"}]
  direct_source_prefix_ranges: [{address_prefix: 192.168.0.0, prefix_len: 16}]
  source_type: SAME_IP_OR_LOOPBACK
  source_prefix_ranges: [{address_prefix: 127.0.0.1}]
  source_ports: [1234]
  server_names: [API.Example.com, "*.example.org"]
  transport_protocol: tls
  application_protocols: [h2, http/1.1]
"#,
    );
    let chain = &bootstrap.listeners[0].filter_chains[0];
    assert_eq!(chain.name, "matched");
    assert_eq!(chain.path, CHAIN);
    let m = &chain.filter_match;
    assert_eq!(m.destination_port, Some(443));
    assert_eq!(
        (m.prefix_ranges[0].len, m.prefix_ranges[1].len),
        (8, 128),
        "an unset prefix_len is the whole address"
    );
    assert!(m.prefix_ranges[0].contains("10.9.8.7".parse().unwrap()));
    assert!(m.direct_source_prefix_ranges[0].contains("192.168.3.4".parse().unwrap()));
    assert_eq!(m.source_type, SourceType::SameIpOrLoopback);
    assert_eq!(m.source_prefix_ranges[0].len, 32);
    assert_eq!(m.source_ports, [1234]);
    assert_eq!(m.server_names, ["api.example.com", "*.example.org"]);
    assert_eq!(m.transport_protocol.as_deref(), Some("tls"));
    assert_eq!(m.application_protocols, ["h2", "http/1.1"]);
    let external = accepted(CHAIN, "filter_chain_match: {source_type: EXTERNAL}");
    assert_eq!(
        external.listeners[0].filter_chains[0]
            .filter_match
            .source_type,
        SourceType::External
    );
}

fn tcp(bootstrap: &remora_config::bootstrap::Bootstrap) -> TcpProxy {
    match &bootstrap.listeners[1].filter_chains[0].filter {
        NetworkFilter::TcpProxy(tcp) => (**tcp).clone(),
        NetworkFilter::Http(_) => panic!("the second listener is tcp_proxy"),
    }
}

#[test]
fn tcp_proxy_fields_are_refused_by_path() {
    check_rejections(
        TCP,
        &[
            (
                "metadata_match: {filter_metadata: {a: {}}}",
                "metadata_match",
                UNSUPPORTED,
            ),
            (
                "downstream_idle_timeout: 1s",
                "downstream_idle_timeout",
                UNSUPPORTED,
            ),
            (
                "upstream_idle_timeout: 1s",
                "upstream_idle_timeout",
                UNSUPPORTED,
            ),
            ("hash_policy: [{source_ip: {}}]", "hash_policy", UNSUPPORTED),
            (
                "max_downstream_connection_duration: 60s",
                "max_downstream_connection_duration",
                UNSUPPORTED,
            ),
            (
                "access_log: [{name: a, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog, log_format: {text_format: \"%FILTER_STATE(x)%\"}}}]",
                "access_log[0].typed_config.log_format",
                "command operator %FILTER_STATE(x)% is not supported",
            ),
            ("stat_prefix: \"\"", "stat_prefix", "must not be empty"),
            ("cluster: \"\"", "cluster", "must not be empty"),
            (
                "cluster: null",
                "",
                "cluster or weighted_clusters is required",
            ),
            ("idle_timeout: -1s", "idle_timeout", "must not be negative"),
            (
                "{cluster: null, weighted_clusters: {clusters: []}}",
                "weighted_clusters.clusters",
                "at least one cluster is required",
            ),
            (
                "{cluster: null, weighted_clusters: {clusters: [{name: echo, weight: 0}]}}",
                "weighted_clusters.clusters[0].weight",
                "must be ≥ 1",
            ),
            (
                "{cluster: null, weighted_clusters: {clusters: [{name: echo, weight: 1, metadata_match: {filter_metadata: {a: {}}}}]}}",
                "weighted_clusters.clusters[0].metadata_match",
                UNSUPPORTED,
            ),
            (
                "{cluster: null, weighted_clusters: {clusters: [{name: echo, weight: 1}, {name: gone, weight: 1}]}}",
                "/static_resources.listeners[1]",
                "tcp_proxy names unknown cluster \"gone\"",
            ),
        ],
    );
}

#[test]
fn tcp_proxy_settings_reach_the_model() {
    let proxy = tcp(&accepted(TCP, ""));
    assert_eq!(proxy.stat_prefix, "tcp");
    assert!(matches!(&proxy.clusters, TcpClusters::One(name) if name == "echo"));
    assert_eq!(
        proxy.idle_timeout,
        Some(Duration::from_secs(3600)),
        "Envoy's default"
    );
    assert_eq!(proxy.max_connect_attempts, 1);
    let proxy = tcp(&accepted(
        TCP,
        "{idle_timeout: 0s, max_connect_attempts: 3, cluster: null, weighted_clusters: {clusters: [{name: echo, weight: 3}]}}",
    ));
    assert_eq!(proxy.idle_timeout, None, "0s disables it");
    assert_eq!(proxy.max_connect_attempts, 3);
    match &proxy.clusters {
        TcpClusters::Weighted(list) => {
            assert_eq!((list[0].name.as_str(), list[0].weight), ("echo", 3));
        }
        TcpClusters::One(_) => panic!("weighted"),
    }
    assert_eq!(
        tcp(&accepted(TCP, "max_connect_attempts: 0")).max_connect_attempts,
        1
    );
    assert_eq!(
        tcp(&accepted(TCP, "idle_timeout: 10s")).idle_timeout,
        Some(Duration::from_secs(10))
    );
}
