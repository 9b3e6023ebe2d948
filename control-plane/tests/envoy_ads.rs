//! Real Envoy 1.40 with ADS at remora-cp, SotW and delta: config pushed through the API makes
//! Envoy proxy HTTP to real upstreams; route changes move traffic; a deleted listener closes;
//! the proxies table shows Envoy's ACKs.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::envoy::Envoy;
use remora_tests::{free_port, wait_for};

fn envoy_follows_the_api(api_type: &str) {
    if !envoy_or_skip() {
        return;
    }
    let alpha = EchoServer::start("alpha", "127.0.0.1");
    let beta = EchoServer::start("beta", "127.0.0.1");
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = ControlPlane::start(&dir.path().join("data"));
    let listener_port = free_port();
    let ingress: SocketAddr = ([127, 0, 0, 1], listener_port).into();
    cp.apply(&documents(&[
        eds_cluster("alpha"),
        endpoints("alpha", alpha.addr),
        eds_cluster("beta"),
        endpoints("beta", beta.addr),
        route("local_route", "alpha"),
        listener("ingress", listener_port, "local_route"),
    ]));

    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-1", "edge", cp.xds, admin, api_type);
    let envoy = Envoy::start(&bootstrap, admin, &["--drain-time-s", "1"]);
    wait_for_upstream(ingress, "alpha");

    let version = cp.put("routes", "local_route", &route("local_route", "beta"));
    wait_for_upstream(ingress, "beta");
    let proxy = cp.wait_for_ack("envoy-1", "RDS", version);
    assert_eq!(proxy["group"], "edge");
    assert_eq!(
        proxy["protocol"],
        if api_type == "GRPC" { "sotw" } else { "delta" }
    );
    for xds in ["CDS", "EDS", "LDS"] {
        assert!(
            proxy["types"][xds]["acked_version"].is_string(),
            "{xds} not ACKed: {proxy}"
        );
        assert!(
            proxy["types"][xds]["last_nack"].is_null(),
            "{xds} NACKed: {proxy}"
        );
    }

    // A changed EDS cluster is rebuilt by Envoy and must get its endpoints again to finish
    // warming (well before Envoy's 15 s initial fetch timeout).
    let changed = eds_cluster("beta").replace("connect_timeout: 1s", "connect_timeout: 2s");
    let version = cp.put("clusters", "beta", &changed);
    cp.wait_for_ack("envoy-1", "CDS", version);
    wait_for(
        "the changed cluster to finish warming",
        Duration::from_secs(5),
        || (envoy.stat("cluster_manager.warming_clusters") == Some(0)).then_some(()),
    );
    assert_eq!(upstream_behind(ingress).as_deref(), Some("beta"));

    let (status, body) = cp.call("DELETE", "/v1/listeners/ingress", "");
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the deleted listener to close",
        Duration::from_secs(30),
        || {
            TcpStream::connect_timeout(&ingress, Duration::from_millis(200))
                .is_err()
                .then_some(())
        },
    );
    assert!(
        envoy
            .stat("listener_manager.total_listeners_active")
            .is_some_and(|n| n == 0)
    );
    let (status, _) = cp.call("DELETE", "/v1/listeners/ingress", "");
    assert_eq!(status, 404, "deleting an absent listener");
}

#[test]
fn sotw_envoy_follows_config_from_the_api() {
    envoy_follows_the_api("GRPC");
}

#[test]
fn delta_envoy_follows_config_from_the_api() {
    envoy_follows_the_api("DELTA_GRPC");
}
