//! The webhook's HTTPS server: rustls over tokio, HTTP/1.1 by hyper, routes `POST /inject`
//! to [`crate::webhook`] and `GET /healthz` to a liveness answer.
//!
//! The certificate and key are read from files and re-read every poll interval; when their
//! contents change and parse, the new TLS config is swapped in atomically (arc-swap), so
//! new connections get the new certificate while open ones keep theirs. A file pair that
//! is half-written or does not parse keeps the old config in place.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::webhook::{self, WebhookConfig};

/// Largest AdmissionReview body accepted; the API server's own limit is about 3 MiB.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client gets to send request headers, and then the body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An error loading the certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The TLS server config, reloaded from a certificate and key file.
pub struct ReloadingTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<ServerConfig>,
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn build_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid("no certificate in PEM".to_string()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| TlsError::Invalid(format!("key PEM: {e}")))?
        .ok_or_else(|| TlsError::Invalid("no private key in PEM".to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl ReloadingTls {
    /// Loads the pair once; fails if it does not parse.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let cert = read(cert_path)?;
        let key = read(key_path)?;
        let config = build_config(&cert, &key)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(config),
            loaded: std::sync::Mutex::new((cert, key)),
        }))
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files; swaps the config if they changed and parse. Returns whether a
    /// new config was installed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert = read(&self.cert_path)?;
        let key = read(&self.key_path)?;
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.0 == cert && loaded.1 == key {
            return Ok(false);
        }
        let config = build_config(&cert, &key)?;
        self.current.store(Arc::new(config));
        *loaded = (cert, key);
        Ok(true)
    }

    /// Polls the files every `interval` until `shutdown` fires.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.changed() => return,
                }
                match this.reload_if_changed() {
                    Ok(true) => tracing::info!("reloaded TLS certificate"),
                    Ok(false) => {}
                    // Rotation tools write the two files one after the other; the next
                    // poll sees the finished pair.
                    Err(e) => tracing::warn!(error = %e, "keeping the current TLS certificate"),
                }
            }
        })
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn route(
    request: Request<Incoming>,
    config: Arc<WebhookConfig>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let response = match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/inject") => {
            let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
            match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
                Err(_) => text(StatusCode::REQUEST_TIMEOUT, "timed out reading body\n"),
                Ok(Err(e)) => text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
                Ok(Ok(collected)) => {
                    let bytes = collected.to_bytes();
                    // Injection is CPU-only and quick; a panic in it must not take the
                    // connection task with it, so it runs where one is contained.
                    let config = Arc::clone(&config);
                    let answer =
                        tokio::task::spawn_blocking(move || webhook::review(&bytes, &config)).await;
                    match answer {
                        Ok(Ok(json)) => {
                            let mut r = Response::new(Full::new(Bytes::from(json)));
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            r
                        }
                        Ok(Err(bad)) => text(StatusCode::BAD_REQUEST, format!("{bad}\n")),
                        Err(e) => {
                            tracing::error!(error = %e, "injection task failed");
                            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
                        }
                    }
                }
            }
        }
        (_, "/inject") | (_, "/healthz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    config: Arc<WebhookConfig>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| route(req, Arc::clone(&config)));
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Accepts connections on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    config: Arc<WebhookConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let acceptor = TlsAcceptor::from(tls.current());
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    acceptor,
                    Arc::clone(&config),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
