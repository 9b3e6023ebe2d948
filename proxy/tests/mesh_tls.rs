//! Mesh mTLS end to end: SPIFFE certificates (a URI SAN and nothing else) checked by SAN
//! matchers, against real Envoy in both directions; secrets from static resources, from a
//! watched file, over ADS and from an SDS stream of their own, rotated under load without a
//! failed request; static listeners and clusters naming ADS secrets holding initialization
//! until they come, as in Envoy.

#[path = "common/ads.rs"]
mod ads;
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use pki::*;
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, http_get, wait_for};

/// The CA's file and two workloads' certificate and key files: `backend/server` (serial 1)
/// and `frontend/client` (serial 2).
fn workload_files(dir: &Path, ca: &Ca) -> (String, (String, String), (String, String)) {
    let files = |leaf: Leaf, stem: &str| {
        (
            write(dir, &format!("{stem}.pem"), &leaf.certificate),
            write(dir, &format!("{stem}.key"), &leaf.key),
        )
    };
    (
        write(dir, "ca.pem", &ca.pem()),
        files(ca.workload("backend", "server", 1), "server"),
        files(ca.workload("frontend", "client", 2), "client"),
    )
}

/// The same files, issued by the control plane's mesh CA (`remora-cp`'s own code): what
/// sidecars of a Remora mesh present.
fn mesh_ca_workload_files(dir: &Path) -> (String, (String, String), (String, String)) {
    use remora_control_plane::ca::{CaOptions, SpiffeId};
    let trust_domain = TRUST_DOMAIN.trim_start_matches("spiffe://");
    let (root, root_key) =
        remora_control_plane::ca::generate_root(trust_domain).expect("mesh CA root");
    let options = CaOptions {
        trust_domain: trust_domain.to_string(),
        ..CaOptions::default()
    };
    let ca = remora_control_plane::ca::Ca::from_pem(&root, &root_key, &options).expect("CA");
    let files = |namespace: &str, account: &str| {
        let issued = ca
            .issue(
                &SpiffeId::new(trust_domain, namespace, account),
                std::time::SystemTime::now(),
            )
            .expect("issue");
        (
            write(dir, &format!("{account}.pem"), &issued.chain_pem),
            write(dir, &format!("{account}.key"), &issued.key_pem),
        )
    };
    (
        write(dir, "ca.pem", &root),
        files("backend", "server"),
        files("frontend", "client"),
    )
}

/// Client sidecar (originates mTLS) → server sidecar (terminates mTLS) → app, with the two
/// sidecars Remora and Envoy in every pairing. A SAN the peer does not have fails the
/// connection the same way whichever side checks it and whichever proxy that is.
#[test]
fn spiffe_mtls_between_remora_and_envoy_in_both_directions() {
    if !envoy::available_or_skip("Envoy interop over SPIFFE mTLS") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (ca_path, server_leaf, client_leaf) = mesh_ca_workload_files(dir.path());
    let app = EchoServer::start("app", "127.0.0.1");
    let log_path = dir.path().join("inbound.log");
    // `/certs` of each role, by proxy: the same bootstrap shows the same certificates.
    let mut certs: std::collections::BTreeMap<(&str, &str), Vec<serde_json::Value>> =
        Default::default();

    let mut logged = 0;
    for (client_is_remora, server_is_remora) in [(true, false), (false, true), (true, true)] {
        let pairing = format!("{} → {}", name(client_is_remora), name(server_is_remora));
        // The server sidecar: one listener admitting the frontend namespace, one admitting
        // only a namespace the client is not in.
        let (server_admin, server_admin_yaml) = admin_block();
        let (open_port, strict_port) = (free_port(), free_port());
        let server_yaml = bootstrap(
            &server_admin_yaml,
            &[
                mtls_listener(
                    "inbound",
                    open_port,
                    &server_leaf,
                    &ca_path,
                    &uri_matcher("prefix", &format!("{TRUST_DOMAIN}/ns/frontend/")),
                ),
                mtls_listener(
                    "inbound_strict",
                    strict_port,
                    &server_leaf,
                    &ca_path,
                    &uri_matcher("exact", &format!("{TRUST_DOMAIN}/ns/admin/sa/ops")),
                ),
            ],
            &[static_cluster("app", &[app.addr])],
        );
        // Remora's inbound listener also logs who called, from the client's certificate.
        let server_yaml = if server_is_remora {
            server_yaml.replacen(
                "          stat_prefix: inbound\n",
                &format!(
                    "          stat_prefix: inbound\n          access_log: [{{name: file, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{}\", log_format: {{text_format_source: {{inline_string: \"%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_PEER_SERIAL% %DOWNSTREAM_PEER_ISSUER%\\n\"}}}}}}}}]\n",
                    log_path.display()
                ),
                1,
            )
        } else {
            server_yaml
        };
        let server = run(server_is_remora, &server_yaml, server_admin);

        let (client_admin, client_admin_yaml) = admin_block();
        let client_port = free_port();
        let routes = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: \"/ok\"}\n                route: {cluster: to_server}\n              - match: {prefix: \"/wrong-server\"}\n                route: {cluster: expects_other_server}\n              - match: {prefix: \"/strict\"}\n                route: {cluster: to_strict}\n";
        let server_identity = format!("{TRUST_DOMAIN}/ns/backend/sa/server");
        let client_yaml = bootstrap(
            &client_admin_yaml,
            &[http_listener("outbound", client_port, "", routes)],
            &[
                mtls_cluster(
                    "to_server",
                    loopback(open_port),
                    &client_leaf,
                    &ca_path,
                    &uri_matcher("exact", &server_identity),
                ),
                mtls_cluster(
                    "expects_other_server",
                    loopback(open_port),
                    &client_leaf,
                    &ca_path,
                    &uri_matcher("exact", &format!("{TRUST_DOMAIN}/ns/backend/sa/other")),
                ),
                mtls_cluster(
                    "to_strict",
                    loopback(strict_port),
                    &client_leaf,
                    &ca_path,
                    &uri_matcher("exact", &server_identity),
                ),
            ],
        );
        let client_proxy = run(client_is_remora, &client_yaml, client_admin);
        let client = loopback(client_port);

        let (status, _, body) = http_get(client, "/ok").expect("request");
        assert_eq!(status, 200, "{pairing}: {body}");
        assert_eq!(echo_json(&body)["upstream"], "app", "{pairing}");
        let (status, _, _) = http_get(client, "/wrong-server").expect("request");
        assert_eq!(
            status, 503,
            "{pairing}: the client refuses the server's SAN"
        );
        let (status, _, _) = http_get(client, "/strict").expect("request");
        assert_eq!(
            status, 503,
            "{pairing}: the server refuses the client's SAN"
        );
        // And the good route still works after the refusals.
        let (status, _, _) = http_get(client, "/ok").expect("request");
        assert_eq!(status, 200, "{pairing}");
        // Both proxies count the refusals where they happened, under Envoy's names.
        let counted = |running: &Running, stat: &str| {
            wait_for(
                &format!("{pairing}: {stat}"),
                Duration::from_secs(10),
                || running.stat(stat).filter(|n| *n >= 1),
            )
        };
        counted(
            &client_proxy,
            "cluster.expects_other_server.ssl.fail_verify_san",
        );
        counted(
            &server,
            &format!("listener.127.0.0.1_{strict_port}.ssl.fail_verify_san"),
        );
        assert!(counted(&client_proxy, "cluster.to_server.ssl.handshake") >= 1);
        certs.insert(("client", name(client_is_remora)), client_proxy.certs());
        certs.insert(("server", name(server_is_remora)), server.certs());
        if server_is_remora {
            // The server is killed when this pairing ends, and access log lines wait for
            // their writer's interval: its line must be in before then.
            logged += 1;
            wait_for(
                "this pairing's inbound log line",
                Duration::from_secs(10),
                || {
                    let log = std::fs::read_to_string(&log_path).ok()?;
                    (log.lines().count() >= logged).then_some(())
                },
            );
        }
    }
    for role in ["client", "server"] {
        let remora = &certs[&(role, "remora")];
        assert_eq!(
            remora.len(),
            if role == "client" { 3 } else { 2 },
            "{remora:?}"
        );
        assert_eq!(
            remora,
            &certs[&(role, "envoy")],
            "/certs of the {role} sidecar"
        );
    }
    let log = wait_for("the inbound access log", Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path)
            .ok()
            .filter(|log| log.lines().count() >= 2)
    });
    // The serial as OpenSSL prints it (lowercase hex, no leading zero byte) and the issuer
    // the way RFC 2253 writes the mesh CA's subject.
    let client_der =
        rustls_pemfile::certs(&mut std::fs::read(&client_leaf.0).expect("pem").as_slice())
            .next()
            .expect("a certificate")
            .expect("pem");
    let (_, client) = x509_parser::parse_x509_certificate(&client_der).expect("x509");
    let serial: String = client
        .raw_serial()
        .iter()
        .skip_while(|byte| **byte == 0)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let issuer = client.issuer().to_string();
    for line in log.lines() {
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        assert_eq!(
            fields[..3],
            [
                &format!("{TRUST_DOMAIN}/ns/frontend/sa/client"),
                "-",
                serial.as_str()
            ],
            "{line}"
        );
        // x509-parser prints "O=a, CN=b" in order; RFC 2253 reverses it and drops the spaces.
        let reversed: Vec<&str> = issuer
            .split(", ")
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert_eq!(fields[3], reversed.join(","), "{line}");
    }
}

/// A TLS client for the tests: rustls, trusting `ca`, presenting no certificate, never
/// resuming a session.
fn tls_client(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pemfile::certs(&mut ca.as_bytes()) {
        roots.add(certificate.expect("pem")).expect("ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every request a full handshake: a resumed session shows the certificate it began with.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// One request on a new TLS connection: the status and the serial of the certificate the
/// server presented; `None` if the handshake or request failed.
fn tls_request(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Option<(u16, u64)> {
    let (status, stream) = tls_get(addr, config.clone())?;
    let serial = stream
        .conn
        .peer_certificates()?
        .first()
        .map(|der| serial_of(der))?;
    Some((status, serial))
}

/// The serial number of a DER certificate, as the number the test gave rcgen.
fn serial_of(der: &[u8]) -> u64 {
    let (_, certificate) =
        x509_parser::parse_x509_certificate(der).expect("a certificate from the proxy");
    certificate
        .raw_serial()
        .iter()
        .fold(0u64, |serial, byte| (serial << 8) | u64::from(*byte))
}

/// A `DiscoveryResponse` file with one TLS certificate secret, as Envoy's file-based SDS reads.
fn certificate_secret_file(name: &str, leaf: &Leaf) -> String {
    format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: {name}\n  tls_certificate:\n    certificate_chain: {{inline_string: {}}}\n    private_key: {{inline_string: {}}}\n",
        quoted(&leaf.certificate),
        quoted(&leaf.key),
    )
}

/// Replaces `path` in one step (write aside, rename), as a Kubernetes secret volume does.
fn replace_file(path: &Path, text: &str) {
    let aside = path.with_extension("next");
    std::fs::write(&aside, text).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

fn tls_listener_with_sds(port: u16, sds: &str) -> String {
    format!(
        r#"  - name: tls_in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs: [{sds}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tls_in
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: app}}}}]}}]
"#
    )
}

/// The certificate of a TLS listener comes from a watched SDS file. It is rotated every two
/// seconds for 30 s while clients make a new TLS connection per request and one kept-alive
/// connection sends request after request: no request fails, the kept-alive connection is
/// never cut, and after each rotation new handshakes get the new certificate.
#[test]
fn file_sds_rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new();
    let secret_path = dir.path().join("server-cert.yaml");
    let first = ca.server(100);
    std::fs::write(&secret_path, certificate_secret_file("server-cert", &first)).expect("write");
    let app = EchoServer::start("app", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    // Envoy needs a node to use SDS, files included.
    let node = "node: {id: sds-file, cluster: test}\n";
    let yaml = bootstrap(
        &format!("{node}{admin_yaml}"),
        &[tls_listener_with_sds(
            port,
            &format!(
                "{{name: server-cert, sds_config: {{path_config_source: {{path: \"{}\"}}}}}}",
                secret_path.display()
            ),
        )],
        &[static_cluster("app", &[app.addr])],
    );
    if envoy::available() {
        let (_d, path) = write_config(&yaml);
        envoy::validate(&path).unwrap_or_else(|e| panic!("envoy rejects the SDS bootstrap: {e}"));
    }
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);
    let client = tls_client(&ca.pem());
    assert_eq!(tls_request(addr, &client), Some((200, 100)));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failed, client) = (stop.clone(), ok.clone(), failed.clone(), client.clone());
        load.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tls_request(addr, &client) {
                    Some((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // One connection kept alive through every rotation.
    let kept = {
        let (stop, client) = (stop.clone(), client.clone());
        std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("server.mesh.test").expect("name");
            let connection = rustls::ClientConnection::new(client, name).expect("client");
            let socket = TcpStream::connect(addr).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut stream = rustls::StreamOwned::new(connection, socket);
            let mut served = 0u64;
            while !stop.load(Ordering::Relaxed) {
                stream
                    .write_all(b"GET /kept HTTP/1.1\r\nhost: server.mesh.test\r\n\r\n")
                    .expect("the kept-alive connection stays open");
                let head = read_head(&mut stream).expect("a response on the kept connection");
                let head = String::from_utf8_lossy(&head).to_string();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().expect("length"))
                    })
                    .expect("content-length");
                let mut body = vec![0; length];
                stream.read_exact(&mut body).expect("body");
                served += 1;
            }
            served
        })
    };

    let started = Instant::now();
    let mut serial = 100;
    while started.elapsed() < Duration::from_secs(30) {
        serial += 1;
        let next = ca.server(serial);
        replace_file(&secret_path, &certificate_secret_file("server-cert", &next));
        // The next handshakes get the new certificate once the file is seen (about a second).
        wait_for(
            &format!("handshakes with certificate {serial}"),
            Duration::from_secs(10),
            || (tls_request(addr, &client)? == (200, serial)).then_some(()),
        );
        // The next rotation once the load has run through this certificate for a while.
        let served = ok.load(Ordering::Relaxed);
        wait_for(
            "load on the new certificate",
            Duration::from_secs(10),
            || (ok.load(Ordering::Relaxed) >= served + 300).then_some(()),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().expect("load thread");
    }
    let kept_served = kept
        .join()
        .expect("the kept-alive connection served throughout");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotations: {}, new-connection requests: {ok} ok / {failed} failed, kept-alive requests: {kept_served}",
        serial - 100
    );
    assert_eq!(failed, 0, "{ok} requests passed");
    assert!(ok > 0 && kept_served > 0);
    assert!(serial - 100 >= 5, "rotated {} times", serial - 100);
    // A file that no longer reads leaves the last good certificate serving.
    replace_file(&secret_path, "resources: [{\"@type\": nonsense}]");
    wait_for(
        "the bad file to be reported",
        Duration::from_secs(10),
        || {
            proxy
                .process
                .log()
                .contains("secret file: keeping the last good version")
                .then_some(())
        },
    );
    assert_eq!(tls_request(addr, &client), Some((200, serial)));
}

/// Secrets over ADS: a listener whose certificate and a cluster whose trust bundle come by
/// SDS warm until those arrive; a new certificate serves the next handshake; a certificate
/// whose key does not belong to it is NACKed by name and the last good one keeps serving.
#[test]
fn ads_secrets_warm_rotate_and_nack() {
    use xds_api::type_urls::{CLUSTER, LISTENER, SECRET};
    let ca = Ca::new();
    let app = EchoServer::start("app", "127.0.0.1");
    let ads_server = ads::AdsServer::start();
    let (admin, _) = admin_block();
    let port = free_port();
    let yaml = format!(
        r#"node: {{id: sds-node, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
{app}
{xds}"#,
        admin_port = admin.port(),
        app = static_cluster("app", &[app.addr]).trim_end(),
        xds = http2_cluster("xds", ads_server.addr),
    );
    let listener_yaml = tls_listener_with_sds(port, "{name: server-cert, sds_config: {ads: {}}}");
    let listener_yaml = as_resource(&listener_yaml);
    ads_server.set(LISTENER, vec![ads::listener(&listener_yaml)]);
    ads_server.set(CLUSTER, vec![]);
    let (_dir, path) = write_config(&yaml);
    let mut command = std::process::Command::new(remora_tests::workspace_binary("remora-proxy"));
    command.arg("-c").arg(&path).args(["--log-level", "debug"]);
    let mut proxy = remora_tests::process::ChildGuard::spawn("remora-proxy", command);

    // The listener waits for its certificate: the server is not live and nothing listens.
    wait_for(
        "the proxy to ask for the secret",
        Duration::from_secs(20),
        || {
            ads_server
                .requests()
                .into_iter()
                .find(|r| r.type_url == SECRET && r.names.contains(&"server-cert".to_string()))
        },
    );
    assert!(proxy.try_wait().is_none(), "{}", proxy.log());
    let (status, _, _) = http_get(admin, "/ready").expect("admin");
    assert_eq!(status, 503, "not live while the listener warms");
    assert!(
        TcpStream::connect(loopback(port)).is_err(),
        "the warming listener is not bound"
    );

    let secret = |leaf: &Leaf| {
        ads::pack(
            SECRET,
            &xds_api::json::from_yaml_str::<
                xds_api::envoy::extensions::transport_sockets::tls::v3::Secret,
            >(&format!(
                "name: server-cert\ntls_certificate: {{certificate_chain: {{inline_string: {}}}, private_key: {{inline_string: {}}}}}",
                quoted(&leaf.certificate),
                quoted(&leaf.key)
            ))
            .expect("secret"),
        )
    };
    let first = ca.server(7);
    ads_server.set(SECRET, vec![secret(&first)]);
    wait_ready(&mut proxy, admin);
    let client = tls_client(&ca.pem());
    let addr = loopback(port);
    wait_for(
        "TLS with the first certificate",
        Duration::from_secs(10),
        || (tls_request(addr, &client)? == (200, 7)).then_some(()),
    );

    // Rotation: the very next handshake after the ACK has the new certificate.
    let second = ca.server(8);
    ads_server.set(SECRET, vec![secret(&second)]);
    wait_for(
        "TLS with the second certificate",
        Duration::from_secs(10),
        || (tls_request(addr, &client)? == (200, 8)).then_some(()),
    );

    // A key that is not the certificate's: NACKed with the resource and the reason.
    let mut mismatched = ca.server(9);
    mismatched.key = ca.server(10).key;
    ads_server.set(SECRET, vec![secret(&mismatched)]);
    let nack = ads_server.wait_nack("Secret server-cert");
    let message = nack.error.unwrap_or_default();
    assert!(
        message.contains("tls_certificate") && message.contains("do not match"),
        "{message}"
    );
    assert_eq!(tls_request(addr, &client), Some((200, second.serial)));
    drop(proxy);
}

/// Sidecar to sidecar, a new connection each time (tcp_proxy on the client side): the server
/// sidecar resumes the client's sessions, whichever proxy the client is and whichever version
/// it speaks (TLS 1.2 by default as a client, as Envoy; TLS 1.3 when asked, whose tickets
/// serve one handshake each), and `max_session_keys: 0` makes every handshake a full one, as
/// in Envoy.
#[test]
fn mtls_sessions_resume_between_sidecars_unless_turned_off() {
    if !envoy::available_or_skip("session resumption with an Envoy client") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new();
    let (ca_path, server_leaf, client_leaf) = workload_files(dir.path(), &ca);
    let app = EchoServer::start("app", "127.0.0.1");
    let (server_admin, server_admin_yaml) = admin_block();
    let server_port = free_port();
    let server = Proxy::start(
        &bootstrap(
            &server_admin_yaml,
            &[mtls_listener(
                "inbound",
                server_port,
                &server_leaf,
                &ca_path,
                &uri_matcher("prefix", &format!("{TRUST_DOMAIN}/ns/frontend/")),
            )],
            &[static_cluster("app", &[app.addr])],
        ),
        server_admin,
        &[],
    );
    let server_stat =
        |name: &str| server.stat(&format!("listener.127.0.0.1_{server_port}.ssl.{name}"));
    let identity = uri_matcher("exact", &format!("{TRUST_DOMAIN}/ns/backend/sa/server"));
    let cases = [
        // (client is Remora, resume, TLS 1.3 asked for)
        (true, true, false),
        (true, true, true),
        (true, false, true),
        (false, true, false),
    ];
    for (client_is_remora, resume, tls13) in cases {
        let (client_admin, client_admin_yaml) = admin_block();
        let client_port = free_port();
        let mut cluster = mtls_cluster(
            "to_server",
            loopback(server_port),
            &client_leaf,
            &ca_path,
            &identity,
        );
        if !resume {
            cluster = cluster.replacen(
                "        sni: server.mesh.test\n",
                "        sni: server.mesh.test\n        max_session_keys: 0\n",
                1,
            );
        }
        if tls13 {
            cluster = cluster.replacen(
                "        common_tls_context:\n",
                "        common_tls_context:\n          tls_params: {tls_maximum_protocol_version: TLSv1_3}\n",
                1,
            );
        }
        let _client = run(
            client_is_remora,
            &bootstrap(
                &client_admin_yaml,
                &[tcp_listener("outbound", client_port, "to_server", "")],
                &[cluster],
            ),
            client_admin,
        );
        let (handshakes, resumed) = (server_stat("handshake"), server_stat("session_reused"));
        for _ in 0..20 {
            let (status, _, body) = http_get(loopback(client_port), "/").expect("request");
            assert_eq!(status, 200, "{body}");
        }
        let (handshakes, resumed) = (
            server_stat("handshake") - handshakes,
            server_stat("session_reused") - resumed,
        );
        let client = format!("{} (TLS 1.3 asked: {tls13})", name(client_is_remora));
        assert!(handshakes >= 20, "{client}: {handshakes} handshakes");
        if resume {
            assert!(resumed >= 18, "{client}: {resumed} of {handshakes} resumed");
        } else {
            assert_eq!(resumed, 0, "{client} with max_session_keys: 0");
        }
        if client_is_remora && resume && tls13 {
            // Many connections at once, as a busy pool opens them: each takes a ticket of its
            // own, so a client needs more than the eight rustls keeps by default. The first
            // wave finds only the tickets the sequential requests left (about 20); it brings
            // two per connection, so the next waves find enough.
            for round in 0..3 {
                let (handshakes, resumed) =
                    (server_stat("handshake"), server_stat("session_reused"));
                let wave: Vec<_> = (0..40)
                    .map(|_| std::thread::spawn(move || http_get(loopback(client_port), "/")))
                    .collect();
                for request in wave {
                    let (status, _, _) = request.join().expect("thread").expect("request");
                    assert_eq!(status, 200);
                }
                let handshakes = server_stat("handshake") - handshakes;
                let resumed = server_stat("session_reused") - resumed;
                assert!(
                    round == 0 || resumed * 10 >= handshakes * 9,
                    "wave {round}: {resumed} of {handshakes} concurrent handshakes resumed"
                );
            }
        }
    }
}

/// What a TLS client sees of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Nothing listens: the connection is refused.
    Refused,
    /// The handshake failed (reset, alert or close).
    HandshakeFailed,
    /// A response with this status, from a server presenting the certificate of this serial.
    Status(u16, u64),
}

/// Sends the listener's certificate (`server-cert`, serial `serial`) late and waits until
/// `addr` serves with it.
fn late_secret_serves(
    ads_server: &ads::AdsServer,
    ca: &Ca,
    serial: u64,
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
) {
    ads_server.set(
        xds_api::type_urls::SECRET,
        vec![certificate_secret("server-cert", &ca.server(serial))],
    );
    wait_for(
        "TLS once the late secret is in",
        Duration::from_secs(20),
        || (tls_probe(addr, client) == Seen::Status(200, serial)).then_some(()),
    );
}

/// One HTTPS request on a new connection to `addr`, trusting `ca`.
fn tls_probe(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> Seen {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => Seen::Refused,
        _ => match tls_request(addr, client) {
            Some((status, serial)) => Seen::Status(status, serial),
            None => Seen::HandshakeFailed,
        },
    }
}

/// Whether a plain TCP connection to `addr` is refused (nothing listens there).
fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .is_err_and(|error| error.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `/ready`'s status and body, and `/server_info`'s state.
fn server_state(admin: SocketAddr) -> (u16, String, String) {
    let (status, _, body) = http_get(admin, "/ready").expect("/ready");
    let (_, _, info) = http_get(admin, "/server_info").expect("/server_info");
    let state = echo_json(&info)["state"].as_str().unwrap_or("").to_string();
    (status, body, state)
}

/// A `Secret` resource holding a TLS certificate.
fn certificate_secret(name: &str, leaf: &Leaf) -> prost_types::Any {
    ads::pack(
        xds_api::type_urls::SECRET,
        &xds_api::json::from_yaml_str::<
            xds_api::envoy::extensions::transport_sockets::tls::v3::Secret,
        >(&format!(
            "name: {name}\ntls_certificate: {{certificate_chain: {{inline_string: {}}}, private_key: {{inline_string: {}}}}}",
            quoted(&leaf.certificate),
            quoted(&leaf.key)
        ))
        .expect("secret"),
    )
}

/// A `Secret` resource holding a trust bundle.
fn trust_secret(name: &str, ca: &Ca) -> prost_types::Any {
    ads::pack(
        xds_api::type_urls::SECRET,
        &xds_api::json::from_yaml_str::<
            xds_api::envoy::extensions::transport_sockets::tls::v3::Secret,
        >(&format!(
            "name: {name}\nvalidation_context: {{trusted_ca: {{inline_string: {}}}}}",
            quoted(&ca.pem()),
        ))
        .expect("secret"),
    )
}

/// A bootstrap whose static resources name secrets that come over ADS: a TLS listener
/// `tls_in` (certificate `server-cert`) in front of the app, and a plain HTTP listener `out`
/// that sends to the app directly or, with `tls_cluster`, through a cluster that originates
/// TLS to `tls_in` and trusts the CA of secret `mesh-ca`. With `cds_lds`, clusters and
/// listeners come over ADS too, as a sidecar's do.
struct StaticSds {
    admin: SocketAddr,
    tls_in: SocketAddr,
    out: SocketAddr,
    yaml: String,
}

impl StaticSds {
    fn new(
        ads: SocketAddr,
        app: SocketAddr,
        initial_fetch_timeout: &str,
        tls_cluster: bool,
        cds_lds: bool,
    ) -> StaticSds {
        let (admin, _) = admin_block();
        let (tls_port, out_port) = (free_port(), free_port());
        let sds = |name: &str| {
            format!(
                "{{name: {name}, sds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {initial_fetch_timeout}}}}}"
            )
        };
        let tls_in = tls_listener_with_sds(tls_port, &sds("server-cert"));
        let (target, tls_cluster) = if tls_cluster {
            let cluster = tls_cluster_validated_by(
                "to_tls_in",
                loopback(tls_port),
                None,
                &format!("validation_context_sds_secret_config: {}", sds("mesh-ca")),
            );
            ("to_tls_in", cluster)
        } else {
            ("app", String::new())
        };
        let out = http_listener("out", out_port, "", &catch_all(target, "5s"));
        let cds_lds = if cds_lds {
            "  cds_config: {ads: {}, resource_api_version: V3}\n  lds_config: {ads: {}, resource_api_version: V3}\n"
        } else {
            ""
        };
        let yaml = format!(
            r#"node: {{id: static-sds, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
{cds_lds}static_resources:
  listeners:
{tls_in}{out}  clusters:
{app}{tls_cluster}{xds}"#,
            admin_port = admin.port(),
            app = static_cluster("app", &[app]),
            xds = http2_cluster("xds", ads),
        );
        StaticSds {
            admin,
            tls_in: loopback(tls_port),
            out: loopback(out_port),
            yaml,
        }
    }

    /// Starts Remora or Envoy on it, without waiting for `/ready`.
    fn start(&self, remora: bool) -> Running {
        if remora {
            let (dir, path) = write_config(&self.yaml);
            let mut command =
                std::process::Command::new(remora_tests::workspace_binary("remora-proxy"));
            command.arg("-c").arg(&path).args(["--log-level", "debug"]);
            let process = remora_tests::process::ChildGuard::spawn("remora-proxy", command);
            Running::Remora(Proxy {
                process,
                admin: self.admin,
                config: path,
                _dir: dir,
            })
        } else {
            // Not `envoy --mode validate`: it crashes on secrets over ADS in static resources.
            let (dir, path) = write_config(&self.yaml);
            Running::Envoy(envoy::Envoy::start(&path, self.admin, &[]), dir)
        }
    }

    /// Waits until the proxy has asked the ADS server for `names`.
    fn wait_asked(&self, ads_server: &ads::AdsServer, names: &[&str]) {
        wait_for(
            "the proxy to ask for its secrets",
            Duration::from_secs(20),
            || {
                let asked: Vec<String> = ads_server
                    .requests()
                    .into_iter()
                    .filter(|r| r.type_url == xds_api::type_urls::SECRET)
                    .flat_map(|r| r.names)
                    .collect();
                names
                    .iter()
                    .all(|name| asked.iter().any(|a| a == name))
                    .then_some(())
            },
        );
    }

    fn wait_live(&self) {
        wait_for("/ready to answer LIVE", Duration::from_secs(30), || {
            (server_state(self.admin) == (200, "LIVE\n".into(), "LIVE".into())).then_some(())
        });
    }
}

/// Which proxies a side-by-side test runs, as `remora` flags: Remora, then Envoy where it is
/// installed (else `what` is reported skipped).
fn remora_then_envoy(what: &str) -> &'static [bool] {
    if envoy::available_or_skip(what) {
        &[true, false]
    } else {
        &[true]
    }
}

/// Static listeners whose certificate comes over ADS are part of server initialization, in
/// Remora as in Envoy: until the secret arrives the server is INITIALIZING (`/ready` 503) and
/// no static listener listens (connections are refused, not accepted and failed); then both
/// serve. A secret that never comes holds initialization for its `initial_fetch_timeout`
/// only: then the server is live, the listener's handshakes fail
/// (`sds.NAME.init_fetch_timeout` counts it), and a late secret serves the next handshake.
#[test]
fn static_listeners_wait_for_their_ads_secrets_as_in_envoy() {
    use xds_api::type_urls::SECRET;
    let ca = Ca::new();
    let client = tls_client(&ca.pem());
    let app = EchoServer::start("app", "127.0.0.1");
    for &remora in remora_then_envoy("Envoy's static SDS initialization") {
        let who = name(remora);
        // The secret is withheld, then sent; clusters and listeners come over ADS (none).
        let ads_server = ads::AdsServer::start();
        ads_server.set(xds_api::type_urls::CLUSTER, vec![]);
        ads_server.set(xds_api::type_urls::LISTENER, vec![]);
        let setup = StaticSds::new(ads_server.addr, app.addr, "15s", false, true);
        let proxy = setup.start(remora);
        setup.wait_asked(&ads_server, &["server-cert"]);
        assert_eq!(
            server_state(setup.admin),
            (503, "INITIALIZING\n".into(), "INITIALIZING".into()),
            "{who}: initializing while the secret is out"
        );
        assert_eq!(tls_probe(setup.tls_in, &client), Seen::Refused, "{who}");
        assert!(refused(setup.out), "{who}: no static listener listens yet");
        if let Running::Remora(proxy) = &proxy {
            // Envoy's gauges, the same numbers, change only at its stats flush (every 5 s).
            assert_eq!(proxy.stat("server.state"), 3, "INITIALIZING");
            assert_eq!(proxy.stat("server.live"), 1, "not draining");
            let log = proxy.process.log();
            assert!(
                log.lines().any(|line| line.contains("waiting for a secret")
                    && line.contains("server-cert")
                    && line.contains("listener tls_in")),
                "the log says which secret the listener waits for:\n{log}"
            );
        }
        ads_server.set(
            SECRET,
            vec![certificate_secret("server-cert", &ca.server(21))],
        );
        setup.wait_live();
        if let Running::Remora(proxy) = &proxy {
            assert_eq!(proxy.stat("server.state"), 0, "LIVE");
        }
        assert_eq!(
            tls_probe(setup.tls_in, &client),
            Seen::Status(200, 21),
            "{who}"
        );
        let (status, _, _) = http_get(setup.out, "/").expect("out");
        assert_eq!(status, 200, "{who}");
        drop(proxy);

        // The secret never comes in time: live after its 1 s initial fetch timeout, TLS fails
        // until it comes. (No CDS or LDS: the secret is asked for without waiting for them.)
        let ads_server = ads::AdsServer::start();
        let setup = StaticSds::new(ads_server.addr, app.addr, "1s", false, false);
        let started = Instant::now();
        let proxy = setup.start(remora);
        setup.wait_asked(&ads_server, &["server-cert"]);
        setup.wait_live();
        assert!(started.elapsed() >= Duration::from_secs(1), "{who}");
        assert_eq!(
            proxy.stat("sds.server-cert.init_fetch_timeout"),
            Some(1),
            "{who}"
        );
        if let Running::Remora(proxy) = &proxy {
            let log = proxy.process.log();
            assert!(
                log.lines()
                    .any(|line| line.contains("did not arrive in time")
                        && line.contains("server-cert")
                        && line.contains("listener tls_in")),
                "the log says which secret never came:\n{log}"
            );
        }
        assert_eq!(
            tls_probe(setup.tls_in, &client),
            Seen::HandshakeFailed,
            "{who}"
        );
        let (status, _, _) = http_get(setup.out, "/").expect("out");
        assert_eq!(status, 200, "{who}");
        late_secret_serves(&ads_server, &ca, 22, setup.tls_in, &client);
        drop(proxy);
    }
}

/// A static cluster whose trust bundle comes over ADS holds initialization too, as a
/// dynamic cluster warms for its secrets (Envoy 1.40 cannot take this bootstrap: it crashes
/// loading a static cluster with an ADS secret, envoyproxy/envoy#15517). With the listener's
/// certificate in but not the cluster's trust bundle the server is still initializing and
/// nothing listens; with both, a request through the cluster is served.
#[test]
fn static_cluster_waits_for_its_ads_trust_bundle() {
    use xds_api::type_urls::SECRET;
    let ca = Ca::new();
    let client = tls_client(&ca.pem());
    let app = EchoServer::start("app", "127.0.0.1");
    let ads_server = ads::AdsServer::start();
    let setup = StaticSds::new(ads_server.addr, app.addr, "15s", true, false);
    let proxy = setup.start(true);
    setup.wait_asked(&ads_server, &["server-cert", "mesh-ca"]);
    ads_server.set(
        SECRET,
        vec![certificate_secret("server-cert", &ca.server(31))],
    );
    wait_for(
        "the certificate to be ACKed",
        Duration::from_secs(20),
        || {
            let version = ads_server.version();
            ads_server
                .requests()
                .into_iter()
                .any(|r| r.type_url == SECRET && r.version_info == version && r.error.is_none())
                .then_some(())
        },
    );
    assert_eq!(
        server_state(setup.admin),
        (503, "INITIALIZING\n".into(), "INITIALIZING".into()),
        "initializing while the cluster's trust bundle is out"
    );
    assert_eq!(tls_probe(setup.tls_in, &client), Seen::Refused);
    assert!(refused(setup.out));
    ads_server.set(
        SECRET,
        vec![
            certificate_secret("server-cert", &ca.server(31)),
            trust_secret("mesh-ca", &ca),
        ],
    );
    setup.wait_live();
    assert_eq!(tls_probe(setup.tls_in, &client), Seen::Status(200, 31));
    let (status, _, body) = http_get(setup.out, "/through").expect("out");
    assert_eq!(status, 200, "{body}");
    assert_eq!(echo_json(&body)["path"], "/through");
    drop(proxy);
}

/// A listener of a bootstrap's `listeners:` list as a resource of its own (one level less
/// indented).
fn as_resource(listener_yaml: &str) -> String {
    listener_yaml
        .replacen("  - name:", "    name:", 1)
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A listener that comes over LDS waits for its ADS certificate as long as the secret's
/// `initial_fetch_timeout` (here 1 s, not the default 15 s), in Remora as in Envoy: then the
/// server is live, the listener listens and fails handshakes, and the secret serves the next
/// handshake when it comes.
#[test]
fn a_dynamic_listener_waits_for_its_secret_as_long_as_its_initial_fetch_timeout() {
    use xds_api::type_urls::{CLUSTER, LISTENER};
    let ca = Ca::new();
    let client = tls_client(&ca.pem());
    let app = EchoServer::start("app", "127.0.0.1");
    for &remora in remora_then_envoy("Envoy's SDS initial fetch timeout") {
        let who = name(remora);
        let ads_server = ads::AdsServer::start();
        let mut setup = StaticSds::new(ads_server.addr, app.addr, "1s", false, true);
        let sds = "{name: server-cert, sds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 1s}}";
        let listener = tls_listener_with_sds(setup.tls_in.port(), sds);
        assert!(setup.yaml.contains(&listener));
        setup.yaml = setup.yaml.replace(&listener, "");
        ads_server.set(CLUSTER, vec![]);
        ads_server.set(LISTENER, vec![ads::listener(&as_resource(&listener))]);
        let started = Instant::now();
        let proxy = setup.start(remora);
        setup.wait_asked(&ads_server, &["server-cert"]);
        setup.wait_live();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
            "{who}: live after {waited:?}"
        );
        assert_eq!(
            tls_probe(setup.tls_in, &client),
            Seen::HandshakeFailed,
            "{who}"
        );
        late_secret_serves(&ads_server, &ca, 41, setup.tls_in, &client);
        drop(proxy);
    }
}

/// A static listener whose certificate comes from a secret file waits for the file to hold
/// it, as for a secret over ADS (here without any xDS at all). Envoy does not wait here: it
/// refuses a bootstrap naming a missing file, and a file without the secret is a rejected
/// update that lets initialization go on with the listener failing handshakes.
#[test]
fn a_static_listener_waits_for_its_secret_file_to_hold_the_secret() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new();
    let client = tls_client(&ca.pem());
    let app = EchoServer::start("app", "127.0.0.1");
    let secret_path = dir.path().join("server-cert.yaml");
    std::fs::write(&secret_path, "resources: []\n").expect("write");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let sds = format!(
        "{{name: server-cert, sds_config: {{path_config_source: {{path: {}}}, resource_api_version: V3}}}}",
        secret_path.display()
    );
    let yaml = bootstrap(
        &admin_yaml,
        &[tls_listener_with_sds(port, &sds)],
        &[static_cluster("app", &[app.addr])],
    );
    let (_config_dir, path) = write_config(&yaml);
    let mut command = std::process::Command::new(remora_tests::workspace_binary("remora-proxy"));
    command.arg("-c").arg(&path).args(["--log-level", "debug"]);
    let proxy = remora_tests::process::ChildGuard::spawn("remora-proxy", command);
    wait_for("the admin endpoint", Duration::from_secs(20), || {
        http_get(admin, "/ready").ok()
    });
    assert_eq!(
        server_state(admin),
        (503, "INITIALIZING\n".into(), "INITIALIZING".into())
    );
    assert_eq!(tls_probe(loopback(port), &client), Seen::Refused);
    replace_file(
        &secret_path,
        &certificate_secret_file("server-cert", &ca.server(51)),
    );
    wait_for("/ready to answer LIVE", Duration::from_secs(20), || {
        (server_state(admin).0 == 200).then_some(())
    });
    assert_eq!(tls_probe(loopback(port), &client), Seen::Status(200, 51));
    drop(proxy);
}

/// Istio's sidecar bootstrap: a listener's certificate comes from an SDS source of its own
/// (`api_config_source` to the `sds-grpc` cluster, whose endpoint is the agent's unix socket),
/// waited for without a timeout. Under Remora as under Envoy the listener serves once the
/// secret streams in, serves the next version after its ACK, keeps the last good one after a
/// NACK, and the node goes only in each stream's first request.
#[test]
fn a_secret_streams_from_its_own_sds_cluster_as_istio_writes_it() {
    use xds_api::type_urls::SECRET;
    let ca = Ca::new();
    let app = EchoServer::start("app", "127.0.0.1");
    for &remora in remora_then_envoy("SDS from a cluster of its own") {
        let sds_server = ads::AdsServer::start();
        let (_relay_dir, pipe) = ads::pipe_relay(sds_server.addr);
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        let sds = r#"{name: default, sds_config: {api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc}}], set_node_on_first_message_only: true}, initial_fetch_timeout: 0s, resource_api_version: V3}}"#;
        let yaml = format!(
            r#"node: {{id: sidecar~10.0.0.1~app.default~default.svc.cluster.local, cluster: app.default}}
{admin_yaml}static_resources:
  listeners:
{listener}  clusters:
{app}
  - name: sds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{pipe}"}}}}}}}}]}}]
"#,
            listener = tls_listener_with_sds(port, sds),
            app = static_cluster("app", &[app.addr]).trim_end(),
            pipe = pipe.display(),
        );
        let proxy = if remora { "remora" } else { "envoy" };
        sds_server.set(SECRET, vec![certificate_secret("default", &ca.server(7))]);
        let (dir, file) = write_config(&yaml);
        let _running: Box<dyn std::any::Any> = if remora {
            Box::new(Proxy::start_file(&file, admin, &[]))
        } else {
            Box::new((envoy::Envoy::start(&file, admin, &[]), dir))
        };
        let client = tls_client(&ca.pem());
        let addr = loopback(port);
        wait_for(
            &format!("{proxy}: TLS with the streamed certificate"),
            Duration::from_secs(20),
            || (tls_request(addr, &client)? == (200, 7)).then_some(()),
        );
        sds_server.set(SECRET, vec![certificate_secret("default", &ca.server(8))]);
        wait_for(
            &format!("{proxy}: TLS with the next version"),
            Duration::from_secs(20),
            || (tls_request(addr, &client)? == (200, 8)).then_some(()),
        );
        // A key that is not the certificate's: NACKed, the last good version serves on.
        let mut mismatched = ca.server(9);
        mismatched.key = ca.server(10).key;
        sds_server.set(SECRET, vec![certificate_secret("default", &mismatched)]);
        let nack = wait_for(
            &format!("{proxy}: a NACK of the bad version"),
            Duration::from_secs(20),
            || {
                sds_server
                    .requests()
                    .into_iter()
                    .find(|r| r.type_url == SECRET && r.error.is_some())
            },
        );
        if remora {
            let message = nack.error.unwrap_or_default();
            assert!(
                message.contains("Secret default") && message.contains("do not match"),
                "{message}"
            );
        }
        assert_eq!(tls_request(addr, &client), Some((200, 8)), "{proxy}");
        let requests = sds_server.requests();
        assert!(
            requests
                .iter()
                .all(|r| r.type_url == SECRET && r.names == ["default"]),
            "{proxy}: {requests:#?}"
        );
        let mut streams_seen = std::collections::BTreeSet::new();
        for request in &requests {
            let first = streams_seen.insert(request.stream);
            assert_eq!(request.has_node, first, "{proxy}: {request:?}");
        }
    }
}
