//! Process lifecycle: SIGTERM drains (in-flight requests finish, then exit 0), and gRPC
//! (bidirectional streaming with trailers) through the proxy with a tonic client and server.

#[path = "common/ads.rs"]
mod ads;
mod common;

use std::time::{Duration, Instant};

use common::*;
use remora_tests::{free_port, http_get, wait_for};

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let upstream = HeldUpstream::start("done");
    let slow = upstream.addr;
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let routes = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: \"/\"}\n                route: {cluster: slow}\n";
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", routes)],
        &[static_cluster("slow", &[slow])],
    );
    let mut proxy = Proxy::start(&yaml, admin, &["--drain-time-s", "20"]);
    let addr = loopback(port);
    const IN_FLIGHT: u64 = 16;
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            std::thread::spawn(move || {
                http_get(addr, &format!("/in-flight/{i}")).map(|(status, _, body)| (status, body))
            })
        })
        .collect();
    wait_for(
        "all requests at the upstream",
        Duration::from_secs(10),
        || (upstream.arrived() == IN_FLIGHT).then_some(()),
    );
    let signalled = Instant::now();
    proxy.process.signal("TERM");
    // Draining: the admin says so and new connections are refused.
    wait_for("draining", Duration::from_secs(5), || {
        http_get(admin, "/ready")
            .ok()
            .filter(|(s, _, b)| *s == 503 && b.contains("DRAINING"))
            .map(|_| ())
    });
    wait_for("listener closed", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    });
    assert!(
        requests.iter().all(|r| !r.is_finished()),
        "the port closes while requests are still in flight"
    );
    upstream.release();
    for request in requests {
        let (status, body) = request
            .join()
            .expect("client thread")
            .expect("in-flight request completes");
        assert_eq!((status, body.as_str()), (200, "done"));
    }
    let exit = proxy
        .process
        .wait_timeout(Duration::from_secs(15))
        .expect("exits once drained");
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "exits when drained, not at the drain deadline"
    );
}

#[test]
fn grpc_bidi_streaming_with_trailers_through_the_proxy() {
    use xds_api::envoy::service::discovery::v3::DiscoveryRequest;
    use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    // A tonic gRPC server (the test ADS server) as the upstream, behind an HTTP/2 cluster.
    let upstream = ads::AdsServer::start();
    upstream.set(
        xds_api::type_urls::CLUSTER,
        vec![ads::cluster("name: from-grpc\nconnect_timeout: 1s\n")],
    );
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let routes = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: \"/envoy.service.discovery.v3.AggregatedDiscoveryService/\"}\n                route: {cluster: grpc}\n";
    let cluster = http2_cluster("grpc", upstream.addr);
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "grpc",
            port,
            "          codec_type: HTTP2\n",
            routes,
        )],
        &[cluster],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .expect("connect through proxy");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DiscoveryRequest {
            type_url: xds_api::type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .expect("send");
        let mut responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let first = responses
            .message()
            .await
            .expect("first message")
            .expect("a response");
        assert_eq!(first.type_url, xds_api::type_urls::CLUSTER);
        assert_eq!(first.resources.len(), 1);
        drop(tx); // half-close: the server ends the stream with grpc-status 0 in trailers
        let end = responses
            .message()
            .await
            .expect("trailers carry an OK grpc-status");
        assert!(end.is_none());
    });
    assert!(proxy.stat("cluster.grpc.upstream_rq_2xx") >= 1);
}
