//! TLS end to end: proxy A originates TLS (UpstreamTlsContext with SNI and a trusted CA) to
//! proxy B, which picks a filter chain by SNI (tls_inspector), terminates TLS with that chain's
//! certificate and routes to an echo upstream; a WebSocket tunnel crosses the same TLS hop.

mod common;

use std::path::Path;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, http_get};

struct Pki {
    ca: String,
    backend: (String, String),
    other: (String, String),
}

fn pki(dir: &Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write pem");
        path.display().to_string()
    };
    let leaf = |host: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("sign");
        (
            write(&format!("{host}.pem"), cert.pem()),
            write(&format!("{host}.key"), key.serialize_pem()),
        )
    };
    Pki {
        backend: leaf("backend.local"),
        other: leaf("other.local"),
        ca: write("ca.pem", ca.pem()),
    }
}

fn tls_chain(name: &str, server_name: &str, cert: &(String, String), cluster: &str) -> String {
    format!(
        r#"    - name: {name}
      filter_chain_match: {{server_names: ["{server_name}"], transport_protocol: tls}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: "{cert}"}}, private_key: {{filename: "{key}"}}}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          use_remote_address: true
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]
"#,
        cert = cert.0,
        key = cert.1,
    )
}

fn tls_cluster(name: &str, target: std::net::SocketAddr, sni: &str, ca: &str) -> String {
    static_cluster(name, &[target]).replace(
        "    type: STATIC\n",
        &format!(
            "    type: STATIC\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: {sni}\n        common_tls_context:\n          validation_context: {{trusted_ca: {{filename: \"{ca}\"}}}}\n"
        ),
    )
}

#[test]
fn tls_origination_sni_chain_selection_and_termination() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");

    // Proxy B: TLS listener, one chain per server name.
    let (admin_b, admin_b_yaml) = admin_block();
    let port_b = free_port();
    let listener_b = format!(
        "  - name: tls_in\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port_b}}}}}\n    listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n      typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}\n    filter_chains:\n{}{}",
        tls_chain("backend", "backend.local", &pki.backend, "a"),
        tls_chain("other", "other.local", &pki.other, "b"),
    );
    // The backend chain logs the server name its client asked for, and the route it took.
    let log_path = dir.path().join("backend.log");
    let listener_b = listener_b.replacen(
        "          use_remote_address: true\n",
        &format!(
            "          use_remote_address: true\n          access_log: [{{name: file, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{}\", log_format: {{text_format: \"%REQUESTED_SERVER_NAME% %ROUTE_NAME% %UPSTREAM_CLUSTER_RAW%\\n\"}}}}}}]\n",
            log_path.display()
        ),
        1,
    );
    let yaml_b = bootstrap(
        &admin_b_yaml,
        &[listener_b],
        &[
            static_cluster("a", &[a.addr]),
            static_cluster("b", &[b.addr]),
        ],
    );
    if envoy::available() {
        let (_d, path) = write_config(&yaml_b);
        envoy::validate(&path).unwrap_or_else(|e| panic!("envoy rejects the TLS bootstrap: {e}"));
    }
    let proxy_b = Proxy::start(&yaml_b, admin_b, &[]);

    // Proxy A: plaintext in, TLS out with SNI and CA verification.
    let (admin_a, admin_a_yaml) = admin_block();
    let port_a = free_port();
    let routes = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: \"/backend\"}\n                route: {cluster: to_backend}\n              - match: {prefix: \"/other\"}\n                route: {cluster: to_other}\n              - match: {prefix: \"/wrong-ca\"}\n                route: {cluster: wrong_name}\n";
    let target = loopback(port_b);
    let yaml_a = bootstrap(
        &admin_a_yaml,
        &[http_listener("plain_in", port_a, "", routes)],
        &[
            tls_cluster("to_backend", target, "backend.local", &pki.ca),
            tls_cluster("to_other", target, "other.local", &pki.ca),
            // SNI picks the `backend` chain, but the name does not match its certificate.
            tls_cluster("wrong_name", target, "backend.local", &pki.ca)
                .replace("sni: backend.local", "sni: nobody.local"),
        ],
    );
    let _proxy_a = Proxy::start(&yaml_a, admin_a, &[]);
    let addr = loopback(port_a);
    let (status, _, body) = http_get(addr, "/backend/x").expect("request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(echo_json(&body)["upstream"], "a");
    assert_eq!(
        echo_json(&body)["headers"]["x-forwarded-proto"],
        "https",
        "B saw a TLS connection"
    );
    let (status, _, body) = http_get(addr, "/other/y").expect("request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(echo_json(&body)["upstream"], "b");
    // No chain for this SNI at B, so the handshake fails: 503 at A.
    let (status, _, _) = http_get(addr, "/wrong-ca").expect("request");
    assert_eq!(status, 503);
    assert_eq!(proxy_b.stat("http.backend.downstream_rq_2xx"), 1);
    assert_eq!(proxy_b.stat("http.other.downstream_rq_2xx"), 1);
    let logged = remora_tests::wait_for(
        "the backend chain's log line",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log_path)
                .ok()
                .filter(|log| !log.is_empty())
        },
    );
    assert_eq!(logged, "backend.local - a\n", "an unnamed route logs as -");
}

/// A WebSocket tunnel through a TLS hop: A's tunnel has a plain client and a TLS upstream, B's
/// a TLS client and a plain upstream, so both copy rather than splice, with the same behaviour.
#[test]
fn websocket_tunnel_crosses_a_tls_hop() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let upstream = upgrade_greeting_echo_upstream(b"upstream-first");
    let upgrades = "          upgrade_configs: [{upgrade_type: websocket}]\n";

    let (admin_b, admin_b_yaml) = admin_block();
    let port_b = free_port();
    let listener_b = format!(
        "  - name: tls_in\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port_b}}}}}\n    listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n      typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}\n    filter_chains:\n{}",
        tls_chain("backend", "backend.local", &pki.backend, "ws").replace(
            "          use_remote_address: true\n",
            &format!("          use_remote_address: true\n{upgrades}"),
        ),
    );
    let yaml_b = bootstrap(
        &admin_b_yaml,
        &[listener_b],
        &[static_cluster("ws", &[upstream])],
    );
    let proxy_b = Proxy::start(&yaml_b, admin_b, &[]);

    let (admin_a, admin_a_yaml) = admin_block();
    let port_a = free_port();
    let yaml_a = bootstrap(
        &admin_a_yaml,
        &[http_listener(
            "plain_in",
            port_a,
            upgrades,
            &catch_all("to_backend", "15s"),
        )],
        &[tls_cluster(
            "to_backend",
            loopback(port_b),
            "backend.local",
            &pki.ca,
        )],
    );
    let proxy_a = Proxy::start(&yaml_a, admin_a, &[]);
    let sent = tunnel_round_trip(loopback(port_a), 1_000_000);
    remora_tests::wait_for(
        "byte stats on both hops",
        std::time::Duration::from_secs(30),
        || {
            (proxy_a.stat("cluster.to_backend.upstream_cx_tx_bytes_total") >= sent
                && proxy_b.stat("cluster.ws.upstream_cx_rx_bytes_total") >= sent)
                .then_some(())
        },
    );
}

/// `tcp_proxy` to a TLS cluster: what the client sends at once goes out with the handshake's
/// last flight (read before the handshake). Nothing is lost or counted twice whichever way the
/// first bytes went: the upgrade head, the bytes behind it and a megabyte arrive whole, a
/// half-close passes, and both byte counters hold exactly what the client sent.
#[test]
fn tcp_proxy_to_a_tls_cluster_sends_early_bytes_once() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let upstream = upgrade_greeting_echo_upstream(b"upstream-first");
    let (admin_b, admin_b_yaml) = admin_block();
    let port_b = free_port();
    let listener_b = format!(
        "  - name: tls_in\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port_b}}}}}\n    filter_chains:\n{}",
        tls_chain("backend", "backend.local", &pki.backend, "ws")
            .replace("      filter_chain_match: {server_names: [\"backend.local\"], transport_protocol: tls}\n", "")
            .replace(
                "          use_remote_address: true\n",
                "          use_remote_address: true\n          upgrade_configs: [{upgrade_type: websocket}]\n",
            ),
    );
    let yaml_b = bootstrap(
        &admin_b_yaml,
        &[listener_b],
        &[static_cluster("ws", &[upstream])],
    );
    let _proxy_b = Proxy::start(&yaml_b, admin_b, &[]);

    let (admin_a, admin_a_yaml) = admin_block();
    let port_a = free_port();
    let yaml_a = bootstrap(
        &admin_a_yaml,
        &[tcp_listener("l4", port_a, "to_backend", "")],
        &[tls_cluster(
            "to_backend",
            loopback(port_b),
            "backend.local",
            &pki.ca,
        )],
    );
    let proxy_a = Proxy::start(&yaml_a, admin_a, &[]);
    let expected: u64 = [100_000, 0, 1_000_000]
        .into_iter()
        .map(|bulk| UPGRADE_HEAD.len() as u64 + tunnel_round_trip(loopback(port_a), bulk))
        .sum();
    remora_tests::wait_for(
        "byte counters on the client side",
        std::time::Duration::from_secs(30),
        || {
            let rx = proxy_a.stat("tcp.l4.downstream_cx_rx_bytes_total");
            let tx = proxy_a.stat("cluster.to_backend.upstream_cx_tx_bytes_total");
            (rx == expected && tx == expected).then_some(())
        },
    );
}

/// The cipher and key exchange `openssl s_client` (TLS 1.2) agrees on with `port` when it
/// offers only `cipher` and the groups `curves` (which must hold P-256, the certificate's own
/// curve, for the client to accept its signature); `None` when the handshake fails.
fn negotiated(port: u16, cipher: &str, curves: &str) -> Option<(String, String)> {
    let output = std::process::Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "backend.local", "-tls1_2", "-cipher", cipher])
        .args(["-curves", curves])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&output.stdout);
    // `New, TLSv1.2, Cipher is ...` and `Server Temp Key: ...`.
    let field = |label: &str| {
        text.lines()
            .find_map(|line| line.split_once(label).map(|(_, value)| value.trim()))
            .map(str::to_string)
    };
    let cipher = field("Cipher is ").filter(|cipher| cipher != "(NONE)")?;
    Some((cipher, field("Server Temp Key: ").unwrap_or_default()))
}

/// `tls_params.cipher_suites` (a BoringSSL group, a suite rustls lacks) and `ecdh_curves`
/// limit what a TLS 1.2 client can agree on, under Remora as under Envoy.
#[test]
fn cipher_suites_and_curves_limit_the_handshake_as_in_envoy() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let a = EchoServer::start("a", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let chain = tls_chain("backend", "backend.local", &pki.backend, "a").replace(
        "          common_tls_context:\n",
        "          common_tls_context:\n            tls_params:\n              cipher_suites: [\"[ECDHE-ECDSA-CHACHA20-POLY1305|ECDHE-ECDSA-AES256-GCM-SHA384]\", ECDHE-ECDSA-AES128-SHA]\n              ecdh_curves: [P-384, P-521]\n",
    );
    let listener = format!(
        "  - name: tls_in\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n      typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}\n    filter_chains:\n{chain}"
    );
    let yaml = bootstrap(&admin_yaml, &[listener], &[static_cluster("a", &[a.addr])]);
    let outcomes = |port: u16| {
        [
            ("ECDHE-ECDSA-CHACHA20-POLY1305", "P-384:P-256"),
            ("ECDHE-ECDSA-AES256-GCM-SHA384", "P-384:P-256"),
            ("ECDHE-ECDSA-AES128-GCM-SHA256", "P-384:P-256"),
            ("ECDHE-ECDSA-CHACHA20-POLY1305", "X25519:P-256"),
        ]
        .map(|(cipher, curves)| negotiated(port, cipher, curves))
    };
    let remora = {
        let _proxy = Proxy::start(&yaml, admin, &[]);
        remora_tests::wait_for_port(loopback(port), std::time::Duration::from_secs(20));
        outcomes(port)
    };
    let agreed = |cipher: &str| Some((cipher.to_string(), "ECDH, secp384r1, 384 bits".into()));
    assert_eq!(
        remora,
        [
            agreed("ECDHE-ECDSA-CHACHA20-POLY1305"),
            agreed("ECDHE-ECDSA-AES256-GCM-SHA384"),
            None,
            None
        ]
    );
    if !envoy::available_or_skip("the Envoy half of cipher_suites and ecdh_curves") {
        return;
    }
    let (_dir, path) = write_config(&yaml);
    let _envoy = envoy::Envoy::start(&path, admin, &[]);
    remora_tests::wait_for_port(loopback(port), std::time::Duration::from_secs(20));
    assert_eq!(outcomes(port), remora, "left: envoy, right: remora");
}
