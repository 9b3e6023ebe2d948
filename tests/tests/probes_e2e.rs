//! The kubelet's probes keep working when the app's inbound traffic requires mTLS, end to end
//! in network namespaces this test creates:
//! - `remora-injector inject` injects a pod whose containers have HTTP, TCP and gRPC probes;
//!   the injected pod's `remora-init` arguments install capture in a "pod" namespace, and
//!   `remora-proxy --bootstrap-from-env` runs there as uid 1337 with the injected proxy's
//!   environment (the original probes included) plus a bootstrap file whose inbound listener
//!   requires a client certificate on the app's port;
//! - real apps answer in the pod: an HTTP server on 8080 (healthy or not, as the test says)
//!   and a gRPC health server on 9090;
//! - a "kubelet" namespace on the other end of a veth pair sends the probes exactly as the
//!   injected pod spec describes them (plain HTTP to the pod IP, rewritten port and path):
//!   they pass while a plain request, or TLS without a client certificate, to the app's port
//!   is refused, and they fail when the app does.
//!
//! Needs root, iproute2, iptables, util-linux (setpriv) and curl; skips with a message
//! otherwise, and fails instead when `REMORA_REQUIRE_ALL=1` (CI).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use remora_tests::netns::{NamespacePair, in_namespace, listen_in, missing_prerequisite, run};
use remora_tests::process::ChildGuard;
use remora_tests::{wait_for, workspace_binary};
use serde_json::Value;

// Benchmarking range (198.18.0.0/15), configured only inside the test's own namespaces.
const POD_IP: &str = "198.18.9.1";
const KUBELET_IP: &str = "198.18.9.2";
const PROXY_UID: &str = "1337";
const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;

/// The pod as a user writes it: an HTTP readiness probe (named port, a header), a TCP
/// liveness probe and a gRPC startup probe on `web`; a TCP probe of a port nobody listens on
/// and a gRPC probe of a service that is not serving on `sick`.
const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: probed, namespace: shop, labels: {app: probed}}
spec:
  containers:
  - name: web
    image: example.invalid/web
    ports: [{name: http, containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /healthz, port: http, httpHeaders: [{name: X-Probe, value: kubelet}]}
      timeoutSeconds: 2
    livenessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {grpc: {port: 9090, service: web}, timeoutSeconds: 2}
  - name: sick
    image: example.invalid/sick
    livenessProbe: {tcpSocket: {port: 8089}}
    startupProbe: {grpc: {port: 9090, service: sick}, timeoutSeconds: 2}
"#;

/// The injected pod, from the real `remora-injector inject`.
fn injected_pod() -> Value {
    let mut child = Command::new(workspace_binary("remora-injector"))
        .arg("inject")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run remora-injector inject");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(POD.as_bytes())
        .expect("write the pod");
    let out = child.wait_with_output().expect("remora-injector inject");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).expect("the injected pod is YAML")
}

fn init_container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["initContainers"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no init container {name} in {pod}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// (container, probe field) → (port, path) of the probe the kubelet would send.
fn kubelet_probes(pod: &Value) -> HashMap<(String, String), (u16, String)> {
    let mut probes = HashMap::new();
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for field in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let get = &container[field]["httpGet"];
            let port = get["port"].as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(port), Some(path)) = (port, get["path"].as_str()) {
                let name = container["name"].as_str().unwrap_or_default().to_string();
                probes.insert((name, field.to_string()), (port, path.to_string()));
            }
        }
    }
    probes
}

/// The app: answers every request 200 while `healthy`, else 500, and keeps each request's
/// head so the test can see what the probe sent.
struct HttpApp {
    healthy: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl HttpApp {
    fn start(listener: TcpListener) -> HttpApp {
        let healthy = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (state, seen) = (healthy.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (state, seen) = (state.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return, // a TCP probe: connected, then gone
                        }
                    }
                    seen.lock()
                        .expect("request log")
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let status = if state.load(Ordering::SeqCst) {
                        "200 OK"
                    } else {
                        "500 Internal Server Error"
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\napp"
                    );
                });
            }
        });
        HttpApp { healthy, requests }
    }

    fn request_count(&self) -> usize {
        self.requests.lock().expect("request log").len()
    }

    fn last_request(&self) -> String {
        self.requests
            .lock()
            .expect("request log")
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

/// A gRPC health server (`grpc.health.v1.Health/Check`, HTTP/2 with trailers) that says
/// SERVING for `web`, NOT_SERVING for anything else.
fn start_grpc_health(listener: TcpListener) {
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(health_check);
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
}

type GrpcBody = StreamBody<
    tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
>;

async fn health_check(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<GrpcBody>, hyper::Error> {
    let path_ok = request.uri().path() == "/grpc.health.v1.Health/Check";
    let mut body = request.into_body().collect().await?.to_bytes();
    // One uncompressed frame holding field 1 (service, a short string).
    let service = if body.remaining() >= 7 && path_ok {
        body.advance(5);
        let (tag, length) = (body.get_u8(), usize::from(body.get_u8()));
        (tag == 0x0a && body.remaining() >= length)
            .then(|| String::from_utf8_lossy(&body[..length]).into_owned())
    } else {
        None
    };
    let mut trailers = http::HeaderMap::new();
    let mut frames = Vec::new();
    match service {
        Some(service) => {
            let status = if service == "web" { 1u8 } else { 2u8 };
            frames.push(Ok(Frame::data(Bytes::from(vec![
                0, 0, 0, 0, 2, 0x08, status,
            ]))));
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        }
        None => {
            trailers.insert("grpc-status", http::HeaderValue::from_static("12"));
        }
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let response = hyper::Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .expect("response");
    Ok(response)
}

/// A CA, a server certificate for the pod IP and a client certificate, as PEM files
/// readable by the proxy's uid.
fn write_certificates(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "probes-e2e CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let leaf = |name: &str, san: rcgen::SanType| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![san];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca, &ca_key).expect("leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        "pod",
        rcgen::SanType::IpAddress(POD_IP.parse().expect("pod ip")),
    );
    let (client_cert, client_key) = leaf(
        "peer",
        rcgen::SanType::DnsName("peer.shop.svc".try_into().expect("dns name")),
    );
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a certificate file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
}

/// What the proxy gets on top of the injector's environment: the inbound listener the
/// control plane would send, requiring a client certificate on the app's port.
fn bootstrap(dir: &Path) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"static_resources:
  listeners:
  - name: virtual_inbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15006 }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filter_chain_match: {{ destination_port: {APP_PORT} }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{ certificate_chain: {{ filename: "{cert}" }}, private_key: {{ filename: "{key}" }} }}]
            validation_context: {{ trusted_ca: {{ filename: "{ca}" }} }}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound_app
          cluster: inbound_app
  clusters:
  - name: inbound_app
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: inbound_app
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {APP_PORT} }} }} }}
"#,
        cert = file("server.pem"),
        key = file("server.key"),
        ca = file("ca.pem"),
    )
}

/// A kubelet-style probe from the kubelet's namespace: plain HTTP GET to the pod IP.
fn probe(kubelet: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    in_namespace(kubelet, move || {
        let addr: SocketAddr = format!("{POD_IP}:{port}").parse().expect("address");
        remora_tests::http_get(addr, &path).map(|(status, _, body)| (status, body))
    })
}

/// curl from the kubelet's namespace to the app's port over TLS; the HTTP status, or the
/// error when there was no HTTP exchange.
fn curl_tls(kubelet: &str, dir: &Path, with_client_certificate: bool) -> Result<u16, String> {
    let file = |name: &str| dir.join(name).display().to_string();
    let url = format!("https://{POD_IP}:{APP_PORT}/mtls");
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        kubelet.into(),
        "curl".into(),
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "--cacert".into(),
        file("ca.pem"),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
    ];
    if with_client_certificate {
        args.extend([
            "--cert".into(),
            file("client.pem"),
            "--key".into(),
            file("client.key"),
        ]);
    }
    args.push(url);
    let out = Command::new("ip")
        .args(&args)
        .output()
        .map_err(|e| e.to_string())?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match code.parse::<u16>() {
        Ok(code) if out.status.success() && code != 0 => Ok(code),
        _ => Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[test]
fn kubelet_probes_pass_through_the_sidecar_while_the_app_port_requires_mtls() {
    const TEST: &str = "kubelet_probes_pass_through_the_sidecar_while_the_app_port_requires_mtls";
    if let Some(reason) = missing_prerequisite(&["ip", "iptables-restore", "setpriv", "curl"]) {
        remora_tests::skip(TEST, &reason);
        return;
    }
    let pod_spec = injected_pod();
    let probes = kubelet_probes(&pod_spec);
    let web_ready = probes[&("web".to_string(), "readinessProbe".to_string())].clone();
    let web_live = probes[&("web".to_string(), "livenessProbe".to_string())].clone();
    let web_startup = probes[&("web".to_string(), "startupProbe".to_string())].clone();
    let sick_live = probes[&("sick".to_string(), "livenessProbe".to_string())].clone();
    let sick_startup = probes[&("sick".to_string(), "startupProbe".to_string())].clone();
    assert_eq!(web_ready, (15021, "/app-health/web/readyz".to_string()));

    let namespaces = NamespacePair::create(
        &format!("remora-prb-{}", std::process::id()),
        &format!("{POD_IP}/24"),
        &format!("{KUBELET_IP}/24"),
    );
    let (pod, kubelet) = (namespaces.left.clone(), namespaces.right.clone());

    let app = HttpApp::start(listen_in(
        &pod,
        format!("0.0.0.0:{APP_PORT}").parse().unwrap(),
    ));
    start_grpc_health(listen_in(
        &pod,
        format!("0.0.0.0:{GRPC_PORT}").parse().unwrap(),
    ));

    // Capture as the injected remora-init container would install it.
    let init = init_container(&pod_spec, "remora-init");
    let init_args = strings(&init["args"]);
    assert!(
        init_args
            .join(" ")
            .contains("--exclude-inbound-ports 15021"),
        "{init_args:?}"
    );
    let mut command = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        pod.clone(),
        workspace_binary("remora-init").display().to_string(),
    ];
    command.extend(init_args);
    command.push("--no-ipv6".into());
    run(&command.iter().map(String::as_str).collect::<Vec<_>>());

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    write_certificates(dir.path());
    let bootstrap_path = dir.path().join("inbound.yaml");
    std::fs::write(&bootstrap_path, bootstrap(dir.path())).unwrap();
    std::fs::set_permissions(&bootstrap_path, std::fs::Permissions::from_mode(0o644)).unwrap();

    // The injected proxy container's command and literal environment (the downward-API
    // variables have no value here); xDS points at the pod's own loopback, where nothing
    // answers: the probe server must not depend on the control plane.
    let sidecar = init_container(&pod_spec, "remora-proxy");
    let sidecar_command = strings(&sidecar["command"]);
    assert_eq!(sidecar_command, ["remora-proxy", "--bootstrap-from-env"]);
    let mut proxy = Command::new("ip");
    proxy
        .args([
            "netns", "exec", &pod, "setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID,
        ])
        .arg("--clear-groups")
        .arg(workspace_binary("remora-proxy"))
        .args(&sidecar_command[1..])
        .arg("-c")
        .arg(&bootstrap_path)
        .args(["--concurrency", "1"]);
    for var in sidecar["env"].as_array().into_iter().flatten() {
        if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
            proxy.env(name, value);
        }
    }
    proxy.env("REMORA_XDS_ADDRESS", "127.0.0.1:18000");
    let mut proxy = ChildGuard::spawn("remora-proxy", proxy);

    // Readiness through the sidecar: the original HTTP probe, path and header, reached the
    // app on loopback.
    let seen_before = app.request_count();
    wait_for(
        "the rewritten readiness probe to pass",
        Duration::from_secs(20),
        || {
            assert!(
                proxy.try_wait().is_none(),
                "remora-proxy exited:\n{}",
                proxy.log()
            );
            matches!(probe(&kubelet, web_ready.0, &web_ready.1), Ok((200, _))).then_some(())
        },
    );
    assert!(app.request_count() > seen_before);
    let head = app.last_request().to_ascii_lowercase();
    assert!(head.starts_with("get /healthz http/1.1"), "{head}");
    assert!(head.contains("x-probe: kubelet"), "{head}");

    // The app's port itself requires mTLS from outside: plain HTTP gets no answer from the
    // app, nor does TLS without a client certificate; with one, the app answers.
    let before = app.request_count();
    let plain = probe(&kubelet, APP_PORT, "/plain");
    assert!(
        !matches!(plain, Ok((200, _)) | Ok((500, _))),
        "a plain request reached the app: {plain:?}"
    );
    let no_certificate = curl_tls(&kubelet, dir.path(), false);
    assert!(
        no_certificate.is_err(),
        "TLS without a client certificate got {no_certificate:?}"
    );
    assert_eq!(
        app.request_count(),
        before,
        "a request without mTLS reached the app"
    );
    assert_eq!(curl_tls(&kubelet, dir.path(), true), Ok(200));
    assert!(app.last_request().starts_with("GET /mtls "));

    // TCP and gRPC probes pass; a port nobody listens on and a service not serving fail.
    assert_eq!(
        probe(&kubelet, web_live.0, &web_live.1).ok().map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        probe(&kubelet, web_startup.0, &web_startup.1)
            .ok()
            .map(|r| r.0),
        Some(200)
    );
    let (status, body) = probe(&kubelet, sick_live.0, &sick_live.1).expect("sick liveness");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("127.0.0.1:8089"), "{body}");
    let (status, body) = probe(&kubelet, sick_startup.0, &sick_startup.1).expect("sick startup");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not SERVING"), "{body}");

    // A failing app fails its probe, and recovers with it.
    app.healthy.store(false, Ordering::SeqCst);
    let (status, body) = probe(&kubelet, web_ready.0, &web_ready.1).expect("readiness");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("500"), "{body}");
    app.healthy.store(true, Ordering::SeqCst);
    assert_eq!(
        probe(&kubelet, web_ready.0, &web_ready.1).ok().map(|r| r.0),
        Some(200)
    );

    // Only the rewritten paths are served.
    assert_eq!(
        probe(&kubelet, 15021, "/app-health/web/other")
            .ok()
            .map(|r| r.0),
        Some(404)
    );
    drop(proxy);
}

#[test]
fn a_malformed_probe_list_stops_the_proxy_with_an_error_naming_it() {
    let validate = |probes: &str| {
        Command::new(workspace_binary("remora-proxy"))
            .args(["--bootstrap-from-env", "--mode", "validate"])
            .env("REMORA_NODE_ID", "probed.shop")
            .env("REMORA_XDS_ADDRESS", "127.0.0.1:18000")
            .env("REMORA_APP_PROBES", probes)
            .output()
            .expect("run remora-proxy")
    };
    let good = validate(r#"{"/app-health/web/livez": {"tcpSocket": {"port": 8080}}}"#);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let bad = validate(r#"{"/app-health/web/livez": {"tcpSocket": {"port": "http"}}}"#);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("REMORA_APP_PROBES: /app-health/web/livez: tcpSocket.port"),
        "{stderr}"
    );
}
