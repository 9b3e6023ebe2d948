//! Helpers shared by the proxy's end-to-end tests: start `remora-proxy` with a bootstrap,
//! bootstrap snippets, and small raw-socket peers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use remora_tests::process::ChildGuard;
use remora_tests::{free_port, http_get, wait_for, workspace_binary};

/// A running remora-proxy.
pub struct Proxy {
    pub process: ChildGuard,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub _dir: tempfile::TempDir,
}

pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, yaml).expect("write bootstrap");
    (dir, path)
}

impl Proxy {
    /// Starts the proxy with `yaml` (whose admin must be on `admin`) and waits for `/ready`.
    pub fn start(yaml: &str, admin: SocketAddr, extra: &[&str]) -> Proxy {
        let (dir, config) = write_config(yaml);
        let mut command = Command::new(workspace_binary("remora-proxy"));
        command
            .arg("-c")
            .arg(&config)
            .args(default_args(extra))
            .args(extra);
        let mut process = ChildGuard::spawn("remora-proxy", command);
        wait_ready(&mut process, admin);
        Proxy {
            process,
            admin,
            config,
            _dir: dir,
        }
    }

    /// The value of the counter or gauge `name`; a stat the proxy does not have fails the test
    /// (so a misspelt name cannot pass for a zero).
    pub fn stat(&self, name: &str) -> u64 {
        self.stat_or_none(name)
            .unwrap_or_else(|| panic!("the proxy at {} has no stat {name}", self.admin))
    }

    /// The value of `name`, or `None` when the proxy does not have it (or the admin did not
    /// answer): for the few checks that ask whether a stat exists.
    pub fn stat_or_none(&self, name: &str) -> Option<u64> {
        remora_tests::admin_stat(self.admin, name)
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An admin block on a fresh port.
pub fn admin_block() -> (SocketAddr, String) {
    let port = free_port();
    (
        loopback(port),
        format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n"
        ),
    )
}

/// A STATIC cluster with the given endpoints.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> String {
    let mut lb = String::new();
    for e in endpoints {
        lb.push_str(&format!(
            "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
            e.ip(),
            e.port()
        ));
    }
    format!(
        "  - name: {name}\n    connect_timeout: 0.5s\n    type: STATIC\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{lb}"
    )
}

/// A STATIC cluster of one endpoint spoken to over HTTP/2 (h2c).
pub fn http2_cluster(name: &str, endpoint: SocketAddr) -> String {
    static_cluster(name, &[endpoint]).replace(
        "    type: STATIC\n",
        "    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}\n",
    )
}

/// A listener with an HCM whose inline route config is `routes_yaml` (the `virtual_hosts` list,
/// indented by 12 spaces) and extra HCM fields.
pub fn http_listener(name: &str, port: u16, hcm_extra: &str, virtual_hosts: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
{hcm_extra}          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: {name}_routes
            virtual_hosts:
{virtual_hosts}"#
    )
}

pub fn tcp_listener(name: &str, port: u16, cluster: &str, extra: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
{extra}"#
    )
}

/// `listener` (from [`http_listener`]) with `filters` (YAML list items) before its router.
pub fn with_http_filters(listener: String, filters: &str) -> String {
    listener.replace(
        "          http_filters:\n",
        &format!("          http_filters:\n{filters}"),
    )
}

/// A health check filter (for [`with_http_filters`]) taking `:path` `path`, answering or
/// (`pass_through`) passing it on; `clusters`: its `cluster_min_healthy_percentages` entries.
pub fn health_check_filter(path: &str, pass_through: bool, clusters: &str) -> String {
    format!(
        r#"          - name: health{path}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: {pass_through}
              headers: [{{name: ":path", string_match: {{exact: {path}}}}}]
              cluster_min_healthy_percentages: {{{clusters}}}
"#
    )
}

/// Assembles a bootstrap.
/// One virtual host whose only route sends everything to `cluster` with route `timeout`.
pub fn catch_all(cluster: &str, timeout: &str) -> String {
    format!(
        r#"            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster}, timeout: {timeout}}}
"#
    )
}

pub fn bootstrap(admin: &str, listeners: &[String], clusters: &[String]) -> String {
    format!(
        "{admin}static_resources:\n  listeners:\n{}  clusters:\n{}",
        listeners.concat(),
        clusters.concat()
    )
}

/// Parses the echo upstream's JSON body.
pub fn echo_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not echo JSON ({e}): {body:?}"))
}

/// A TCP peer that accepts and never answers (for timeouts).
pub fn silent_upstream() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// A port with nothing listening.
pub fn closed_port() -> SocketAddr {
    loopback(free_port())
}

/// Reads an HTTP/1 message head, through its blank line, a byte at a time (so nothing after
/// it is consumed); `None` when the peer closes or fails first.
pub fn read_head(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// Sends raw bytes and reads the whole answer until the peer closes (or 10 s).
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

impl Proxy {
    /// Starts the proxy with an existing bootstrap file.
    pub fn start_file(config: &std::path::Path, admin: SocketAddr, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(workspace_binary("remora-proxy"));
        command
            .arg("-c")
            .arg(config)
            .args(default_args(extra))
            .args(extra);
        let mut process = ChildGuard::spawn("remora-proxy", command);
        wait_ready(&mut process, admin);
        Proxy {
            process,
            admin,
            config: config.to_path_buf(),
            _dir: dir,
        }
    }
}

/// Two workers and debug logs, unless `extra` sets the worker count itself.
/// `--concurrency 2 --log-level debug`, each unless `extra` sets it.
fn default_args(extra: &[&str]) -> Vec<&'static str> {
    let mut args = Vec::new();
    if !extra.contains(&"--concurrency") {
        args.extend(["--concurrency", "2"]);
    }
    if !extra.contains(&"--log-level") {
        args.extend(["--log-level", "debug"]);
    }
    args
}

/// Waits for `/ready`, failing at once (with the log) if the proxy exits instead.
pub fn wait_ready(process: &mut ChildGuard, admin: SocketAddr) {
    wait_for("remora-proxy /ready", Duration::from_secs(20), || {
        if let Some(status) = process.try_wait() {
            panic!("remora-proxy exited with {status}:\n{}", process.log());
        }
        http_get(admin, "/ready")
            .ok()
            .filter(|(status, _, _)| *status == 200)
            .map(|_| ())
    });
}

/// An HTTP/1.1 upstream that holds every response until the test calls [`HeldUpstream::release`],
/// so a test keeps requests in flight for exactly as long as it needs them, not for a guessed
/// delay. [`HeldUpstream::hold`] re-arms it.
pub struct HeldUpstream {
    pub addr: SocketAddr,
    arrived: std::sync::Arc<std::sync::atomic::AtomicU64>,
    released: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl HeldUpstream {
    /// Starts it; each response is a 200 with `body`.
    pub fn start(body: &str) -> HeldUpstream {
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        Self::spawn(String::new(), response, false)
    }

    /// Like [`HeldUpstream::start`], but each response says `connection: close` and the
    /// upstream closes the connection after it.
    pub fn start_closing(body: &str) -> HeldUpstream {
        let response = format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        Self::spawn(String::new(), response, true)
    }

    /// Sends the headers and `first` at once, and holds the rest of the body, `rest`, until
    /// released: a response that stalls mid-body.
    pub fn start_stalled_body(first: &str, rest: &str) -> HeldUpstream {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{first}",
            first.len() + rest.len()
        );
        Self::spawn(head, rest.to_string(), false)
    }

    fn spawn(immediate: String, held: String, close: bool) -> HeldUpstream {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let arrived = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let released =
            std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let (counter, gate) = (arrived.clone(), released.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (counter, gate) = (counter.clone(), gate.clone());
                let (immediate, held) = (immediate.clone(), held.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut head = Vec::new();
                    loop {
                        let Ok(n) = stream.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            head.clear();
                            if !immediate.is_empty()
                                && stream.write_all(immediate.as_bytes()).is_err()
                            {
                                return;
                            }
                            counter.fetch_add(1, Ordering::SeqCst);
                            let (lock, condvar) = &*gate;
                            let open = lock.lock().unwrap_or_else(|p| p.into_inner());
                            drop(
                                condvar
                                    .wait_while(open, |open| !*open)
                                    .unwrap_or_else(|p| p.into_inner()),
                            );
                            let _ = stream.write_all(held.as_bytes());
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        HeldUpstream {
            addr,
            arrived,
            released,
        }
    }

    /// How many requests have reached it so far.
    pub fn arrived(&self) -> u64 {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers every held request, and answers new ones at once until [`HeldUpstream::hold`].
    pub fn release(&self) {
        self.set_open(true);
    }

    /// Holds new requests again.
    pub fn hold(&self) {
        self.set_open(false);
    }

    fn set_open(&self, open: bool) {
        let (lock, condvar) = &*self.released;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = open;
        condvar.notify_all();
    }
}

/// What an HTTP/2 client writes first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
pub const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads HTTP/2 frames off a raw connection until `wanted(type, flags)` holds; returns that
/// frame's payload.
pub fn read_h2_frame_until(
    stream: &mut TcpStream,
    wanted: impl Fn(u8, u8) -> bool,
) -> std::io::Result<Vec<u8>> {
    loop {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        stream.read_exact(&mut payload)?;
        if wanted(head[3], head[4]) {
            return Ok(payload);
        }
    }
}

/// The (identifier, value) pairs of a SETTINGS payload.
pub fn h2_settings(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

/// A WebSocket upgrade request for `/chat`.
pub const UPGRADE_HEAD: &str = "GET /chat HTTP/1.1\r\nHost: ws.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// An upstream that accepts every upgrade and then echoes bytes.
pub fn upgrade_echo_upstream() -> std::net::SocketAddr {
    upgrade_greeting_echo_upstream(b"")
}

/// An upstream that accepts every upgrade with `greeting` in the same write as its 101, then
/// echoes bytes until the client ends its side, and then ends its own.
pub fn upgrade_greeting_echo_upstream(greeting: &'static [u8]) -> std::net::SocketAddr {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(mut stream) = stream else {
                return;
            };
            std::thread::spawn(move || {
                if read_head(&mut stream).is_none() {
                    return;
                }
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
                answer.extend_from_slice(greeting);
                let _ = stream.write_all(&answer);
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    upstream_addr
}

/// Upgrades a connection to `addr` whose far end is [`upgrade_greeting_echo_upstream`] with
/// greeting `upstream-first`, sending `client-first` in the same write as the request; checks
/// the bytes behind both heads arrive first and in order, that `bulk` bytes come back whole,
/// and that a half-close passes through (the upstream then closes and so does the tunnel).
/// Returns what the client sent after its head.
pub fn tunnel_round_trip(addr: SocketAddr, bulk: usize) -> u64 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(format!("{UPGRADE_HEAD}client-first").as_bytes())
        .expect("write upgrade");
    let head = read_head(&mut stream).expect("a response head");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut first = [0u8; 26];
    stream.read_exact(&mut first).expect("early bytes");
    assert_eq!(&first, b"upstream-firstclient-first");

    let data: Vec<u8> = (0..bulk as u32).map(|i| (i * 31 + i / 509) as u8).collect();
    let mut writer = stream.try_clone().expect("clone");
    let sent = data.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write bulk");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut echoed = Vec::new();
    stream
        .read_to_end(&mut echoed)
        .expect("echo until the upstream closes");
    sender.join().expect("sender");
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the same bytes in the same order");
    (bulk + "client-first".len()) as u64
}

/// A current-thread runtime and an HTTP/2 (prior knowledge) client connection to `addr`,
/// whose connection task runs whenever the runtime is driven (`block_on`).
pub fn h2_client(
    addr: SocketAddr,
) -> (
    tokio::runtime::Runtime,
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sender = runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(connection);
        sender
    });
    (runtime, sender)
}
