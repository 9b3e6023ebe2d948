//! The OpenTelemetry tracer's way out: finished requests become OTLP spans (the
//! `opentelemetry-proto` messages) in one `ExportTraceServiceRequest` per batch, sent with
//! `TraceService/Export` over gRPC (a tonic channel whose connections come from the collector
//! cluster) or POSTed as protobuf over HTTP ([`CollectorClient`]). The resource is Envoy's set
//! of attributes with Remora's name; the environment detector adds `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Spans are encoded straight from the request's record. The SDK's `SpanData` and
//! `opentelemetry-otlp`'s exporter cost more CPU per span (figures in bench/RESULTS.md,
//! "Tracing overhead"): each span's strings were copied into the SDK's model, the batch cloned
//! for a possible retry, then converted again into these messages.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use remora_config::tracing::{OpenTelemetry, OtlpExporter};

use super::export::{ClusterConnector, CollectorClient, Queued, SendError, Sink, check_status};
use super::{Kind, Record, TracingContext, span_tags, upstream_span_tags};

fn kv(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// The resource every span of this tracer carries.
pub fn resource(config: &OpenTelemetry) -> Resource {
    let mut attributes = Vec::new();
    if config.resource_from_environment
        && let Ok(pairs) = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
    {
        for pair in pairs.split(',') {
            if let Some((key, value)) = pair.split_once('=')
                && !key.trim().is_empty()
            {
                attributes.push(kv(key.trim(), value.trim()));
            }
        }
    }
    attributes.push(kv("service.name", config.service_name.as_str()));
    attributes.push(kv("telemetry.sdk.language", "rust"));
    attributes.push(kv("telemetry.sdk.name", "remora"));
    attributes.push(kv("telemetry.sdk.version", env!("CARGO_PKG_VERSION")));
    Resource {
        attributes,
        ..Default::default()
    }
}

/// The instrumentation scope of every span (Envoy's is `envoy`).
fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "remora".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
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

/// A finished request as OTLP spans: the proxy's span and, with `spawn_upstream_span`, the
/// upstream request's.
pub fn spans(queued: Queued, out: &mut Vec<Span>) {
    let (tags, record) = queued;
    let Record {
        ids, name, kind, ..
    } = &*record;
    let trace_id = ids.trace_id.to_be_bytes().to_vec();
    let trace_state = ids
        .tracestate
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let end = nanos(record.start + record.duration);
    let status = (record.status >= 500).then(|| Status {
        message: String::new(),
        code: opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32,
    });
    let custom: Vec<KeyValue> = tags
        .fixed
        .iter()
        .map(|(k, v)| kv(&**k, &**v))
        .chain(record.tags.iter().map(|(k, v)| kv(&**k, v.as_str())))
        .collect();
    let events = |only_upstream: bool| -> Vec<span::Event> {
        record
            .events
            .iter()
            .flatten()
            .filter(|(name, _)| !only_upstream || super::event::UPSTREAM.contains(name))
            .map(|(name, time)| span::Event {
                time_unix_nano: nanos(*time),
                name: (*name).to_string(),
                ..Default::default()
            })
            .collect()
    };
    let mut attributes: Vec<KeyValue> = span_tags(&tags, &record)
        .into_iter()
        .map(|(k, v)| kv(k, v))
        .collect();
    attributes.extend(custom.iter().cloned());
    let upstream = match (&record.upstream, record.upstream_span) {
        (Some(upstream), Some((span_id, start))) => {
            let mut attributes: Vec<KeyValue> = upstream_span_tags(&record, upstream)
                .into_iter()
                .map(|(k, v)| kv(k, v))
                .collect();
            attributes.extend(custom);
            Some(Span {
                trace_id: trace_id.clone(),
                span_id: span_id.to_be_bytes().to_vec(),
                trace_state: trace_state.clone(),
                parent_span_id: ids.span_id.to_be_bytes().to_vec(),
                flags: flags(Some(false)),
                name: format!("router {} egress", upstream.cluster),
                kind: span::SpanKind::Client as i32,
                start_time_unix_nano: nanos(start),
                end_time_unix_nano: end,
                attributes,
                events: events(true),
                status: status.clone(),
                ..Default::default()
            })
        }
        _ => None,
    };
    out.push(Span {
        trace_id,
        span_id: ids.span_id.to_be_bytes().to_vec(),
        trace_state,
        parent_span_id: ids
            .parent_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: flags(ids.parent_id.map(|_| true)),
        name: name.clone(),
        kind: match kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: nanos(record.start),
        end_time_unix_nano: end,
        attributes,
        events: events(false),
        status,
        ..Default::default()
    });
    out.extend(upstream);
}

/// One batch as the request `TraceService/Export` takes.
pub fn request(
    batch: Vec<Queued>,
    resource: &Resource,
    scope: &InstrumentationScope,
) -> ExportTraceServiceRequest {
    let mut out = Vec::with_capacity(batch.len() + batch.len() / 2);
    for queued in batch {
        spans(queued, &mut out);
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope.clone()),
                spans: out,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Where batches go.
enum Transport {
    Grpc {
        client: TraceServiceClient<tonic::transport::Channel>,
        timeout: Duration,
        metadata: tonic::metadata::MetadataMap,
    },
    Http(CollectorClient),
}

struct OtlpSink {
    transport: Transport,
    resource: Resource,
    scope: InstrumentationScope,
}

impl Sink for OtlpSink {
    fn send(
        &self,
        batch: Vec<Queued>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + '_>> {
        Box::pin(async move {
            let request = request(batch, &self.resource, &self.scope);
            match &self.transport {
                Transport::Grpc {
                    client,
                    timeout,
                    metadata,
                } => {
                    let mut call = tonic::Request::new(request);
                    *call.metadata_mut() = metadata.clone();
                    call.set_timeout(*timeout);
                    match tokio::time::timeout(*timeout, client.clone().export(call)).await {
                        Ok(Ok(_)) => Ok(()),
                        // A status from the collector is its answer; a transport error none.
                        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                            Err(SendError::Failed(status.to_string()))
                        }
                        Ok(Err(status)) => Err(SendError::Rejected(status.to_string())),
                        Err(_) => Err(SendError::Failed(format!(
                            "collector did not answer within {timeout:?}"
                        ))),
                    }
                }
                Transport::Http(client) => {
                    let body = prost::Message::encode_to_vec(&request);
                    let post = http::Request::post(client.collector.path.as_str())
                        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                        .body(Bytes::from(body))
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
                client: TraceServiceClient::new(channel),
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
        resource: resource(config),
        scope: scope(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::http::tracing::{ExportTags, Ids, Upstream};

    fn record() -> Box<Record> {
        Box::new(Record {
            ids: Ids {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 7,
                parent_id: Some(9),
                shared: false,
                tracestate: Some(http::HeaderValue::from_static("a=1")),
            },
            name: "ingress".into(),
            kind: Kind::Server,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            started: std::time::Instant::now(),
            duration: Duration::from_millis(2),
            method: http::Method::GET,
            url: "http://h/p".into(),
            version: http::Version::HTTP_11,
            user_agent: None,
            request_id: Some(http::HeaderValue::from_static("id-1")),
            client_trace_id: None,
            downstream_cluster: None,
            peer: "127.0.0.1".parse().unwrap(),
            tags: vec![("t".into(), "v".into())],
            status: 503,
            flag: Some("UF"),
            bytes_received: Arc::default(),
            bytes_sent: 5,
            upstream: Some(Upstream {
                cluster: "app".into(),
                address: "127.0.0.1:80".parse().unwrap(),
                protocol: http::Version::HTTP_11,
            }),
            upstream_span: Some((11, SystemTime::UNIX_EPOCH + Duration::from_secs(1))),
            reason: super::super::request_id::Reason::Sampling,
            events: None,
        })
    }

    #[test]
    fn a_request_becomes_envoys_spans() {
        let tags = Arc::new(ExportTags {
            node_id: "node".into(),
            zone: "zone".into(),
            fixed: vec![("lit".into(), "x".into())],
        });
        let mut out = Vec::new();
        spans((tags, record()), &mut out);
        let [server, upstream] = out.as_slice() else {
            panic!("two spans: {out:?}");
        };
        assert_eq!(
            server.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(server.parent_span_id, 9u64.to_be_bytes());
        assert_eq!(server.trace_state, "a=1");
        assert_eq!(server.kind, span::SpanKind::Server as i32);
        assert_eq!(
            server.end_time_unix_nano - server.start_time_unix_nano,
            2_000_000
        );
        assert_eq!(server.status.as_ref().map(|s| s.code), Some(2));
        let attribute = |span: &Span, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
        };
        assert_eq!(attribute(server, "error").as_deref(), Some("true"));
        assert_eq!(attribute(server, "response_flags").as_deref(), Some("UF"));
        assert_eq!(attribute(server, "lit").as_deref(), Some("x"));
        assert_eq!(attribute(server, "t").as_deref(), Some("v"));
        assert_eq!(upstream.name, "router app egress");
        assert_eq!(upstream.parent_span_id, 7u64.to_be_bytes());
        assert_eq!(
            attribute(upstream, "upstream_address").as_deref(),
            Some("127.0.0.1:80")
        );
        assert_eq!(attribute(upstream, "guid:x-request-id"), None);
    }
}
