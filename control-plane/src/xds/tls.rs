//! xDS over TLS (`--xds-tls`): the xDS port (ADS, the per-type services and the certificate
//! service) serves TLS with a certificate the mesh CA issues to the control plane itself. It
//! names the control plane's SPIFFE id (`spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`) and the
//! DNS names it is reached by, so a proxy verifies it with the trust bundle as `trusted_ca`
//! and a SAN matcher on either.
//!
//! The certificate is as short-lived as workload certificates and renewed at half life. The
//! TLS config asks a resolver for it on every handshake, so a renewal takes effect for the next
//! connection and open streams are not dropped.
//!
//! With `--xds-tls-client-auth optional|require` the port also asks for a client certificate,
//! verified against the mesh CA's bundle. One naming a workload identity
//! (`spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`) is a credential of its own
//! ([`ClientCertificate`], carried to each request in [`XdsConnectInfo`]): the caller is that
//! service account, as a Kubernetes token of it would say (see [`crate::xds::auth`]), so a
//! proxy holding a workload certificate renews it, and follows its config, without a token.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::ca::{Ca, IssuedCertificate, SpiffeId};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed renewal waits before the next attempt (the current certificate still
/// serves until then).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// Connections handshaken and not yet taken by the gRPC server.
const ACCEPT_BACKLOG: usize = 64;

/// Whether the xDS port asks clients for certificates (`--xds-tls-client-auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Clients are not asked for certificates.
    #[default]
    None,
    /// Asked for: one presented must be the mesh CA's; a client presenting none authenticates
    /// as `--xds-auth` says (a token).
    Optional,
    /// Every connection must present a certificate the mesh CA issued.
    Require,
}

/// What a connection's client certificate proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    /// None presented (or not asked for; or plain text).
    Absent,
    /// Verified against the bundle, naming this workload identity.
    Identity(SpiffeId),
    /// Verified against the bundle but naming no workload identity of the trust domain: why.
    Unusable(String),
}

/// The connection an xDS request came over: the TCP addresses and, over TLS, what the client's
/// certificate proves. The gRPC server puts it into every request's extensions.
#[derive(Clone, Debug)]
pub struct XdsConnectInfo {
    pub tcp: TcpConnectInfo,
    pub client: ClientCertificate,
}

/// The peer address and client certificate of the connection a request came over (TLS or
/// plain text).
pub fn connection_of(extensions: &http::Extensions) -> (Option<SocketAddr>, ClientCertificate) {
    if let Some(info) = extensions.get::<XdsConnectInfo>() {
        return (info.tcp.remote_addr(), info.client.clone());
    }
    let peer = extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr);
    (peer, ClientCertificate::Absent)
}

/// Who the control plane is on its xDS port.
#[derive(Clone, Debug)]
pub struct ServingIdentity {
    pub identity: SpiffeId,
    pub dns_names: Vec<String>,
}

/// The control plane's current serving certificate, handed to every handshake.
#[derive(Debug)]
struct CurrentCertificate {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.key
                .read()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone(),
        )
    }
}

/// TLS for the xDS port: the acceptor and what keeps its certificate current.
#[derive(Clone)]
pub struct XdsTls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<CurrentCertificate>,
    ca: Arc<Ca>,
    serving: ServingIdentity,
    client_auth: ClientAuth,
}

impl XdsTls {
    /// Issues the first serving certificate; clients must speak HTTP/2 (ALPN `h2`), and
    /// present a certificate of the mesh CA as `client_auth` says.
    pub fn new(
        ca: Arc<Ca>,
        serving: ServingIdentity,
        client_auth: ClientAuth,
    ) -> anyhow::Result<XdsTls> {
        let (key, _) = issue(&ca, &serving)?;
        let current = Arc::new(CurrentCertificate {
            key: RwLock::new(key),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = match client_auth {
            ClientAuth::None => WebPkiClientVerifier::no_client_auth(),
            ClientAuth::Optional | ClientAuth::Require => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in rustls_pemfile::certs(&mut ca.bundle_pem().as_bytes()) {
                    roots
                        .add(certificate.context("reading the trust bundle")?)
                        .context("the trust bundle as a root for client certificates")?;
                }
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let builder = if client_auth == ClientAuth::Optional {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                builder
                    .build()
                    .context("verifying client certificates against the trust bundle")?
            }
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions for the xDS port")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(XdsTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            ca,
            serving,
            client_auth,
        })
    }

    /// Renews the serving certificate at half its life, for as long as the process runs.
    pub async fn keep_renewed(self) {
        let mut renew_in = self.ca.workload_lifetime() / 2;
        loop {
            tokio::time::sleep(renew_in).await;
            match issue(&self.ca, &self.serving) {
                Ok((key, issued)) => {
                    *self
                        .current
                        .key
                        .write()
                        .unwrap_or_else(|poison| poison.into_inner()) = key;
                    tracing::info!(identity = %self.serving.identity, not_after = ?issued.not_after, "renewed the xDS serving certificate");
                    renew_in = issued
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        / 2;
                }
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "cannot renew the xDS serving certificate; retrying"
                    );
                    renew_in = RETRY_AFTER_FAILURE;
                }
            }
        }
    }

    /// The TLS connections made to `listener`, each handshake in its own task so a slow
    /// client delays nobody; failed handshakes are logged and dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConnection>> {
        let (sender, receiver) = mpsc::channel(ACCEPT_BACKLOG);
        let acceptor = self.acceptor.clone();
        let ca = self.ca.clone();
        let client_auth = self.client_auth;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    // The server stopped taking connections.
                    _ = sender.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: give the system a moment.
                        tracing::warn!(%error, "accepting an xDS connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                let ca = ca.clone();
                tokio::spawn(async move {
                    match handshake(&acceptor, &ca, tcp, peer).await {
                        Ok(connection) => {
                            let _ = sender.send(Ok(connection)).await;
                        }
                        Err(error) => {
                            // `client_auth` tells whether a client certificate was asked for.
                            tracing::info!(%peer, %error, ?client_auth, "xDS TLS handshake failed");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(receiver)
    }
}

async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    ca: &Ca,
    tcp: TcpStream,
    peer: SocketAddr,
) -> io::Result<TlsConnection> {
    let info = tcp.connect_info();
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{peer} did not finish its handshake"),
            )
        })??;
    // The verifier has checked the chain; what remains is whom it names.
    let client = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
    {
        None => ClientCertificate::Absent,
        Some(leaf) => match ca.identity_of_certificate(leaf) {
            Ok(identity) => ClientCertificate::Identity(identity),
            Err(problem) => {
                tracing::info!(%peer, %problem, "xDS client certificate names no workload identity");
                ClientCertificate::Unusable(problem)
            }
        },
    };
    Ok(TlsConnection {
        stream,
        info: XdsConnectInfo { tcp: info, client },
    })
}

/// A new serving certificate as rustls serves it, and as issued.
fn issue(
    ca: &Ca,
    serving: &ServingIdentity,
) -> anyhow::Result<(Arc<CertifiedKey>, IssuedCertificate)> {
    let issued = ca
        .issue_with_dns_names(&serving.identity, &serving.dns_names, SystemTime::now())
        .context("issuing the xDS serving certificate")?;
    let chain = rustls_pemfile::certs(&mut issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the issued chain")?;
    let key = rustls_pemfile::private_key(&mut issued.key_pem.as_bytes())
        .context("reading the issued key")?
        .context("the issued key PEM holds no key")?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("the issued key cannot sign TLS handshakes")?;
    Ok((Arc::new(CertifiedKey::new(chain, signing_key)), issued))
}

/// A TLS connection to the xDS port; the gRPC server sees its TCP addresses (the discovery
/// services log and list proxies by them) and its client certificate's identity.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: XdsConnectInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = XdsConnectInfo;

    fn connect_info(&self) -> XdsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
