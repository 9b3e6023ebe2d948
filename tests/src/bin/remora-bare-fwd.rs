//! `remora-bare-fwd`: the calibration point for `bench/calibrate` — the least an HTTP proxy on
//! hyper can do: one current-thread runtime, accept, forward every request to one upstream
//! through a pooled client, stream the reply back. No routing, no stats, no config.
//! Its ratios to Envoy show what "close to bare hyper" means on the machine at hand.
//!
//! `--admin` answers 200 to every request so the bench script can wait on `/ready` as it does
//! for Envoy and remora-proxy. SIGINT and SIGTERM exit cleanly, so that an instrumented build
//! writes its profile (`bench/pgo` trains this binary too).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Bare hyper forwarder (benchmark calibration)")]
struct Args {
    /// Address to accept HTTP/1.1 and h2c on.
    #[arg(long)]
    listen: SocketAddr,
    /// The one upstream, HOST:PORT, spoken to over HTTP/1.1.
    #[arg(long)]
    upstream: String,
    /// Address answering 200 to anything (readiness probe).
    #[arg(long)]
    admin: SocketAddr,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn error_body(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: std::sync::Arc<str>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let Ok(uri) = format!("http://{upstream}{path}").parse() else {
        return Ok(error_body(StatusCode::BAD_REQUEST));
    };
    *request.uri_mut() = uri;
    // An h2 request goes upstream as HTTP/1.1.
    *request.version_mut() = hyper::Version::HTTP_11;
    Ok(match client.request(request).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => error_body(StatusCode::BAD_GATEWAY),
    })
}

async fn admin(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"LIVE\n"))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Exits through `exit(3)`, which runs the handlers a killed process skips.
fn exit_on_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        std::process::exit(0);
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::spawn(exit_on_signal()?);
    let listener = TcpListener::bind(args.listen).await?;
    tokio::spawn(admin(TcpListener::bind(args.admin).await?));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let upstream: std::sync::Arc<str> = args.upstream.into();
    eprintln!("remora-bare-fwd {} -> {upstream}", args.listen);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                forward(client.clone(), upstream.clone(), request)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
