//! Traffic capture end to end, in network namespaces this test creates: a "pod" namespace
//! with the capture rules installed by `remora-init` and `remora-proxy` running as uid 1337,
//! and a "peer" namespace on the other end of a veth pair.
//! - An app in the pod (uid 1000) makes a plain HTTP request to the peer by IP; the request
//!   is redirected to the proxy's outbound listener (15001), which finds the original
//!   destination, adds a header and forwards it there.
//! - A request from the peer to the pod's app port (8080) is redirected to the proxy's inbound
//!   listener (15006), which adds a header and forwards it to the app on 127.0.0.1:8080.
//!
//! Both show in the proxy's stats. Needs root, iproute2, iptables and util-linux (setpriv);
//! skips with a message otherwise, and fails instead when `REMORA_REQUIRE_ALL=1` (CI).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use remora_tests::echo::EchoServer;
use remora_tests::netns::{NamespacePair, in_namespace, listen_in, missing_prerequisite, run};
use remora_tests::process::ChildGuard;
use remora_tests::{wait_for, workspace_binary};

// Benchmarking range (198.18.0.0/15), configured only inside the test's own namespaces.
const POD_IP: &str = "198.18.7.1";
const PEER_IP: &str = "198.18.7.2";
const PROXY_UID: &str = "1337";
const APP_UID: &str = "1000";

fn bootstrap() -> String {
    // The same file Envoy would take: an outbound capture listener that recovers the original
    // destination and forwards to it (ORIGINAL_DST cluster), and an inbound one that matches
    // the original destination port and forwards to the app on loopback.
    let hcm = |prefix: &str, direction: &str, cluster: &str| {
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: {prefix}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster} }}
                request_headers_to_add:
                - header: {{ key: x-remora-captured, value: {direction} }}"#
        )
    };
    format!(
        r#"node: {{ id: capture-test.default, cluster: capture-test }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }}
static_resources:
  listeners:
  - name: virtual_outbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:
    - filter_chain_match: {{ destination_port: 80 }}
      filters:{outbound}
  - name: virtual_inbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15006 }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filter_chain_match: {{ destination_port: 8080 }}
      filters:{inbound}
  clusters:
  - name: outbound_passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
  - name: inbound_app
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: inbound_app
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 8080 }} }} }}
"#,
        outbound = hcm("outbound_http", "outbound", "outbound_passthrough"),
        inbound = hcm("inbound_http", "inbound", "inbound_app"),
    )
}

/// GET through a plain socket opened by bash as `uid` inside `ns` (so the iptables owner match
/// sees that uid); returns the raw response.
fn get_as(ns: &str, uid: &str, ip: &str, port: u16, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: {ip}\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"
    );
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid",
        uid,
        "--regid",
        uid,
        "--clear-groups",
        "bash",
        "-c",
        &script,
    ])
}

fn body_json(response: &str) -> serde_json::Value {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|error| panic!("not JSON ({error}):\n{response}"))
}

fn admin_stat(ns: &str, name: &str) -> Option<u64> {
    let name = name.to_string();
    in_namespace(ns, move || {
        remora_tests::admin_stat("127.0.0.1:15000".parse().unwrap(), &name)
    })
}

#[test]
fn captured_traffic_goes_through_the_proxy_both_ways() {
    if let Some(reason) =
        missing_prerequisite(&["ip", "iptables-restore", "iptables-save", "setpriv", "bash"])
    {
        remora_tests::skip("captured_traffic_goes_through_the_proxy_both_ways", &reason);
        return;
    }
    let namespaces = NamespacePair::create(
        &format!("remora-cap-{}", std::process::id()),
        &format!("{POD_IP}/24"),
        &format!("{PEER_IP}/24"),
    );
    let (pod, peer) = (namespaces.left.clone(), namespaces.right.clone());

    let _peer_server = EchoServer::start_on(
        "peer",
        listen_in(&peer, format!("{PEER_IP}:80").parse().unwrap()),
    );
    let _app = EchoServer::start_on("app", listen_in(&pod, "0.0.0.0:8080".parse().unwrap()));

    let init = workspace_binary("remora-init");
    run(&[
        "ip",
        "netns",
        "exec",
        &pod,
        init.to_str().unwrap(),
        "--no-ipv6",
    ]);

    // The proxy runs as uid 1337, so its bootstrap must be readable by that user.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bootstrap_path = dir.path().join("bootstrap.yaml");
    std::fs::write(&bootstrap_path, bootstrap()).unwrap();
    std::fs::set_permissions(&bootstrap_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut command = Command::new("ip");
    command
        .args([
            "netns", "exec", &pod, "setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID,
        ])
        .arg("--clear-groups")
        .arg(workspace_binary("remora-proxy"))
        .arg("-c")
        .arg(&bootstrap_path)
        .args(["--concurrency", "1"]);
    let mut proxy = ChildGuard::spawn("remora-proxy", command);
    wait_for(
        "the proxy's /ready inside the pod",
        Duration::from_secs(20),
        || {
            assert!(
                proxy.try_wait().is_none(),
                "remora-proxy exited:\n{}",
                proxy.log()
            );
            let pod = pod.clone();
            in_namespace(&pod, || {
                let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
                matches!(remora_tests::http_get(admin, "/ready"), Ok((200, _, _))).then_some(())
            })
        },
    );

    // Outbound: the app talks to the peer's IP; the proxy is in the path.
    let response = get_as(&pod, APP_UID, PEER_IP, 80, "/outbound");
    let seen = body_json(&response);
    assert_eq!(seen["upstream"], "peer", "{response}");
    assert_eq!(seen["path"], "/outbound");
    assert_eq!(
        seen["headers"]["x-remora-captured"], "outbound",
        "{response}"
    );
    assert_eq!(
        admin_stat(&pod, "http.outbound_http.downstream_rq_total"),
        Some(1)
    );

    // Inbound: the peer talks to the pod's app port; the proxy is in the path.
    let response = get_as(&peer, "0", POD_IP, 8080, "/inbound");
    let seen = body_json(&response);
    assert_eq!(seen["upstream"], "app", "{response}");
    assert_eq!(seen["path"], "/inbound");
    assert_eq!(
        seen["headers"]["x-remora-captured"], "inbound",
        "{response}"
    );
    assert_eq!(
        admin_stat(&pod, "http.inbound_http.downstream_rq_total"),
        Some(1)
    );

    // The proxy's own connections were not captured again (no loop): one request each way.
    assert_eq!(
        admin_stat(&pod, "http.outbound_http.downstream_rq_total"),
        Some(1)
    );
    drop(proxy);
}
