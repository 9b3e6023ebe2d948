//! Golden files for generated sidecar config: one mesh (three namespaces, HTTP, gRPC, TCP and
//! headless services, ready and terminating endpoints in two zones, pods with app ports,
//! traffic policies) and, for a few sidecars and settings, every resource the sidecar gets,
//! in Envoy's YAML, compared with `tests/golden/mesh/*.yaml`. `REMORA_UPDATE_GOLDEN=1`
//! rewrites them. The tests crate feeds the same files to `envoy --mode validate` and
//! `remora-proxy --mode validate` (`tests/tests/mesh_config_validates.rs`).
//!
//! Also checks the generator's incremental behaviour: what an endpoint change touches.

use std::path::PathBuf;
use std::sync::Arc;

use remora_control_plane::mesh::generate::Generator;
use remora_control_plane::mesh::model::{
    EndpointAddress, EndpointHealth, EndpointSet, NamespaceSettings, ObjectKey, PolicyObject,
    Protocol, Service, ServicePort, Source, TargetPort, Workload,
};
use remora_control_plane::mesh::sidecar::Sidecar;
use remora_control_plane::mesh::translate::{MeshSettings, OutboundLayout};
use remora_control_plane::resource::{Kind, stored_to_json};
use serde_json::json;

const K8S: Source = Source::Kubernetes;

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

fn port(name: &str, number: u16, protocol: Protocol, target: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        port: number,
        protocol,
        target_port: Some(TargetPort::Number(target)),
    }
}

fn labels(app: &str) -> std::collections::BTreeMap<String, String> {
    [("app".to_string(), app.to_string())].into()
}

fn endpoint(ip: &str, zone: &str, health: EndpointHealth, pod: Option<&str>) -> EndpointAddress {
    EndpointAddress {
        address: ip.parse().unwrap(),
        zone: Some(zone.into()),
        health,
        workload: pod.map(|pod| key("shop", pod)),
    }
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> PolicyObject {
    PolicyObject {
        key: key(namespace, name),
        generation: 1,
        spec: serde_json::from_value(spec).expect("a valid policy spec"),
    }
}

/// The mesh every golden file is generated from.
fn mesh(settings: MeshSettings, with_policies: bool) -> Generator {
    let mut generator = Generator::new(settings);
    generator.set_namespace(K8S, "shop", Some(NamespaceSettings::default()));
    generator.set_namespace(
        K8S,
        "web",
        Some(NamespaceSettings::from_reach_annotation(Some("shop"))),
    );
    generator.set_namespace(
        K8S,
        "ops",
        Some(NamespaceSettings::from_reach_annotation(Some("ops"))),
    );
    let services = [
        (
            key("shop", "b"),
            Some("198.19.0.10"),
            vec![
                port("http", 80, Protocol::Http, 8080),
                port("grpc", 9090, Protocol::Http2, 9091),
            ],
        ),
        (
            key("shop", "b-canary"),
            Some("198.19.0.12"),
            vec![port("http", 80, Protocol::Http, 8080)],
        ),
        (
            key("shop", "db"),
            Some("198.19.0.11"),
            vec![port("postgres", 5432, Protocol::Tcp, 5432)],
        ),
        (
            key("shop", "h"),
            None,
            vec![port("http", 80, Protocol::Http, 8080)],
        ),
        (
            key("web", "a"),
            Some("198.19.0.20"),
            vec![port("http", 80, Protocol::Http, 8080)],
        ),
        (
            key("ops", "tools"),
            Some("198.19.0.30"),
            vec![port("http", 80, Protocol::Http, 8080)],
        ),
    ];
    for (service_key, vip, ports) in services {
        generator.set_service(
            K8S,
            service_key.clone(),
            Some(Service {
                selector: Some(labels(&service_key.name)),
                key: service_key,
                vip: vip.map(|ip| ip.parse().unwrap()),
                ports,
            }),
        );
    }
    generator.set_endpoints(
        K8S,
        key("shop", "b"),
        "b-x1",
        Some(EndpointSet {
            service: key("shop", "b"),
            ports: [("http".to_string(), 8080), ("grpc".to_string(), 9091)].into(),
            endpoints: vec![
                endpoint("198.18.1.1", "z1", EndpointHealth::Healthy, Some("b-1")),
                endpoint("198.18.1.2", "z2", EndpointHealth::Draining, Some("b-2")),
            ],
        }),
    );
    generator.set_endpoints(
        K8S,
        key("shop", "b"),
        "b-x2",
        Some(EndpointSet {
            service: key("shop", "b"),
            ports: [("http".to_string(), 8080), ("grpc".to_string(), 9091)].into(),
            endpoints: vec![endpoint(
                "198.18.1.3",
                "z1",
                EndpointHealth::Healthy,
                Some("b-3"),
            )],
        }),
    );
    generator.set_endpoints(
        K8S,
        key("shop", "b-canary"),
        "b-canary-x1",
        Some(EndpointSet {
            service: key("shop", "b-canary"),
            ports: [("http".to_string(), 8080)].into(),
            endpoints: vec![endpoint("198.18.1.9", "z1", EndpointHealth::Healthy, None)],
        }),
    );
    generator.set_endpoints(
        K8S,
        key("shop", "db"),
        "db-x1",
        Some(EndpointSet {
            service: key("shop", "db"),
            ports: [("postgres".to_string(), 5432)].into(),
            endpoints: vec![endpoint(
                "198.18.1.5",
                "z1",
                EndpointHealth::Healthy,
                Some("db-0"),
            )],
        }),
    );
    generator.set_workload(
        K8S,
        key("shop", "b-1"),
        Some(Workload {
            key: key("shop", "b-1"),
            ip: Some("198.18.1.1".parse().unwrap()),
            service_account: "b".into(),
            labels: labels("b"),
            ports: vec![("http".into(), 8080), ("metrics".into(), 9100)],
        }),
    );
    generator.set_workload(
        K8S,
        key("web", "a-1"),
        Some(Workload {
            key: key("web", "a-1"),
            ip: Some("198.18.2.1".parse().unwrap()),
            service_account: "a".into(),
            labels: labels("a"),
            ports: vec![("http".into(), 8080)],
        }),
    );
    if with_policies {
        generator.set_policy(
            K8S,
            key("shop", "b-http"),
            Some(policy(
                "shop",
                "b-http",
                json!({
                    "service": "b",
                    "port": 80,
                    "connectTimeout": "1s",
                    "timeout": "3s",
                    "loadBalancer": {"algorithm": "RingHash", "hashKey": {"header": "x-user"}},
                    "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": ["connect-failure", "reset", "gateway-error"], "budget": {"percent": 25.0, "minConcurrency": 2}},
                    "circuitBreaker": {"maxConnections": 100, "maxPendingRequests": 50},
                    "outlierDetection": {"consecutive5xx": 3, "interval": "2s", "baseEjectionTime": "15s", "maxEjectionPercent": 34},
                    "tracing": {"samplingPercent": 10.0},
                    "routes": [
                        {"prefix": "/slow", "timeout": "30s"},
                        {"prefix": "/v2", "split": [{"service": "b-canary", "weight": 20}, {"service": "gone", "weight": 5}]}
                    ]
                }),
            )),
        );
        generator.set_policy(
            K8S,
            key("shop", "b-wide"),
            Some(policy(
                "shop",
                "b-wide",
                json!({"service": "b", "mtls": {"mode": "Permissive"}, "loadBalancer": {"algorithm": "LeastRequest"}}),
            )),
        );
        generator.set_policy(
            K8S,
            key("shop", "db"),
            Some(policy(
                "shop",
                "db",
                json!({"service": "db", "mtls": {"mode": "Strict"}, "exportTo": ["."]}),
            )),
        );
    }
    generator.rebuild(1);
    generator
}

fn sidecar(namespace: &str, pod: &str) -> Sidecar {
    Sidecar {
        node_id: format!("{pod}.{namespace}"),
        group: String::new(),
        workload: key(namespace, pod),
        inbound_port: Some(15006),
        outbound_port: Some(15001),
        service_account: None,
    }
}

/// Every resource the sidecar gets, as multi-document YAML in push order.
fn render(generator: &mut Generator, sidecar: &Sidecar) -> String {
    let parts = generator.sidecar_parts(sidecar);
    let maps = [
        (Kind::Cluster, parts.clusters.map.clone()),
        (Kind::Endpoint, parts.endpoints.map.clone()),
        (Kind::Listener, parts.listeners.clone()),
        (Kind::Route, parts.routes.map.clone()),
    ];
    let mut out = String::new();
    for (kind, map) in maps {
        for resource in map.values() {
            // Endpoints the sidecar has no cluster for are not asked for (EDS is by name).
            if kind == Kind::Endpoint && !parts.clusters.map.contains_key(&resource.name) {
                continue;
            }
            let value = stored_to_json(kind, &resource.body.value).expect("decodes");
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&value).expect("yaml"));
        }
    }
    out
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mesh")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(format!("{name}.yaml"));
    if std::env::var("REMORA_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).expect("golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (REMORA_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the generated config at line {}:\n  golden:    {:?}\n  generated: {:?}\n(REMORA_UPDATE_GOLDEN=1 rewrites it)",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

#[test]
fn a_caller_in_a_narrowed_namespace_gets_its_reach_only() {
    let mut generator = mesh(MeshSettings::default(), false);
    let config = render(&mut generator, &sidecar("web", "a-1"));
    check("web-a-1.default", &config);
    // web reaches shop and itself, not ops; headless h has a cluster but no chain.
    assert!(config.contains("b.shop.svc.cluster.local:80"));
    assert!(config.contains("a.web.svc.cluster.local:80"));
    assert!(!config.contains("tools.ops"));
    assert!(config.contains("name: h.shop.svc.cluster.local:80"));
    assert!(!config.contains("198.19.0.30"));
}

#[test]
fn a_server_sidecar_gets_inbound_chains_for_its_app_ports() {
    let mut generator = mesh(MeshSettings::default(), false);
    let config = render(&mut generator, &sidecar("shop", "b-1"));
    check("shop-b-1.default", &config);
    // 8080 from the endpoints (HTTP), 9091 (HTTP/2), 9100 from the container ports (TCP).
    for port in ["inbound:8080", "inbound:9091:h2", "inbound:9100"] {
        assert!(config.contains(port), "{port} missing");
    }
    // Same-namespace callers also use the short name.
    assert!(config.contains("- b:80"));
}

#[test]
fn policies_become_cluster_route_and_listener_fields() {
    let mut generator = mesh(MeshSettings::default(), true);
    let config = render(&mut generator, &sidecar("shop", "b-1"));
    check("shop-b-1.policies", &config);
    for needle in [
        "lb_policy: RING_HASH",
        "lb_policy: LEAST_REQUEST",
        "header_name: x-user",
        "retry_on: connect-failure,reset,gateway-error",
        "retry_on: connect-failure",
        "budget_percent",
        "consecutive_5xx: 3",
        "random_sampling",
        "remora-workload-cert",
        "require_client_certificate: true",
        "envoy.filters.listener.tls_inspector",
        "b-canary.shop.svc.cluster.local:80",
        "timeout: 30s",
    ] {
        assert!(config.contains(needle), "{needle:?} missing");
    }
    // db is exported to its own namespace only.
    let web = render(&mut generator, &sidecar("web", "a-1"));
    check("web-a-1.policies", &web);
    assert!(!web.contains("db.shop"));
    let states = generator.policy_states();
    assert_eq!(states[&key("shop", "b-http")].rejected, None);
    // The Remora proxy's own conversion has nothing to reject: it takes the mTLS cluster's SDS
    // secrets and SAN matchers (it refused them before SDS support, which this test showed).
    assert_eq!(
        states[&key("shop", "b-http")].remora_rejects,
        Vec::<String>::new()
    );
    assert!(
        states[&key("shop", "b-http")].warnings[0].contains("gone"),
        "{:?}",
        states[&key("shop", "b-http")]
    );
}

#[test]
fn mesh_defaults_add_retries_outlier_detection_and_lifted_limits_unless_turned_off() {
    let mut generator = mesh(MeshSettings::default(), false);
    let config = render(&mut generator, &sidecar("web", "a-1"));
    let bare_settings = MeshSettings {
        mesh_defaults: false,
        ..MeshSettings::default()
    };
    let mut bare_generator = mesh(bare_settings, false);
    let bare = render(&mut bare_generator, &sidecar("web", "a-1"));
    check("web-a-1.bare", &bare);
    for needle in [
        "retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "retry_on: connect-failure,refused-stream",
        "^(GET|HEAD|OPTIONS|PUT|DELETE|TRACE)$",
        "consecutive_gateway_failure: 5",
        "max_requests: 4294967295",
    ] {
        assert!(config.contains(needle), "{needle:?} missing");
        assert!(!bare.contains(needle), "{needle:?} without the defaults");
    }
}

/// The defaults are on by default, so every resource they shape must be one a Remora proxy
/// takes (its own config gate), not only Envoy.
#[test]
fn mesh_defaults_pass_the_remora_proxys_config_gate() {
    let mut generator = mesh(MeshSettings::default(), false);
    let parts = generator.sidecar_parts(&sidecar("web", "a-1"));
    let maps = [
        (Kind::Cluster, parts.clusters.map.clone()),
        (Kind::Endpoint, parts.endpoints.map.clone()),
        (Kind::Listener, parts.listeners.clone()),
        (Kind::Route, parts.routes.map.clone()),
    ];
    let mut checked = 0;
    for (kind, map) in maps {
        for resource in map.values() {
            if let Err(error) =
                remora_config::resource::check(kind.type_url(), &resource.body.value)
            {
                panic!("{kind:?} {}: {error}", resource.name);
            }
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} resources generated");
}

#[test]
fn the_port_listener_layout_gives_each_service_port_a_listener() {
    let settings = MeshSettings {
        outbound_layout: OutboundLayout::PortListeners,
        ..MeshSettings::default()
    };
    let mut generator = mesh(settings, false);
    let config = render(&mut generator, &sidecar("web", "a-1"));
    check("web-a-1.port-listeners", &config);
    assert!(config.contains("bind_to_port: false"));
}

#[test]
fn an_endpoint_change_touches_one_assignment_and_no_view() {
    let mut generator = mesh(MeshSettings::default(), false);
    let a = sidecar("web", "a-1");
    let before = generator.sidecar_parts(&a);
    generator.set_endpoints(
        K8S,
        key("shop", "db"),
        "db-x1",
        Some(EndpointSet {
            service: key("shop", "db"),
            ports: [("postgres".to_string(), 5432)].into(),
            endpoints: vec![endpoint("198.18.1.6", "z1", EndpointHealth::Healthy, None)],
        }),
    );
    let rebuilt = generator.rebuild(2);
    assert!(rebuilt.endpoints_changed);
    assert!(rebuilt.views_changed.is_empty(), "{rebuilt:?}");
    let after = generator.sidecar_parts(&a);
    assert!(Arc::ptr_eq(&before.clusters.map, &after.clusters.map));
    assert!(
        Arc::ptr_eq(&before.listeners, &after.listeners) || before.listeners == after.listeners
    );
    let change = after.endpoints.change.expect("a recorded change");
    assert!(Arc::ptr_eq(&change.from, &before.endpoints.map));
    assert_eq!(change.names, ["db.shop.svc.cluster.local:5432"]);
    // The same endpoints again change nothing.
    generator.set_endpoints(
        K8S,
        key("shop", "db"),
        "db-x1",
        Some(EndpointSet {
            service: key("shop", "db"),
            ports: [("postgres".to_string(), 5432)].into(),
            endpoints: vec![endpoint("198.18.1.6", "z1", EndpointHealth::Healthy, None)],
        }),
    );
    assert!(!generator.is_dirty());
}

#[test]
fn removing_a_service_removes_its_resources_and_a_policy_names_what_is_wrong() {
    let mut generator = mesh(MeshSettings::default(), false);
    generator.set_service(K8S, key("shop", "db"), None);
    generator.set_policy(
        K8S,
        key("shop", "lost"),
        Some(policy(
            "shop",
            "lost",
            json!({"service": "nothing", "timeout": "1s"}),
        )),
    );
    generator.set_policy(
        K8S,
        key("shop", "bad-port"),
        Some(policy(
            "shop",
            "bad-port",
            json!({"service": "b", "port": 81}),
        )),
    );
    generator.set_policy(
        K8S,
        key("shop", "b-a"),
        Some(policy(
            "shop",
            "b-a",
            json!({"service": "b", "timeout": "1s"}),
        )),
    );
    generator.set_policy(
        K8S,
        key("shop", "b-b"),
        Some(policy(
            "shop",
            "b-b",
            json!({"service": "b", "timeout": "2s"}),
        )),
    );
    let rebuilt = generator.rebuild(2);
    assert!(rebuilt.endpoints_changed);
    let config = render(&mut generator, &sidecar("shop", "b-1"));
    assert!(!config.contains("db.shop"));
    assert!(config.contains("timeout: 1s"));
    let states = generator.policy_states();
    let reason = |name: &str| states[&key("shop", name)].rejected.clone().map(|r| r.0);
    assert_eq!(reason("lost").as_deref(), Some("ServiceNotFound"));
    assert_eq!(reason("bad-port").as_deref(), Some("Invalid"));
    assert_eq!(reason("b-a"), None);
    // A timeout is something the Remora proxy takes.
    assert_eq!(
        states[&key("shop", "b-a")].remora_rejects,
        Vec::<String>::new()
    );
    assert_eq!(reason("b-b").as_deref(), Some("Conflicted"));
}

#[test]
fn a_pod_gets_its_inbound_chains_from_service_selectors_before_any_endpoint() {
    let mut generator = mesh(MeshSettings::default(), false);
    generator.set_workload(
        K8S,
        key("shop", "b-4"),
        Some(Workload {
            key: key("shop", "b-4"),
            ip: None,
            service_account: "b".into(),
            labels: labels("b"),
            ports: Vec::new(),
        }),
    );
    generator.rebuild(2);
    let config = render(&mut generator, &sidecar("shop", "b-4"));
    // Both of b's target ports, from the selector alone.
    assert!(config.contains("name: inbound:8080"), "{config}");
    assert!(config.contains("name: inbound:9091:h2"), "{config}");
}

#[test]
fn a_policy_that_narrows_export_takes_the_service_out_of_other_views() {
    let mut generator = mesh(MeshSettings::default(), false);
    let web = sidecar("web", "a-1");
    assert!(render(&mut generator, &web).contains("b.shop.svc.cluster.local:80"));
    generator.set_policy(
        K8S,
        key("shop", "b-private"),
        Some(policy(
            "shop",
            "b-private",
            json!({"service": "b", "exportTo": ["."]}),
        )),
    );
    let rebuilt = generator.rebuild(2);
    assert!(rebuilt.views_changed.contains("web"), "{rebuilt:?}");
    let after = render(&mut generator, &web);
    let leftover: Vec<&str> = after
        .lines()
        .filter(|line| line.contains(" b.shop.svc.cluster.local") || line.contains("- b.shop"))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
    assert!(
        render(&mut generator, &sidecar("shop", "b-1")).contains("b.shop.svc.cluster.local:80")
    );
}

/// The SAN matchers of the mTLS cluster `name` as the sidecar gets it: (kind, value) pairs.
fn san_matchers(generator: &mut Generator, sidecar: &Sidecar, name: &str) -> Vec<(String, String)> {
    let parts = generator.sidecar_parts(sidecar);
    let cluster =
        stored_to_json(Kind::Cluster, &parts.clusters.map[name].body.value).expect("decodes");
    let context = &cluster["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(
        context["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
        "remora-trust-bundle"
    );
    context["combined_validation_context"]["default_validation_context"]
        ["match_typed_subject_alt_names"]
        .as_array()
        .expect("matchers")
        .iter()
        .map(|matcher| {
            assert_eq!(matcher["san_type"], "URI");
            let (kind, value) = matcher["matcher"]
                .as_object()
                .and_then(|object| object.iter().next())
                .expect("one pattern");
            (kind.clone(), value.as_str().unwrap_or_default().to_string())
        })
        .collect()
}

fn pod(name: &str, service_account: &str) -> Option<Workload> {
    Some(Workload {
        key: key("shop", name),
        ip: None,
        service_account: service_account.into(),
        labels: labels("b"),
        ports: Vec::new(),
    })
}

#[test]
fn an_mtls_cluster_accepts_exactly_the_service_accounts_behind_it() {
    let mut generator = mesh(MeshSettings::default(), true);
    let caller = sidecar("web", "a-1");
    let cluster = "b.shop.svc.cluster.local:80";
    // b-2 and b-3 are not known yet: any identity of the trust domain.
    assert_eq!(
        san_matchers(&mut generator, &caller, cluster),
        [("prefix".to_string(), "spiffe://cluster.local/".to_string())]
    );
    generator.set_workload(K8S, key("shop", "b-2"), pod("b-2", "b"));
    generator.set_workload(K8S, key("shop", "b-3"), pod("b-3", "b-batch"));
    let rebuilt = generator.rebuild(2);
    assert!(rebuilt.views_changed.contains("web"), "{rebuilt:?}");
    assert_eq!(
        san_matchers(&mut generator, &caller, cluster),
        [
            (
                "exact".to_string(),
                "spiffe://cluster.local/ns/shop/sa/b".to_string()
            ),
            (
                "exact".to_string(),
                "spiffe://cluster.local/ns/shop/sa/b-batch".to_string()
            ),
        ]
    );
    // A pod's service account changes: so does the matcher.
    generator.set_workload(K8S, key("shop", "b-3"), pod("b-3", "b"));
    generator.rebuild(3);
    assert_eq!(
        san_matchers(&mut generator, &caller, cluster),
        [(
            "exact".to_string(),
            "spiffe://cluster.local/ns/shop/sa/b".to_string()
        )]
    );
    // A pod that changes nothing about who answers rebuilds no view.
    generator.set_workload(K8S, key("shop", "b-3"), pod("b-3", "b"));
    let rebuilt = generator.rebuild(4);
    assert!(!rebuilt.views_changed.contains("web"), "{rebuilt:?}");
    // One endpoint's pod gone from the mesh: back to the trust domain.
    generator.set_workload(K8S, key("shop", "b-2"), None);
    generator.rebuild(5);
    assert_eq!(
        san_matchers(&mut generator, &caller, cluster),
        [("prefix".to_string(), "spiffe://cluster.local/".to_string())]
    );

    let settings = MeshSettings {
        trust_domain: "example.org".into(),
        ..MeshSettings::default()
    };
    let mut generator = mesh(settings, true);
    generator.set_workload(K8S, key("shop", "b-2"), pod("b-2", "b"));
    generator.set_workload(K8S, key("shop", "b-3"), pod("b-3", "b"));
    generator.rebuild(2);
    assert_eq!(
        san_matchers(&mut generator, &caller, cluster),
        [(
            "exact".to_string(),
            "spiffe://example.org/ns/shop/sa/b".to_string()
        )]
    );
}
