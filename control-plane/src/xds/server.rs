//! The tonic services: ADS and the five per-type discovery services, all on one gRPC port.
//! Each RPC spawns one task per stream ([`crate::xds::stream::drive`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds_api::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use xds_api::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use xds_api::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use xds_api::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use xds_api::envoy::service::route::v3::route_discovery_service_server::{
    RouteDiscoveryService, RouteDiscoveryServiceServer,
};
use xds_api::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};

use crate::metrics::Metrics;
use crate::resource::Kind;
use crate::snapshot::SnapshotHub;
use crate::xds::delta::DeltaStream;
use crate::xds::sotw::SotwStream;
use crate::xds::stream::{ProxyRegistry, StreamProtocol, drive};

/// What every stream needs.
#[derive(Clone)]
pub struct XdsContext {
    pub hub: Arc<SnapshotHub>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
}

/// Responses buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 4;

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

impl XdsContext {
    fn start<P: StreamProtocol>(
        &self,
        request: Request<Streaming<P::Request>>,
        protocol: P,
    ) -> Response<ResponseStream<P::Response>>
    where
        Streaming<P::Request>: tokio_stream::Stream<Item = Result<P::Request, Status>>,
    {
        let peer = request.remote_addr();
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(drive(
            self.clone(),
            peer,
            request.into_inner(),
            sender,
            protocol,
        ));
        Response::new(ReceiverStream::new(receiver))
    }

    /// Serves every discovery service on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(
                AggregatedDiscoveryServiceServer::new(self.clone())
                    .max_decoding_message_size(64 << 20),
            )
            .add_service(ClusterDiscoveryServiceServer::new(self.clone()))
            .add_service(EndpointDiscoveryServiceServer::new(self.clone()))
            .add_service(ListenerDiscoveryServiceServer::new(self.clone()))
            .add_service(RouteDiscoveryServiceServer::new(self.clone()))
            .add_service(SecretDiscoveryServiceServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}

/// The address a client connected from, for the proxies table.
pub fn peer_of<T>(request: &Request<T>) -> Option<SocketAddr> {
    request.remote_addr()
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsContext {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(self.start(request, SotwStream::aggregated()))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(self.start(request, DeltaStream::aggregated()))
    }
}

/// Implements one per-type discovery service over the shared stream machinery.
macro_rules! per_type_service {
    ($trait:ident, $kind:expr, $delta:ident, $delta_stream:ident, $stream:ident, $stream_stream:ident, $fetch:ident) => {
        #[tonic::async_trait]
        impl $trait for XdsContext {
            type $delta_stream = ResponseStream<DeltaDiscoveryResponse>;
            type $stream_stream = ResponseStream<DiscoveryResponse>;

            async fn $delta(
                &self,
                request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<Self::$delta_stream>, Status> {
                Ok(self.start(request, DeltaStream::single($kind)))
            }

            async fn $stream(
                &self,
                request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<Self::$stream_stream>, Status> {
                Ok(self.start(request, SotwStream::single($kind)))
            }

            async fn $fetch(
                &self,
                _request: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                Err(Status::unimplemented(
                    "REST-style fetch is not served; use the streaming RPCs",
                ))
            }
        }
    };
}

per_type_service!(
    ClusterDiscoveryService,
    Kind::Cluster,
    delta_clusters,
    DeltaClustersStream,
    stream_clusters,
    StreamClustersStream,
    fetch_clusters
);
per_type_service!(
    EndpointDiscoveryService,
    Kind::Endpoint,
    delta_endpoints,
    DeltaEndpointsStream,
    stream_endpoints,
    StreamEndpointsStream,
    fetch_endpoints
);
per_type_service!(
    ListenerDiscoveryService,
    Kind::Listener,
    delta_listeners,
    DeltaListenersStream,
    stream_listeners,
    StreamListenersStream,
    fetch_listeners
);
per_type_service!(
    RouteDiscoveryService,
    Kind::Route,
    delta_routes,
    DeltaRoutesStream,
    stream_routes,
    StreamRoutesStream,
    fetch_routes
);
per_type_service!(
    SecretDiscoveryService,
    Kind::Secret,
    delta_secrets,
    DeltaSecretsStream,
    stream_secrets,
    StreamSecretsStream,
    fetch_secrets
);
