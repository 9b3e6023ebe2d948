//! `remora-otlp-sink`: an OTLP/gRPC trace receiver that decodes and counts what it is sent and
//! keeps nothing, for benchmarks (a real collector would compete with the proxies for the
//! cores). `GET /` on `--stats` answers the span count so far.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
#[command(about = "An OTLP/gRPC trace receiver that counts spans and drops them")]
struct Args {
    /// Address to receive OTLP/gRPC on.
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: std::net::SocketAddr,
    /// Address answering the span count (plain text) to any HTTP request.
    #[arg(long)]
    stats: Option<std::net::SocketAddr>,
}

#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let counter = Counter::default();
    if let Some(stats) = args.stats {
        let listener = tokio::net::TcpListener::bind(stats).await?;
        let count = counter.0.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let body = count.load(Ordering::Relaxed).to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
    }
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(counter))
        .serve(args.listen)
        .await?;
    Ok(())
}
