//! Two remora-cp replicas sharing one etcd: a write to one is seen by the other and reaches a
//! real Envoy connected to the other. (How fast is for benchmarks, not for a test's deadline.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::envoy::Envoy;
use remora_tests::{free_port, wait_for};

#[test]
fn a_write_to_one_replica_reaches_envoy_on_the_other() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    if !envoy_or_skip() {
        return;
    }
    let store = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
    ];
    let writer = ControlPlane::start_with(free_port(), free_port(), &store);
    let server = ControlPlane::start_with(free_port(), free_port(), &store);

    let alpha = EchoServer::start("alpha", "127.0.0.1");
    let beta = EchoServer::start("beta", "127.0.0.1");
    let listener_port = free_port();
    let ingress: SocketAddr = ([127, 0, 0, 1], listener_port).into();
    let version = writer.apply(&documents(&[
        eds_cluster("alpha"),
        endpoints("alpha", alpha.addr),
        eds_cluster("beta"),
        endpoints("beta", beta.addr),
        route("local_route", "alpha"),
        listener("ingress", listener_port, "local_route"),
    ]));
    wait_for(
        "the other replica to see the write",
        Duration::from_secs(30),
        || {
            let (status, body) = server.call("GET", "/v1/routes", "");
            (status == 200 && body["version"].as_u64() == Some(version)).then_some(())
        },
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let bootstrap = envoy_bootstrap(dir.path(), "envoy-etcd", "edge", server.xds, admin, "GRPC");
    let _envoy = Envoy::start(&bootstrap, admin, &[]);
    wait_for_upstream(ingress, "alpha");

    let next = writer.put("routes", "local_route", &route("local_route", "beta"));
    assert!(next > version);
    wait_for_upstream(ingress, "beta");
    server.wait_for_ack("envoy-etcd", "RDS", next);

    // Writes through either replica keep one increasing version.
    let (status, body) = server.call("DELETE", "/v1/listeners/ingress", "");
    assert_eq!(status, 200, "{body}");
    assert!(body["version"].as_u64().is_some_and(|v| v > next), "{body}");
    drop(etcd);
}
