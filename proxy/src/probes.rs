//! The probe server: answers the kubelet's probes that the injector rewrote, by running the
//! app's original probe from inside the pod.
//!
//! Beside the request path, not on it. The kubelet probes the pod IP in plaintext and has no
//! mesh certificate, so once the app's port is captured and its inbound listener requires
//! mTLS its probes would fail. The injector rewrites each HTTP, TCP and gRPC probe to
//! `GET /app-health/CONTAINER/livez|readyz|startupz` on this server's port (excluded from
//! capture) and hands the originals over in `REMORA_APP_PROBES`. Each request here runs the
//! original against the app on 127.0.0.1, as the kubelet would have: HTTP(S) GET with its
//! path and headers (certificates unchecked, as the kubelet does; 200–399 passes, redirects
//! not followed), TCP
//! connect, or `grpc.health.v1.Health/Check` (SERVING passes), all within the probe's
//! timeout. It answers 200 when the probe passes, 503 with the reason when it fails.
//!
//! Started by `--bootstrap-from-env` when `REMORA_APP_PROBES` is set, on its own thread, so
//! it answers from before the first xDS response and whatever the workers are doing.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;

/// Environment variable with the original probes, by rewritten path (JSON).
pub const PROBES_ENV: &str = "REMORA_APP_PROBES";
/// Environment variable with the port to listen on.
pub const PORT_ENV: &str = "REMORA_PROBE_PORT";
/// The port when [`PORT_ENV`] is not set (the injector's, and Istio's health port).
pub const DEFAULT_PORT: u16 = 15021;

/// Where the app is probed: the pod's loopback, which capture leaves alone for the proxy.
const APP_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Kubernetes' default probe timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a gRPC health response we read; a real one is a few bytes.
const MAX_GRPC_RESPONSE: usize = 64 * 1024;

/// One original probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub check: Check,
    pub timeout: Duration,
}

/// What a probe does against the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Http {
        tls: bool,
        port: u16,
        path: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

/// The server's settings: its address and the probes by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub listen: SocketAddr,
    pub probes: HashMap<String, AppProbe>,
}

/// A bad `REMORA_APP_PROBES` or `REMORA_PROBE_PORT`, naming the path and field.
#[derive(Debug, thiserror::Error)]
#[error("{PROBES_ENV}: {0}")]
pub struct ProbeConfigError(String);

/// The server's settings from the environment; `None` when no probes were handed over.
pub fn from_env() -> Result<Option<ProbeConfig>, ProbeConfigError> {
    let Ok(text) = std::env::var(PROBES_ENV) else {
        return Ok(None);
    };
    let port = match std::env::var(PORT_ENV) {
        Ok(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ProbeConfigError(format!("{PORT_ENV} {port:?} is not a port")))?,
        Err(_) => DEFAULT_PORT,
    };
    Ok(Some(ProbeConfig {
        listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        probes: parse(&text)?,
    }))
}

/// Parses the injector's JSON: `{"/app-health/web/readyz": {"httpGet": {...},
/// "timeoutSeconds": 1}, ...}`, ports as numbers.
pub fn parse(text: &str) -> Result<HashMap<String, AppProbe>, ProbeConfigError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ProbeConfigError(format!("not JSON: {e}")))?;
    let entries = value
        .as_object()
        .ok_or_else(|| ProbeConfigError("not a JSON object of probes by path".into()))?;
    entries
        .iter()
        .map(|(path, probe)| {
            if !path.starts_with('/') {
                return Err(ProbeConfigError(format!(
                    "{path:?}: a path must start with /"
                )));
            }
            let probe = parse_probe(probe).map_err(|e| ProbeConfigError(format!("{path}: {e}")))?;
            Ok((path.clone(), probe))
        })
        .collect()
}

fn parse_probe(probe: &Value) -> Result<AppProbe, String> {
    let timeout = match probe.get("timeoutSeconds") {
        None => DEFAULT_TIMEOUT,
        Some(t) => Duration::from_secs(
            t.as_u64()
                .filter(|t| *t > 0)
                .ok_or_else(|| format!("timeoutSeconds {t} is not a positive integer"))?,
        ),
    };
    let port = |handler: &Value, field: &str| -> Result<u16, String> {
        let port = &handler["port"];
        port.as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{field}.port {port} is not a port number"))
    };
    let check = if let Some(get) = probe.get("httpGet") {
        let tls = match get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP") {
            "HTTP" => false,
            "HTTPS" => true,
            other => {
                return Err(format!(
                    "httpGet.scheme {other:?} is neither HTTP nor HTTPS"
                ));
            }
        };
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let mut headers = Vec::new();
        for header in get
            .get("httpHeaders")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = header["name"].as_str().unwrap_or_default();
            let value = header["value"].as_str().unwrap_or_default();
            let name = HeaderName::try_from(name)
                .map_err(|_| format!("httpGet.httpHeaders: {name:?} is not a header name"))?;
            let value = HeaderValue::try_from(value)
                .map_err(|_| format!("httpGet.httpHeaders: the value of {name} is not valid"))?;
            headers.push((name, value));
        }
        Check::Http {
            tls,
            port: port(get, "httpGet")?,
            path,
            headers,
        }
    } else if let Some(tcp) = probe.get("tcpSocket") {
        Check::Tcp {
            port: port(tcp, "tcpSocket")?,
        }
    } else if let Some(grpc) = probe.get("grpc") {
        Check::Grpc {
            port: port(grpc, "grpc")?,
            service: grpc
                .get("service")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        }
    } else {
        return Err("no httpGet, tcpSocket or grpc".into());
    };
    Ok(AppProbe { check, timeout })
}

/// Binds the port now (so a clash fails startup) and serves on a thread of its own until
/// the process ends.
pub fn spawn(config: ProbeConfig) -> std::io::Result<SocketAddr> {
    let listener = bind(config.listen)?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("remora-probes".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, Arc::new(config.probes)).await,
                    Err(error) => tracing::error!(%error, "probe server cannot listen"),
                }
            })
        })?;
    tracing::info!(%address, "probe server listening");
    Ok(address)
}

/// An unspecified IPv4 address is bound dual-stack (`[::]`, v4-mapped included) where the
/// host has IPv6, so IPv6 and dual-stack pods are probed too; IPv4 alone otherwise.
fn bind(listen: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    if listen.ip() == std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        let dual_stack = || -> std::io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, listen.port()));
            socket.bind(&any.into())?;
            socket.listen(128)?;
            Ok(socket.into())
        };
        if let Ok(listener) = dual_stack() {
            return Ok(listener);
        }
    }
    std::net::TcpListener::bind(listen)
}

async fn serve(listener: tokio::net::TcpListener, probes: Arc<HashMap<String, AppProbe>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(%error, "probe server accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let probes = probes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: Request<hyper::body::Incoming>| {
                    let probes = probes.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&probes, &request).await) }
                },
            );
            // The port is outside capture, so anyone who reaches the pod can connect: a
            // client that never finishes its request does not keep a connection forever.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer<B>(
    probes: &HashMap<String, AppProbe>,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: String| {
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = status;
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let Some(probe) = probes.get(request.uri().path()) else {
        return reply(StatusCode::NOT_FOUND, "no such probe\n".into());
    };
    match run(probe).await {
        Ok(()) => reply(StatusCode::OK, "ok\n".into()),
        Err(reason) => {
            tracing::debug!(path = request.uri().path(), %reason, "app probe failed");
            reply(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
        }
    }
}

/// Runs one probe against the app; `Err` says why it failed.
pub async fn run(probe: &AppProbe) -> Result<(), String> {
    let checked = async {
        match &probe.check {
            Check::Tcp { port } => connect(*port).await.map(drop),
            Check::Http {
                tls,
                port,
                path,
                headers,
            } => http_check(*tls, *port, path, headers).await,
            Check::Grpc { port, service } => grpc_check(*port, service).await,
        }
    };
    tokio::time::timeout(probe.timeout, checked)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", probe.timeout)))
}

async fn connect(port: u16) -> Result<tokio::net::TcpStream, String> {
    tokio::net::TcpStream::connect((APP_HOST, port))
        .await
        .map_err(|e| format!("connecting to {APP_HOST}:{port}: {e}"))
}

async fn http_check(
    tls: bool,
    port: u16,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
) -> Result<(), String> {
    let mut request = Request::get(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request for {path:?}: {e}"))?;
    let request_headers = request.headers_mut();
    // The kubelet's defaults, which the probe's own headers replace.
    for (name, value) in [
        (http::header::HOST, format!("{APP_HOST}:{port}")),
        (http::header::USER_AGENT, "kube-probe/remora".to_string()),
        (http::header::ACCEPT, "*/*".to_string()),
    ] {
        if let Ok(value) = HeaderValue::try_from(value) {
            request_headers.insert(name, value);
        }
    }
    for (name, _) in headers {
        request_headers.remove(name);
    }
    for (name, value) in headers {
        request_headers.append(name.clone(), value.clone());
    }
    let stream = connect(port).await?;
    let status = if tls {
        let connector = tokio_rustls::TlsConnector::from(insecure_client_config()?);
        let stream = connector
            .connect(
                rustls::pki_types::ServerName::IpAddress(APP_HOST.into()),
                stream,
            )
            .await
            .map_err(|e| format!("TLS handshake with {APP_HOST}:{port}: {e}"))?;
        send_http1(stream, request).await?
    } else {
        send_http1(stream, request).await?
    };
    // As the kubelet: 2xx and 3xx pass.
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("HTTP probe of {path} answered {status}"))
    }
}

async fn send_http1<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP probe: {e}"))?;
    Ok(response.status())
}

/// The kubelet does not verify an HTTPS probe's certificate; neither do we.
fn insecure_client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(crate::tls::NoVerification))
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; status 1 is SERVING.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

async fn grpc_check(port: u16, service: &str) -> Result<(), String> {
    use prost::Message as _;
    let message = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = Request::post(format!(
        "http://{APP_HOST}:{port}/grpc.health.v1.Health/Check"
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .header(http::header::USER_AGENT, "kube-probe/remora")
    .body(Full::new(Bytes::from(frame)))
    .map_err(|e| format!("gRPC request: {e}"))?;

    let stream = connect(port).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("gRPC health check: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!(
            "gRPC health check answered HTTP {}",
            response.status()
        ));
    }
    let header_status = response.headers().get("grpc-status").cloned();
    let body = http_body_util::Limited::new(response.into_body(), MAX_GRPC_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("gRPC health check response: {e}"))?;
    let grpc_status = body
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status);
    match grpc_status.as_ref().map(HeaderValue::as_bytes) {
        Some(b"0") => {}
        Some(code) => {
            return Err(format!(
                "gRPC health check failed with grpc-status {}",
                String::from_utf8_lossy(code)
            ));
        }
        None => return Err("gRPC health check answered no grpc-status".into()),
    }
    let mut data = body.to_bytes();
    if data.remaining() < 5 {
        return Err("gRPC health check answered no message".into());
    }
    let compressed = data.get_u8() != 0;
    let length = data.get_u32() as usize;
    if compressed || data.remaining() < length {
        return Err("gRPC health check answered a compressed or truncated message".into());
    }
    let answer = HealthCheckResponse::decode(data.slice(..length))
        .map_err(|e| format!("gRPC health check response: {e}"))?;
    if answer.status == SERVING {
        Ok(())
    } else {
        Err(format!(
            "gRPC service {service:?} is not SERVING (status {})",
            answer.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injectors_probes() {
        let probes = parse(
            r#"{
              "/app-health/web/readyz": {"httpGet": {"path": "/ready?x=1", "port": 8443, "scheme": "HTTPS",
                  "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 3},
              "/app-health/web/livez": {"tcpSocket": {"port": 9090}},
              "/app-health/web/startupz": {"grpc": {"port": 9091, "service": "web"}, "timeoutSeconds": 2}
            }"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            probes["/app-health/web/readyz"],
            AppProbe {
                check: Check::Http {
                    tls: true,
                    port: 8443,
                    path: "/ready?x=1".into(),
                    headers: vec![(
                        HeaderName::from_static("x-probe"),
                        HeaderValue::from_static("kubelet")
                    )],
                },
                timeout: Duration::from_secs(3),
            }
        );
        assert_eq!(
            probes["/app-health/web/livez"],
            AppProbe {
                check: Check::Tcp { port: 9090 },
                timeout: DEFAULT_TIMEOUT
            }
        );
        assert_eq!(
            probes["/app-health/web/startupz"].check,
            Check::Grpc {
                port: 9091,
                service: "web".into()
            }
        );
    }

    #[test]
    fn bad_probes_are_named() {
        for (text, expected) in [
            ("[]", "not a JSON object"),
            (r#"{"/a": {"exec": {}}}"#, "/a: no httpGet"),
            (
                r#"{"/a": {"tcpSocket": {"port": 70000}}}"#,
                "tcpSocket.port 70000",
            ),
            (
                r#"{"/a": {"tcpSocket": {"port": "http"}}}"#,
                "tcpSocket.port \"http\"",
            ),
            (
                r#"{"/a": {"httpGet": {"port": 80, "scheme": "FTP"}}}"#,
                "\"FTP\"",
            ),
            (
                r#"{"/a": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}"#,
                "timeoutSeconds 0",
            ),
            (r#"{"a": {"tcpSocket": {"port": 1}}}"#, "must start with /"),
        ] {
            let error = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(expected), "{text}: {error:?}");
            assert!(error.starts_with(PROBES_ENV), "{error}");
        }
    }

    #[tokio::test]
    async fn a_tcp_probe_passes_while_the_port_listens_and_fails_after() {
        let listener = tokio::net::TcpListener::bind((APP_HOST, 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let probe = AppProbe {
            check: Check::Tcp { port },
            timeout: Duration::from_secs(2),
        };
        assert_eq!(run(&probe).await, Ok(()));
        drop(listener);
        let error = run(&probe).await.err().unwrap_or_default();
        assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    }

    /// A one-request HTTP/1.1 server on 127.0.0.1 answering `status`, over TLS with a
    /// self-signed certificate when `tls`; hands back its port and the request head it got.
    async fn one_shot_server(
        status: u16,
        tls: bool,
    ) -> (u16, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind((APP_HOST, 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let acceptor = tls.then(|| {
            let certified = rcgen::generate_simple_self_signed(vec!["app".to_string()])
                .unwrap_or_else(|e| panic!("{e}"));
            let key =
                rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![certified.cert.der().clone()], key)
            })
            .unwrap_or_else(|e| panic!("{e}"));
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let mut stream: Box<dyn Io> = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => Box::new(tls),
                    Err(_) => return,
                },
                None => Box::new(stream),
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = head_tx.send(String::from_utf8_lossy(&head).into_owned());
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
        (port, head_rx)
    }

    trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

    fn http_probe(port: u16, tls: bool, headers: Vec<(HeaderName, HeaderValue)>) -> AppProbe {
        AppProbe {
            check: Check::Http {
                tls,
                port,
                path: "/health?deep=1".into(),
                headers,
            },
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_send_the_probe_headers() {
        let (port, head) = one_shot_server(302, false).await;
        let host = (http::header::HOST, HeaderValue::from_static("web.example"));
        assert_eq!(run(&http_probe(port, false, vec![host])).await, Ok(()));
        let head = head.await.unwrap_or_default().to_ascii_lowercase();
        assert!(
            head.starts_with("get /health?deep=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("host: web.example\r\n"), "{head}");
        assert_eq!(head.matches("host:").count(), 1, "{head}");
        assert!(head.contains("user-agent: kube-probe/remora"), "{head}");

        let (port, _) = one_shot_server(404, false).await;
        let error = run(&http_probe(port, false, vec![]))
            .await
            .err()
            .unwrap_or_default();
        assert!(error.contains("404"), "{error}");
    }

    #[tokio::test]
    async fn https_probes_do_not_check_the_certificate() {
        let (port, head) = one_shot_server(200, true).await;
        assert_eq!(run(&http_probe(port, true, vec![])).await, Ok(()));
        assert!(head.await.unwrap_or_default().starts_with("GET /health"));
    }

    #[tokio::test]
    async fn a_probe_that_gets_no_answer_fails_at_its_timeout() {
        let listener = tokio::net::TcpListener::bind((APP_HOST, 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let mut probe = http_probe(port, false, vec![]);
        probe.timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let error = run(&probe).await.err().unwrap_or_default();
        assert!(error.contains("timed out"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn listens_on_ipv4_and_on_ipv6_where_the_host_has_it() {
        let listener =
            bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let connects = |ip: std::net::IpAddr| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((ip, port)),
                Duration::from_secs(2),
            )
            .is_ok()
        };
        assert!(connects(APP_HOST.into()));
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(connects(std::net::Ipv6Addr::LOCALHOST.into()));
        }
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_only_get_is_served() {
        let probes = HashMap::new();
        let get = Request::get("/app-health/x/livez")
            .body(())
            .unwrap_or_default();
        assert_eq!(answer(&probes, &get).await.status(), StatusCode::NOT_FOUND);
        let post = Request::post("/app-health/x/livez")
            .body(())
            .unwrap_or_default();
        assert_eq!(
            answer(&probes, &post).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
