//! An upstream that follows a script, for tests of retries, timeouts and health: the n-th
//! request it receives gets the n-th step (the last step repeats): a status, a status after a
//! delay, a gRPC trailers-only status, or a reset (the connection closed with no answer). It
//! records every request it saw, so a test can count attempts and read their headers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// What the upstream does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Answer with this status (the JSON description of the request as body).
    Status(u16),
    /// Wait, then answer with this status.
    Delayed(Duration, u16),
    /// Answer 200 with `grpc-status` set and no body (a gRPC trailers-only answer).
    Grpc(u32),
    /// Close the connection without answering.
    Reset,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body_len: usize,
}

#[derive(Debug, Default)]
struct Shared {
    seen: Vec<Seen>,
}

/// The scripted upstream, on its own thread and runtime; stops on drop.
pub struct Scripted {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    script: Arc<Mutex<Vec<Step>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scripted {
    /// Starts an upstream named `name` on an ephemeral loopback port with `script`.
    pub fn start(name: &str, script: &[Step]) -> Scripted {
        assert!(!script.is_empty(), "a script needs at least one step");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let script = Arc::new(Mutex::new(script.to_vec()));
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let (shared, script, name) = (shared.clone(), script.clone(), name.to_string());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("listener");
                    tokio::select! {
                        _ = serve(name, listener, shared, script) => {}
                        _ = stopped => {}
                    }
                });
            })
        };
        Scripted {
            addr,
            shared,
            script,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Every request seen so far, in order of arrival.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().expect("lock").seen.clone()
    }

    /// Forgets what was seen and restarts the script (`script` replaces it).
    pub fn reset(&self, script: &[Step]) {
        self.shared.lock().expect("lock").seen.clear();
        *self.script.lock().expect("lock") = script.to_vec();
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    name: String,
    listener: TcpListener,
    shared: Arc<Mutex<Shared>>,
    script: Arc<Mutex<Vec<Step>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, shared, script) = (name.clone(), shared.clone(), script.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(name.clone(), shared.clone(), script.clone(), request)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The answer that ends a connection without a response.
#[derive(Debug)]
struct Hangup;

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted reset")
    }
}

impl std::error::Error for Hangup {}

async fn handle(
    name: String,
    shared: Arc<Mutex<Shared>>,
    script: Arc<Mutex<Vec<Step>>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Hangup> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let step = {
        let mut shared = shared.lock().expect("lock");
        let index = shared.seen.len();
        shared.seen.push(Seen {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".to_string(), |pq| pq.to_string()),
            headers: parts.headers.clone(),
            body_len: body.len(),
        });
        let script = script.lock().expect("lock");
        script[index.min(script.len() - 1)].clone()
    };
    let request = Request::from_parts(parts, ());
    let description = crate::echo::describe(&name, &request, &body).to_string();
    let respond = |status: u16| -> Result<Response<Full<Bytes>>, Hangup> {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-upstream", name.as_str())
            .body(Full::new(Bytes::from(description.clone())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
    };
    match step {
        Step::Status(status) => respond(status),
        Step::Delayed(delay, status) => {
            tokio::time::sleep(delay).await;
            respond(status)
        }
        Step::Grpc(code) => Ok(Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", code.to_string())
            .header("x-upstream", name.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))),
        Step::Reset => Err(Hangup),
    }
}
