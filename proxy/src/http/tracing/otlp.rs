//! The OpenTelemetry tracer's way out: finished requests become the SDK's `SpanData` (the
//! span model of `opentelemetry_sdk`) and go to `opentelemetry-otlp`'s exporter, over OTLP/gRPC
//! (a tonic channel whose connections come from the collector cluster) or OTLP/HTTP protobuf
//! (its HTTP client is [`CollectorClient`]). The resource is Envoy's set of attributes with
//! Remora's name; the environment detector adds `OTEL_RESOURCE_ATTRIBUTES`.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use remora_config::tracing::{OpenTelemetry, OtlpExporter};

use super::export::{ClusterConnector, CollectorClient, Queued, SendError, Sink};
use super::{Kind, Record, TracingContext, span_tags, upstream_span_tags};

/// The resource every span of this tracer carries.
fn resource(config: &OpenTelemetry) -> Resource {
    let mut attributes = Vec::new();
    if config.resource_from_environment
        && let Ok(pairs) = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
    {
        for pair in pairs.split(',') {
            if let Some((key, value)) = pair.split_once('=')
                && !key.trim().is_empty()
            {
                attributes.push(KeyValue::new(
                    key.trim().to_string(),
                    value.trim().to_string(),
                ));
            }
        }
    }
    attributes.push(KeyValue::new("service.name", config.service_name.clone()));
    attributes.push(KeyValue::new("telemetry.sdk.language", "rust"));
    attributes.push(KeyValue::new("telemetry.sdk.name", "remora"));
    attributes.push(KeyValue::new(
        "telemetry.sdk.version",
        env!("CARGO_PKG_VERSION"),
    ));
    Resource::builder_empty()
        .with_attributes(attributes)
        .build()
}

/// The instrumentation scope of every span (Envoy's is `envoy`).
fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("remora")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

fn to_kv(tags: Vec<(&'static str, String)>) -> Vec<KeyValue> {
    tags.into_iter()
        .map(|(key, value)| KeyValue::new(key, value))
        .collect()
}

/// A finished request as OpenTelemetry spans: the proxy's span and, with
/// `spawn_upstream_span`, the upstream request's.
pub fn spans(queued: Queued, scope: &InstrumentationScope) -> impl Iterator<Item = SpanData> {
    let (tags, record) = queued;
    let Record {
        ids, name, kind, ..
    } = &*record;
    let trace_id = TraceId::from(ids.trace_id);
    let state = ids
        .tracestate
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = |span_id: u64| {
        SpanContext::new(
            trace_id,
            SpanId::from(span_id),
            TraceFlags::SAMPLED,
            false,
            state.clone(),
        )
    };
    let end = record.start + record.duration;
    let error = record.status >= 500;
    let status = if error {
        Status::error("")
    } else {
        Status::Unset
    };
    let mut attributes = to_kv(span_tags(&tags, &record));
    let custom: Vec<KeyValue> = tags
        .fixed
        .iter()
        .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
        .chain(
            record
                .tags
                .iter()
                .map(|(k, v)| KeyValue::new(k.to_string(), v.clone())),
        )
        .collect();
    attributes.extend(custom.iter().cloned());
    let events = |only_upstream: bool| {
        let mut events = SpanEvents::default();
        for (name, time) in record.events.iter().flatten() {
            if !only_upstream || super::event::UPSTREAM.contains(name) {
                events.events.push(opentelemetry::trace::Event::new(
                    *name,
                    *time,
                    Vec::new(),
                    0,
                ));
            }
        }
        events
    };
    let main = SpanData {
        span_context: context(ids.span_id),
        parent_span_id: ids.parent_id.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: ids.parent_id.is_some(),
        span_kind: match kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        },
        name: Cow::Owned(name.clone()),
        start_time: record.start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: events(false),
        links: SpanLinks::default(),
        status: status.clone(),
        instrumentation_scope: scope.clone(),
    };
    let upstream = match (&record.upstream, record.upstream_span) {
        (Some(upstream), Some((span_id, start))) => {
            let mut attributes = to_kv(upstream_span_tags(&record, upstream));
            attributes.extend(custom);
            Some(SpanData {
                span_context: context(span_id),
                parent_span_id: SpanId::from(ids.span_id),
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: Cow::Owned(format!("router {} egress", upstream.cluster)),
                start_time: start,
                end_time: end,
                attributes,
                dropped_attributes_count: 0,
                events: events(true),
                links: SpanLinks::default(),
                status,
                instrumentation_scope: scope.clone(),
            })
        }
        _ => None,
    };
    std::iter::once(main).chain(upstream)
}

/// `opentelemetry-otlp`'s exporter behind the [`Sink`] the drain task calls.
struct OtlpSink {
    exporter: Option<opentelemetry_otlp::SpanExporter>,
    scope: InstrumentationScope,
}

impl Sink for OtlpSink {
    fn send(
        &self,
        batch: Vec<Queued>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + '_>> {
        Box::pin(async move {
            let Some(exporter) = &self.exporter else {
                return Err(SendError::Failed(
                    "the OTLP exporter could not be built".into(),
                ));
            };
            let spans: Vec<SpanData> = batch
                .into_iter()
                .flat_map(|queued| spans(queued, &self.scope))
                .collect();
            exporter
                .export(spans)
                .await
                .map_err(|e| SendError::Failed(e.to_string()))
        })
    }
}

/// The OTLP exporter for a tracer (built on the tracing runtime: tonic needs one).
pub fn sink(config: &OpenTelemetry, context: &TracingContext) -> Box<dyn Sink> {
    let built = match &config.exporter {
        OtlpExporter::Grpc {
            cluster,
            authority,
            timeout,
            headers,
        } => {
            let timeout = timeout.unwrap_or(Duration::from_secs(10));
            tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
                .map_err(|e| e.to_string())
                .and_then(|endpoint| {
                    let channel =
                        endpoint
                            .timeout(timeout)
                            .connect_with_connector_lazy(ClusterConnector {
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
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_channel(channel)
                        .with_metadata(metadata)
                        .with_timeout(timeout)
                        .with_retry_policy(RetryPolicy::disabled())
                        .build()
                        .map_err(|e| e.to_string())
                })
        }
        OtlpExporter::Http(collector) => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(HttpClient(Arc::new(CollectorClient::new(
                context.store.clone(),
                collector.clone(),
            ))))
            .with_endpoint(format!("http://{}{}", collector.authority, collector.path))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(collector.timeout)
            .with_retry_policy(RetryPolicy::disabled())
            .build()
            .map_err(|e| e.to_string()),
    };
    let exporter = match built {
        Ok(mut exporter) => {
            exporter.set_resource(&resource(config));
            Some(exporter)
        }
        Err(error) => {
            ::tracing::error!(%error, "cannot build the OTLP exporter");
            None
        }
    };
    Box::new(OtlpSink {
        exporter,
        scope: scope(),
    })
}

/// `opentelemetry-http`'s client trait over the collector cluster.
#[derive(Debug, Clone)]
struct HttpClient(Arc<CollectorClient>);

// The trait is declared with `async_trait`: this is its boxed-future form, written out.
impl opentelemetry_http::HttpClient for HttpClient {
    fn send_bytes<'client, 'call>(
        &'client self,
        request: http::Request<Bytes>,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<http::Response<Bytes>, opentelemetry_http::HttpError>>
                + Send
                + 'call,
        >,
    >
    where
        'client: 'call,
        Self: 'call,
    {
        Box::pin(async move { self.0.send(request).await.map_err(Into::into) })
    }
}
