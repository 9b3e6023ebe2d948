//! The OpenTelemetry tracer's way out: a batch of finished requests becomes one OTLP
//! `ExportTraceServiceRequest` (OTLP's protobuf, field numbers from opentelemetry-proto),
//! sent with `TraceService/Export` over gRPC (a tonic channel whose connections come from the
//! collector cluster) or POSTed as protobuf over HTTP ([`CollectorClient`]). The resource is
//! Envoy's set of attributes with Remora's name; the environment detector adds
//! `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Spans are written straight from each request's record into one reused buffer. Going
//! through the SDK's `SpanData` and `opentelemetry-otlp`'s exporter, then through the
//! `opentelemetry-proto` message structs, cost several allocations per attribute; measured
//! with `bench/tracing` (bench/RESULTS.md, "Tracing overhead"), the CPU a request cost at 100%
//! sampling grew by 1.60x with the SDK's exporter, 1.32x with the message structs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use remora_config::tracing::{OpenTelemetry, OtlpExporter};

use super::export::{ClusterConnector, CollectorClient, Queued, SendError, Sink, check_status};
use super::{Kind, TracingContext, span_tags, upstream_span_tags};

/// `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

fn put_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn put_fixed64(field: u32, value: u64, out: &mut Vec<u8>) {
    encode_key(field, WireType::SixtyFourBit, out);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_fixed32(field: u32, value: u32, out: &mut Vec<u8>) {
    encode_key(field, WireType::ThirtyTwoBit, out);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_varint(field: u32, value: u64, out: &mut Vec<u8>) {
    encode_key(field, WireType::Varint, out);
    encode_varint(value, out);
}

/// A `KeyValue` with a string `AnyValue`, as field `field` of its parent.
fn put_attribute(field: u32, key: &str, value: &str, out: &mut Vec<u8>) {
    // Fields 1 and 2 take a one-byte key each.
    let any = 1 + encoded_len_varint(value.len() as u64) + value.len();
    let key_value = 1
        + encoded_len_varint(key.len() as u64)
        + key.len()
        + 1
        + encoded_len_varint(any as u64)
        + any;
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(key_value as u64, out);
    put_bytes(1, key.as_bytes(), out);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(any as u64, out);
    put_bytes(1, value.as_bytes(), out);
}

/// The resource's attributes, as the body of a `Resource` message.
pub fn resource(config: &OpenTelemetry) -> Vec<u8> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    if config.resource_from_environment
        && let Ok(pairs) = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
    {
        for pair in pairs.split(',') {
            if let Some((key, value)) = pair.split_once('=')
                && !key.trim().is_empty()
            {
                attributes.push((key.trim().into(), value.trim().into()));
            }
        }
    }
    attributes.push(("service.name".into(), config.service_name.clone()));
    attributes.push(("telemetry.sdk.language".into(), "rust".into()));
    attributes.push(("telemetry.sdk.name".into(), "remora".into()));
    attributes.push((
        "telemetry.sdk.version".into(),
        env!("CARGO_PKG_VERSION").into(),
    ));
    let mut out = Vec::new();
    for (key, value) in &attributes {
        put_attribute(1, key, value, &mut out);
    }
    out
}

/// The instrumentation scope (Envoy's is `envoy`), as the body of its message.
fn scope() -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, b"remora", &mut out);
    put_bytes(2, env!("CARGO_PKG_VERSION").as_bytes(), &mut out);
    out
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// W3C trace flags in OTLP's `flags`: sampled, and whether the parent is remote (bits 8, 9).
fn flags(remote_parent: Option<bool>) -> u32 {
    match remote_parent {
        Some(true) => 0x301,
        Some(false) => 0x101,
        None => 0x1,
    }
}

const SERVER: u64 = 2;
const CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;

/// One `Span`, written as field 2 of `ScopeSpans` into `out` (its body built in `scratch`).
struct SpanWriter<'a> {
    out: &'a mut Vec<u8>,
    scratch: &'a mut Vec<u8>,
}

impl SpanWriter<'_> {
    fn begin(&mut self) {
        self.scratch.clear();
    }

    fn finish(&mut self) {
        put_bytes(2, self.scratch, self.out);
    }
}

/// Writes a finished request's spans: the proxy's, and with `spawn_upstream_span` the
/// upstream request's.
pub fn write_spans(queued: &Queued, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    let (tags, record) = queued;
    let ids = record.ids;
    let trace_id = ids.trace_id.to_be_bytes();
    let end = nanos(record.start + record.duration);
    let error = record.status >= 500;
    let mut span = SpanWriter { out, scratch };
    let events = |only_upstream: bool, buf: &mut Vec<u8>| {
        for (name, time) in record.events.iter().flatten() {
            if !only_upstream || super::event::UPSTREAM.contains(name) {
                let body = 9 + 1 + encoded_len_varint(name.len() as u64) + name.len();
                encode_key(11, WireType::LengthDelimited, buf);
                encode_varint(body as u64, buf);
                put_fixed64(1, nanos(*time), buf);
                put_bytes(2, name.as_bytes(), buf);
            }
        }
    };
    let status = |buf: &mut Vec<u8>| {
        if error {
            // Status { code: ERROR }: field 3, one byte of value.
            encode_key(15, WireType::LengthDelimited, buf);
            encode_varint(2, buf);
            put_varint(3, STATUS_ERROR, buf);
        }
    };

    span.begin();
    let buf = &mut *span.scratch;
    put_bytes(1, &trace_id, buf);
    put_bytes(2, &ids.span_id.to_be_bytes(), buf);
    if !record.tracestate().is_empty() {
        put_bytes(3, record.tracestate().as_bytes(), buf);
    }
    if let Some(parent) = ids.parent_id {
        put_bytes(4, &parent.to_be_bytes(), buf);
    }
    put_bytes(5, record.name().as_bytes(), buf);
    put_varint(
        6,
        match record.kind {
            Kind::Server => SERVER,
            Kind::Client => CLIENT,
        },
        buf,
    );
    put_fixed64(7, nanos(record.start), buf);
    put_fixed64(8, end, buf);
    span_tags(tags, record, &mut |key, value| {
        put_attribute(9, key, value, buf)
    });
    events(false, buf);
    status(buf);
    put_fixed32(16, flags(ids.parent_id.map(|_| true)), buf);
    span.finish();

    if let (Some(upstream), Some((span_id, start))) = (&record.upstream, record.upstream_span) {
        span.begin();
        let buf = &mut *span.scratch;
        put_bytes(1, &trace_id, buf);
        put_bytes(2, &span_id.to_be_bytes(), buf);
        if !record.tracestate().is_empty() {
            put_bytes(3, record.tracestate().as_bytes(), buf);
        }
        put_bytes(4, &ids.span_id.to_be_bytes(), buf);
        encode_key(5, WireType::LengthDelimited, buf);
        let cluster = record.text(upstream.cluster);
        encode_varint((7 + cluster.len() + 7) as u64, buf);
        buf.extend_from_slice(b"router ");
        buf.extend_from_slice(cluster.as_bytes());
        buf.extend_from_slice(b" egress");
        put_varint(6, CLIENT, buf);
        put_fixed64(7, nanos(start), buf);
        put_fixed64(8, end, buf);
        upstream_span_tags(tags, record, upstream, &mut |key, value| {
            put_attribute(9, key, value, buf)
        });
        events(true, buf);
        status(buf);
        put_fixed32(16, flags(Some(false)), buf);
        span.finish();
    }
}

/// Encodes a batch as one `ExportTraceServiceRequest` with one resource and one scope.
pub struct Encoder {
    /// `ResourceSpans.resource` and `ScopeSpans.scope`, written once.
    resource: Vec<u8>,
    scope: Vec<u8>,
    spans: Vec<u8>,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(resource: Vec<u8>) -> Self {
        let mut resource_field = Vec::new();
        put_bytes(1, &resource, &mut resource_field);
        let mut scope_field = Vec::new();
        put_bytes(1, &scope(), &mut scope_field);
        Encoder {
            resource: resource_field,
            scope: scope_field,
            spans: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn encode(&mut self, batch: &[Queued]) -> Bytes {
        self.spans.clear();
        for queued in batch {
            write_spans(queued, &mut self.spans, &mut self.scratch);
        }
        let scope_spans = self.scope.len() + self.spans.len();
        let resource_spans =
            self.resource.len() + 1 + encoded_len_varint(scope_spans as u64) + scope_spans;
        let mut out = Vec::with_capacity(resource_spans + 16);
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        out.extend_from_slice(&self.resource);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(scope_spans as u64, &mut out);
        out.extend_from_slice(&self.scope);
        out.extend_from_slice(&self.spans);
        Bytes::from(out)
    }
}

/// tonic's codec for a request already encoded, and a response read as far as "it came".
#[derive(Debug, Clone, Copy, Default)]
struct Encoded;

impl tonic::codec::Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Encoded {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for Encoded {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Encoded;
    type Decoder = Encoded;
    fn encoder(&mut self) -> Encoded {
        Encoded
    }
    fn decoder(&mut self) -> Encoded {
        Encoded
    }
}

/// Where batches go.
enum Transport {
    Grpc {
        channel: tonic::transport::Channel,
        timeout: Duration,
        metadata: tonic::metadata::MetadataMap,
    },
    Http(CollectorClient),
}

struct OtlpSink {
    transport: Transport,
    /// Only the drain task encodes; the lock is never contended.
    encoder: Mutex<Encoder>,
}

impl OtlpSink {
    async fn grpc(
        channel: &tonic::transport::Channel,
        timeout: Duration,
        metadata: &tonic::metadata::MetadataMap,
        body: Bytes,
    ) -> Result<(), SendError> {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| SendError::Failed(e.to_string()))?;
            let mut request = tonic::Request::new(body);
            *request.metadata_mut() = metadata.clone();
            request.set_timeout(timeout);
            let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
            match grpc.unary(request, path, Encoded).await {
                Ok(_) => Ok(()),
                // A status from the collector is its answer; Unavailable is no answer.
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    Err(SendError::Failed(status.to_string()))
                }
                Err(status) => Err(SendError::Rejected(status.to_string())),
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Failed(format!(
                "collector did not answer within {timeout:?}"
            ))),
        }
    }
}

impl Sink for OtlpSink {
    fn send(
        &self,
        batch: Vec<Queued>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + '_>> {
        Box::pin(async move {
            let body = self
                .encoder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .encode(&batch);
            // The records go back to the allocator here, before the wait for the collector.
            drop(batch);
            match &self.transport {
                Transport::Grpc {
                    channel,
                    timeout,
                    metadata,
                } => Self::grpc(channel, *timeout, metadata, body).await,
                Transport::Http(client) => {
                    let post = http::Request::post(client.collector.path.as_str())
                        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                        .body(body)
                        .map_err(|e| SendError::Failed(e.to_string()))?;
                    let response = client.send(post).await.map_err(SendError::Failed)?;
                    check_status(response.status())
                }
            }
        })
    }
}

/// The OTLP exporter for a tracer (built on the tracing runtime: tonic needs one).
pub fn sink(config: &OpenTelemetry, context: &TracingContext) -> Box<dyn Sink> {
    let transport = match &config.exporter {
        OtlpExporter::Grpc {
            cluster,
            authority,
            timeout,
            headers,
        } => {
            // Envoy's gRPC calls have no deadline unless `timeout` is set; a batch must end,
            // so Remora gives it 10 s.
            let timeout = timeout.unwrap_or(Duration::from_secs(10));
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
                .unwrap_or_else(|_| tonic::transport::Endpoint::from_static("http://collector"));
            let channel = endpoint.connect_with_connector_lazy(ClusterConnector {
                store: context.store.clone(),
                cluster: cluster.clone(),
            });
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (name, value) in headers {
                if let (Ok(key), Ok(value)) = (
                    tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                    tonic::metadata::MetadataValue::try_from(value.as_bytes()),
                ) {
                    metadata.insert(key, value);
                }
            }
            Transport::Grpc {
                channel,
                timeout,
                metadata,
            }
        }
        OtlpExporter::Http(collector) => Transport::Http(CollectorClient::new(
            context.store.clone(),
            collector.clone(),
        )),
    };
    Box::new(OtlpSink {
        transport,
        encoder: Mutex::new(Encoder::new(resource(config))),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;

    use super::*;
    use crate::http::tracing::{ExportTags, Ids, event};

    fn queued() -> Queued {
        let tags = Arc::new(ExportTags {
            node_id: "node".into(),
            zone: "zone".into(),
            fixed: vec![("lit".into(), "x".into())],
        });
        let mut record = crate::http::tracing::Record::for_test("ingress", "http://h/p");
        record.ids = Ids {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 7,
            parent_id: Some(9),
            shared: false,
        };
        record.start = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        record.duration = Duration::from_millis(2);
        record.status = 503;
        record.flags = crate::error::ResponseFlag::UpstreamConnectionFailure.into();
        record.bytes_received = Arc::new(AtomicU64::new(3));
        record.set_upstream("app", "127.0.0.1:80".parse().unwrap());
        record.upstream_span = Some((11, SystemTime::UNIX_EPOCH + Duration::from_secs(1)));
        record.events = Some(vec![(event::FIRST_UPSTREAM_TX, SystemTime::UNIX_EPOCH)]);
        (tags, Box::new(record))
    }

    fn attribute(span: &Span, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
    }

    #[test]
    fn the_hand_written_encoding_is_otlp() {
        let config = remora_config::tracing::OpenTelemetry {
            exporter: OtlpExporter::Grpc {
                cluster: "c".into(),
                authority: "c".into(),
                timeout: None,
                headers: vec![],
            },
            service_name: "svc".into(),
            resource_from_environment: false,
            max_cache_size: 1024,
            always_on_sampler: false,
        };
        let mut encoder = Encoder::new(resource(&config));
        let bytes = encoder.encode(&[queued(), queued()]);
        let request = ExportTraceServiceRequest::decode(bytes).expect("valid OTLP");
        let [resource_spans] = request.resource_spans.as_slice() else {
            panic!("one resource");
        };
        let resource = resource_spans.resource.as_ref().unwrap();
        assert!(
            resource
                .attributes
                .iter()
                .any(|kv| kv.key == "service.name")
        );
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "remora");
        let spans = &scope_spans.spans;
        assert_eq!(spans.len(), 4);
        let (server, upstream) = (&spans[0], &spans[1]);
        assert_eq!(
            server.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(server.span_id, 7u64.to_be_bytes());
        assert_eq!(server.parent_span_id, 9u64.to_be_bytes());
        assert_eq!(server.name, "ingress");
        assert_eq!(server.kind, 2);
        assert_eq!(
            server.end_time_unix_nano - server.start_time_unix_nano,
            2_000_000
        );
        assert_eq!(server.status.as_ref().map(|s| s.code), Some(2));
        assert_eq!(server.flags, 0x301);
        assert_eq!(attribute(server, "http.url").as_deref(), Some("http://h/p"));
        assert_eq!(attribute(server, "request_size").as_deref(), Some("3"));
        assert_eq!(attribute(server, "error").as_deref(), Some("true"));
        assert_eq!(attribute(server, "response_flags").as_deref(), Some("UF"));
        assert_eq!(
            attribute(server, "upstream_cluster").as_deref(),
            Some("app")
        );
        assert_eq!(attribute(server, "lit").as_deref(), Some("x"));
        assert_eq!(server.events.len(), 1);
        assert_eq!(server.events[0].name, "first_upstream_tx_byte_sent");
        assert_eq!(upstream.name, "router app egress");
        assert_eq!(upstream.kind, 3);
        assert_eq!(upstream.parent_span_id, 7u64.to_be_bytes());
        assert_eq!(
            attribute(upstream, "upstream_address").as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(attribute(upstream, "guid:x-request-id"), None);
    }
}
