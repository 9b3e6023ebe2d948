//! Upstreams whose health a test controls while they run: [`ControlledUpstream`] answers
//! HTTP/1.1 and HTTP/2 with its name and statuses the test sets (one for its health check path,
//! one for everything else, both changeable at any time), and [`GrpcHealthServer`] serves
//! `grpc.health.v1.Health/Check` with a serving status per service name that the test sets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Runs `serve` on its own thread and runtime until the returned sender is dropped.
fn spawn_server<F, Fut>(listener: std::net::TcpListener, serve: F) -> Stopper
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("upstream runtime");
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            tokio::select! {
                () = serve(listener) => {}
                _ = stopped => {}
            }
        });
    });
    Stopper {
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Stops a server thread when dropped (its runtime and connections go with it).
struct Stopper {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop<S, Fut>(listener: TcpListener, handle: S)
where
    S: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<HealthBody>, Infallible>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(handle);
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Response bodies of these upstreams: data, then trailers when given.
pub struct HealthBody(std::collections::VecDeque<Frame<Bytes>>);

impl hyper::body::Body for HealthBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn body(frames: Vec<Frame<Bytes>>) -> HealthBody {
    HealthBody(frames.into())
}

/// An HTTP upstream that names itself (body and `x-upstream`) and answers its health check
/// path and other requests with statuses the test sets.
pub struct ControlledUpstream {
    pub addr: SocketAddr,
    pub name: String,
    health_status: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
    checks: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    headers: Arc<Mutex<ExtraHeaders>>,
    _server: Stopper,
}

/// Headers added to health check answers and to other answers.
#[derive(Debug, Default, Clone)]
struct ExtraHeaders {
    checks: Vec<(String, String)>,
    requests: Vec<(String, String)>,
}

impl ControlledUpstream {
    /// Starts it on a fresh loopback port; requests whose path starts with `health_path`
    /// are health checks. Both statuses start at 200.
    pub fn start(name: &str, health_path: &str) -> ControlledUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        ControlledUpstream::start_on(name, health_path, listener)
    }

    /// Serves on a listener the test bound (e.g. to come back on the same port).
    pub fn start_on(
        name: &str,
        health_path: &str,
        listener: std::net::TcpListener,
    ) -> ControlledUpstream {
        let addr = listener.local_addr().expect("upstream address");
        let health_status = Arc::new(AtomicU16::new(200));
        let status = Arc::new(AtomicU16::new(200));
        let checks = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let headers = Arc::new(Mutex::new(ExtraHeaders::default()));
        let shared = (
            name.to_string(),
            health_path.to_string(),
            health_status.clone(),
            status.clone(),
            (checks.clone(), requests.clone()),
            headers.clone(),
        );
        let server = spawn_server(listener, move |listener| {
            accept_loop(listener, move |request: Request<Incoming>| {
                let (name, health_path, health_status, status, (checks, requests), headers) =
                    shared.clone();
                async move {
                    let is_check = request.uri().path().starts_with(health_path.as_str());
                    let code = if is_check {
                        checks.fetch_add(1, Ordering::SeqCst);
                        health_status.load(Ordering::SeqCst)
                    } else {
                        requests.fetch_add(1, Ordering::SeqCst);
                        status.load(Ordering::SeqCst)
                    };
                    let _ = request.into_body().collect().await;
                    let extra = {
                        let headers = headers.lock().unwrap_or_else(|p| p.into_inner());
                        if is_check {
                            headers.checks.clone()
                        } else {
                            headers.requests.clone()
                        }
                    };
                    let mut response = Response::builder()
                        .status(code)
                        .header("x-upstream", name.as_str());
                    for (key, value) in extra {
                        response = response.header(key, value);
                    }
                    Ok(response
                        .body(body(vec![Frame::data(Bytes::from(name))]))
                        .expect("response"))
                }
            })
        });
        ControlledUpstream {
            addr,
            name: name.to_string(),
            health_status,
            status,
            checks,
            requests,
            headers,
            _server: server,
        }
    }

    /// Headers health check answers carry from now on.
    pub fn set_check_headers(&self, headers: &[(&str, &str)]) {
        self.headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .checks = owned(headers);
    }

    /// Headers other answers carry from now on.
    pub fn set_response_headers(&self, headers: &[(&str, &str)]) {
        self.headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests = owned(headers);
    }

    /// The status health checks get from now on.
    pub fn set_health_status(&self, status: u16) {
        self.health_status.store(status, Ordering::SeqCst);
    }

    /// The status other requests get from now on.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Health checks received so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }

    /// Other requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `grpc.health.v1` serving statuses.
pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

/// A `grpc.health.v1.Health` server (HTTP/2 cleartext): `Check` answers the status set for the
/// requested service, or NOT_FOUND (gRPC status 5) for a service it does not know, as the
/// reference implementations do.
pub struct GrpcHealthServer {
    pub addr: SocketAddr,
    statuses: Arc<Mutex<HashMap<String, i32>>>,
    checks: Arc<AtomicU64>,
    _server: Stopper,
}

/// The `service` field of a `HealthCheckRequest` frame (empty when absent or unreadable).
fn requested_service(frame: &[u8]) -> String {
    let Some(message) = frame.get(5..) else {
        return String::new();
    };
    match message {
        [0x0a, len, rest @ ..] if (*len as usize) <= rest.len() && *len < 0x80 => {
            String::from_utf8_lossy(&rest[..*len as usize]).into_owned()
        }
        _ => String::new(),
    }
}

impl GrpcHealthServer {
    pub fn start() -> GrpcHealthServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind grpc upstream");
        let addr = listener.local_addr().expect("grpc address");
        let statuses = Arc::new(Mutex::new(HashMap::new()));
        let checks = Arc::new(AtomicU64::new(0));
        let shared = (statuses.clone(), checks.clone());
        let server = spawn_server(listener, move |listener| {
            accept_loop(listener, move |request: Request<Incoming>| {
                let (statuses, checks) = shared.clone();
                async move {
                    let path = request.uri().path().to_string();
                    let frame = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let grpc = |status: &str, message: Vec<u8>| {
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", status.parse().expect("status"));
                        let mut frames = Vec::new();
                        if !message.is_empty() || status == "0" {
                            let mut data = vec![0];
                            data.extend_from_slice(&(message.len() as u32).to_be_bytes());
                            data.extend_from_slice(&message);
                            frames.push(Frame::data(Bytes::from(data)));
                        }
                        frames.push(Frame::trailers(trailers));
                        Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(body(frames))
                            .expect("response")
                    };
                    if path != "/grpc.health.v1.Health/Check" {
                        return Ok(grpc("12", Vec::new()));
                    }
                    checks.fetch_add(1, Ordering::SeqCst);
                    let service = requested_service(&frame);
                    let status = statuses
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&service)
                        .copied();
                    Ok(match status {
                        Some(status) => grpc("0", vec![0x08, status as u8]),
                        None => grpc("5", Vec::new()),
                    })
                }
            })
        });
        GrpcHealthServer {
            addr,
            statuses,
            checks,
            _server: server,
        }
    }

    /// Sets `service`'s serving status ([`SERVING`], [`NOT_SERVING`]).
    pub fn set(&self, service: &str, status: i32) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_string(), status);
    }

    /// Checks received so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }
}
