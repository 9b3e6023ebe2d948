//! The discovery services on one gRPC port: ADS and the five per-type services, each method
//! (`Stream*` SotW, `Delta*` incremental) served by one task per stream
//! ([`crate::xds::stream::drive`]), its requests and responses framed by hand
//! ([`crate::xds::frame`]); beside them Remora's certificate service, and TLS when configured.
//! A stream is authenticated before it starts (a Kubernetes token review is awaited there).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tonic::Status;
use tonic::server::NamedService;
use xds_api::remora::ca::v1::certificate_service_server::CertificateServiceServer;

use crate::resource::Kind;
use crate::xds::certificates::CertificateSigner;
use crate::xds::delta::DeltaStream;
use crate::xds::frame::{RequestStream, ResponseBody};
use crate::xds::requests::{DeltaDecoder, SotwDecoder};
use crate::xds::sotw::SotwStream;
use crate::xds::stream::{XdsContext, drive};
use crate::xds::tls::{XdsTls, connection_of};

/// Encoded responses buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 4;
/// Largest request accepted (an EDS subscription can name many thousands of clusters).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// One gRPC service name and the resource type it is fixed to (none for ADS).
pub trait ServiceSpec: Send + Sync + 'static {
    const NAME: &'static str;
    const KIND: Option<Kind>;
}

macro_rules! service_spec {
    ($type:ident, $name:literal, $kind:expr) => {
        pub struct $type;
        impl ServiceSpec for $type {
            const NAME: &'static str = $name;
            const KIND: Option<Kind> = $kind;
        }
    };
}

service_spec!(
    Aggregated,
    "envoy.service.discovery.v3.AggregatedDiscoveryService",
    None
);
service_spec!(
    Clusters,
    "envoy.service.cluster.v3.ClusterDiscoveryService",
    Some(Kind::Cluster)
);
service_spec!(
    Endpoints,
    "envoy.service.endpoint.v3.EndpointDiscoveryService",
    Some(Kind::Endpoint)
);
service_spec!(
    Listeners,
    "envoy.service.listener.v3.ListenerDiscoveryService",
    Some(Kind::Listener)
);
service_spec!(
    Routes,
    "envoy.service.route.v3.RouteDiscoveryService",
    Some(Kind::Route)
);
service_spec!(
    Secrets,
    "envoy.service.secret.v3.SecretDiscoveryService",
    Some(Kind::Secret)
);

/// A discovery service as a tower service over HTTP/2.
pub struct DiscoveryService<S> {
    context: XdsContext,
    spec: PhantomData<S>,
}

impl<S> Clone for DiscoveryService<S> {
    fn clone(&self) -> Self {
        DiscoveryService {
            context: self.context.clone(),
            spec: PhantomData,
        }
    }
}

impl<S: ServiceSpec> NamedService for DiscoveryService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: ServiceSpec> tower_service::Service<http::Request<tonic::body::Body>>
    for DiscoveryService<S>
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let (peer, client) = connection_of(request.extensions());
        let context = self.context.clone();
        Box::pin(async move {
            let caller = match context.auth.authenticate(request.headers(), &client).await {
                Ok(caller) => caller,
                Err(status) => {
                    tracing::info!(?peer, %status, "xDS stream refused");
                    return Ok(status.into_http());
                }
            };
            let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
            let body = request.into_body();
            if method.starts_with("Stream") {
                let mut decoder = SotwDecoder::default();
                let decode = move |message| decoder.decode(message);
                let requests = RequestStream::new(body, decode, MAX_REQUEST_BYTES);
                let protocol = S::KIND
                    .map(SotwStream::single)
                    .unwrap_or_else(SotwStream::aggregated);
                tokio::spawn(drive(context, peer, requests, sender, protocol, caller));
            } else if method.starts_with("Delta") {
                let mut decoder = DeltaDecoder::default();
                let decode = move |message| decoder.decode(message);
                let requests = RequestStream::new(body, decode, MAX_REQUEST_BYTES);
                let protocol = S::KIND
                    .map(DeltaStream::single)
                    .unwrap_or_else(DeltaStream::aggregated);
                tokio::spawn(drive(context, peer, requests, sender, protocol, caller));
            } else {
                let status = Status::unimplemented(format!(
                    "{method} is not served; use the streaming methods"
                ));
                return Ok(status.into_http());
            }
            Ok(http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .body(tonic::body::Body::new(ResponseBody::new(receiver)))
                .unwrap_or_else(|_| Status::internal("cannot build the response").into_http()))
        })
    }
}

impl XdsContext {
    fn service<S: ServiceSpec>(&self) -> DiscoveryService<S> {
        DiscoveryService {
            context: self.clone(),
            spec: PhantomData,
        }
    }

    /// Serves every discovery service, and the certificate service when `signer` is given,
    /// on `listener` (over TLS with `tls`) until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<XdsTls>,
        signer: Option<CertificateSigner>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(self.service::<Aggregated>())
            .add_service(self.service::<Clusters>())
            .add_service(self.service::<Endpoints>())
            .add_service(self.service::<Listeners>())
            .add_service(self.service::<Routes>())
            .add_service(self.service::<Secrets>())
            .add_optional_service(signer.map(CertificateServiceServer::new));
        match tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                    .await?
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await?
            }
        }
        Ok(())
    }
}
