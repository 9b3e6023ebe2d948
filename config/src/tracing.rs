//! Tracing config: the HTTP connection manager's `tracing` block (sampling, custom tags, path
//! tag length, verbose, upstream spans), its provider (`envoy.tracers.opentelemetry` over
//! OTLP/gRPC or OTLP/HTTP, `envoy.tracers.zipkin` as Zipkin v2 JSON or protobuf), and a route's
//! `decorator` and `tracing` overrides. The proxy's `http::tracing` makes the spans.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use xds_api::envoy::config::core::v3 as core_pb;
use xds_api::envoy::config::route::v3 as route_pb;
use xds_api::envoy::config::trace::v3 as trace_pb;
use xds_api::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use xds_api::envoy::extensions::tracers::opentelemetry::resource_detectors::v3 as detectors_pb;
use xds_api::envoy::extensions::tracers::opentelemetry::samplers::v3 as samplers_pb;
use xds_api::envoy::r#type::metadata::v3 as metadata_pb;
use xds_api::envoy::r#type::tracing::v3 as tag_pb;
use xds_api::envoy::r#type::v3 as type_pb;

use crate::common::{header_mutations, header_name, opt_duration, per_million, unpack};
use crate::error::{ConfigResult, err, field, item};
use crate::unsupported;

/// Sampling shares are kept in ten-thousandths, the resolution Envoy samples at (it draws a
/// number below 10000 from the request id).
pub const SAMPLING_SCALE: u32 = 10_000;

/// The connection manager's `tracing` block.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// Share of requests with `x-client-trace-id` that are traced (ten-thousandths).
    pub client_sampling: u32,
    /// Share of other requests that are traced (ten-thousandths).
    pub random_sampling: u32,
    /// Share of all traced requests that stay traced, after the two above.
    pub overall_sampling: u32,
    /// Timing events (first/last byte up and down) on the spans.
    pub verbose: bool,
    /// `http.url` is cut to this many bytes.
    pub max_path_tag_length: usize,
    pub custom_tags: Vec<CustomTag>,
    pub provider: Option<Provider>,
    /// A CLIENT span per upstream request, child of the server span.
    pub spawn_upstream_span: bool,
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq)]
pub enum Provider {
    OpenTelemetry(OpenTelemetry),
    Zipkin(Zipkin),
}

/// `envoy.tracers.opentelemetry`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTelemetry {
    pub exporter: OtlpExporter,
    /// The resource's `service.name` (Envoy's default: `unknown_service:envoy`).
    pub service_name: String,
    /// Resource attributes from `OTEL_RESOURCE_ATTRIBUTES` (the environment detector).
    pub resource_from_environment: bool,
    /// Spans a batch holds before it is sent at once (else every 5 s).
    pub max_cache_size: u32,
    /// `AlwaysOnSamplerConfig`: every span is sampled, whatever the request's decision.
    pub always_on_sampler: bool,
}

/// How OTLP spans leave the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum OtlpExporter {
    /// `grpc_service.envoy_grpc`: `TraceService/Export` on an HTTP/2 cluster.
    Grpc {
        cluster: String,
        /// `:authority` (default: the cluster name).
        authority: String,
        timeout: Option<Duration>,
        /// `initial_metadata`: headers on every export call.
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// `http_service`: protobuf POSTed to a URI through a cluster.
    Http(HttpCollector),
}

/// A collector reached with HTTP POSTs through a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCollector {
    pub cluster: String,
    /// The request's `Host`.
    pub authority: String,
    /// Path and query.
    pub path: String,
    pub timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// `envoy.tracers.zipkin`.
#[derive(Debug, Clone, PartialEq)]
pub struct Zipkin {
    pub collector: HttpCollector,
    pub encoding: ZipkinEncoding,
    pub trace_id_128bit: bool,
    /// The server span takes the incoming span id (one span shared by client and server).
    pub shared_span_context: bool,
    pub split_spans_for_request: bool,
    /// `USE_B3_WITH_W3C_PROPAGATION`: W3C read when B3 is absent, both written.
    pub w3c_propagation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZipkinEncoding {
    /// `HTTP_JSON`: a JSON list of Zipkin v2 spans.
    Json,
    /// `HTTP_PROTO`: `zipkin.proto3.ListOfSpans`.
    Proto,
}

/// A tag on every span, and where its value comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomTag {
    pub tag: String,
    pub value: TagValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    Literal(String),
    /// An environment variable, read when the connection manager is built.
    Environment {
        name: String,
        default: String,
    },
    /// A request header; `:path`, `:method`, `:authority`, `:scheme` are pseudo-headers.
    RequestHeader {
        name: String,
        default: String,
    },
    /// A string at `path` in the `key` namespace of a metadata.
    Metadata {
        kind: MetadataKind,
        key: String,
        path: Vec<String>,
        default: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataKind {
    /// Dynamic metadata filters set on the stream (no Remora filter sets any).
    Request,
    Route,
    Cluster,
    Host,
}

/// A route's `decorator`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decorator {
    /// The server span's name.
    pub operation: String,
    /// Tell the upstream the operation in `x-envoy-decorator-operation` (default true).
    pub propagate: bool,
}

/// A route's `tracing`: overrides of the connection manager's sampling, and more tags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteTracing {
    /// In ten-thousandths, as [`Tracing`]'s.
    pub client_sampling: Option<u32>,
    pub random_sampling: Option<u32>,
    pub overall_sampling: Option<u32>,
    pub custom_tags: Vec<CustomTag>,
}

/// The Remora runtime key that makes every tracer read W3C or B3 and write both: the option
/// for meshes whose applications use different tracing libraries.
pub const PROPAGATE_BOTH_RUNTIME_KEY: &str = "remora.tracing.propagate_w3c_and_b3";

/// A `Percent` (0..100) in ten-thousandths, rounded, as Envoy converts it; unset is 100%.
fn percent(value: &Option<type_pb::Percent>, path: &str) -> ConfigResult<u32> {
    let Some(type_pb::Percent { value }) = value else {
        return Ok(SAMPLING_SCALE);
    };
    if !(0.0..=100.0).contains(value) {
        return err(field(path, "value"), "must be between 0 and 100");
    }
    Ok((value * 100.0).round() as u32)
}

/// A `FractionalPercent` in ten-thousandths.
fn fraction(value: &Option<type_pb::FractionalPercent>, path: &str) -> ConfigResult<Option<u32>> {
    value
        .as_ref()
        .map(|fraction| Ok(per_million(fraction, path)? / 100))
        .transpose()
}

pub fn tracing(
    proto: &hcm_pb::http_connection_manager::Tracing,
    path: &str,
) -> ConfigResult<Tracing> {
    let hcm_pb::http_connection_manager::Tracing {
        client_sampling,
        random_sampling,
        overall_sampling,
        verbose,
        max_path_tag_length,
        custom_tags,
        provider,
        spawn_upstream_span,
        operation,
        upstream_operation,
    } = proto;
    unsupported!(path, operation, upstream_operation);
    Ok(Tracing {
        client_sampling: percent(client_sampling, &field(path, "client_sampling"))?,
        random_sampling: percent(random_sampling, &field(path, "random_sampling"))?,
        overall_sampling: percent(overall_sampling, &field(path, "overall_sampling"))?,
        verbose: *verbose,
        max_path_tag_length: max_path_tag_length.unwrap_or(256) as usize,
        custom_tags: tags(custom_tags, path)?,
        provider: provider
            .as_ref()
            .map(|provider| read_provider(provider, &field(path, "provider")))
            .transpose()?,
        spawn_upstream_span: spawn_upstream_span.unwrap_or(false),
    })
}

pub fn read_provider(proto: &trace_pb::tracing::Http, path: &str) -> ConfigResult<Provider> {
    let trace_pb::tracing::Http { name, config_type } = proto;
    let Some(trace_pb::tracing::http::ConfigType::TypedConfig(any)) = config_type else {
        return err(field(path, "typed_config"), "required");
    };
    let tpath = field(path, "typed_config");
    let zipkin = format!(
        "{}{}",
        xds_api::type_urls::PREFIX,
        "envoy.config.trace.v3.ZipkinConfig"
    );
    let otel = format!(
        "{}{}",
        xds_api::type_urls::PREFIX,
        "envoy.config.trace.v3.OpenTelemetryConfig"
    );
    if any.type_url == otel {
        Ok(Provider::OpenTelemetry(open_telemetry(
            &unpack(any, &tpath)?,
            &tpath,
        )?))
    } else if any.type_url == zipkin {
        Ok(Provider::Zipkin(read_zipkin(
            &unpack(any, &tpath)?,
            &tpath,
        )?))
    } else {
        err(
            tpath,
            format!(
                "tracer {name:?} ({}) is not supported (Remora has envoy.tracers.opentelemetry and envoy.tracers.zipkin)",
                any.type_url
            ),
        )
    }
}

fn open_telemetry(
    proto: &trace_pb::OpenTelemetryConfig,
    path: &str,
) -> ConfigResult<OpenTelemetry> {
    let trace_pb::OpenTelemetryConfig {
        grpc_service,
        http_service,
        service_name,
        resource_detectors,
        sampler,
        max_cache_size,
    } = proto;
    let exporter = match (grpc_service, http_service) {
        (Some(grpc), None) => grpc_exporter(grpc, &field(path, "grpc_service"))?,
        (None, Some(http)) => {
            OtlpExporter::Http(http_collector(http, &field(path, "http_service"))?)
        }
        (Some(_), Some(_)) => {
            return err(path, "grpc_service and http_service are mutually exclusive");
        }
        // Envoy accepts a tracer with nowhere to send; Remora needs to know where spans go.
        (None, None) => return err(path, "grpc_service or http_service is required"),
    };
    let mut resource_from_environment = false;
    for (index, detector) in resource_detectors.iter().enumerate() {
        let dpath = item(path, "resource_detectors", index);
        let core_pb::TypedExtensionConfig {
            name: _,
            typed_config,
        } = detector;
        let Some(any) = typed_config else {
            return err(field(&dpath, "typed_config"), "required");
        };
        let detectors_pb::EnvironmentResourceDetectorConfig {} =
            unpack(any, &field(&dpath, "typed_config")).map_err(|mut error| {
                error.reason = format!(
                    "{}; Remora has the environment resource detector only",
                    error.reason
                );
                error
            })?;
        resource_from_environment = true;
    }
    let always_on_sampler = match sampler {
        None => false,
        Some(core_pb::TypedExtensionConfig {
            name: _,
            typed_config,
        }) => {
            let spath = field(path, "sampler");
            let Some(any) = typed_config else {
                return err(field(&spath, "typed_config"), "required");
            };
            let samplers_pb::AlwaysOnSamplerConfig {} = unpack(any, &field(&spath, "typed_config"))
                .map_err(|mut error| {
                    error.reason =
                        format!("{}; Remora has the always-on sampler only", error.reason);
                    error
                })?;
            true
        }
    };
    Ok(OpenTelemetry {
        exporter,
        service_name: if service_name.is_empty() {
            "unknown_service:envoy".into()
        } else {
            service_name.clone()
        },
        resource_from_environment,
        max_cache_size: max_cache_size.unwrap_or(1024).max(1),
        always_on_sampler,
    })
}

fn grpc_exporter(proto: &core_pb::GrpcService, path: &str) -> ConfigResult<OtlpExporter> {
    let core_pb::GrpcService {
        target_specifier,
        timeout,
        initial_metadata,
    } = proto;
    let Some(core_pb::grpc_service::TargetSpecifier::EnvoyGrpc(core_pb::grpc_service::EnvoyGrpc {
        cluster_name,
        authority,
        max_receive_message_length,
        skip_envoy_headers,
    })) = target_specifier
    else {
        return err(field(path, "envoy_grpc"), "required");
    };
    let gpath = field(path, "envoy_grpc");
    unsupported!(&gpath, max_receive_message_length, skip_envoy_headers);
    if cluster_name.is_empty() {
        return err(field(&gpath, "cluster_name"), "must not be empty");
    }
    let headers = crate::common::initial_metadata(initial_metadata, path)?;
    Ok(OtlpExporter::Grpc {
        authority: if authority.is_empty() {
            cluster_name.clone()
        } else {
            authority.clone()
        },
        cluster: cluster_name.clone(),
        timeout: opt_duration(timeout, &field(path, "timeout"))?.filter(|t| !t.is_zero()),
        headers,
    })
}

/// An `HttpService`: `http_uri` (URI, cluster, timeout) and headers to add.
fn http_collector(proto: &core_pb::HttpService, path: &str) -> ConfigResult<HttpCollector> {
    let core_pb::HttpService {
        http_uri,
        request_headers_to_add,
    } = proto;
    let Some(core_pb::HttpUri {
        uri,
        http_upstream_type,
        timeout,
    }) = http_uri
    else {
        return err(field(path, "http_uri"), "required");
    };
    let upath = field(path, "http_uri");
    let Some(core_pb::http_uri::HttpUpstreamType::Cluster(cluster)) = http_upstream_type else {
        return err(field(&upath, "cluster"), "required");
    };
    if cluster.is_empty() {
        return err(field(&upath, "cluster"), "must not be empty");
    }
    let parsed: http::Uri = uri
        .parse()
        .map_err(|e| crate::ConfigError::new(field(&upath, "uri"), format!("{e}")))?;
    let Some(authority) = parsed.authority() else {
        return err(
            field(&upath, "uri"),
            format!("{uri:?} has no host (write it as http://HOST/PATH)"),
        );
    };
    let Some(timeout) = opt_duration(timeout, &field(&upath, "timeout"))? else {
        return err(field(&upath, "timeout"), "required");
    };
    let mutations = header_mutations(
        request_headers_to_add,
        &[],
        path,
        "request_headers_to_add",
        "request_headers_to_remove",
    )?;
    Ok(HttpCollector {
        cluster: cluster.clone(),
        authority: authority.to_string(),
        path: parsed
            .path_and_query()
            .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
        timeout,
        headers: mutations
            .add
            .into_iter()
            .map(|add| (add.name, add.value))
            .collect(),
    })
}

fn read_zipkin(proto: &trace_pb::ZipkinConfig, path: &str) -> ConfigResult<Zipkin> {
    let trace_pb::ZipkinConfig {
        collector_cluster,
        collector_endpoint,
        trace_id_128bit,
        shared_span_context,
        collector_endpoint_version,
        collector_hostname,
        split_spans_for_request,
        trace_context_option,
        collector_service,
    } = proto;
    unsupported!(path, collector_service);
    use trace_pb::zipkin_config::{CollectorEndpointVersion, TraceContextOption};
    let encoding = match CollectorEndpointVersion::try_from(*collector_endpoint_version) {
        Ok(CollectorEndpointVersion::HttpJson) => ZipkinEncoding::Json,
        Ok(CollectorEndpointVersion::HttpProto) => ZipkinEncoding::Proto,
        Ok(CollectorEndpointVersion::Grpc) => {
            return err(
                field(path, "collector_endpoint_version"),
                "GRPC is not supported (HTTP_JSON and HTTP_PROTO are)",
            );
        }
        _ => {
            return err(
                field(path, "collector_endpoint_version"),
                "must be HTTP_JSON or HTTP_PROTO",
            );
        }
    };
    if collector_cluster.is_empty() {
        return err(field(path, "collector_cluster"), "must not be empty");
    }
    if !collector_endpoint.starts_with('/') {
        return err(
            field(path, "collector_endpoint"),
            "must be a path starting with '/'",
        );
    }
    let w3c_propagation = match TraceContextOption::try_from(*trace_context_option) {
        Ok(TraceContextOption::UseB3) => false,
        Ok(TraceContextOption::UseB3WithW3cPropagation) => true,
        Err(_) => return err(field(path, "trace_context_option"), "unknown value"),
    };
    Ok(Zipkin {
        collector: HttpCollector {
            cluster: collector_cluster.clone(),
            authority: if collector_hostname.is_empty() {
                collector_cluster.clone()
            } else {
                collector_hostname.clone()
            },
            path: collector_endpoint.clone(),
            // Envoy's Zipkin reports time out after 5 s.
            timeout: Duration::from_secs(5),
            headers: Vec::new(),
        },
        encoding,
        trace_id_128bit: *trace_id_128bit,
        shared_span_context: shared_span_context.unwrap_or(true),
        split_spans_for_request: *split_spans_for_request,
        w3c_propagation,
    })
}

/// `custom_tags` of a connection manager or route.
fn tags(protos: &[tag_pb::CustomTag], path: &str) -> ConfigResult<Vec<CustomTag>> {
    protos
        .iter()
        .enumerate()
        .map(|(index, tag)| custom_tag(tag, &item(path, "custom_tags", index)))
        .collect()
}

fn custom_tag(proto: &tag_pb::CustomTag, path: &str) -> ConfigResult<CustomTag> {
    let tag_pb::CustomTag { tag, r#type } = proto;
    if tag.is_empty() {
        return err(field(path, "tag"), "must not be empty");
    }
    use tag_pb::custom_tag::Type;
    let value = match r#type {
        Some(Type::Literal(tag_pb::custom_tag::Literal { value })) => {
            TagValue::Literal(value.clone())
        }
        Some(Type::Environment(tag_pb::custom_tag::Environment {
            name,
            default_value,
        })) => {
            if name.is_empty() {
                return err(
                    field(&field(path, "environment"), "name"),
                    "must not be empty",
                );
            }
            TagValue::Environment {
                name: name.clone(),
                default: default_value.clone(),
            }
        }
        Some(Type::RequestHeader(tag_pb::custom_tag::Header {
            name,
            default_value,
        })) => {
            let hpath = field(&field(path, "request_header"), "name");
            if !name.starts_with(':') {
                header_name(name, &hpath)?;
            }
            TagValue::RequestHeader {
                name: name.to_ascii_lowercase(),
                default: default_value.clone(),
            }
        }
        Some(Type::Metadata(tag_pb::custom_tag::Metadata {
            kind,
            metadata_key,
            default_value,
        })) => {
            let mpath = field(path, "metadata");
            use metadata_pb::metadata_kind::Kind;
            let kind = match kind.as_ref().and_then(|k| k.kind.as_ref()) {
                Some(Kind::Request(_)) => MetadataKind::Request,
                Some(Kind::Route(_)) => MetadataKind::Route,
                Some(Kind::Cluster(_)) => MetadataKind::Cluster,
                Some(Kind::Host(_)) => MetadataKind::Host,
                None => return err(field(&mpath, "kind"), "required"),
            };
            let Some(metadata_pb::MetadataKey {
                key,
                path: segments,
            }) = metadata_key
            else {
                return err(field(&mpath, "metadata_key"), "required");
            };
            let kpath = field(&mpath, "metadata_key");
            if key.is_empty() {
                return err(field(&kpath, "key"), "must not be empty");
            }
            let mut path_keys = Vec::new();
            for (index, segment) in segments.iter().enumerate() {
                let metadata_pb::metadata_key::PathSegment { segment } = segment;
                match segment {
                    Some(metadata_pb::metadata_key::path_segment::Segment::Key(k))
                        if !k.is_empty() =>
                    {
                        path_keys.push(k.clone())
                    }
                    _ => return err(item(&kpath, "path", index), "a non-empty key is required"),
                }
            }
            TagValue::Metadata {
                kind,
                key: key.clone(),
                path: path_keys,
                default: default_value.clone(),
            }
        }
        Some(Type::Value(_)) => {
            return err(
                field(path, "value"),
                "substitution-format tag values are not supported",
            );
        }
        None => {
            return err(
                path,
                "literal, environment, request_header or metadata is required",
            );
        }
    };
    Ok(CustomTag {
        tag: tag.clone(),
        value,
    })
}

/// A route's `decorator`.
pub fn decorator(
    proto: &Option<route_pb::Decorator>,
    path: &str,
) -> ConfigResult<Option<Decorator>> {
    let Some(route_pb::Decorator {
        operation,
        propagate,
    }) = proto
    else {
        return Ok(None);
    };
    if operation.is_empty() {
        return err(field(path, "operation"), "must not be empty");
    }
    Ok(Some(Decorator {
        operation: operation.clone(),
        propagate: propagate.unwrap_or(true),
    }))
}

/// A route's `tracing`.
pub fn route_tracing(
    proto: &Option<route_pb::Tracing>,
    path: &str,
) -> ConfigResult<Option<RouteTracing>> {
    let Some(route_pb::Tracing {
        client_sampling,
        random_sampling,
        overall_sampling,
        custom_tags,
        operation,
        upstream_operation,
    }) = proto
    else {
        return Ok(None);
    };
    unsupported!(path, operation, upstream_operation);
    Ok(Some(RouteTracing {
        client_sampling: fraction(client_sampling, &field(path, "client_sampling"))?,
        random_sampling: fraction(random_sampling, &field(path, "random_sampling"))?,
        overall_sampling: fraction(overall_sampling, &field(path, "overall_sampling"))?,
        custom_tags: tags(custom_tags, path)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hcm_tracing(yaml: &str) -> ConfigResult<Tracing> {
        let proto: hcm_pb::http_connection_manager::Tracing =
            xds_api::json::from_yaml_str(yaml).expect("tracing yaml");
        tracing(&proto, "tracing")
    }

    const OTEL_GRPC: &str = r#"
provider:
  name: envoy.tracers.opentelemetry
  typed_config:
    "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
    grpc_service: {envoy_grpc: {cluster_name: otel}, timeout: 0.25s}
    service_name: front
"#;

    #[test]
    fn defaults_are_envoys() {
        let tracing = hcm_tracing(OTEL_GRPC).unwrap();
        assert_eq!(tracing.random_sampling, 10_000);
        assert_eq!(tracing.client_sampling, 10_000);
        assert_eq!(tracing.overall_sampling, 10_000);
        assert_eq!(tracing.max_path_tag_length, 256);
        assert!(!tracing.spawn_upstream_span);
        let Some(Provider::OpenTelemetry(otel)) = tracing.provider else {
            panic!("an OpenTelemetry provider");
        };
        assert_eq!(otel.service_name, "front");
        assert_eq!(otel.max_cache_size, 1024);
        assert_eq!(
            otel.exporter,
            OtlpExporter::Grpc {
                cluster: "otel".into(),
                authority: "otel".into(),
                timeout: Some(Duration::from_millis(250)),
                headers: vec![],
            }
        );
    }

    #[test]
    fn sampling_percentages_become_ten_thousandths() {
        let tracing = hcm_tracing(&format!(
            "{OTEL_GRPC}random_sampling: {{value: 1}}\nclient_sampling: {{value: 0.05}}\noverall_sampling: {{value: 50}}\nspawn_upstream_span: true\nverbose: true\nmax_path_tag_length: 10\n"
        ))
        .unwrap();
        assert_eq!(
            (
                tracing.random_sampling,
                tracing.client_sampling,
                tracing.overall_sampling
            ),
            (100, 5, 5000)
        );
        assert!(tracing.spawn_upstream_span && tracing.verbose);
        assert_eq!(tracing.max_path_tag_length, 10);
    }

    #[test]
    fn envoys_jaeger_example_reads_as_zipkin_with_four_custom_tags() {
        let tracing = hcm_tracing(
            r#"
provider:
  name: envoy.tracers.zipkin
  typed_config:
    "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
    collector_cluster: jaeger
    collector_endpoint: "/api/v2/spans"
    shared_span_context: false
    collector_endpoint_version: HTTP_JSON
custom_tags:
- tag: tag_literal
  literal: {value: literal value}
- tag: tag_request_header
  request_header: {name: ":path"}
- tag: tag_env_hostname
  environment: {name: "HOSTNAME"}
- tag: tag_metadata
  metadata:
    kind: {request: {}}
    metadata_key: {key: custom_tag, path: [{key: tag_metadata}]}
"#,
        )
        .unwrap();
        let Some(Provider::Zipkin(zipkin)) = &tracing.provider else {
            panic!("a Zipkin provider");
        };
        assert_eq!(zipkin.collector.cluster, "jaeger");
        assert_eq!(zipkin.collector.authority, "jaeger");
        assert_eq!(zipkin.collector.path, "/api/v2/spans");
        assert_eq!(zipkin.encoding, ZipkinEncoding::Json);
        assert!(!zipkin.shared_span_context && !zipkin.trace_id_128bit);
        assert_eq!(
            tracing
                .custom_tags
                .iter()
                .map(|t| &t.value)
                .collect::<Vec<_>>(),
            [
                &TagValue::Literal("literal value".into()),
                &TagValue::RequestHeader {
                    name: ":path".into(),
                    default: String::new()
                },
                &TagValue::Environment {
                    name: "HOSTNAME".into(),
                    default: String::new()
                },
                &TagValue::Metadata {
                    kind: MetadataKind::Request,
                    key: "custom_tag".into(),
                    path: vec!["tag_metadata".into()],
                    default: String::new()
                },
            ]
        );
    }

    #[test]
    fn otlp_http_service_names_host_path_and_headers() {
        let tracing = hcm_tracing(
            r#"
provider:
  name: envoy.tracers.opentelemetry
  typed_config:
    "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
    http_service:
      http_uri: {uri: "http://collector:4318/v1/traces", cluster: otel, timeout: 1s}
      request_headers_to_add: [{header: {key: x-token, value: abc}}]
    resource_detectors:
    - name: envoy.tracers.opentelemetry.resource_detectors.environment
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors.v3.EnvironmentResourceDetectorConfig
    sampler:
      name: envoy.tracers.opentelemetry.samplers.always_on
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.tracers.opentelemetry.samplers.v3.AlwaysOnSamplerConfig
"#,
        )
        .unwrap();
        let Some(Provider::OpenTelemetry(otel)) = tracing.provider else {
            panic!("an OpenTelemetry provider");
        };
        assert!(otel.resource_from_environment && otel.always_on_sampler);
        assert_eq!(otel.service_name, "unknown_service:envoy");
        let OtlpExporter::Http(http) = otel.exporter else {
            panic!("an HTTP exporter");
        };
        assert_eq!(
            (
                http.cluster.as_str(),
                http.authority.as_str(),
                http.path.as_str()
            ),
            ("otel", "collector:4318", "/v1/traces")
        );
        assert_eq!(http.timeout, Duration::from_secs(1));
        assert_eq!(http.headers[0].0, "x-token");
    }

    #[test]
    fn unsupported_settings_are_errors_naming_their_field() {
        let cases = [
            (
                "operation: op",
                "tracing.operation",
                "field is not supported",
            ),
            (
                "random_sampling: {value: 101}",
                "tracing.random_sampling.value",
                "between 0 and 100",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: z, collector_endpoint: /api/v2/spans, collector_endpoint_version: GRPC}}"#,
                "tracing.provider.typed_config.collector_endpoint_version",
                "GRPC is not supported",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: z, collector_endpoint: /api/v2/spans}}"#,
                "tracing.provider.typed_config.collector_endpoint_version",
                "HTTP_JSON or HTTP_PROTO",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, service_name: s}}"#,
                "tracing.provider.typed_config",
                "grpc_service or http_service is required",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, http_service: {http_uri: {uri: "http://c/v1/traces", cluster: c}}}}"#,
                "tracing.provider.typed_config.http_service.http_uri.timeout",
                "required",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: c, skip_envoy_headers: true}}}}"#,
                "tracing.provider.typed_config.grpc_service.envoy_grpc.skip_envoy_headers",
                "field is not supported",
            ),
            (
                r#"provider: {name: x, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: c}}, sampler: {name: s, typed_config: {"@type": type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors.v3.EnvironmentResourceDetectorConfig}}}}"#,
                "tracing.provider.typed_config.sampler.typed_config",
                "always-on sampler only",
            ),
            (
                "custom_tags: [{tag: t, value: '%REQ(x)%'}]",
                "tracing.custom_tags[0].value",
                "not supported",
            ),
            (
                "custom_tags: [{tag: t, request_header: {name: 'bad name'}}]",
                "tracing.custom_tags[0].request_header.name",
                "not a valid header name",
            ),
        ];
        for (yaml, path, reason) in cases {
            let error = hcm_tracing(yaml).expect_err(yaml);
            assert_eq!(error.path, path, "{yaml}");
            assert!(error.reason.contains(reason), "{yaml}: {error}");
        }
    }

    #[test]
    fn route_decorator_and_tracing_overrides() {
        let proto: route_pb::Route = xds_api::json::from_yaml_str(
            r#"
match: {prefix: /}
decorator: {operation: checkAvailability, propagate: false}
tracing:
  random_sampling: {numerator: 25, denominator: HUNDRED}
  custom_tags: [{tag: t, literal: {value: v}}]
"#,
        )
        .unwrap();
        assert_eq!(
            decorator(&proto.decorator, "r.decorator").unwrap(),
            Some(Decorator {
                operation: "checkAvailability".into(),
                propagate: false
            })
        );
        let tracing = route_tracing(&proto.tracing, "r.tracing").unwrap().unwrap();
        assert_eq!(tracing.random_sampling, Some(2500));
        assert_eq!(tracing.client_sampling, None);
        assert_eq!(tracing.custom_tags.len(), 1);
        let empty: Option<route_pb::Decorator> = Some(route_pb::Decorator::default());
        assert_eq!(
            decorator(&empty, "r.decorator").unwrap_err().path,
            "r.decorator.operation"
        );
    }
}
