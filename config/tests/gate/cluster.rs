//! Clusters (discovery types, load balancing, circuit breakers, protocol options, keepalive,
//! DNS) and their endpoints (localities, priorities, weights, health).

use std::sync::Arc;
use std::time::Duration;

use remora_config::cluster::{
    Cluster, DiscoveryType, DnsLookupFamily, Thresholds, UpstreamProtocol,
};
use remora_config::common::{EndpointAddress, Http2Keepalive, TcpKeepalive};
use remora_config::endpoint::{DEFAULT_OVERPROVISIONING, HealthStatus, Locality};

use crate::support::*;

fn cluster(anchor: &str, patch: &str) -> Arc<Cluster> {
    accepted(anchor, patch).clusters[0].clone()
}

const HTTP_OPTIONS: &str =
    "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]";

fn http_options(inner: &str) -> String {
    format!(
        "typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, {inner}}}}}"
    )
}

#[test]
fn cluster_fields_are_refused_by_path() {
    check_rejections(
        CLUSTER,
        &[
            (
                "lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 4}",
                "maglev_lb_config.table_size",
                "4 is not a prime number",
            ),
            (
                "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {choice_count: 1}",
                "least_request_lb_config.choice_count",
                "must be at least 2",
            ),
            (
                "lb_policy: RING_HASH\ncommon_lb_config: {consistent_hashing_lb_config: {hash_balance_factor: 150}}",
                "common_lb_config.consistent_hashing_lb_config.hash_balance_factor",
                UNSUPPORTED,
            ),
            (
                "lb_policy: CLUSTER_PROVIDED",
                "lb_policy",
                "CLUSTER_PROVIDED is only for ORIGINAL_DST clusters",
            ),
            (
                "outlier_detection: {max_ejection_percent: 150}",
                "outlier_detection.max_ejection_percent",
                "must be ≤ 100",
            ),
            (
                "health_checks: [{timeout: 1s}]",
                "health_checks[0].interval",
                "is required",
            ),
            (
                "per_connection_buffer_limit_bytes: 1024",
                "per_connection_buffer_limit_bytes",
                UNSUPPORTED,
            ),
            (
                "common_http_protocol_options: {idle_timeout: 1s}",
                "common_http_protocol_options",
                UNSUPPORTED,
            ),
            (
                "http_protocol_options: {}",
                "http_protocol_options",
                UNSUPPORTED,
            ),
            (
                "upstream_http_protocol_options: {auto_sni: true}",
                "upstream_http_protocol_options",
                UNSUPPORTED,
            ),
            (
                "dns_failure_refresh_rate: {base_interval: 1s}",
                "dns_failure_refresh_rate",
                UNSUPPORTED,
            ),
            (
                "dns_resolvers: [{socket_address: {address: 127.0.0.53, port_value: 53}}]",
                "dns_resolvers",
                UNSUPPORTED,
            ),
            (
                "use_tcp_for_dns_lookups: true",
                "use_tcp_for_dns_lookups",
                UNSUPPORTED,
            ),
            (
                "wait_for_warm_on_init: false",
                "wait_for_warm_on_init",
                "only true is supported",
            ),
            ("cleanup_interval: 5s", "cleanup_interval", UNSUPPORTED),
            (
                "upstream_bind_config: {source_address: {address: 127.0.0.1}}",
                "upstream_bind_config",
                UNSUPPORTED,
            ),
            (
                "common_lb_config: {close_connections_on_host_set_change: true}",
                "common_lb_config.close_connections_on_host_set_change",
                UNSUPPORTED,
            ),
            (
                "metadata: {filter_metadata: {a: {}}}",
                "metadata",
                UNSUPPORTED,
            ),
            (
                "protocol_selection: USE_DOWNSTREAM_PROTOCOL",
                "protocol_selection",
                UNSUPPORTED,
            ),
            (
                "close_connections_on_host_health_failure: true",
                "close_connections_on_host_health_failure",
                UNSUPPORTED,
            ),
            (
                "connection_pool_per_downstream_connection: true",
                "connection_pool_per_downstream_connection",
                UNSUPPORTED,
            ),
            (
                "transport_socket_matches: [{name: m}]",
                "transport_socket_matches",
                UNSUPPORTED,
            ),
            ("name: \"\"", "name", "must not be empty"),
            ("type: 17", "type", "unknown value"),
            (
                "{type: null, cluster_type: {name: envoy.clusters.aggregate}}",
                "cluster_type",
                "custom cluster types are not supported",
            ),
            (
                "eds_cluster_config: {eds_config: {ads: {}}}",
                "eds_cluster_config",
                "only EDS clusters have an eds_cluster_config",
            ),
            (
                "connect_timeout: 0s",
                "connect_timeout",
                "must be greater than 0",
            ),
            (
                "connect_timeout: -1s",
                "connect_timeout",
                "must not be negative",
            ),
            (
                "dns_refresh_rate: -1s",
                "dns_refresh_rate",
                "must not be negative",
            ),
            ("dns_lookup_family: 9", "dns_lookup_family", "unknown value"),
            (
                "load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: localhost}}}}]}]}",
                "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address",
                "must be an IP address (names only in STRICT_DNS and LOGICAL_DNS clusters)",
            ),
        ],
    );
}

#[test]
fn discovery_types_constrain_the_rest() {
    let eds = "{type: EDS, load_assignment: null, eds_cluster_config: {eds_config: {ads: {}}}}";
    check_rejections(
        CLUSTER,
        &[
            (
                "{type: EDS, eds_cluster_config: {eds_config: {ads: {}}}}",
                "load_assignment",
                "not allowed for EDS and ORIGINAL_DST clusters",
            ),
            (
                "{type: EDS, load_assignment: null}",
                "eds_cluster_config",
                "required for EDS clusters",
            ),
            (
                "{type: EDS, load_assignment: null, eds_cluster_config: {eds_config: {ads: {}, resource_api_version: V2}}}",
                "eds_cluster_config.eds_config.resource_api_version",
                "V2 is not supported: Remora speaks xDS v3 only",
            ),
            (
                "{type: EDS, load_assignment: null, eds_cluster_config: {eds_config: {path: /etc/eds.yaml}}}",
                "eds_cluster_config.eds_config",
                "only `ads: {}` config sources are supported",
            ),
            (
                "{type: EDS, load_assignment: null, eds_cluster_config: {}}",
                "eds_cluster_config.eds_config",
                "config source is required",
            ),
            (
                "type: ORIGINAL_DST",
                "load_assignment",
                "not allowed for EDS and ORIGINAL_DST clusters",
            ),
            (
                "{type: LOGICAL_DNS, load_assignment: {endpoints: [{lb_endpoints: [{}, {endpoint: {address: {socket_address: {address: b.example, port_value: 80}}}}]}]}}",
                "load_assignment",
                "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
            ),
        ],
    );
    let cluster = self::cluster(CLUSTER, eds);
    assert_eq!(
        cluster.discovery,
        DiscoveryType::Eds {
            service_name: "echo".into(),
            source: Default::default()
        },
        "the service name defaults to the cluster's"
    );
    let cluster = self::cluster(
        CLUSTER,
        "{type: EDS, load_assignment: null, eds_cluster_config: {service_name: svc, eds_config: {ads: {}, initial_fetch_timeout: 0s}}}",
    );
    match &cluster.discovery {
        DiscoveryType::Eds {
            service_name,
            source,
        } => {
            assert_eq!(service_name, "svc");
            assert_eq!(source.initial_fetch_timeout, Duration::ZERO);
        }
        other => panic!("EDS, not {other:?}"),
    }
    let cluster = self::cluster(
        CLUSTER,
        "{type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, load_assignment: null}",
    );
    assert_eq!(cluster.discovery, DiscoveryType::OriginalDst);
    assert!(matches!(
        cluster.load_balancing.policy,
        remora_config::load_balancing::LbPolicy::ClusterProvided
    ));
    assert!(cluster.load_assignment.endpoints.is_empty());
}

#[test]
fn dns_clusters_read_names_families_and_refresh_rates() {
    let cluster = self::cluster(
        CLUSTER,
        "{type: STRICT_DNS, dns_lookup_family: V6_ONLY, dns_refresh_rate: 60s, load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: localhost}}}}]}]}}",
    );
    assert_eq!(cluster.discovery, DiscoveryType::StrictDns);
    assert_eq!(cluster.dns_lookup_family, DnsLookupFamily::V6Only);
    assert_eq!(cluster.dns_refresh_rate, Duration::from_secs(60));
    let endpoint = &cluster.load_assignment.endpoints[0];
    assert_eq!(
        endpoint.address,
        EndpointAddress::Dns {
            host: "localhost".into(),
            port: 8080
        }
    );
    assert_eq!(
        endpoint.hostname, "localhost",
        "a DNS endpoint's name is its hostname"
    );
    for (family, expected) in [
        ("AUTO", DnsLookupFamily::Auto),
        ("V4_ONLY", DnsLookupFamily::V4Only),
        ("V4_PREFERRED", DnsLookupFamily::V4Preferred),
        ("ALL", DnsLookupFamily::All),
    ] {
        let cluster = self::cluster(
            CLUSTER,
            &format!("{{type: LOGICAL_DNS, dns_lookup_family: {family}}}"),
        );
        assert_eq!(cluster.dns_lookup_family, expected, "{family}");
        assert_eq!(cluster.discovery, DiscoveryType::LogicalDns);
    }
    assert_eq!(
        self::cluster(CLUSTER, "dns_refresh_rate: 0s").dns_refresh_rate,
        Duration::from_millis(1),
        "never a zero period"
    );
    assert_eq!(
        self::cluster(CLUSTER, "").dns_refresh_rate,
        Duration::from_secs(5)
    );
    // The family filters what a resolver answers, as Envoy does.
    let v4: std::net::SocketAddr = "127.0.0.1:80".parse().unwrap();
    let v6: std::net::SocketAddr = "[::1]:80".parse().unwrap();
    assert_eq!(DnsLookupFamily::Auto.select(vec![v4, v6]), [v6]);
    assert_eq!(DnsLookupFamily::Auto.select(vec![v4]), [v4]);
    assert_eq!(DnsLookupFamily::V4Preferred.select(vec![v6, v4]), [v4]);
    assert_eq!(DnsLookupFamily::V6Only.select(vec![v4]), []);
    assert_eq!(DnsLookupFamily::All.select(vec![v6, v4]), [v4, v6]);
}

#[test]
fn circuit_breakers_and_keepalive_are_refused_by_path() {
    check_rejections(
        CLUSTER,
        &[
            (
                "circuit_breakers: {per_host_thresholds: [{max_requests: 1}]}",
                "circuit_breakers.per_host_thresholds[0].max_requests",
                "only max_connections applies per host",
            ),
            (
                "circuit_breakers: {thresholds: [{retry_budget: {budget_percent: {value: 150}}}]}",
                "circuit_breakers.thresholds[0].retry_budget.budget_percent",
                "must be between 0 and 100",
            ),
            (
                "circuit_breakers: {thresholds: [{max_connection_pools: 1}]}",
                "circuit_breakers.thresholds[0].max_connection_pools",
                UNSUPPORTED,
            ),
            (
                "circuit_breakers: {thresholds: [{}, {priority: 5}]}",
                "circuit_breakers.thresholds[1].priority",
                "unknown value",
            ),
            (
                "upstream_connection_options: {tcp_keepalive: {keepalive_probes: 0}}",
                "upstream_connection_options.tcp_keepalive.keepalive_probes",
                "must be at least 1",
            ),
            (
                "upstream_connection_options: {tcp_keepalive: {keepalive_time: 0}}",
                "upstream_connection_options.tcp_keepalive.keepalive_time",
                "must be at least 1 second",
            ),
            (
                "upstream_connection_options: {tcp_keepalive: {keepalive_interval: 0}}",
                "upstream_connection_options.tcp_keepalive.keepalive_interval",
                "must be at least 1 second",
            ),
            (
                "upstream_connection_options: {set_local_interface_name_on_upstream_connections: true}",
                "upstream_connection_options.set_local_interface_name_on_upstream_connections",
                UNSUPPORTED,
            ),
        ],
    );
}

#[test]
fn circuit_breakers_and_keepalive_reach_the_model() {
    let cluster = self::cluster(CLUSTER, "");
    assert_eq!(cluster.thresholds, Thresholds::default());
    assert_eq!(
        (
            cluster.thresholds.max_connections,
            cluster.thresholds.max_retries
        ),
        (1024, 3),
        "Envoy's defaults"
    );
    assert_eq!(cluster.connect.tcp_keepalive, None);
    assert_eq!(cluster.connect.connect_timeout, Duration::from_millis(500));
    let cluster = self::cluster(
        CLUSTER,
        r#"
circuit_breakers:
  thresholds:
  - {max_connections: 1, max_pending_requests: 2, max_requests: 3, max_retries: 4}
  - {priority: HIGH, max_requests: 50}
upstream_connection_options: {tcp_keepalive: {keepalive_probes: 3, keepalive_interval: 7}}
"#,
    );
    assert_eq!(
        cluster.thresholds,
        Thresholds {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3,
            max_retries: 4,
            ..Thresholds::default()
        }
    );
    assert_eq!(
        cluster.thresholds_high,
        Thresholds {
            max_requests: 50,
            ..Thresholds::default()
        }
    );
    assert_eq!(
        cluster.connect.tcp_keepalive,
        Some(TcpKeepalive {
            probes: Some(3),
            time: None,
            interval: Some(Duration::from_secs(7)),
        }),
        "an unset value keeps the system's default"
    );
    assert_eq!(
        self::cluster(CLUSTER, "upstream_connection_options: {}")
            .connect
            .tcp_keepalive,
        None
    );
    assert_eq!(
        self::cluster(CLUSTER, "connect_timeout: null")
            .connect
            .connect_timeout,
        Duration::from_secs(5)
    );
}

#[test]
fn upstream_protocol_options_are_refused_by_path() {
    let explicit = format!("{HTTP_OPTIONS}.explicit_http_config");
    check_rejections(
        CLUSTER,
        &[
            (
                "http2_protocol_options: {max_concurrent_streams: 10}",
                "http2_protocol_options.max_concurrent_streams",
                "is not supported on clusters",
            ),
            (
                &http_options(
                    "explicit_http_config: {http2_protocol_options: {max_concurrent_streams: 10}}",
                ),
                &format!("{explicit}.http2_protocol_options.max_concurrent_streams"),
                "is not supported on clusters",
            ),
            (
                &http_options(
                    "explicit_http_config: {http2_protocol_options: {initial_stream_window_size: 10}}",
                ),
                &format!("{explicit}.http2_protocol_options.initial_stream_window_size"),
                "must be in 65535..",
            ),
            (
                &http_options(
                    "explicit_http_config: {http2_protocol_options: {allow_metadata: true}}",
                ),
                &format!("{explicit}.http2_protocol_options.allow_metadata"),
                UNSUPPORTED,
            ),
            (
                &http_options(
                    "explicit_http_config: {http_protocol_options: {allow_chunked_length: true}}",
                ),
                &format!("{explicit}.http_protocol_options.allow_chunked_length"),
                "applies to requests a listener receives, not to upstreams",
            ),
            (
                &http_options(
                    "explicit_http_config: {http_protocol_options: {send_fully_qualified_url: true}}",
                ),
                &format!("{explicit}.http_protocol_options.send_fully_qualified_url"),
                UNSUPPORTED,
            ),
            (
                &http_options("explicit_http_config: {}"),
                &explicit,
                "http_protocol_options or http2_protocol_options is required",
            ),
            (
                &http_options("use_downstream_protocol_config: {}"),
                &format!("{HTTP_OPTIONS}.use_downstream_protocol_config"),
                "is not supported (use explicit_http_config)",
            ),
            (
                &http_options("auto_config: {}"),
                &format!("{HTTP_OPTIONS}.auto_config"),
                "is not supported (use explicit_http_config)",
            ),
            (
                &http_options("upstream_http_protocol_options: {auto_sni: true}"),
                &format!("{HTTP_OPTIONS}.upstream_http_protocol_options"),
                UNSUPPORTED,
            ),
            (
                "typed_extension_protocol_options: {x: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}",
                "typed_extension_protocol_options[\"x\"]",
                "only envoy.extensions.upstreams.http.v3.HttpProtocolOptions is supported",
            ),
        ],
    );
}

#[test]
fn upstream_protocol_options_reach_the_model() {
    let cluster = self::cluster(CLUSTER, "");
    assert_eq!(cluster.protocol, UpstreamProtocol::Http1);
    assert_eq!(cluster.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(cluster.max_headers_count, 100);
    let cluster = self::cluster(
        CLUSTER,
        &http_options(
            "common_http_protocol_options: {idle_timeout: 2s, max_headers_count: 30}, explicit_http_config: {http2_protocol_options: {initial_stream_window_size: 200000, connection_keepalive: {interval: 0.2s, timeout: 5s}}}",
        ),
    );
    assert_eq!(cluster.protocol, UpstreamProtocol::Http2);
    assert_eq!(cluster.http2.initial_stream_window_size, Some(200_000));
    assert_eq!(
        cluster.http2.keepalive,
        Some(Http2Keepalive {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5)
        })
    );
    assert_eq!(cluster.idle_timeout, Some(Duration::from_secs(2)));
    assert_eq!(cluster.max_headers_count, 30);
    let cluster = self::cluster(
        CLUSTER,
        &http_options("explicit_http_config: {http_protocol_options: {}}"),
    );
    assert_eq!(cluster.protocol, UpstreamProtocol::Http1);
    let cluster = self::cluster(CLUSTER, "http2_protocol_options: {}");
    assert_eq!(
        cluster.protocol,
        UpstreamProtocol::Http2,
        "the deprecated field still says HTTP/2"
    );
    let cluster = self::cluster(
        CLUSTER,
        &http_options("common_http_protocol_options: {idle_timeout: 0s}"),
    );
    assert_eq!(cluster.idle_timeout, None);
}

#[test]
fn endpoint_fields_are_refused_by_path() {
    check_rejections(
        ENDPOINTS,
        &[
            ("named_endpoints: {a: {}}", "named_endpoints", UNSUPPORTED),
            (
                "policy: {drop_overloads: [{category: c}]}",
                "policy.drop_overloads",
                UNSUPPORTED,
            ),
            (
                "policy: {endpoint_stale_after: 1s}",
                "policy.endpoint_stale_after",
                UNSUPPORTED,
            ),
            (
                "policy: {weighted_priority_health: true}",
                "policy.weighted_priority_health",
                UNSUPPORTED,
            ),
            (
                "policy: {overprovisioning_factor: 0}",
                "policy.overprovisioning_factor",
                "must be ≥ 1",
            ),
            (
                "endpoints: [{priority: 129}]",
                "endpoints[0].priority",
                "must be ≤ 128",
            ),
            (
                "endpoints: [{load_balancing_weight: 0}]",
                "endpoints[0].load_balancing_weight",
                "must be ≥ 1",
            ),
            (
                "endpoints: [{metadata: {filter_metadata: {a: {}}}}]",
                "endpoints[0].metadata",
                UNSUPPORTED,
            ),
            (
                "endpoints: [{proximity: 1}]",
                "endpoints[0].proximity",
                UNSUPPORTED,
            ),
            (
                "endpoints: [{lb_endpoints: [{load_balancing_weight: 0}]}]",
                "endpoints[0].lb_endpoints[0].load_balancing_weight",
                "must be ≥ 1",
            ),
            (
                "endpoints: [{lb_endpoints: [{health_status: 9}]}]",
                "endpoints[0].lb_endpoints[0].health_status",
                "unknown value",
            ),
            (
                "endpoints: [{lb_endpoints: [{metadata: {filter_metadata: {a: {}}}}]}]",
                "endpoints[0].lb_endpoints[0].metadata",
                UNSUPPORTED,
            ),
            (
                "endpoints: [{lb_endpoints!: [{endpoint_name: e}]}]",
                "endpoints[0].lb_endpoints[0].endpoint_name",
                "named endpoints are not supported",
            ),
            (
                "endpoints: [{lb_endpoints!: [{}]}]",
                "endpoints[0].lb_endpoints[0].endpoint",
                "endpoint is required",
            ),
            (
                "endpoints: [{lb_endpoints!: [{endpoint: {}}]}]",
                "endpoints[0].lb_endpoints[0].endpoint.address",
                "address is required",
            ),
            (
                "endpoints: [{lb_endpoints: [{endpoint: {health_check_config: {port_value: 70000}}}]}]",
                "endpoints[0].lb_endpoints[0].endpoint.health_check_config.port_value",
                "must be ≤ 65535",
            ),
            (
                "endpoints: [{lb_endpoints: [{endpoint: {additional_addresses: [{}]}}]}]",
                "endpoints[0].lb_endpoints[0].endpoint.additional_addresses",
                UNSUPPORTED,
            ),
            (
                "endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {port_value: 65536}}}}]}]",
                "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value",
                "must be ≤ 65535",
            ),
        ],
    );
}

#[test]
fn localities_priorities_weights_and_health_reach_the_model() {
    let cluster = self::cluster(CLUSTER, "");
    assert_eq!(
        cluster.load_assignment.overprovisioning,
        DEFAULT_OVERPROVISIONING
    );
    let endpoint = &cluster.load_assignment.endpoints[0];
    assert_eq!((endpoint.weight, endpoint.priority), (1, 0));
    assert_eq!(endpoint.health, HealthStatus::Unknown);
    assert_eq!(*endpoint.locality, Locality::default());
    assert_eq!(endpoint.locality_weight, None);
    assert_eq!(endpoint.hostname, "");

    let cluster = self::cluster(
        ENDPOINTS,
        r#"
policy: {overprovisioning_factor: 200}
endpoints!:
- locality: {region: eu, zone: eu-1, sub_zone: rack-a}
  load_balancing_weight: 3
  lb_endpoints:
  - endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}, hostname: one.example}
    load_balancing_weight: 5
    health_status: HEALTHY
  - endpoint: {address: {socket_address: {address: 10.0.0.2, port_value: 80}}}
    health_status: DEGRADED
- priority: 1
  lb_endpoints:
  - endpoint: {address: {socket_address: {address: "::1", port_value: 81}}}
    health_status: DRAINING
  - endpoint: {address: {socket_address: {address: 10.0.0.4, port_value: 81}}}
    health_status: UNHEALTHY
  - endpoint: {address: {socket_address: {address: 10.0.0.5, port_value: 81}}}
    health_status: TIMEOUT
"#,
    );
    let assignment = &cluster.load_assignment;
    assert_eq!(assignment.overprovisioning, 200);
    let seen: Vec<(String, u32, HealthStatus, u32, Option<u32>)> = assignment
        .endpoints
        .iter()
        .map(|e| {
            let EndpointAddress::Ip(addr) = e.address else {
                panic!("IP endpoints")
            };
            (
                addr.to_string(),
                e.weight,
                e.health,
                e.priority,
                e.locality_weight,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("10.0.0.1:80".into(), 5, HealthStatus::Healthy, 0, Some(3)),
            ("10.0.0.2:80".into(), 1, HealthStatus::Degraded, 0, Some(3)),
            ("[::1]:81".into(), 1, HealthStatus::Draining, 1, None),
            ("10.0.0.4:81".into(), 1, HealthStatus::Unhealthy, 1, None),
            ("10.0.0.5:81".into(), 1, HealthStatus::Timeout, 1, None),
        ]
    );
    assert_eq!(
        *assignment.endpoints[0].locality,
        Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            sub_zone: "rack-a".into()
        }
    );
    assert!(Arc::ptr_eq(
        &assignment.endpoints[0].locality,
        &assignment.endpoints[1].locality
    ));
    assert_eq!(assignment.endpoints[0].hostname, "one.example");
    assert_eq!(HealthStatus::Degraded.name(), "DEGRADED");
}

/// A pipe as a STATIC cluster's only endpoint (Istio's clusters to its agent) is read as the
/// cluster's pipe, with no hosts; with other endpoints, on another kind of cluster, or as a
/// route's target, refused.
#[test]
fn a_pipe_is_taken_as_a_static_clusters_only_endpoint() {
    const PIPE: &str =
        "{lb_endpoints: [{endpoint: {address: {pipe: {path: ./etc/istio/proxy/XDS}}}}]}";
    let agent = format!(
        "static_resources: {{clusters: [{{}}, {{name: agent, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: agent, endpoints: [{PIPE}]}}}}]}}"
    );
    let bootstrap = accepted_all(&[(ROOT, &agent)]);
    let cluster = &bootstrap.clusters[1];
    assert_eq!(
        cluster.pipe.as_deref(),
        Some(std::path::Path::new("./etc/istio/proxy/XDS"))
    );
    assert!(cluster.load_assignment.endpoints.is_empty());
    check_rejections_given(
        &[(ROOT, &agent)],
        "static_resources.clusters[1]",
        &[
            (
                &format!(
                    "load_assignment!: {{cluster_name: agent, endpoints: [{PIPE}, {{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}}}]}}]}}"
                ),
                "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe",
                "a pipe must be the only endpoint of a STATIC cluster",
            ),
            (
                "type: STRICT_DNS",
                "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe",
                "a pipe must be the only endpoint of a STATIC cluster",
            ),
        ],
    );
    check_rejections(
        CLUSTER,
        &[(
            &format!("load_assignment!: {{cluster_name: echo, endpoints: [{PIPE}]}}"),
            "/static_resources.listeners[0]",
            "route: cluster \"echo\" is a pipe",
        )],
    );
}
