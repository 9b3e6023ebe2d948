//! The ADS client end to end: remora-proxy (and, as a reference, real Envoy) against an in-test
//! ADS server: SotW and delta, ACK/NACK with field paths, warming, initial_fetch_timeout,
//! reconnects, listener updates and removals that drain, and config churn under load.

#[path = "common/ads.rs"]
mod ads;
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ads::AdsServer;
use common::{HeldUpstream, Proxy, echo_json, loopback};
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, http_get, wait_for};
use xds_api::type_urls::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION};

fn ads_bootstrap(
    admin: SocketAddr,
    ads: SocketAddr,
    api_type: &str,
    fetch_timeout: &str,
) -> String {
    format!(
        r#"node: {{id: test-node, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
  lds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}}}}}}}]}}]
"#,
        admin_port = admin.port(),
        ads_port = ads.port(),
    )
}

fn eds_cluster(name: &str, fetch_timeout: &str) -> prost_types::Any {
    ads::cluster(&format!(
        "name: {name}\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}}}\n"
    ))
}

fn endpoints_for(name: &str, addrs: &[SocketAddr]) -> prost_types::Any {
    let lb: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    ads::endpoints(&format!(
        "cluster_name: {name}\nendpoints: [{{lb_endpoints: [{}]}}]\n",
        lb.join(", ")
    ))
}

fn rds_listener(name: &str, port: u16, stat_prefix: &str, route_name: &str) -> prost_types::Any {
    ads::listener(&format!(
        r#"name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {stat_prefix}
      rds: {{route_config_name: {route_name}, config_source: {{ads: {{}}, resource_api_version: V3}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    ))
}

fn route_config(name: &str, cluster: &str, prefix_rewrite: Option<&str>) -> prost_types::Any {
    let rewrite = prefix_rewrite
        .map(|p| format!(", prefix_rewrite: \"{p}\""))
        .unwrap_or_default();
    ads::routes(&format!(
        "name: {name}\nvirtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n  - match: {{prefix: \"/\"}}\n    route: {{cluster: {cluster}{rewrite}}}\n"
    ))
}

/// Which proxy binary a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Under {
    Remora,
    Envoy,
}

struct Running {
    _remora: Option<Proxy>,
    _envoy: Option<envoy::Envoy>,
    _dir: tempfile::TempDir,
    admin: SocketAddr,
}

impl Running {
    /// What the proxy has logged so far.
    fn log(&self) -> String {
        match (&self._remora, &self._envoy) {
            (Some(remora), _) => remora.process.log(),
            (None, Some(envoy)) => envoy.process.log(),
            (None, None) => String::new(),
        }
    }
}

fn start(under: Under, yaml: &str, admin: SocketAddr, wait_ready: bool) -> Running {
    let (dir, path) = common::write_config(yaml);
    match under {
        Under::Remora => {
            if wait_ready {
                Running {
                    _remora: Some(Proxy::start_file(&path, admin, &[])),
                    _envoy: None,
                    _dir: dir,
                    admin,
                }
            } else {
                let mut command = Command::new(remora_tests::workspace_binary("remora-proxy"));
                command.arg("-c").arg(&path).args([
                    "--concurrency",
                    "2",
                    "--log-level",
                    "debug",
                    "--drain-time-s",
                    "5",
                ]);
                let process = remora_tests::process::ChildGuard::spawn("remora-proxy", command);
                wait_for("admin", Duration::from_secs(10), || {
                    http_get(admin, "/server_info").ok().map(|_| ())
                });
                Running {
                    _remora: Some(Proxy {
                        process,
                        admin,
                        config: path,
                        _dir: tempfile::tempdir().expect("dir"),
                    }),
                    _envoy: None,
                    _dir: dir,
                    admin,
                }
            }
        }
        Under::Envoy => Running {
            _remora: None,
            _envoy: Some(envoy::Envoy::start(&path, admin, &[])),
            _dir: dir,
            admin,
        },
    }
}

/// A proxy on ADS with the usual config: EDS cluster `svc` with one endpoint, behind listener
/// `ingress` on `port` (HCM stats under `stat_prefix`), whose routes (RDS `routes`) send
/// everything to `svc`.
struct SvcMesh {
    ads: AdsServer,
    port: u16,
    admin: SocketAddr,
    proxy: Running,
}

fn start_svc(under: Under, api_type: &str, endpoint: SocketAddr, stat_prefix: &str) -> SvcMesh {
    start_svc_with(under, api_type, endpoint, stat_prefix, |yaml| yaml)
}

/// [`start_svc`] with the bootstrap changed by `edit` first.
fn start_svc_with(
    under: Under,
    api_type: &str,
    endpoint: SocketAddr,
    stat_prefix: &str,
    edit: impl FnOnce(String) -> String,
) -> SvcMesh {
    let ads = AdsServer::start();
    let port = free_port();
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s")]);
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[endpoint])],
    );
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, stat_prefix, "routes")],
    );
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", None)],
    );
    let admin = loopback(free_port());
    let proxy = start(
        under,
        &edit(ads_bootstrap(admin, ads.addr, api_type, "5s")),
        admin,
        true,
    );
    SvcMesh {
        ads,
        port,
        admin,
        proxy,
    }
}

/// [`start_svc`] with `upstream` (the echo server named `name`) as the endpoint, once traffic
/// through the listener reaches it.
fn start_svc_serving(under: Under, api_type: &str, upstream: &EchoServer, name: &str) -> SvcMesh {
    let mesh = start_svc(under, api_type, upstream.addr, "ingress");
    let addr = loopback(mesh.port);
    wait_for(
        &format!("traffic to {name}"),
        Duration::from_secs(20),
        || get_upstream(addr, "/x").filter(|(u, _)| u == name),
    );
    mesh
}

fn get_upstream(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    let (status, _, body) = http_get(addr, path).ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((
        json["upstream"].as_str()?.to_string(),
        json["path"].as_str()?.to_string(),
    ))
}

fn acked(ads: &AdsServer, type_url: &str) -> bool {
    let version = ads.version();
    ads.requests().iter().any(|r| {
        r.type_url == type_url
            && r.error.is_none()
            && !r.nonce.is_empty()
            && (r.version_info == version || r.version_info.is_empty())
    })
}

/// The basic scenario: initial config, then an EDS change, then an RDS change.
fn basic_flow(under: Under, api_type: &str) {
    if under == Under::Envoy && !envoy::available_or_skip("basic_flow under envoy") {
        return;
    }
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let SvcMesh {
        ads,
        port,
        admin,
        proxy: _proxy,
    } = start_svc_serving(under, api_type, &a, "a");
    let addr = loopback(port);

    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[b.addr])],
    );
    wait_for("endpoint change to b", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "b")
    });

    // A host an update keeps keeps its stats, as in Envoy: `rq_total` goes on counting.
    for _ in 0..5 {
        assert_eq!(get_upstream(addr, "/x").map(|(u, _)| u), Some("b".into()));
    }
    let served_by_b = host_stat(admin, "svc", b.addr, "rq_total");
    assert!(served_by_b >= 6, "{served_by_b}");
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[b.addr, a.addr])],
    );
    wait_for("a back beside b", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "a")
    });
    assert!(host_stat(admin, "svc", b.addr, "rq_total") >= served_by_b);

    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", Some("/rewritten/"))],
    );
    wait_for("route change", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(_, p)| p == "/rewritten/x")
    });

    for type_url in [
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        LISTENER,
        ROUTE_CONFIGURATION,
    ] {
        wait_for(
            &format!("ACK of {type_url}"),
            Duration::from_secs(10),
            || acked(&ads, type_url).then_some(()),
        );
    }
    assert!(
        ads.requests().iter().all(|r| r.error.is_none()),
        "no NACKs expected: {:?}",
        ads.requests()
    );
    assert!(ads.requests().iter().all(|r| r.node_id == "test-node"));
}

#[test]
fn sotw_ads_end_to_end() {
    basic_flow(Under::Remora, "GRPC");
}

#[test]
fn delta_ads_end_to_end() {
    basic_flow(Under::Remora, "DELTA_GRPC");
}

#[test]
fn sotw_ads_reference_envoy() {
    basic_flow(Under::Envoy, "GRPC");
}

#[test]
fn delta_ads_reference_envoy() {
    basic_flow(Under::Envoy, "DELTA_GRPC");
}

#[test]
fn nack_names_resource_and_field_and_proxy_keeps_serving() {
    for api_type in ["GRPC", "DELTA_GRPC"] {
        let a = EchoServer::start("a", "127.0.0.1");
        let SvcMesh {
            ads,
            port,
            admin: _,
            proxy,
        } = start_svc_serving(Under::Remora, api_type, &a, "a");
        let addr = loopback(port);

        let bad = ads::cluster(
            "name: bad\ntype: STATIC\nconnect_timeout: 1s\nlb_policy: CLUSTER_PROVIDED\n",
        );
        ads.set(CLUSTER, vec![eds_cluster("svc", "5s"), bad]);
        let nack = ads.wait_nack("Cluster bad");
        let message = nack.error.unwrap_or_default();
        assert!(
            message.contains("lb_policy: CLUSTER_PROVIDED is only for ORIGINAL_DST clusters"),
            "{message}"
        );
        assert_eq!(nack.type_url, CLUSTER);
        if api_type == "GRPC" {
            assert_ne!(
                nack.version_info,
                ads.version(),
                "a NACK carries the last accepted version"
            );
        }
        // A field our protos do not declare at all is NACKed too, not dropped by the decoder.
        let mut unknown = ads::cluster("name: unknown-field\ntype: STATIC\nconnect_timeout: 1s\n");
        unknown.value.extend_from_slice(&[0xf8, 0xf0, 0x04, 0x01]); // field 9999, varint 1
        ads.set(CLUSTER, vec![eds_cluster("svc", "5s"), unknown]);
        let nack = ads.wait_nack("Cluster unknown-field");
        assert!(
            nack.error
                .unwrap_or_default()
                .contains("field number 9999 is not known to Remora")
        );
        // An unsupported field deep inside a listener's Any is named by its path.
        let mut bad_listener = rds_listener("bad-listener", free_port(), "x", "routes");
        let mut proto: xds_api::envoy::config::listener::v3::Listener =
            prost::Message::decode(bad_listener.value.as_slice()).expect("decode");
        proto.per_connection_buffer_limit_bytes = Some(1024);
        bad_listener.value = prost::Message::encode_to_vec(&proto);
        ads.set(
            LISTENER,
            vec![
                rds_listener("ingress", port, "ingress", "routes"),
                bad_listener,
            ],
        );
        let nack = ads.wait_nack("Listener bad-listener");
        assert!(
            nack.error
                .unwrap_or_default()
                .contains("per_connection_buffer_limit_bytes: field is not supported")
        );
        // Still serving, and /config_dump shows the error.
        assert!(get_upstream(addr, "/still").is_some());
        let (_, _, dump) =
            http_get(proxy.admin, "/config_dump?resource=dynamic_listeners").expect("dump");
        assert!(dump.contains("per_connection_buffer_limit_bytes"), "{dump}");
        let (_, _, dump) = http_get(proxy.admin, "/config_dump").expect("dump");
        let dump = echo_json(&dump);
        assert!(
            dump.to_string()
                .contains("lb_policy: CLUSTER_PROVIDED is only for ORIGINAL_DST clusters")
        );
    }
}

#[test]
fn warming_waits_for_endpoints_and_routes_bounded_by_initial_fetch_timeout() {
    let a = EchoServer::start("a", "127.0.0.1");
    // Without a deadline (`initial_fetch_timeout: 0s` waits for ever, as in Envoy), so the
    // checks of what warming holds back cannot race a timer.
    let ads = AdsServer::start();
    let port = free_port();
    // EDS withheld: the cluster warms; the listener's routes withheld: the listener warms.
    ads.set(CLUSTER, vec![eds_cluster("svc", "0s")]);
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "ingress", "routes")],
    );
    let admin = loopback(free_port());
    let proxy = start(
        Under::Remora,
        &ads_bootstrap(admin, ads.addr, "GRPC", "0s"),
        admin,
        false,
    );
    // Not ready while warming.
    wait_for("an EDS subscription", Duration::from_secs(30), || {
        ads.requests()
            .iter()
            .any(|r| r.type_url == CLUSTER_LOAD_ASSIGNMENT && r.names == ["svc"])
            .then_some(())
    });
    let (status, _, _) = http_get(admin, "/ready").expect("ready");
    assert_eq!(status, 503, "not ready while the cluster warms");
    let (_, _, dump) =
        http_get(admin, "/config_dump?resource=dynamic_warming_clusters").expect("dump");
    assert!(dump.contains("\"svc\""), "{dump}");
    assert!(
        std::net::TcpStream::connect(loopback(port)).is_err(),
        "the listener is not bound before its routes arrive"
    );
    // Routes arrive: the listener starts, but the cluster is still warming.
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", None)],
    );
    remora_tests::wait_for_port(loopback(port), Duration::from_secs(30));
    let (status, _, _) = http_get(admin, "/ready").expect("ready");
    assert_eq!(status, 503, "not ready while the cluster warms");
    // Endpoints arrive: ready, and serving.
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[a.addr])],
    );
    wait_for("endpoints arrive", Duration::from_secs(30), || {
        get_upstream(loopback(port), "/x")
    });
    let (status, _, _) = http_get(admin, "/ready").expect("ready");
    assert_eq!(status, 200);
    drop(proxy);

    // With a deadline: endpoints that never come hold the cluster back 2 s, then it is used
    // without them.
    let ads = AdsServer::start();
    let port = free_port();
    ads.set(CLUSTER, vec![eds_cluster("svc", "2s")]);
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "ingress", "routes")],
    );
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", None)],
    );
    let admin = loopback(free_port());
    let started = Instant::now();
    let _proxy = start(
        Under::Remora,
        &ads_bootstrap(admin, ads.addr, "GRPC", "0s"),
        admin,
        false,
    );
    wait_for(
        "ready after the fetch timeout",
        Duration::from_secs(30),
        || {
            http_get(admin, "/ready")
                .ok()
                .filter(|(s, _, _)| *s == 200)
                .map(|_| ())
        },
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    let (status, _, body) = http_get(loopback(port), "/x").expect("request");
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
}

#[test]
fn reconnects_with_backoff_and_keeps_serving_meanwhile() {
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let ads_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let ads_addr = ads_listener.local_addr().expect("addr");
    let ads = AdsServer::start_on(ads_listener);
    let port = free_port();
    let resources = |upstream: SocketAddr| {
        vec![
            (CLUSTER, vec![eds_cluster("svc", "5s")]),
            (
                CLUSTER_LOAD_ASSIGNMENT,
                vec![endpoints_for("svc", &[upstream])],
            ),
            (
                LISTENER,
                vec![rds_listener("ingress", port, "ingress", "routes")],
            ),
            (
                ROUTE_CONFIGURATION,
                vec![route_config("routes", "svc", None)],
            ),
        ]
    };
    for (t, r) in resources(a.addr) {
        ads.set(t, r);
    }
    let admin = loopback(free_port());
    let _proxy = start(
        Under::Remora,
        &ads_bootstrap(admin, ads_addr, "GRPC", "5s"),
        admin,
        true,
    );
    let addr = loopback(port);
    wait_for("traffic to a", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "a")
    });
    drop(ads);
    // The control plane is gone: the last good config keeps serving.
    for _ in 0..20 {
        assert_eq!(
            get_upstream(addr, "/x").map(|(u, _)| u).as_deref(),
            Some("a")
        );
    }
    let ads = AdsServer::start_on(std::net::TcpListener::bind(ads_addr).expect("rebind ads port"));
    for (t, r) in resources(b.addr) {
        ads.set(t, r);
    }
    wait_for(
        "reconnect and new endpoints",
        Duration::from_secs(30),
        || get_upstream(addr, "/x").filter(|(u, _)| u == "b"),
    );
    assert!(ads.streams() >= 1);
}

#[test]
fn listener_update_and_removal_drain_in_flight_requests() {
    let upstream = HeldUpstream::start("{\"upstream\":\"slow\",\"path\":\"/\"}");
    let slow = upstream.addr;
    let SvcMesh {
        ads,
        port,
        admin,
        proxy,
    } = start_svc(Under::Remora, "GRPC", slow, "first");
    let addr = loopback(port);
    // A request in flight while the listener is updated...
    let in_flight = std::thread::spawn(move || http_get(addr, "/during-update").map(|(s, _, _)| s));
    wait_for("request at upstream", Duration::from_secs(10), || {
        (upstream.arrived() >= 1).then_some(())
    });
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "second", "routes")],
    );
    wait_for("new listener stats", Duration::from_secs(10), || {
        http_get(admin, "/stats")
            .ok()
            .filter(|(_, _, b)| b.contains("http.second."))
            .map(|_| ())
    });
    // ...completes on the old listener, and new connections use the new one.
    upstream.release();
    assert_eq!(in_flight.join().expect("thread").expect("request"), 200);
    assert_eq!(
        http_get(addr, "/after-update")
            .map(|(s, _, _)| s)
            .expect("request"),
        200
    );
    wait_for(
        "counted on the new listener",
        Duration::from_secs(5),
        || (remora_tests::admin_stat(admin, "http.second.downstream_rq_2xx")? >= 1).then_some(()),
    );
    assert_eq!(proxy_stat(admin, "http.first.downstream_rq_2xx"), 1);

    // Removal: in flight completes, new connections are refused.
    upstream.hold();
    let before = upstream.arrived();
    let in_flight =
        std::thread::spawn(move || http_get(addr, "/during-removal").map(|(s, _, _)| s));
    wait_for("request at upstream", Duration::from_secs(10), || {
        (upstream.arrived() > before).then_some(())
    });
    ads.set(LISTENER, vec![]);
    wait_for("listener removed", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    });
    upstream.release();
    assert_eq!(in_flight.join().expect("thread").expect("request"), 200);
    drop(proxy);
}

/// One host's stat from `/clusters` (`CLUSTER::ADDR::STAT::VALUE`).
fn host_stat(admin: SocketAddr, cluster: &str, host: SocketAddr, stat: &str) -> u64 {
    let (_, _, clusters) = http_get(admin, "/clusters").expect("/clusters");
    let prefix = format!("{cluster}::{host}::{stat}::");
    clusters
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {clusters}"))
}

/// A stat's value; one the proxy does not have fails the test.
fn proxy_stat(admin: SocketAddr, name: &str) -> u64 {
    remora_tests::admin_stat(admin, name).unwrap_or_else(|| panic!("no stat {name}"))
}

#[test]
fn config_changes_under_load_fail_no_request() {
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let ads = AdsServer::start();
    let port = free_port();
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s")]);
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[a.addr])],
    );
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "ingress", "routes")],
    );
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", None)],
    );
    let admin = loopback(free_port());
    let _proxy = start(
        Under::Remora,
        &ads_bootstrap(admin, ads.addr, "GRPC", "5s"),
        admin,
        true,
    );
    let addr = loopback(port);
    wait_for("traffic", Duration::from_secs(20), || {
        get_upstream(addr, "/x")
    });

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let seen_b = Arc::new(AtomicBool::new(false));
    let seen_rewrite = Arc::new(AtomicBool::new(false));
    // Bounded load: 4 clients, sequential requests, until stopped (at most ~10 s).
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, total, seen_b, seen_rewrite) = (
                stop.clone(),
                failures.clone(),
                total.clone(),
                seen_b.clone(),
                seen_rewrite.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    total.fetch_add(1, Ordering::Relaxed);
                    match get_upstream(addr, "/load") {
                        Some((upstream, path)) => {
                            if upstream == "b" {
                                seen_b.store(true, Ordering::Relaxed);
                            }
                            if path.starts_with("/v2") {
                                seen_rewrite.store(true, Ordering::Relaxed);
                            }
                        }
                        None => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    // 10 changes a second for 10 seconds: endpoints and routes alternate.
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(10) {
        let upstream = if i.is_multiple_of(2) { b.addr } else { a.addr };
        ads.set(
            CLUSTER_LOAD_ASSIGNMENT,
            vec![endpoints_for("svc", &[upstream])],
        );
        ads.set(
            ROUTE_CONFIGURATION,
            vec![route_config(
                "routes",
                "svc",
                if i.is_multiple_of(3) {
                    Some("/v2/")
                } else {
                    None
                },
            )],
        );
        i += 1;
        // 10 changes a second: the load shape under test.
        remora_tests::pace_until(start + Duration::from_millis(100 * u64::from(i)));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client");
    }
    let total = total.load(Ordering::Relaxed);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests out of {total}"
    );
    assert!(total > 100, "load ran: {total}");
    assert!(
        seen_b.load(Ordering::Relaxed) && seen_rewrite.load(Ordering::Relaxed),
        "changes took effect"
    );
    assert!(ads.requests().iter().all(|r| r.error.is_none()));
}

#[test]
fn a_removed_clusters_idle_upstream_connections_close() {
    use std::io::{Read, Write};
    // The upstream answers one keep-alive request, then reports when the proxy hangs up.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let (hung_up, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = upstream.accept() else {
            return;
        };
        let _ = common::read_head(&mut conn);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        // Blocks while the connection sits idle in the proxy's pool; 0 is its close.
        let _ = hung_up.send(conn.read(&mut [0u8; 1]).ok());
    });
    let SvcMesh {
        ads,
        port,
        admin: _,
        proxy: _proxy,
    } = start_svc(Under::Remora, "GRPC", upstream_addr, "ingress");
    let (status, _, body) = http_get(loopback(port), "/once").expect("request");
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(
        closed.try_recv().is_err(),
        "the connection stays pooled while the cluster exists"
    );
    ads.set(CLUSTER, vec![]);
    let read = closed
        .recv_timeout(Duration::from_secs(10))
        .expect("the proxy closes the removed cluster's idle connection");
    assert_eq!(read, Some(0), "a clean close");
}

/// A CA and a server certificate for `host` signed by it, as PEM files in `dir`:
/// (CA, certificate, key).
fn test_pki(dir: &std::path::Path, label: &str, host: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{label} test CA"));
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("sign");
    let write = |name: &str, text: String| {
        let path = dir.join(format!("{label}-{name}"));
        std::fs::write(&path, text).expect("write pem");
        path
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

/// The bootstrap's ADS cluster speaks TLS: it trusts `ca` and asks for `sni`.
fn with_ads_tls(yaml: String, ca: &std::path::Path, sni: &str) -> String {
    yaml.replacen(
        "  - name: xds\n    type: STATIC\n",
        &format!(
            "  - name: xds\n    type: STATIC\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: {sni}\n        common_tls_context:\n          validation_context: {{trusted_ca: {{filename: \"{}\"}}}}\n",
            ca.display()
        ),
        1,
    )
}

/// Loads the usual `svc` resources (EDS cluster, endpoint, RDS listener on `port`, routes).
fn load_svc(ads: &AdsServer, endpoint: SocketAddr, port: u16) {
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s")]);
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[endpoint])],
    );
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "ingress", "routes")],
    );
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", None)],
    );
}

/// ADS to a control plane behind TLS, under Remora or Envoy: with the right CA the resources
/// arrive over a handshake that asked for the configured SNI, and are ACKed; with a CA that did
/// not sign the server's certificate every handshake fails and no request reaches the server.
/// Returns the proxy's log from the wrong-CA run.
fn ads_over_tls(under: Under) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = test_pki(dir.path(), "right", "xds.local");
    let (other_ca, _, _) = test_pki(dir.path(), "other", "xds.local");
    let a = EchoServer::start("a", "127.0.0.1");

    let ads = AdsServer::start();
    let front = ads::TlsFront::start(ads.addr, &cert, &key);
    let port = free_port();
    load_svc(&ads, a.addr, port);
    let admin = loopback(free_port());
    let yaml = with_ads_tls(
        ads_bootstrap(admin, front.addr, "GRPC", "5s"),
        &ca,
        "xds.local",
    );
    let proxy = start(under, &yaml, admin, true);
    wait_for(
        "traffic to a over TLS-fed config",
        Duration::from_secs(20),
        || get_upstream(loopback(port), "/x").filter(|(u, _)| u == "a"),
    );
    for type_url in [
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        LISTENER,
        ROUTE_CONFIGURATION,
    ] {
        wait_for(
            &format!("ACK of {type_url}"),
            Duration::from_secs(20),
            || acked(&ads, type_url).then_some(()),
        );
    }
    assert!(ads.requests().iter().all(|r| r.error.is_none()));
    let names = front.server_names();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.as_deref() == Some("xds.local")),
        "every handshake asked for the configured SNI: {names:?}"
    );
    assert!(front.failures().is_empty(), "{:?}", front.failures());
    drop(proxy);

    // The same control plane, but the proxy trusts another CA.
    let ads = AdsServer::start();
    let front = ads::TlsFront::start(ads.addr, &cert, &key);
    load_svc(&ads, a.addr, free_port());
    let admin = loopback(free_port());
    let yaml = with_ads_tls(
        ads_bootstrap(admin, front.addr, "GRPC", "5s"),
        &other_ca,
        "xds.local",
    );
    let proxy = start(under, &yaml, admin, false);
    // At least two attempts: it retries, and each one fails at the handshake.
    wait_for("two failed handshakes", Duration::from_secs(60), || {
        (front.failures().len() >= 2).then_some(())
    });
    assert!(
        front.server_names().is_empty(),
        "no handshake completed: {:?}",
        front.server_names()
    );
    assert!(
        ads.requests().is_empty(),
        "nothing reached the server: {:?}",
        ads.requests()
    );
    proxy.log()
}

#[test]
fn ads_over_tls_verifies_the_control_plane_as_envoy_does() {
    let log = ads_over_tls(Under::Remora);
    // Remora says why it cannot reach the control plane.
    let line = log
        .lines()
        .find(|l| l.contains("cannot open the ADS stream"))
        .unwrap_or_else(|| panic!("no ADS error in the log:\n{log}"));
    assert!(
        line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
        "{line}"
    );
    if envoy::available_or_skip("the Envoy half of ADS over TLS") {
        ads_over_tls(Under::Envoy);
    }
}

/// A listener whose HCM carries its route table inline, sending everything to `cluster`.
fn inline_routes_listener(name: &str, port: u16, cluster: &str) -> prost_types::Any {
    ads::listener(&format!(
        r#"name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: inline
      route_config:
        name: inline
        virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    ))
}

/// Waits for the ACK of `type_url` at the server's current version.
fn wait_acked(ads: &AdsServer, type_url: &str) {
    let version = ads.version();
    wait_for(
        &format!("ACK of {type_url} version {version}"),
        Duration::from_secs(20),
        || {
            ads.requests()
                .iter()
                .any(|r| r.type_url == type_url && r.error.is_none() && r.version_info == version)
                .then_some(())
        },
    );
}

/// Route tables naming a cluster nobody defined, under Remora or Envoy: inline in a listener
/// (validated by default) and over RDS with `validate_clusters: true` they are NACKed while the
/// last good config keeps serving; over RDS without the field the table is taken. Returns the
/// two NACK messages and the status a request to the missing cluster then gets.
fn routes_to_unknown_clusters(under: Under) -> (String, String, u16) {
    let a = EchoServer::start("a", "127.0.0.1");
    let SvcMesh {
        ads,
        port,
        admin: _,
        proxy: _proxy,
    } = start_svc(under, "GRPC", a.addr, "ingress");
    let addr = loopback(port);
    wait_for("traffic to a", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "a")
    });

    ads.set(
        LISTENER,
        vec![inline_routes_listener("ingress", port, "nope")],
    );
    let inline = ads.wait_nack("nope");
    assert_eq!(inline.type_url, LISTENER);
    assert_eq!(
        get_upstream(addr, "/x"),
        Some(("a".into(), "/x".into())),
        "the RDS listener keeps serving"
    );
    ads.set(
        LISTENER,
        vec![rds_listener("ingress", port, "ingress", "routes")],
    );
    wait_acked(&ads, LISTENER);

    ads.set(
        ROUTE_CONFIGURATION,
        vec![ads::routes(
            "name: routes\nvalidate_clusters: true\nvirtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n  - match: {prefix: \"/\"}\n    route: {cluster: nope2, prefix_rewrite: \"/new/\"}\n",
        )],
    );
    let validated = ads.wait_nack("nope2");
    assert_eq!(validated.type_url, ROUTE_CONFIGURATION);
    assert_eq!(
        get_upstream(addr, "/x"),
        Some(("a".into(), "/x".into())),
        "the last good routes keep serving"
    );

    // Without `validate_clusters`, RDS takes a table that names a missing cluster.
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "nope3", None)],
    );
    wait_acked(&ads, ROUTE_CONFIGURATION);
    let (status, _, _) = http_get(addr, "/x").expect("request");
    assert_eq!(ads.streams(), 1, "one stream throughout");
    (
        inline.error.unwrap_or_default(),
        validated.error.unwrap_or_default(),
        status,
    )
}

#[test]
fn routes_naming_unknown_clusters_are_nacked_as_envoy_does() {
    let remora = routes_to_unknown_clusters(Under::Remora);
    assert!(
        remora.0.contains("Listener ingress")
            && remora.0.contains("unknown cluster \"nope\"")
            && remora.0.contains("validate_clusters"),
        "{}",
        remora.0
    );
    assert!(
        remora.1.contains("RouteConfiguration routes")
            && remora.1.contains("unknown cluster \"nope2\"")
            && remora.1.contains("validate_clusters"),
        "{}",
        remora.1
    );
    assert_eq!(remora.2, 503);
    if !envoy::available_or_skip("the Envoy half of validate_clusters") {
        return;
    }
    let envoy = routes_to_unknown_clusters(Under::Envoy);
    for (message, cluster) in [(&envoy.0, "nope"), (&envoy.1, "nope2")] {
        assert!(
            message.contains("unknown cluster") && message.contains(cluster),
            "Envoy's NACK: {message}"
        );
    }
    assert_eq!(envoy.2, remora.2, "left: envoy, right: remora");
}

/// Under Remora or Envoy: a second listener on the serving listener's address is NACKed while
/// the first keeps serving; a listener that replaces the first under another name, in one
/// update, takes the address. Returns the NACK's message.
fn listeners_sharing_an_address(under: Under) -> String {
    let a = EchoServer::start("a", "127.0.0.1");
    let SvcMesh {
        ads, port, proxy, ..
    } = start_svc(under, "GRPC", a.addr, "ingress");
    let addr = loopback(port);
    wait_for("traffic", Duration::from_secs(20), || {
        get_upstream(addr, "/x")
    });
    ads.set(
        LISTENER,
        vec![
            rds_listener("ingress", port, "ingress", "routes"),
            inline_routes_listener("second", port, "svc"),
        ],
    );
    let nack = ads.wait_nack("duplicate address");
    assert!(get_upstream(addr, "/still").is_some());
    // Renamed in one update: the old one goes first, as Envoy's LDS removes before it adds.
    ads.set(
        LISTENER,
        vec![inline_routes_listener("renamed", port, "svc")],
    );
    wait_acked(&ads, LISTENER);
    wait_for(
        "the renamed listener serving",
        Duration::from_secs(10),
        || get_upstream(addr, "/renamed"),
    );
    drop(proxy);
    nack.error.unwrap_or_default()
}

#[test]
fn a_second_listener_on_an_address_is_nacked_as_envoy_does() {
    let message = listeners_sharing_an_address(Under::Remora);
    assert!(
        message.contains("Listener second")
            && message.contains("duplicate address")
            && message.contains("\"ingress\""),
        "{message}"
    );
    if envoy::available_or_skip("the Envoy half of duplicate listener addresses") {
        let message = listeners_sharing_an_address(Under::Envoy);
        assert!(
            message.contains("duplicate address"),
            "Envoy's NACK: {message}"
        );
    }
}

/// A type nobody subscribes to (Envoy knows it: ECDS extension configs) and one nobody knows.
const UNASKED_TYPES: [&str; 2] = [
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
    "type.googleapis.com/remora.test.v1.Nothing",
];

/// Pushes a response of each of [`UNASKED_TYPES`] (nonces `raw-0`, `raw-1`), then an endpoint
/// change, under Remora or Envoy. The stream stays up and the endpoint change is applied and
/// ACKed; returns the requests that answered the pushed responses (by nonce).
fn responses_of_unasked_types(under: Under, api_type: &str) -> Vec<ads::Recorded> {
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let SvcMesh {
        ads,
        port,
        admin: _,
        proxy: _proxy,
    } = start_svc_serving(under, api_type, &a, "a");
    let addr = loopback(port);
    for (i, type_url) in UNASKED_TYPES.iter().enumerate() {
        let resource = prost_types::Any {
            type_url: type_url.to_string(),
            value: vec![0x0a, 0x01, b'x'], // field 1 (a name in both): "x"
        };
        let nonce = format!("raw-{i}");
        if api_type == "GRPC" {
            ads.push_raw(xds_api::envoy::service::discovery::v3::DiscoveryResponse {
                version_info: "7".into(),
                resources: vec![resource],
                type_url: type_url.to_string(),
                nonce,
                ..Default::default()
            });
        } else {
            ads.push_raw_delta(
                xds_api::envoy::service::discovery::v3::DeltaDiscoveryResponse {
                    system_version_info: "7".into(),
                    resources: vec![xds_api::envoy::service::discovery::v3::Resource {
                        name: "x".into(),
                        version: "7".into(),
                        resource: Some(resource),
                        ..Default::default()
                    }],
                    type_url: type_url.to_string(),
                    nonce,
                    ..Default::default()
                },
            );
        }
    }
    // Other types keep working on the same stream.
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[b.addr])],
    );
    wait_for("endpoint change to b", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "b")
    });
    if api_type == "GRPC" {
        wait_acked(&ads, CLUSTER_LOAD_ASSIGNMENT);
    } else {
        wait_for("delta ACK of the change", Duration::from_secs(20), || {
            ads.requests()
                .iter()
                .rev()
                .find(|r| r.type_url == CLUSTER_LOAD_ASSIGNMENT && !r.nonce.is_empty())
                .filter(|r| r.error.is_none() && !r.nonce.starts_with("raw-"))
                .map(|_| ())
        });
    }
    // The test server may send the change before the raw pushes (its select picks either):
    // Remora's answers are waited for, not assumed to precede the change's ACK. (Envoy may
    // send none; what it sent by now is what the caller checks.)
    let answers = || -> Vec<ads::Recorded> {
        ads.requests()
            .into_iter()
            .filter(|r| r.nonce.starts_with("raw-"))
            .collect()
    };
    if matches!(under, Under::Remora) {
        wait_for("answers to the raw pushes", Duration::from_secs(20), || {
            (answers().len() >= UNASKED_TYPES.len()).then_some(())
        });
    }
    assert_eq!(ads.streams(), 1, "the stream stayed up");
    answers()
}

#[test]
fn responses_of_unknown_types_are_nacked_and_the_stream_goes_on() {
    for api_type in ["GRPC", "DELTA_GRPC"] {
        let answers = responses_of_unasked_types(Under::Remora, api_type);
        assert_eq!(answers.len(), 2, "{api_type}: {answers:?}");
        for (i, type_url) in UNASKED_TYPES.iter().enumerate() {
            let answer = &answers[i];
            assert_eq!(answer.nonce, format!("raw-{i}"), "{api_type}: {answer:?}");
            assert_eq!(answer.type_url, *type_url, "{api_type}: {answer:?}");
            let error = answer.error.as_deref().unwrap_or_default();
            assert!(
                error.contains(type_url) && error.contains("does not take"),
                "{api_type}: a NACK naming the type: {answer:?}"
            );
        }
    }
    // Envoy lets such a response pass without a NACK (a warning in its log); Remora NACKs it
    // so the control plane sees the mistake. Both keep the stream and apply the other types.
    if envoy::available_or_skip("the Envoy half of unknown ADS types") {
        let answers = responses_of_unasked_types(Under::Envoy, "GRPC");
        assert!(
            answers.iter().all(|a| a.error.is_none()),
            "Envoy NACKed: {answers:?}"
        );
    }
}

/// Under `set_node_on_first_message_only`, the requests of each stream: only the first carries
/// the node; after the server cuts the stream, the new one's first request carries it again.
fn node_on_first_message_only(under: Under, api_type: &str) {
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let SvcMesh {
        ads,
        port,
        admin: _,
        proxy: _proxy,
    } = start_svc_with(under, api_type, a.addr, "ingress", |yaml| {
        yaml.replacen(
            "    transport_api_version: V3\n",
            "    transport_api_version: V3\n    set_node_on_first_message_only: true\n",
            1,
        )
    });
    let addr = loopback(port);
    wait_for("traffic to a", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "a")
    });
    let on_stream = |stream: usize| -> Vec<ads::Recorded> {
        ads.requests()
            .into_iter()
            .filter(|r| r.stream == stream)
            .collect()
    };
    // Subscriptions to all four types, and at least one ACK, on the first stream.
    wait_for(
        "four types and an ACK on stream 1",
        Duration::from_secs(20),
        || {
            let requests = on_stream(1);
            let types: std::collections::BTreeSet<_> =
                requests.iter().map(|r| r.type_url.clone()).collect();
            (types.len() == 4 && requests.iter().any(|r| !r.nonce.is_empty())).then_some(())
        },
    );
    ads.disconnect_streams();
    wait_for("a second stream", Duration::from_secs(30), || {
        (ads.streams() >= 2).then_some(())
    });
    // A change on the second stream: its ACK is a later request there.
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[b.addr])],
    );
    wait_for("endpoint change to b", Duration::from_secs(20), || {
        get_upstream(addr, "/x").filter(|(u, _)| u == "b")
    });
    wait_for("an ACK on stream 2", Duration::from_secs(20), || {
        on_stream(2)
            .iter()
            .any(|r| r.type_url == CLUSTER_LOAD_ASSIGNMENT && !r.nonce.is_empty())
            .then_some(())
    });
    for stream in [1, 2] {
        let requests = on_stream(stream);
        assert!(requests.len() >= 2, "stream {stream}: {requests:?}");
        let with_node: Vec<bool> = requests.iter().map(|r| r.has_node).collect();
        assert!(
            with_node[0] && with_node[1..].iter().all(|has| !has),
            "stream {stream}: the node in the first request only: {with_node:?}"
        );
        assert_eq!(requests[0].node_id, "test-node");
    }
}

#[test]
fn node_is_sent_once_per_stream_when_asked_as_in_envoy() {
    for api_type in ["GRPC", "DELTA_GRPC"] {
        node_on_first_message_only(Under::Remora, api_type);
    }
    if envoy::available_or_skip("the Envoy half of set_node_on_first_message_only") {
        for api_type in ["GRPC", "DELTA_GRPC"] {
            node_on_first_message_only(Under::Envoy, api_type);
        }
    }
}

/// When a connection was accepted, and when the peer closed it.
type Lifetime = (Instant, Option<Instant>);

/// A control plane that accepts TCP and never says a word: a thread per connection reads until
/// the proxy hangs up, recording when each connection was accepted and closed.
struct SilentServer {
    addr: SocketAddr,
    connections: Arc<std::sync::Mutex<Vec<Lifetime>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                // Stopping wakes the loop with a connection of its own.
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let mut all = seen.lock().expect("connections");
                let index = all.len();
                all.push((Instant::now(), None));
                drop(all);
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut sink = [0u8; 4096];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                    seen.lock().expect("connections")[index].1 = Some(Instant::now());
                });
            }
        });
        SilentServer {
            addr,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    /// (accepted, closed) of each connection so far.
    fn connections(&self) -> Vec<Lifetime> {
        self.connections.lock().expect("connections").clone()
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn grpc_service_timeout_bounds_stream_establishment() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let silent = SilentServer::start();
    let ads_addr = silent.addr;
    let admin = loopback(free_port());
    let yaml = ads_bootstrap(admin, ads_addr, "GRPC", "5s").replacen(
        "grpc_services: [{envoy_grpc: {cluster_name: xds}}]",
        "grpc_services: [{envoy_grpc: {cluster_name: xds}, timeout: 2s}]",
        1,
    );
    let proxy = start(Under::Remora, &yaml, admin, false);
    // The proxy gives up on each silent connection and tries again.
    let connections = wait_for(
        "three connections, two given up",
        Duration::from_secs(90),
        || {
            let connections = silent.connections();
            let closed = connections.iter().filter(|c| c.1.is_some()).count();
            (connections.len() >= 3 && closed >= 2).then_some(connections)
        },
    );
    for (accepted, closed) in connections
        .iter()
        .filter_map(|(a, c)| Some((a, c.as_ref()?)))
    {
        // Not at once: it waited for the timeout (less what connecting took, with room for a
        // loaded machine's scheduling on this side).
        assert!(
            closed.duration_since(*accepted) >= TIMEOUT / 2,
            "given up after {:?}",
            closed.duration_since(*accepted)
        );
    }
    assert!(
        proxy
            .log()
            .contains("no ADS stream within the grpc_service timeout"),
        "{}",
        proxy.log()
    );
    drop(silent);

    // A control plane that answers, on the same address: the stream is made within the
    // timeout, and lives on well past it.
    let ads =
        AdsServer::start_on(std::net::TcpListener::bind(ads_addr).expect("rebind the ADS port"));
    let port = free_port();
    load_svc(&ads, a.addr, port);
    wait_for("traffic to a", Duration::from_secs(60), || {
        get_upstream(loopback(port), "/x").filter(|(u, _)| u == "a")
    });
    let established = Instant::now();
    // How long the stream lives is the behaviour under test: three timeouts.
    remora_tests::pace_until(established + 3 * TIMEOUT);
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[b.addr])],
    );
    wait_for("endpoint change to b", Duration::from_secs(20), || {
        get_upstream(loopback(port), "/x").filter(|(u, _)| u == "b")
    });
    assert_eq!(ads.streams(), 1, "the established stream was not timed out");
}

/// `initial_metadata` of the ADS gRPC service goes on the stream (how a bootstrap token
/// reaches a control plane that authenticates its streams), under Remora as under Envoy.
#[test]
fn ads_initial_metadata_reaches_the_server() {
    for under in [Under::Remora, Under::Envoy] {
        if under == Under::Envoy && !envoy::available_or_skip("initial_metadata under envoy") {
            continue;
        }
        let a = EchoServer::start("a", "127.0.0.1");
        let SvcMesh {
            ads,
            port,
            admin: _,
            proxy: _proxy,
        } = start_svc_with(under, "GRPC", a.addr, "ingress", |yaml| {
            yaml.replacen(
                "grpc_services: [{envoy_grpc: {cluster_name: xds}}]",
                "grpc_services: [{envoy_grpc: {cluster_name: xds}, initial_metadata: [{key: authorization, value: \"Bearer group-a.s3cret\"}]}]",
                1,
            )
        });
        wait_for("traffic", Duration::from_secs(20), || {
            get_upstream(loopback(port), "/x")
        });
        let requests = ads.requests();
        assert!(!requests.is_empty());
        for request in requests {
            assert_eq!(
                request.authorization.as_deref(),
                Some("Bearer group-a.s3cret"),
                "{request:?}"
            );
        }
    }
}

/// The ADS cluster's endpoint is a pipe, as in Istio's bootstrap (its `xds-grpc` cluster to the
/// agent's socket): the proxy takes its config over it and serves, as Envoy does; a route to
/// such a cluster is refused by name.
#[test]
fn ads_over_a_pipe_as_istio_writes_it() {
    let echo = EchoServer::start("a", "127.0.0.1");
    let mut unders = vec![Under::Remora];
    if envoy::available_or_skip("the Envoy half of the ADS-over-a-pipe test") {
        unders.push(Under::Envoy);
    }
    for under in unders {
        let relay = std::sync::Mutex::new(None);
        let mesh = start_svc_with(under, "GRPC", echo.addr, "ingress", |yaml| {
            let ads_port = yaml
                .split("port_value: ")
                .last()
                .and_then(|rest| rest.split('}').next())
                .and_then(|port| port.parse::<u16>().ok())
                .expect("the ADS port");
            let (dir, path) = ads::pipe_relay(loopback(ads_port));
            let edited = yaml.replace(
                &format!("socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}"),
                &format!("pipe: {{path: {}}}", path.display()),
            );
            assert!(edited.contains("pipe:"), "{edited}");
            *relay.lock().unwrap() = Some(dir);
            edited
        });
        let served = wait_for(
            "served through config from the pipe",
            Duration::from_secs(30),
            || get_upstream(loopback(mesh.port), "/x"),
        );
        assert_eq!(served, ("a".to_string(), "/x".to_string()), "{under:?}");
    }
    // A pipe cluster serves the ADS stream only.
    let (_, admin_yaml) = common::admin_block();
    let yaml = common::bootstrap(
        &admin_yaml,
        &[common::http_listener("ingress", free_port(), "", &common::catch_all("agent", "5s"))],
        &["  - name: agent\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: agent\n      endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: /tmp/agent.sock}}}}]}]\n".to_string()],
    );
    let (_dir, file) = common::write_config(&yaml);
    let out = Command::new(remora_tests::workspace_binary("remora-proxy"))
        .args(["--mode", "validate", "-c"])
        .arg(&file)
        .output()
        .expect("validate");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("cluster \"agent\" is a pipe"), "{text}");
}

/// The xDS stats Envoy keeps and Remora compares with it: each subscription's counters and
/// version, the stream's state, and the managers' counts.
fn xds_stats(admin: SocketAddr) -> std::collections::BTreeMap<String, u64> {
    const SUBSCRIPTIONS: [&str; 4] = [
        "cluster_manager.cds.",
        "listener_manager.lds.",
        "http.ingress.rds.routes.",
        "cluster.svc.",
    ];
    const COUNTERS: [&str; 9] = [
        "update_attempt",
        "update_success",
        "update_rejected",
        "update_failure",
        "update_no_rebuild",
        "init_fetch_timeout",
        "config_reload",
        "version",
        "update_time",
    ];
    const OTHERS: [&str; 14] = [
        "cluster_manager.cluster_added",
        "cluster_manager.cluster_modified",
        "cluster_manager.cluster_removed",
        "listener_manager.listener_added",
        "listener_manager.listener_modified",
        "listener_manager.listener_removed",
        "control_plane.connected_state",
        "control_plane.pending_requests",
        "control_plane.rate_limit_enforced",
        "cluster_manager.active_clusters",
        "cluster_manager.warming_clusters",
        "listener_manager.total_listeners_active",
        "listener_manager.total_listeners_warming",
        "listener_manager.total_listeners_draining",
    ];
    let (_, _, text) = http_get(admin, "/stats").expect("/stats");
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let kept = OTHERS.contains(&name)
                || SUBSCRIPTIONS.iter().any(|prefix| {
                    name.strip_prefix(prefix)
                        .is_some_and(|stat| COUNTERS.contains(&stat))
                });
            Some((name.to_string(), value.parse().ok()?)).filter(|_| kept)
        })
        .collect()
}

/// Waits until the proxy took the server's current version of `types` (every type's, over
/// state-of-the-world, where each change sends them all), as its version gauges show: the
/// stats are settled then. `nacked`'s stays at the version before.
fn settle(
    ads: &AdsServer,
    admin: SocketAddr,
    api_type: &str,
    types: &[&str],
    nacked: Option<&str>,
) {
    const ALL: [&str; 4] = [
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        LISTENER,
        ROUTE_CONFIGURATION,
    ];
    let gauge = |type_url: &str| match type_url {
        CLUSTER => "cluster_manager.cds.version",
        LISTENER => "listener_manager.lds.version",
        CLUSTER_LOAD_ASSIGNMENT => "cluster.svc.version",
        _ => "http.ingress.rds.routes.version",
    };
    let types = if api_type == "GRPC" { &ALL[..] } else { types };
    let version = xxhash_rust::xxh64::xxh64(ads.version().as_bytes(), 0);
    wait_for(
        &format!("version {} of {types:?}", ads.version()),
        Duration::from_secs(20),
        || {
            let stats = xds_stats(admin);
            types
                .iter()
                .filter(|t| Some(**t) != nacked)
                .all(|t| stats.get(gauge(t)) == Some(&version))
                .then_some(())
        },
    );
}

/// One run of the stats scenario: the usual mesh, a NACKed cluster, an added cluster, new
/// endpoints and routes, a dropped stream and the new one's updates, then a removed cluster.
/// Returns the stats after each step, timestamps checked and then left out (they differ
/// between runs).
fn xds_stats_scenario(
    under: Under,
    api_type: &str,
) -> Vec<std::collections::BTreeMap<String, u64>> {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let a = EchoServer::start("a", "127.0.0.1");
    let SvcMesh {
        ads,
        admin,
        proxy: _proxy,
        ..
    } = start_svc_serving(under, api_type, &a, "a");
    let all = [
        CLUSTER,
        CLUSTER_LOAD_ASSIGNMENT,
        LISTENER,
        ROUTE_CONFIGURATION,
    ];
    settle(&ads, admin, api_type, &all, None);
    let mut steps = Vec::new();
    let step = |steps: &mut Vec<_>| {
        let mut stats = xds_stats(admin);
        let now = started + 600_000;
        for (name, value) in stats.iter().filter(|(n, _)| n.ends_with("_time")) {
            assert!(
                (started..now).contains(value),
                "{under:?}: {name} {value} is not a time since the test began"
            );
        }
        stats.retain(|name, _| !name.ends_with("_time"));
        steps.push(stats);
    };
    step(&mut steps);
    let bad =
        ads::cluster("name: bad\ntype: STATIC\nconnect_timeout: 1s\nlb_policy: CLUSTER_PROVIDED\n");
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s"), bad]);
    ads.wait_nack("bad");
    settle(&ads, admin, api_type, &[], Some(CLUSTER));
    step(&mut steps);
    let second = ads::cluster("name: second\ntype: STATIC\nconnect_timeout: 1s\n");
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s"), second]);
    settle(&ads, admin, api_type, &[CLUSTER], None);
    ads.set(
        CLUSTER_LOAD_ASSIGNMENT,
        vec![endpoints_for("svc", &[a.addr, loopback(free_port())])],
    );
    settle(&ads, admin, api_type, &[CLUSTER_LOAD_ASSIGNMENT], None);
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", Some("/r"))],
    );
    settle(&ads, admin, api_type, &[ROUTE_CONFIGURATION], None);
    step(&mut steps);
    // The stream drops: every subscription counts a failure. A new version on the new stream
    // then shows when it has settled.
    let streams = ads.streams();
    ads.disconnect_streams();
    // Over SotW the server resends every type on the new stream; the next version must come
    // after each of those is answered, or the proxy may count one response fewer.
    let resubscribed = |type_url: &&str| {
        api_type != "GRPC"
            || ads.requests().iter().any(|r| {
                r.stream > streams
                    && r.type_url == *type_url
                    && !r.nonce.is_empty()
                    && r.error.is_none()
            })
    };
    wait_for("a new stream", Duration::from_secs(30), || {
        (ads.streams() > streams
            && xds_stats(admin).get("control_plane.connected_state") == Some(&1)
            && all.iter().all(resubscribed))
        .then_some(())
    });
    ads.set(
        ROUTE_CONFIGURATION,
        vec![route_config("routes", "svc", Some("/s"))],
    );
    settle(&ads, admin, api_type, &[ROUTE_CONFIGURATION], None);
    step(&mut steps);
    // A cluster removed.
    ads.set(CLUSTER, vec![eds_cluster("svc", "5s")]);
    settle(&ads, admin, api_type, &[CLUSTER], None);
    step(&mut steps);
    steps
}

#[test]
fn xds_stats_count_updates_nacks_and_failures_as_envoy_does() {
    for api_type in ["GRPC", "DELTA_GRPC"] {
        let remora = xds_stats_scenario(Under::Remora, api_type);
        // Counted by hand from the scenario, so the test means something without Envoy too.
        let first = &remora[0];
        assert_eq!(first["cluster_manager.cds.update_attempt"], 2, "{first:?}");
        assert_eq!(first["cluster_manager.cds.update_success"], 1);
        assert_eq!(first["control_plane.connected_state"], 1);
        assert_eq!(
            first["cluster_manager.cds.version"],
            xxhash_rust::xxh64::xxh64(b"4", 0),
            "the version string's xxHash64"
        );
        assert_eq!(remora[1]["cluster_manager.cds.update_rejected"], 1);
        assert_eq!(
            remora[2]["cluster_manager.active_clusters"], 3,
            "{:?}",
            remora[2]
        );
        assert!(remora[3]["cluster_manager.cds.update_failure"] >= 1);
        // The bootstrap's ADS cluster, `svc`, the rejected `bad` (Envoy counts a cluster
        // before it builds it) and `second`; then `second` removed.
        let managed = |step: &std::collections::BTreeMap<String, u64>| {
            ["added", "modified", "removed"]
                .map(|change| step[&format!("cluster_manager.cluster_{change}")])
        };
        assert_eq!(managed(&remora[0]), [2, 0, 0]);
        assert_eq!(managed(&remora[2]), [4, 0, 0]);
        assert_eq!(managed(&remora[4]), [4, 0, 1]);
        assert_eq!(remora[4]["listener_manager.listener_added"], 1);
        if !envoy::available_or_skip("xds stats under envoy") {
            continue;
        }
        let envoy = xds_stats_scenario(Under::Envoy, api_type);
        assert_eq!(envoy.len(), remora.len(), "every step ran under Envoy too");
        for (step, (remora, envoy)) in remora.iter().zip(&envoy).enumerate() {
            assert_eq!(remora, envoy, "{api_type}, step {step}: Remora, then Envoy");
        }
    }
}

/// An EDS cluster and an RDS route table the server never sends, each with a short
/// `initial_fetch_timeout`: their subscriptions' stats once both timed out.
fn late_subscriptions(under: Under, api_type: &str) -> std::collections::BTreeMap<String, u64> {
    let a = EchoServer::start("a", "127.0.0.1");
    let SvcMesh {
        ads,
        port,
        admin,
        proxy: _proxy,
    } = start_svc_serving(under, api_type, &a, "a");
    ads.set(
        CLUSTER,
        vec![eds_cluster("svc", "5s"), eds_cluster("late", "0.5s")],
    );
    let mut late_listener = rds_listener("late", free_port(), "late", "late-routes");
    let mut proto: xds_api::envoy::config::listener::v3::Listener =
        prost::Message::decode(late_listener.value.as_slice()).expect("decode");
    let hcm = &mut proto.filter_chains[0].filters[0];
    let Some(xds_api::envoy::config::listener::v3::filter::ConfigType::TypedConfig(typed)) =
        &mut hcm.config_type
    else {
        panic!("the listener's connection manager")
    };
    let mut manager: xds_api::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager =
        prost::Message::decode(typed.value.as_slice()).expect("decode the connection manager");
    use xds_api::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
    let Some(RouteSpecifier::Rds(rds)) = &mut manager.route_specifier else {
        panic!("RDS")
    };
    if let Some(source) = &mut rds.config_source {
        source.initial_fetch_timeout = Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        });
    }
    typed.value = prost::Message::encode_to_vec(&manager);
    late_listener.value = prost::Message::encode_to_vec(&proto);
    ads.set(
        LISTENER,
        vec![
            rds_listener("ingress", port, "ingress", "routes"),
            late_listener,
        ],
    );
    wait_for(
        "both initial fetch timeouts",
        Duration::from_secs(20),
        || {
            let stats = remora_tests::admin_stat(admin, "cluster.late.init_fetch_timeout").zip(
                remora_tests::admin_stat(admin, "http.late.rds.late-routes.init_fetch_timeout"),
            );
            (stats == Some((1, 1))).then_some(())
        },
    );
    let (_, _, text) = http_get(admin, "/stats").expect("/stats");
    text.lines()
        .filter(|line| {
            line.starts_with("cluster.late.update_") && !line.contains("update_time")
                || line.starts_with("cluster.late.init_fetch_timeout")
                || line.starts_with("http.late.rds.late-routes.update_")
                    && !line.contains("update_time")
                || line.starts_with("http.late.rds.late-routes.init_fetch_timeout")
        })
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn initial_fetch_timeouts_of_endpoints_and_routes_count_as_envoy_counts_them() {
    for api_type in ["GRPC", "DELTA_GRPC"] {
        let remora = late_subscriptions(Under::Remora, api_type);
        assert_eq!(remora["cluster.late.init_fetch_timeout"], 1, "{remora:?}");
        assert_eq!(remora["cluster.late.update_success"], 0, "{remora:?}");
        if !envoy::available_or_skip("initial fetch timeouts under envoy") {
            continue;
        }
        let envoy = late_subscriptions(Under::Envoy, api_type);
        assert_eq!(remora, envoy, "{api_type}: Remora, then Envoy");
    }
}
