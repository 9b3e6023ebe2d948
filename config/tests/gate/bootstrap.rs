//! The bootstrap itself: node, admin, static resources and their cross-references, the
//! `layered_runtime` keys Remora acts on, and `dynamic_resources` (ADS only, v3 only).

use std::time::Duration;

use remora_config::access_log::Target;
use remora_config::bootstrap::AdsFlavor;
use remora_config::stats::{MetricsServiceSink, StatsSink};

use crate::support::*;

/// ADS to the static cluster `echo`, with CDS and LDS over it.
const DYNAMIC: &str = r#"
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: echo}}]
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
"#;

#[test]
fn the_base_bootstrap_is_accepted_as_written() {
    let bootstrap = accepted(ROOT, "");
    assert_eq!(bootstrap.node.id, "node-1");
    assert_eq!(bootstrap.node.cluster, "mesh");
    let admin = bootstrap.admin.expect("admin");
    assert_eq!(admin.address, "127.0.0.1:9901".parse().unwrap());
    assert!(!admin.ignores_global_limit);
    assert!(admin.access_logs.is_empty());
    let names: Vec<&str> = bootstrap
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(names, ["ingress", "tcp"]);
    assert_eq!(bootstrap.clusters[0].name, "echo");
    assert!(bootstrap.dynamic.is_none());
    assert_eq!(bootstrap.runtime, Default::default());
}

#[test]
fn stats_sinks_are_read_with_envoys_defaults() {
    let bootstrap = accepted(
        ROOT,
        "stats_sinks:\n\
         - name: envoy.stat_sinks.statsd\n  typed_config:\n    '@type': type.googleapis.com/envoy.config.metrics.v3.StatsdSink\n    address: {socket_address: {address: 127.0.0.1, port_value: 8125}}\n\
         - name: envoy.stat_sinks.dog_statsd\n  typed_config:\n    '@type': type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink\n    address: {socket_address: {address: '::1', port_value: 8126}}\n    prefix: mesh\n    max_bytes_per_datagram: 1400\n",
    );
    assert_eq!(bootstrap.stats_flush_interval, Some(Duration::from_secs(5)));
    let sinks: Vec<(String, &str, bool, Option<usize>)> = bootstrap
        .stats_sinks
        .iter()
        .filter_map(|s| match s {
            StatsSink::Statsd(s) => Some((
                s.address.to_string(),
                s.prefix.as_str(),
                s.tagged,
                s.max_bytes_per_datagram,
            )),
            StatsSink::MetricsService(_) => None,
        })
        .collect();
    assert_eq!(
        sinks,
        [
            ("127.0.0.1:8125".to_string(), "envoy", false, None),
            ("[::1]:8126".to_string(), "mesh", true, Some(1400)),
        ]
    );
    accepted(ROOT, "stats_eviction_interval: 20s");
    accepted(
        ROOT,
        "{stats_flush_interval: 0.25s, stats_eviction_interval: 0.75s}",
    );
    let bootstrap = accepted(ROOT, "stats_flush_interval: 0.25s");
    assert_eq!(
        bootstrap.stats_flush_interval,
        Some(Duration::from_millis(250))
    );
    let bootstrap = accepted(ROOT, "stats_flush_on_admin: true");
    assert_eq!(bootstrap.stats_flush_interval, None);
    let bootstrap = accepted(
        ROOT,
        "stats_sinks:\n\
         - name: envoy.stat_sinks.metrics_service\n  typed_config:\n    '@type': type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig\n    transport_api_version: V3\n    grpc_service: {envoy_grpc: {cluster_name: echo}}\n    histogram_emit_mode: HISTOGRAM\n    report_counters_as_deltas: true\n",
    );
    assert_eq!(
        bootstrap.stats_sinks,
        [StatsSink::MetricsService(MetricsServiceSink {
            cluster: "echo".into(),
            counters_as_deltas: true,
            tags_as_labels: false,
            summaries: false,
            histograms: true,
        })]
    );
}

#[test]
fn bootstrap_fields_are_refused_by_path() {
    check_rejections(
        ROOT,
        &[
            (
                "stats_flush_interval: 300s",
                "stats_flush_interval",
                "out of range: at least 1ms and under 300s",
            ),
            (
                "{stats_flush_interval: 10s, stats_eviction_interval: 11s}",
                "stats_eviction_interval",
                "11s must be a multiple of stats_flush_interval (10s)",
            ),
            (
                "stats_config: {histogram_bucket_settings: [{match: {prefix: cluster}, buckets: [1, 0.5, 1]}]}",
                "stats_config.histogram_bucket_settings[0].buckets",
                "bounds must be distinct",
            ),
            (
                "stats_config: {histogram_bucket_settings: [{match: {prefix: cluster}, buckets: [1, -2]}]}",
                "stats_config.histogram_bucket_settings[0].buckets",
                "-2 is not a positive bound",
            ),
            (
                "stats_config: {histogram_bucket_settings: [{buckets: [1]}]}",
                "stats_config.histogram_bucket_settings[0].match",
                "required",
            ),
            (
                "stats_config: {histogram_bucket_settings: [{match: {prefix: cluster}, buckets: [1], bins: 10}]}",
                "stats_config.histogram_bucket_settings[0].bins",
                "unknown field",
            ),
            (
                "{stats_flush_interval: 1s, stats_flush_on_admin: true}",
                "stats_flush_on_admin",
                "only one of stats_flush_interval and stats_flush_on_admin may be set",
            ),
            (
                "cluster_manager: {load_stats_config: {api_type: GRPC, transport_api_version: V3}}",
                "cluster_manager.load_stats_config",
                "names no gRPC service: API configs must have either a gRPC service or a cluster name defined",
            ),
            (
                "cluster_manager: {load_stats_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: lrs}}]}}",
                "cluster_manager.load_stats_config",
                "load reporting to a management server (LRS) is not supported",
            ),
            (
                "stats_eviction_interval: 0s",
                "stats_eviction_interval",
                "must be at least 1ms",
            ),
            (
                "stats_sinks: [{name: envoy.stat_sinks.statsd}]",
                "stats_sinks[0].typed_config",
                "required: the settings of sink \"envoy.stat_sinks.statsd\"",
            ),
            (
                "stats_sinks: [{typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.StatsdSink, tcp_cluster_name: statsd}}]",
                "stats_sinks[0].typed_config.tcp_cluster_name",
                "Remora sends statsd over UDP only",
            ),
            (
                "stats_sinks: [{typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.StatsdSink, address: {socket_address: {address: statsd.local, port_value: 8125}}}}]",
                "stats_sinks[0].typed_config.address.socket_address.address",
                "\"statsd.local\" is not an IP address",
            ),
            (
                "stats_sinks: [{typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink, address: {socket_address: {address: 127.0.0.1, port_value: 8125}}, max_bytes_per_datagram: 0}}]",
                "stats_sinks[0].typed_config.max_bytes_per_datagram",
                "must be greater than 0",
            ),
            (
                "stats_sinks: [{name: envoy.stat_sinks.metrics_service, typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig, grpc_service: {envoy_grpc: {cluster_name: ms}}}}]",
                "stats_sinks[0].typed_config.grpc_service.envoy_grpc.cluster_name",
                "unknown static cluster \"ms\"",
            ),
            (
                "stats_sinks: [{name: envoy.stat_sinks.metrics_service, typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig}}]",
                "stats_sinks[0].typed_config.grpc_service",
                "required",
            ),
            (
                "stats_sinks: [{name: envoy.stat_sinks.hystrix, typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.HystrixSink}}]",
                "stats_sinks[0].typed_config",
                "unsupported type \"type.googleapis.com/envoy.config.metrics.v3.HystrixSink\"",
            ),
            (
                "stats_sinks: [{typed_config: {'@type': type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink}}]",
                "stats_sinks[0].typed_config.address",
                "required",
            ),
            ("header_prefix: x-acme", "header_prefix", UNSUPPORTED),
            (
                "cluster_manager: {local_cluster_name: here}",
                "cluster_manager.local_cluster_name",
                UNSUPPORTED,
            ),
            (
                "enable_dispatcher_stats: true",
                "enable_dispatcher_stats",
                UNSUPPORTED,
            ),
            (
                "node: {client_features: [a]}",
                "node.client_features",
                UNSUPPORTED,
            ),
            (
                "admin: {address: {socket_address: {address: localhost}}}",
                "admin.address.socket_address.address",
                "\"localhost\" is not an IP address",
            ),
            (
                "admin: {address: {socket_address: {port_value: 70000}}}",
                "admin.address.socket_address.port_value",
                "must be ≤ 65535",
            ),
            (
                "admin: {address!: {pipe: {path: /tmp/admin.sock}}}",
                "admin.address.pipe",
                "pipes are not supported",
            ),
            (
                "static_resources: {secrets: [{name: s}]}",
                "static_resources.secrets[0]",
                "a secret needs tls_certificate or validation_context",
            ),
            (
                "static_resources: {secrets: [{name: s, session_ticket_keys: {}}]}",
                "static_resources.secrets[0].session_ticket_keys",
                "is not supported",
            ),
            (
                "static_resources: {secrets: [{name: s, validation_context: {trusted_ca: {inline_string: a}}}, {name: s, validation_context: {trusted_ca: {inline_string: b}}}]}",
                "static_resources.secrets[1].name",
                "duplicate secret name",
            ),
            (
                "static_resources: {listeners: [{}, {name: ingress}]}",
                "static_resources.listeners[1].name",
                "duplicate listener name \"ingress\"",
            ),
            (
                "static_resources: {listeners: [{}, {name: second, address: {socket_address: {port_value: 10000}}}]}",
                "static_resources.listeners[1].address",
                "duplicate address 127.0.0.1:10000 as listener \"ingress\"",
            ),
            (
                "static_resources: {clusters: [{}, {name: echo}]}",
                "static_resources.clusters[1].name",
                "duplicate cluster name \"echo\"",
            ),
            // The JSON mapping names a misspelt field, also inside an Any.
            (
                "static_resources: {clusters: [{conect_timeout: 1s}]}",
                "static_resources.clusters[0].conect_timeout",
                "unknown field",
            ),
        ],
    );
    check_rejections(
        HCM,
        &[("stat_prefx: x", "stat_prefx", "unknown field `stat_prefx`")],
    );
}

#[test]
fn static_listeners_must_name_known_clusters_unless_told_otherwise() {
    check_rejections(
        ROUTE,
        &[(
            "route: {cluster: nowhere}",
            // Named at the listener, as Envoy's error is.
            "/static_resources.listeners[0]",
            "route: unknown cluster \"nowhere\"",
        )],
    );
    check_rejections(
        TCP,
        &[(
            "cluster: nowhere",
            "/static_resources.listeners[1]",
            "tcp_proxy names unknown cluster \"nowhere\"",
        )],
    );
    // validate_clusters: false, or clusters from CDS, lift the check.
    accepted_all(&[
        (ROUTES, "validate_clusters: false"),
        (ROUTE, "route: {cluster: nowhere}"),
    ]);
    accepted_all(&[
        (ROOT, DYNAMIC),
        (ROUTE, "route: {cluster: nowhere}"),
        (TCP, "cluster: nowhere"),
    ]);
}

#[test]
fn envoys_spellings_are_read_as_envoy_reads_them() {
    // Lower-case enum names, one object where a list is expected, an unnamed listener.
    let bootstrap = accepted_all(&[
        (CLUSTER, "{type: static, lb_policy: round_robin}"),
        (
            CLUSTER,
            "load_assignment: {endpoints!: {lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.2, port_value: 81}}}}]}}",
        ),
        (LISTENER, "name: null"),
    ]);
    let cluster = &bootstrap.clusters[0];
    assert_eq!(
        cluster.discovery,
        remora_config::cluster::DiscoveryType::Static
    );
    assert!(matches!(
        cluster.load_balancing.policy,
        remora_config::load_balancing::LbPolicy::RoundRobin(_)
    ));
    assert_eq!(
        cluster.load_assignment.endpoints[0].address,
        remora_config::common::EndpointAddress::Ip("127.0.0.2:81".parse().unwrap())
    );
    // As Envoy: a static listener without a name is named with a random UUID.
    let name = &bootstrap.listeners[0].name;
    assert_eq!(name.len(), 36, "{name}");
    assert_eq!(name.matches('-').count(), 4, "{name}");
    assert_ne!(name, &accepted(LISTENER, "name: null").listeners[0].name);
}

#[test]
fn defaults_written_out_are_read_as_left_out() {
    // What generated configs (Istio's, Envoy Gateway's, go-control-plane's) write explicitly.
    let written = accepted_all(&[
        (ROOT, "cluster_manager: {}"),
        (
            HCM,
            "{normalize_path: false, merge_slashes: false, path_with_escaped_slashes_action: KEEP_UNCHANGED}",
        ),
        (
            ROUTE,
            "match!: {safe_regex: {google_re2: {}, regex: \"/[a-z]+\"}}",
        ),
        (
            CLUSTER,
            "{wait_for_warm_on_init: true, connect_timeout: {seconds: 2, nanos: 500000000}}",
        ),
    ]);
    assert_eq!(
        written.clusters[0].connect.connect_timeout,
        Duration::from_millis(2_500)
    );
    assert!(written.listeners[0].filter_chains[0].tls.is_none());
}

#[test]
fn admin_settings_reach_the_model() {
    let admin = accepted(
        ROOT,
        "admin: {ignore_global_conn_limit: true, access_log_path: /dev/null}",
    )
    .admin
    .expect("admin");
    assert!(admin.ignores_global_limit);
    assert!(admin.access_logs.is_empty(), "/dev/null is no log");
    let admin = accepted(ROOT, "admin: {access_log_path: /var/log/admin.log}")
        .admin
        .expect("admin");
    assert_eq!(
        admin.access_logs[0].target,
        Target::File("/var/log/admin.log".into())
    );
    let admin = accepted(
        ROOT,
        "admin: {access_log: [{name: a, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog}}]}",
    )
    .admin
    .expect("admin");
    assert_eq!(admin.access_logs[0].target, Target::Stdout);
    assert!(accepted(ROOT, "admin: null").admin.is_none());
}

#[test]
fn layered_runtime_accepts_the_keys_remora_acts_on_and_names_others() {
    check_rejections(
        ROOT,
        &[
            (
                "layered_runtime: {layers: [{name: s, static_layer: {envoy.reloadable_features.no_such_flag: true}}]}",
                "layered_runtime.layers[0].static_layer.envoy.reloadable_features.no_such_flag",
                "runtime key not supported",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {re2.max_program_size.error_level: 50}}]}",
                "layered_runtime.layers[0].static_layer.re2.max_program_size.error_level",
                "below RE2's default of 100",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {envoy.reloadable_features.http_reject_path_with_fragment: maybe}}]}",
                "layered_runtime.layers[0].static_layer.envoy.reloadable_features.http_reject_path_with_fragment",
                "must be true or false",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {envoy.restart_features.use_eds_cache_for_ads: false}}]}",
                "layered_runtime.layers[0].static_layer.envoy.restart_features.use_eds_cache_for_ads",
                "Remora always reuses the endpoints last received",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {envoy.reloadable_features.google_grpc_disable_tls_13: yes}}]}",
                "layered_runtime.layers[0].static_layer.envoy.reloadable_features.google_grpc_disable_tls_13",
                "must be true or false",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {envoy.reloadable_features.explicit_internal_address_config: 2}}]}",
                "layered_runtime.layers[0].static_layer.envoy.reloadable_features.explicit_internal_address_config",
                "must be true or false",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {overload: {global_downstream_max_connections: -1}}}]}",
                "layered_runtime.layers[0].static_layer.overload.global_downstream_max_connections",
                "must be a non-negative integer",
            ),
            (
                "layered_runtime: {layers: [{name: s, static_layer: {overload.global_downstream_max_connections: 1.5}}]}",
                "layered_runtime.layers[0].static_layer.overload.global_downstream_max_connections",
                "must be a non-negative integer",
            ),
            (
                "layered_runtime: {layers: [{name: a, admin_layer: {}}, {name: s, static_layer: {envoy.resource_limits.listener.ingress.connection_limit: many}}]}",
                "layered_runtime.layers[1].static_layer.envoy.resource_limits.listener.ingress.connection_limit",
                "must be a non-negative integer",
            ),
            (
                "layered_runtime: {layers: [{name: empty}]}",
                "layered_runtime.layers[0]",
                "a static_layer or an admin_layer is required",
            ),
        ],
    );
    // Nested and dotted keys, numbers as strings, later layers win, an admin layer is fine.
    let runtime = accepted(
        ROOT,
        r#"
layered_runtime:
  layers:
  - name: base
    static_layer:
      envoy: {resource_limits: {listener: {ingress: {connection_limit: 2}, tcp: {connection_limit: 9}}}}
      overload.global_downstream_max_connections: "100"
  - name: override
    static_layer: {envoy.resource_limits.listener.ingress.connection_limit: 5, envoy.restart_features.use_eds_cache_for_ads: true, envoy.reloadable_features.google_grpc_disable_tls_13: true}
  - name: admin
    admin_layer: {}
"#,
    )
    .runtime;
    assert_eq!(runtime.global_max_connections, Some(100));
    // What `/runtime` shows: each layer's keys, values as text, in order.
    let text = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        runtime.layers,
        [
            (
                "base".to_string(),
                text(&[
                    (
                        "envoy.resource_limits.listener.ingress.connection_limit",
                        "2"
                    ),
                    ("envoy.resource_limits.listener.tcp.connection_limit", "9"),
                    ("overload.global_downstream_max_connections", "100"),
                ])
            ),
            (
                "override".to_string(),
                text(&[
                    (
                        "envoy.reloadable_features.google_grpc_disable_tls_13",
                        "true"
                    ),
                    (
                        "envoy.resource_limits.listener.ingress.connection_limit",
                        "5"
                    ),
                    ("envoy.restart_features.use_eds_cache_for_ads", "true"),
                ])
            ),
            ("admin".to_string(), vec![]),
        ]
    );
    assert_eq!(runtime.listener_connection_limits["ingress"], 5);
    assert_eq!(runtime.listener_connection_limits["tcp"], 9);
}

#[test]
fn dynamic_resources_are_ads_over_v3_only() {
    check_rejections_given(
        &[(ROOT, DYNAMIC)],
        ROOT,
        &[
            (
                "dynamic_resources: {ads_config: {transport_api_version: V2}}",
                "dynamic_resources.ads_config.transport_api_version",
                "V2 is not supported: Remora speaks xDS v3 only",
            ),
            (
                "dynamic_resources: {cds_config: {resource_api_version: V2}}",
                "dynamic_resources.cds_config.resource_api_version",
                "V2 is not supported",
            ),
            (
                "dynamic_resources: {lds_config: {resource_api_version: V2}}",
                "dynamic_resources.lds_config.resource_api_version",
                "V2 is not supported",
            ),
            (
                "dynamic_resources: {ads_config: null}",
                "dynamic_resources.ads_config",
                "required: only ADS is supported",
            ),
            (
                "dynamic_resources: {ads_config: null, lds_config!: {path: /etc/lds.yaml}}",
                "dynamic_resources.lds_config",
                "only `ads: {}` config sources are supported",
            ),
            (
                "dynamic_resources: {ads_config: {api_type: REST}}",
                "dynamic_resources.ads_config.api_type",
                "only GRPC and DELTA_GRPC are supported",
            ),
            (
                "dynamic_resources: {ads_config: {refresh_delay: 1s}}",
                "dynamic_resources.ads_config.refresh_delay",
                UNSUPPORTED,
            ),
            (
                "dynamic_resources: {ads_config: {rate_limit_settings: {}}}",
                "dynamic_resources.ads_config.rate_limit_settings",
                UNSUPPORTED,
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{}, {envoy_grpc: {cluster_name: echo}}]}}",
                "dynamic_resources.ads_config.grpc_services",
                "exactly one grpc service is required",
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services!: [{timeout: 1s}]}}",
                "dynamic_resources.ads_config.grpc_services[0]",
                "envoy_grpc is required",
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{initial_metadata: [{key: a, raw_value: Yg==}]}]}}",
                "dynamic_resources.ads_config.grpc_services[0].initial_metadata[0].raw_value",
                UNSUPPORTED,
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{timeout: -1s}]}}",
                "dynamic_resources.ads_config.grpc_services[0].timeout",
                "must not be negative",
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{envoy_grpc: {cluster_name: nowhere}}]}}",
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                "unknown static cluster \"nowhere\"",
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{envoy_grpc: {authority: cp.example}}]}}",
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.authority",
                UNSUPPORTED,
            ),
            (
                "dynamic_resources: {ads_config: {grpc_services: [{envoy_grpc: {skip_envoy_headers: true}}]}}",
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.skip_envoy_headers",
                UNSUPPORTED,
            ),
            (
                "dynamic_resources: {cds_config!: {path: /etc/cds.yaml}}",
                "dynamic_resources.cds_config",
                "only `ads: {}` config sources are supported",
            ),
            (
                "dynamic_resources: {lds_config: {initial_fetch_timeout: -2s}}",
                "dynamic_resources.lds_config.initial_fetch_timeout",
                "must not be negative",
            ),
        ],
    );
}

#[test]
fn dynamic_resources_settings_reach_the_model() {
    let dynamic = accepted(ROOT, DYNAMIC).dynamic.expect("dynamic");
    assert_eq!(dynamic.ads_cluster, "echo");
    assert_eq!(dynamic.flavor, AdsFlavor::StateOfTheWorld);
    assert!(!dynamic.node_on_first_message_only);
    assert_eq!(dynamic.stream_timeout, None);
    assert_eq!(
        dynamic.cds.expect("cds").initial_fetch_timeout,
        Duration::from_secs(15)
    );
    let dynamic = accepted_all(&[
        (ROOT, DYNAMIC),
        (
            ROOT,
            r#"
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: AUTO
    set_node_on_first_message_only: true
    grpc_services: [{timeout: 2.5s}]
  cds_config: null
  lds_config: {initial_fetch_timeout: 0s, resource_api_version: AUTO}
"#,
        ),
    ])
    .dynamic
    .expect("dynamic");
    assert_eq!(dynamic.flavor, AdsFlavor::Delta);
    assert!(dynamic.node_on_first_message_only);
    assert_eq!(dynamic.stream_timeout, Some(Duration::from_millis(2500)));
    assert!(dynamic.cds.is_none());
    assert_eq!(
        dynamic.lds.expect("lds").initial_fetch_timeout,
        Duration::ZERO
    );
    // A zero GrpcService.timeout is no timeout, as in Envoy.
    let dynamic = accepted_all(&[
        (ROOT, DYNAMIC),
        (
            ROOT,
            "dynamic_resources: {ads_config: {grpc_services: [{timeout: 0s}]}}",
        ),
    ])
    .dynamic
    .expect("dynamic");
    assert_eq!(dynamic.stream_timeout, None);
}

/// The overload manager: the downstream-connections monitor sets the global limit (winning
/// over the runtime key, and sparing the admin); other monitors and any action are refused by
/// name. Fields that change only Envoy's memory or its profiler are taken.
#[test]
fn overload_manager_reads_the_connection_monitor_and_names_the_rest() {
    const MONITOR: &str = "{name: envoy.resource_monitors.global_downstream_max_connections, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig, max_active_downstream_connections: 7}}";
    let bootstrap = accepted_all(&[(
        ROOT,
        &format!(
            "{{overload_manager: {{refresh_interval: 0.25s, resource_monitors: [{MONITOR}]}}, layered_runtime: {{layers: [{{name: s, static_layer: {{overload.global_downstream_max_connections: 100}}}}]}}, deferred_stat_options: {{enable_deferred_creation_stats: true}}, cluster_manager: {{enable_deferred_cluster_creation: true}}, admin: {{profile_path: /tmp/prof, address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}}}}}"
        ),
    )]);
    assert_eq!(bootstrap.runtime.global_max_connections, Some(7));
    assert!(bootstrap.runtime.global_limit_skips_admin);
    check_rejections(
        ROOT,
        &[
            (
                "overload_manager: {actions: [{name: envoy.overload_actions.shrink_heap, triggers: [{name: envoy.resource_monitors.fixed_heap, threshold: {value: 0.95}}]}]}",
                "overload_manager.actions[0]",
                "overload action \"envoy.overload_actions.shrink_heap\" is not supported",
            ),
            (
                "overload_manager: {resource_monitors: [{name: envoy.resource_monitors.fixed_heap, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig, max_heap_size_bytes: 1000}}]}",
                "overload_manager.resource_monitors[0].typed_config",
                "Remora does not know this message",
            ),
            (
                "overload_manager: {resource_monitors: [{name: mine, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}",
                "overload_manager.resource_monitors[0].typed_config",
                "resource monitor \"mine\"",
            ),
            (
                "overload_manager: {resource_monitors: [{name: envoy.resource_monitors.global_downstream_max_connections, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig}}]}",
                "overload_manager.resource_monitors[0].typed_config.max_active_downstream_connections",
                "must be greater than 0",
            ),
        ],
    );
}

/// `bootstrap_extensions`: the internal listener extension (as Istio writes it, in a
/// TypedStruct) is taken; any other is refused by name.
#[test]
fn bootstrap_extensions_take_the_internal_listener_and_name_the_rest() {
    accepted(
        ROOT,
        "bootstrap_extensions: [{name: envoy.bootstrap.internal_listener, typed_config: {\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener, value: {buffer_size_kb: 64}}}]",
    );
    check_rejections(
        ROOT,
        &[(
            "bootstrap_extensions: [{name: mine, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]",
            "bootstrap_extensions[0].typed_config",
            "bootstrap extension \"mine\"",
        )],
    );
}

/// The bootstrap's deprecated `tracing.http` is read as the default tracer; one Remora does not
/// have is refused by path.
#[test]
fn the_bootstrap_tracer_is_read_or_named() {
    let bootstrap = accepted(
        ROOT,
        "tracing: {http: {name: envoy.tracers.zipkin, typed_config: {\"@type\": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: echo, collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON}}}",
    );
    assert!(matches!(
        bootstrap.tracing_provider,
        Some(remora_config::tracing::Provider::Zipkin(_))
    ));
    check_rejections(
        ROOT,
        &[(
            "tracing: {http: {name: envoy.tracers.datadog, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}",
            "tracing.http.typed_config",
            "tracer \"envoy.tracers.datadog\"",
        )],
    );
}
