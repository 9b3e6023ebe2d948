//! An upstream for tests and benchmarks: answers every request (HTTP/1.1 or HTTP/2 cleartext)
//! with a JSON description of what reached it, so a test can assert the routing decision: which
//! upstream answered, with which method, path, Host and headers. `/status/NNN` answers with
//! that status, `/delay/MS` after that many milliseconds, and `/reset` not at all: the stream is
//! reset (HTTP/2 RST_STREAM) or, over HTTP/1.1, the connection closed.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

async fn handle(
    name: String,
    delay: std::time::Duration,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, &'static str> {
    if request.uri().path() == "/reset" {
        // hyper resets the stream of a request its service fails.
        return Err("reset as asked");
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // `/delay/MS` answers after that many milliseconds, for tests of timeouts.
    if let Some(delay) = request
        .uri()
        .path()
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    // `/status/NNN` answers with that status, for tests of error handling.
    let status = request
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| hyper::StatusCode::from_u16(code).ok())
        .unwrap_or(hyper::StatusCode::OK);
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let request = Request::from_parts(parts, ());
    let description = describe(&name, &request, &body);
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", name.as_str())
        .body(Full::new(Bytes::from(description.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    Ok(response)
}

/// What the echo upstream saw, as returned in its JSON body. `headers` maps each name to its
/// last value (handy for single-valued checks); `header_list` keeps every value of every
/// header, in the order they arrived, so appending and overwriting can be told apart.
pub fn describe(name: &str, request: &Request<()>, body: &[u8]) -> serde_json::Value {
    let header_list: Vec<serde_json::Value> = request
        .headers()
        .iter()
        .map(|(key, value)| {
            serde_json::json!([key.as_str(), String::from_utf8_lossy(value.as_bytes())])
        })
        .collect();
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(key, value)| {
            (
                key.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            )
        })
        .collect();
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "upstream": name,
        "method": request.method().as_str(),
        "path": request.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
        "host": host,
        "authority": request.uri().authority().map(|a| a.to_string()),
        "version": format!("{:?}", request.version()),
        "headers": headers,
        "header_list": header_list,
        "body_len": body.len(),
    })
}

/// Serves the echo upstream named `name` on `listener` until the task is dropped.
pub async fn serve(name: String, listener: TcpListener) {
    serve_delayed(name, listener, std::time::Duration::ZERO).await
}

/// Like [`serve`], but every answer waits `delay` first (a slow upstream, for benchmarks).
pub async fn serve_delayed(name: String, listener: TcpListener, delay: std::time::Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| handle(name.clone(), delay, request));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // Like nginx, no count limit of its own to speak of: a proxy's limit is what a
            // test of header counts measures, not the echo's.
            builder.http1().max_headers(1000);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An echo upstream on its own thread and runtime, for synchronous tests. Stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts an echo upstream called `name` on an ephemeral port of `ip` (e.g. "127.0.0.1").
    pub fn start(name: &str, ip: &str) -> EchoServer {
        let std_listener = std::net::TcpListener::bind((ip, 0)).expect("bind echo upstream");
        EchoServer::start_on(name, std_listener)
    }

    /// Serves on an already bound listener (e.g. one bound inside a network namespace).
    pub fn start_on(name: &str, std_listener: std::net::TcpListener) -> EchoServer {
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("echo address");
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("echo runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                tokio::select! {
                    _ = serve(name, listener) => {}
                    _ = stopped => {}
                }
            });
        });
        EchoServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
