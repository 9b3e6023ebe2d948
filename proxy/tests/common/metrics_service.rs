//! A metrics service for tests: takes `StreamMetrics` streams and keeps every message, with the
//! number of the stream it came on.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status, Streaming};
use xds_api::envoy::service::metrics::v3::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use xds_api::envoy::service::metrics::v3::{StreamMetricsMessage, StreamMetricsResponse};

/// Messages by arrival: (stream number from 1, message).
type Received = Arc<Mutex<Vec<(usize, StreamMetricsMessage)>>>;

/// Handle to a running metrics service (runs until the test process ends).
pub struct MetricsServer {
    pub addr: SocketAddr,
    received: Received,
}

#[derive(Clone)]
struct Service {
    received: Received,
    streams: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn stream_metrics(
        &self,
        request: Request<Streaming<StreamMetricsMessage>>,
    ) -> Result<Response<StreamMetricsResponse>, Status> {
        let stream = {
            let mut streams = self.streams.lock().unwrap();
            *streams += 1;
            *streams
        };
        let mut inbound = request.into_inner();
        while let Ok(Some(message)) = inbound.message().await {
            self.received.lock().unwrap().push((stream, message));
        }
        Ok(Response::new(StreamMetricsResponse {}))
    }
}

impl MetricsServer {
    pub fn start() -> MetricsServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let received: Received = Arc::default();
        let service = Service {
            received: received.clone(),
            streams: Arc::default(),
        };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = tonic::transport::Server::builder()
                    .add_service(MetricsServiceServer::new(service))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await;
            });
        });
        MetricsServer { addr, received }
    }

    pub fn messages(&self) -> Vec<(usize, StreamMetricsMessage)> {
        self.received.lock().unwrap().clone()
    }
}
