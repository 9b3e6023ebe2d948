//! The RBAC network filter against real Envoy: one bootstrap (two `tcp_proxy` listeners behind
//! `envoy.filters.network.rbac`) run through Envoy and then through remora-proxy, with clients
//! bound to different loopback addresses. For every client both proxies must show the same:
//! whether the upstream was connected before the client sent anything, whether the connection
//! stayed open until then, and what the first bytes got (an echo, or the connection closed).
//! The `rbac` stats must be equal too. Also against Envoy: the HTTP filter's address principals
//! from clients on different addresses, and `authenticated` principals and the requested server
//! name over mTLS. The HTTP filter's request corpus is `corpus/rbac` (`differential.rs`).
//!
//! Skipped (with a message) when `envoy` is not installed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Proxy, loopback};
use remora_tests::{envoy, free_port, poll_until, wait_for_port};

/// A TCP upstream that echoes what it reads and counts the connections it accepted.
struct TcpEcho {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl TcpEcho {
    fn start() -> TcpEcho {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        TcpEcho { addr, accepted }
    }
}

/// A connection from `source` (a loopback address) to `target`.
fn connect_from(source: IpAddr, target: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind client source");
    socket.connect(&target.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream
}

/// What one client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// The proxy connected upstream before the client sent a byte.
    upstream_before_data: bool,
    /// The connection was still open just before the client sent.
    open_before_data: bool,
    /// The answer to the first bytes: the echo, or `closed`.
    answer: String,
}

fn observe(source: IpAddr, target: SocketAddr, upstream: &TcpEcho) -> Seen {
    let before = upstream.accepted.load(Ordering::SeqCst);
    let mut stream = connect_from(source, target);
    let upstream_before_data = poll_until(Duration::from_secs(5), || {
        (upstream.accepted.load(Ordering::SeqCst) > before).then_some(())
    })
    .is_some();
    // Open: nothing to read yet, and no end of stream.
    stream.set_nonblocking(true).expect("nonblocking");
    let open_before_data =
        matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).expect("blocking");
    let answer = match stream.write_all(b"ping") {
        Err(_) => "closed".to_string(),
        Ok(()) => {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.len() >= 4 {
                            break;
                        }
                    }
                }
            }
            match got.is_empty() {
                true => "closed".to_string(),
                false => String::from_utf8_lossy(&got).into_owned(),
            }
        }
    };
    Seen {
        upstream_before_data,
        open_before_data,
        answer,
    }
}

fn bootstrap(admin: u16, allow_port: u16, deny_port: u16, upstream: SocketAddr) -> String {
    let up = upstream.port();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
  listeners:
  # Only 127.0.0.1 (directly) and 127.0.0.4 on this port; 127.0.0.2 is also shadow-denied.
  - name: allow_list
    address: {{socket_address: {{address: 127.0.0.1, port_value: {allow_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: allow_list
          shadow_rules_stat_prefix: audit_
          rules:
            action: ALLOW
            policies:
              known-clients:
                permissions: [{{destination_port: {allow_port}}}]
                principals:
                - {{direct_remote_ip: {{address_prefix: 127.0.0.1, prefix_len: 32}}}}
                - {{source_ip: {{address_prefix: 127.0.0.4, prefix_len: 32}}}}
              never-by-path:
                permissions: [{{url_path: {{path: {{prefix: /}}}}}}]
                principals: [{{any: true}}]
          shadow_rules:
            action: DENY
            policies:
              watch-two:
                permissions: [{{destination_ip: {{address_prefix: 127.0.0.0, prefix_len: 8}}}}]
                principals: [{{remote_ip: {{address_prefix: 127.0.0.2, prefix_len: 32}}}}]
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: allow_list_tcp
          cluster: echo
  # Everyone but 127.0.0.3 is denied, by a second filter after one that lets all through.
  - name: deny_list
    address: {{socket_address: {{address: 127.0.0.1, port_value: {deny_port}}}}}
    filter_chains:
    - filters:
      - name: first
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: deny_list_first
          rules: {{action: LOG, policies: {{all: {{permissions: [{{any: true}}], principals: [{{any: true}}]}}}}}}
      - name: second
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: deny_list
          # A bare address (no prefix_len) is /0 in Envoy: this shadow-denies everyone.
          shadow_rules:
            action: DENY
            policies:
              bare-address:
                permissions: [{{any: true}}]
                principals: [{{source_ip: {{address_prefix: 127.0.0.9}}}}]
          rules:
            action: DENY
            policies:
              not-three:
                permissions: [{{destination_port_range: {{start: {deny_port}, end: {deny_end}}}}}]
                principals: [{{not_id: {{source_ip: {{address_prefix: 127.0.0.3, prefix_len: 32}}}}}}]
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: deny_list_tcp
          cluster: echo
"#,
        deny_end = u32::from(deny_port) + 1,
    )
}

fn clients(allow: SocketAddr, deny: SocketAddr) -> Vec<(&'static str, IpAddr, SocketAddr)> {
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
    vec![
        ("allow list, 127.0.0.1 allowed", ip(1), allow),
        (
            "allow list, 127.0.0.2 denied and shadow-denied",
            ip(2),
            allow,
        ),
        ("allow list, 127.0.0.3 denied", ip(3), allow),
        ("allow list, 127.0.0.4 allowed", ip(4), allow),
        ("deny list, 127.0.0.1 denied", ip(1), deny),
        ("deny list, 127.0.0.3 allowed", ip(3), deny),
        ("deny list, 127.0.0.5 denied", ip(5), deny),
    ]
}

fn run(
    allow: SocketAddr,
    deny: SocketAddr,
    upstream: &TcpEcho,
    stats: impl Fn() -> String,
) -> (Vec<Seen>, String) {
    let seen = clients(allow, deny)
        .into_iter()
        .map(|(_, source, target)| observe(source, target, upstream))
        .collect();
    (seen, stats())
}

#[test]
fn rbac_network_filter_matches_envoy() {
    if !envoy::available_or_skip("rbac_network_filter_matches_envoy") {
        return;
    }
    let upstream = TcpEcho::start();
    let (admin_port, allow_port, deny_port) = (free_port(), free_port(), free_port());
    let text = bootstrap(admin_port, allow_port, deny_port, upstream.addr);
    let (_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}"));
    let admin = loopback(admin_port);
    let (allow, deny) = (loopback(allow_port), loopback(deny_port));
    let stats = || {
        remora_tests::http_get(admin, "/stats?filter=%5C.rbac%5C.")
            .map(|(_, _, body)| body)
            .expect("stats")
    };

    let envoy_run = {
        let _envoy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(allow, Duration::from_secs(20));
        wait_for_port(deny, Duration::from_secs(20));
        run(allow, deny, &upstream, stats)
    };
    let remora_run = {
        let _proxy = Proxy::start_file(&file, admin, &[]);
        wait_for_port(allow, Duration::from_secs(20));
        wait_for_port(deny, Duration::from_secs(20));
        run(allow, deny, &upstream, stats)
    };

    let mut mismatches = Vec::new();
    for (((name, _, _), expected), actual) in clients(allow, deny)
        .iter()
        .zip(&envoy_run.0)
        .zip(&remora_run.0)
    {
        if expected != actual {
            mismatches.push(format!(
                "{name}:\n  envoy:  {expected:?}\n  remora: {actual:?}"
            ));
        }
    }
    if envoy_run.1 != remora_run.1 {
        mismatches.push(format!(
            "stats differ:\n  envoy:\n{}\n  remora:\n{}",
            envoy_run.1, remora_run.1
        ));
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // What both showed, so a change in Envoy's behaviour is visible here too: denied clients
    // connected (and were proxied upstream) and were closed on their first bytes.
    let answers: Vec<&str> = remora_run.0.iter().map(|s| s.answer.as_str()).collect();
    assert_eq!(
        answers,
        [
            "ping", "closed", "closed", "ping", "closed", "ping", "closed"
        ]
    );
    assert!(
        remora_run
            .0
            .iter()
            .all(|s| s.upstream_before_data && s.open_before_data),
        "{:?}",
        remora_run.0
    );
    eprintln!("{}", remora_run.1);
}

/// A CA and leaf certificates for the mTLS case, as PEM files in `dir`: the server's (IP SAN
/// 127.0.0.1) and clients with a SPIFFE URI SAN, with a DNS SAN only, and with no SAN at all.
struct Pki {
    ca: String,
    server: (String, String),
    spiffe: (String, String),
    dns: (String, String),
    subject_only: (String, String),
}

fn pki(dir: &std::path::Path) -> Pki {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write pem");
        path.display().to_string()
    };
    let leaf = |name: &str, sans: Vec<SanType>, common_name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let uri = |text: &str| SanType::URI(text.try_into().expect("ia5"));
    let dns = |text: &str| SanType::DnsName(text.try_into().expect("ia5"));
    Pki {
        server: leaf(
            "server",
            vec![SanType::IpAddress([127, 0, 0, 1].into()), dns("sni.test")],
            "server",
        ),
        spiffe: leaf(
            "spiffe",
            vec![uri("spiffe://mesh.local/ns/shop/sa/web"), dns("web.shop")],
            "web",
        ),
        dns: leaf("dns", vec![dns("cart.shop")], "cart"),
        subject_only: leaf("subject", Vec::new(), "batch-job"),
        ca: write("ca.pem", ca.pem()),
    }
}

fn mtls_bootstrap(admin: u16, port: u16, upstream: SocketAddr, pki: &Pki) -> String {
    let policy = |name: &str, prefix: &str, principal: &str| {
        format!(
            "                  {name}:\n                    permissions: [{{url_path: {{path: {{prefix: {prefix}}}}}}}]\n                    principals: [{principal}]\n"
        )
    };
    let policies = [
        policy(
            "spiffe",
            "/spiffe",
            "{authenticated: {principal_name: {exact: \"spiffe://mesh.local/ns/shop/sa/web\"}}}",
        ),
        // A URI SAN is there: the DNS SAN of the same certificate is still tried (Envoy 1.40).
        policy(
            "dns-beside-uri",
            "/web-dns",
            "{authenticated: {principal_name: {exact: web.shop}}}",
        ),
        policy(
            "dns",
            "/dns",
            "{authenticated: {principal_name: {suffix: .shop}}}",
        ),
        policy(
            "subject",
            "/subject",
            "{authenticated: {principal_name: {exact: CN=batch-job}}}",
        ),
        policy("any-tls", "/tls", "{authenticated: {}}"),
        // The server name the client asked for in its TLS hello (read by the tls_inspector).
        "                  sni:\n                    permissions: [{and_rules: {rules: [{url_path: {path: {prefix: /sni}}}, {requested_server_name: {exact: sni.test}}]}}]\n                    principals: [{any: true}]\n".to_string(),
    ]
    .concat();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
  listeners:
  - name: mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    # Without it Envoy 1.40 leaves the requested server name empty on a TLS-terminating chain
    # (seen here: the `sni` policy then never matches, in both proxies).
    listener_filters: [{{name: envoy.filters.listener.tls_inspector, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}}}]
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
            validation_context: {{trusted_ca: {{filename: {ca}}}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
{policies}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: echo}}}}]
"#,
        up = upstream.port(),
        cert = pki.server.0,
        key = pki.server.1,
        ca = pki.ca,
    )
}

/// The status and body curl got for `path` over TLS, with `client` as its certificate.
/// A path starting `/sni/named` is asked for as `https://sni.test`, so the hello carries that
/// name; any other is asked of `127.0.0.1`, with no name in the hello.
fn curl(port: u16, path: &str, ca: &str, client: Option<&(String, String)>) -> (String, String) {
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "10", "--cacert", ca])
        .args(["-w", "\n%{http_code}"]);
    let host = match path.starts_with("/sni/named") {
        true => {
            command.args(["--resolve", &format!("sni.test:{port}:127.0.0.1")]);
            "sni.test"
        }
        false => "127.0.0.1",
    };
    if let Some((cert, key)) = client {
        command.args(["--cert", cert, "--key", key]);
    }
    let output = command
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    // Echo answers differ only by what the upstream saw; the status and a denial's body matter.
    let body = match status {
        "200" => "<echo>".to_string(),
        _ => body.to_string(),
    };
    (status.to_string(), body)
}

#[test]
fn rbac_authenticated_principals_match_envoy() {
    if !envoy::available_or_skip("rbac_authenticated_principals_match_envoy")
        || !remora_tests::on_path("curl")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let upstream = remora_tests::echo::EchoServer::start("echo", "127.0.0.1");
    let (admin_port, port) = (free_port(), free_port());
    let text = mtls_bootstrap(admin_port, port, upstream.addr, &pki);
    let (_config_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}"));
    let admin = loopback(admin_port);
    let cases: Vec<(&str, Option<&(String, String)>)> = vec![
        ("/spiffe", Some(&pki.spiffe)),
        ("/spiffe", Some(&pki.dns)),
        ("/spiffe", None),
        ("/web-dns", Some(&pki.spiffe)),
        ("/dns", Some(&pki.dns)),
        ("/dns", Some(&pki.subject_only)),
        ("/subject", Some(&pki.subject_only)),
        ("/subject", Some(&pki.dns)),
        ("/tls", Some(&pki.dns)),
        ("/tls", None),
        ("/sni/named", Some(&pki.dns)),
        ("/sni/bare", Some(&pki.dns)),
    ];
    let run = || -> (Vec<(String, String)>, String) {
        let seen = cases
            .iter()
            .map(|(path, client)| curl(port, path, &pki.ca, *client))
            .collect();
        let stats = remora_tests::http_get(admin, "/stats?filter=%5C.rbac%5C.")
            .map(|(_, _, body)| body)
            .expect("stats");
        (seen, stats)
    };
    let envoy_run = {
        let _envoy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(loopback(port), Duration::from_secs(20));
        run()
    };
    let remora_run = {
        let _proxy = Proxy::start_file(&file, admin, &[]);
        wait_for_port(loopback(port), Duration::from_secs(20));
        run()
    };
    let mut mismatches = Vec::new();
    for (((path, client), expected), actual) in cases.iter().zip(&envoy_run.0).zip(&remora_run.0) {
        if expected != actual {
            let who = client.map_or("no certificate", |(cert, _)| cert.as_str());
            mismatches.push(format!(
                "{path} with {who}:\n  envoy:  {expected:?}\n  remora: {actual:?}"
            ));
        }
    }
    if envoy_run.1 != remora_run.1 {
        mismatches.push(format!(
            "stats differ:\n  envoy:\n{}\n  remora:\n{}",
            envoy_run.1, remora_run.1
        ));
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // What both showed: a DNS SAN is tried even when a URI SAN is there, the subject when
    // there are no SANs, a TLS client without a certificate is "authenticated" for a
    // principal without a name, and the hello's server name is matched.
    let statuses: Vec<&str> = remora_run.0.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "200", "403", "403", "200", "200", "403", "200", "403", "200", "200", "200", "403"
        ]
    );
    eprintln!("{}", remora_run.1);
}

/// The status line's code of a request sent from `source`, with `x-forwarded-for` if given.
fn http_status_from(source: IpAddr, target: SocketAddr, xff: Option<&str>) -> String {
    let mut stream = connect_from(source, target);
    let xff = xff.map_or(String::new(), |v| format!("x-forwarded-for: {v}\r\n"));
    let request = format!("GET /who HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{xff}\r\n");
    stream.write_all(request.as_bytes()).expect("write request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .unwrap_or("none")
        .to_string()
}

#[test]
fn rbac_http_addresses_match_envoy() {
    if !envoy::available_or_skip("rbac_http_addresses_match_envoy") {
        return;
    }
    let upstream = remora_tests::echo::EchoServer::start("echo", "127.0.0.1");
    let (admin_port, port) = (free_port(), free_port());
    let text = format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
  listeners:
  - name: edge
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          # The peer is the client: x-forwarded-for names nobody RBAC trusts.
          use_remote_address: true
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  two-directly: {{permissions: [{{any: true}}], principals: [{{direct_remote_ip: {{address_prefix: 127.0.0.2, prefix_len: 32}}}}]}}
                  three-as-client: {{permissions: [{{any: true}}], principals: [{{remote_ip: {{address_prefix: 127.0.0.3, prefix_len: 32}}}}]}}
              shadow_rules:
                action: ALLOW
                policies:
                  one: {{permissions: [{{any: true}}], principals: [{{source_ip: {{address_prefix: 127.0.0.1, prefix_len: 32}}}}]}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: echo}}}}]
"#,
        up = upstream.addr.port(),
    );
    let (_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}"));
    let admin = loopback(admin_port);
    let target = loopback(port);
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
    let cases = [
        (ip(1), None),
        (ip(2), None),
        (ip(3), None),
        (ip(1), Some("127.0.0.3")),
        (ip(4), Some("127.0.0.2")),
    ];
    let run = || {
        let statuses: Vec<String> = cases
            .iter()
            .map(|(source, xff)| http_status_from(*source, target, *xff))
            .collect();
        let stats = remora_tests::http_get(admin, "/stats?filter=%5C.rbac%5C.")
            .map(|(_, _, body)| body)
            .expect("stats");
        (statuses, stats)
    };
    let envoy_run = {
        let _envoy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(target, Duration::from_secs(20));
        run()
    };
    let remora_run = {
        let _proxy = Proxy::start_file(&file, admin, &[]);
        wait_for_port(target, Duration::from_secs(20));
        run()
    };
    assert_eq!(
        envoy_run, remora_run,
        "envoy (left) and remora (right) differ"
    );
    assert_eq!(remora_run.0, ["200", "403", "403", "200", "200"]);
}
