//! The Zipkin tracer's way out: finished requests as Zipkin v2 spans, POSTed to
//! `collector_endpoint` on `collector_cluster` as a JSON list (`HTTP_JSON`) or a
//! `zipkin.proto3.ListOfSpans` (`HTTP_PROTO`), shaped as Envoy's: `localEndpoint` is the node's
//! cluster and the host's address, a SERVER span shared with its caller carries `shared`, and
//! the span's single annotation is `ss` (server) or `cr` (client) at its end.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use remora_config::tracing::{Zipkin, ZipkinEncoding};
use serde_json::{Map, Value, json};

use super::export::{CollectorClient, Queued, SendError, Sink, check_status};
use super::{Kind, TracingContext, span_tags, upstream_span_tags};

/// `zipkin.proto3` messages (field numbers from openzipkin's zipkin.proto).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListOfSpans {
        #[prost(message, repeated, tag = "1")]
        pub spans: Vec<Span>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub parent_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub id: Vec<u8>,
        /// 1 CLIENT, 2 SERVER.
        #[prost(int32, tag = "4")]
        pub kind: i32,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(fixed64, tag = "6")]
        pub timestamp: u64,
        #[prost(uint64, tag = "7")]
        pub duration: u64,
        #[prost(message, optional, tag = "8")]
        pub local_endpoint: Option<Endpoint>,
        #[prost(message, repeated, tag = "10")]
        pub annotations: Vec<Annotation>,
        #[prost(map = "string, string", tag = "11")]
        pub tags: std::collections::HashMap<String, String>,
        #[prost(bool, tag = "13")]
        pub shared: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Endpoint {
        #[prost(string, tag = "1")]
        pub service_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub ipv4: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub ipv6: Vec<u8>,
        #[prost(int32, tag = "4")]
        pub port: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Annotation {
        #[prost(fixed64, tag = "1")]
        pub timestamp: u64,
        #[prost(string, tag = "2")]
        pub value: String,
    }
}

/// One Zipkin span, before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct ZipkinSpan {
    pub trace_id: u128,
    pub wide: bool,
    pub id: u64,
    pub parent_id: Option<u64>,
    pub kind: Kind,
    pub name: String,
    /// Microseconds since the epoch, and duration in microseconds.
    pub timestamp: u64,
    pub duration: u64,
    pub shared: bool,
    pub tags: Vec<(String, String)>,
    /// `verbose` timing annotations before the closing `ss`/`cr` (microseconds, name).
    pub annotations: Vec<(u64, &'static str)>,
}

fn micros(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A finished request as Zipkin spans.
pub fn spans(queued: &Queued, wide: bool) -> Vec<ZipkinSpan> {
    let (tags, record) = queued;
    let ids = record.ids;
    let end = record.start + record.duration;
    let annotations = |only_upstream: bool| -> Vec<(u64, &'static str)> {
        record
            .events
            .iter()
            .flatten()
            .filter(|(name, _)| !only_upstream || super::event::UPSTREAM.contains(name))
            .map(|(name, time)| (micros(*time), *name))
            .collect()
    };
    let mut span_tags_list = Vec::with_capacity(24);
    span_tags(tags, record, &mut |key, value| {
        span_tags_list.push((key.to_string(), value.to_string()))
    });
    let mut out = vec![ZipkinSpan {
        trace_id: ids.trace_id,
        wide: wide || ids.trace_id > u128::from(u64::MAX),
        id: ids.span_id,
        parent_id: ids.parent_id,
        kind: record.kind,
        name: record.name().to_string(),
        timestamp: micros(record.start),
        duration: record.duration.as_micros() as u64,
        shared: ids.shared,
        tags: span_tags_list,
        annotations: annotations(false),
    }];
    if let (Some(upstream), Some((span_id, start))) = (&record.upstream, record.upstream_span) {
        let mut upstream_tags = Vec::with_capacity(12);
        upstream_span_tags(tags, record, upstream, &mut |key, value| {
            upstream_tags.push((key.to_string(), value.to_string()))
        });
        out.push(ZipkinSpan {
            trace_id: ids.trace_id,
            wide: out[0].wide,
            id: span_id,
            parent_id: Some(ids.span_id),
            kind: Kind::Client,
            name: format!("router {} egress", record.text(upstream.cluster)),
            timestamp: micros(start),
            duration: end
                .duration_since(start)
                .unwrap_or(Duration::ZERO)
                .as_micros() as u64,
            shared: false,
            tags: upstream_tags,
            annotations: annotations(true),
        });
    }
    out
}

/// Who sends the spans: `localEndpoint`.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub service_name: String,
    pub ip: Option<IpAddr>,
}

fn annotation(span: &ZipkinSpan) -> (&'static str, u64) {
    let value = match span.kind {
        Kind::Server => "ss",
        Kind::Client => "cr",
    };
    (value, span.timestamp + span.duration)
}

fn trace_id_hex(span: &ZipkinSpan) -> String {
    if span.wide {
        format!("{:032x}", span.trace_id)
    } else {
        format!("{:016x}", span.trace_id as u64)
    }
}

/// Zipkin v2 JSON, as Envoy writes it.
pub fn encode_json(spans: &[ZipkinSpan], local: &LocalEndpoint) -> Vec<u8> {
    let mut endpoint = Map::new();
    endpoint.insert("serviceName".into(), json!(local.service_name));
    match local.ip {
        Some(IpAddr::V4(ip)) => {
            endpoint.insert("ipv4".into(), json!(ip.to_string()));
        }
        Some(IpAddr::V6(ip)) => {
            endpoint.insert("ipv6".into(), json!(ip.to_string()));
        }
        None => {}
    }
    endpoint.insert("port".into(), json!(0));
    let list: Vec<Value> = spans
        .iter()
        .map(|span| {
            let mut object = Map::new();
            object.insert("traceId".into(), json!(trace_id_hex(span)));
            object.insert("id".into(), json!(format!("{:016x}", span.id)));
            if let Some(parent) = span.parent_id {
                object.insert("parentId".into(), json!(format!("{parent:016x}")));
            }
            object.insert("name".into(), json!(span.name));
            object.insert(
                "kind".into(),
                json!(match span.kind {
                    Kind::Server => "SERVER",
                    Kind::Client => "CLIENT",
                }),
            );
            object.insert("timestamp".into(), json!(span.timestamp));
            object.insert("duration".into(), json!(span.duration));
            object.insert("localEndpoint".into(), Value::Object(endpoint.clone()));
            let (value, timestamp) = annotation(span);
            let annotations: Vec<Value> = span
                .annotations
                .iter()
                .map(|(timestamp, value)| json!({"timestamp": timestamp, "value": value}))
                .chain(std::iter::once(
                    json!({"timestamp": timestamp, "value": value}),
                ))
                .collect();
            object.insert("annotations".into(), Value::Array(annotations));
            let tags: Map<String, Value> = span
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            object.insert("tags".into(), Value::Object(tags));
            if span.shared {
                object.insert("shared".into(), json!(true));
            }
            Value::Object(object)
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

/// `zipkin.proto3.ListOfSpans`.
pub fn encode_proto(spans: &[ZipkinSpan], local: &LocalEndpoint) -> Vec<u8> {
    let endpoint = proto::Endpoint {
        service_name: local.service_name.clone(),
        ipv4: match local.ip {
            Some(IpAddr::V4(ip)) => ip.octets().to_vec(),
            _ => Vec::new(),
        },
        ipv6: match local.ip {
            Some(IpAddr::V6(ip)) => ip.octets().to_vec(),
            _ => Vec::new(),
        },
        port: 0,
    };
    let list = proto::ListOfSpans {
        spans: spans
            .iter()
            .map(|span| {
                let (value, timestamp) = annotation(span);
                proto::Span {
                    trace_id: if span.wide {
                        span.trace_id.to_be_bytes().to_vec()
                    } else {
                        (span.trace_id as u64).to_be_bytes().to_vec()
                    },
                    parent_id: span
                        .parent_id
                        .map(|p| p.to_be_bytes().to_vec())
                        .unwrap_or_default(),
                    id: span.id.to_be_bytes().to_vec(),
                    kind: match span.kind {
                        Kind::Client => 1,
                        Kind::Server => 2,
                    },
                    name: span.name.clone(),
                    timestamp: span.timestamp,
                    duration: span.duration,
                    local_endpoint: Some(endpoint.clone()),
                    annotations: span
                        .annotations
                        .iter()
                        .map(|(timestamp, value)| (*timestamp, *value))
                        .chain(std::iter::once((timestamp, value)))
                        .map(|(timestamp, value)| proto::Annotation {
                            timestamp,
                            value: value.into(),
                        })
                        .collect(),
                    tags: span.tags.iter().cloned().collect(),
                    shared: span.shared,
                }
            })
            .collect(),
    };
    prost::Message::encode_to_vec(&list)
}

struct ZipkinSink {
    client: CollectorClient,
    encoding: ZipkinEncoding,
    wide: bool,
    local: LocalEndpoint,
}

impl Sink for ZipkinSink {
    fn send(
        &self,
        batch: Vec<Queued>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + '_>> {
        Box::pin(async move {
            if self
                .client
                .store
                .load()
                .cluster(&self.client.collector.cluster)
                .is_none()
            {
                return Err(SendError::NoCluster(format!(
                    "collector cluster {:?} does not exist",
                    self.client.collector.cluster
                )));
            }
            let spans: Vec<ZipkinSpan> = batch.iter().flat_map(|q| spans(q, self.wide)).collect();
            let (body, content_type) = match self.encoding {
                ZipkinEncoding::Json => (encode_json(&spans, &self.local), "application/json"),
                ZipkinEncoding::Proto => {
                    (encode_proto(&spans, &self.local), "application/x-protobuf")
                }
            };
            let request = http::Request::post(self.client.collector.path.as_str())
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Bytes::from(body))
                .map_err(|e| SendError::Failed(e.to_string()))?;
            let response = self.client.send(request).await.map_err(SendError::Failed)?;
            check_status(response.status())
        })
    }
}

pub fn sink(config: &Zipkin, context: &TracingContext) -> Box<dyn Sink> {
    Box::new(ZipkinSink {
        client: CollectorClient::new(context.store.clone(), config.collector.clone()),
        encoding: config.encoding,
        wide: config.trace_id_128bit,
        local: LocalEndpoint {
            service_name: context.node_cluster.to_string(),
            ip: context.local_ip,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> ZipkinSpan {
        ZipkinSpan {
            trace_id: 0x463ac35c9f6413ad,
            wide: false,
            id: 0xa2fb4a1d1a96d312,
            parent_id: Some(1),
            kind: Kind::Server,
            name: "checkAvailability".into(),
            timestamp: 1_000,
            duration: 20,
            shared: true,
            tags: vec![("component".into(), "proxy".into())],
            annotations: vec![],
        }
    }

    #[test]
    fn json_is_shaped_as_envoys() {
        let local = LocalEndpoint {
            service_name: "front-proxy".into(),
            ip: Some("192.0.2.2".parse().unwrap()),
        };
        let out: Value = serde_json::from_slice(&encode_json(&[span()], &local)).unwrap();
        assert_eq!(
            out,
            json!([{
                "traceId": "463ac35c9f6413ad",
                "id": "a2fb4a1d1a96d312",
                "parentId": "0000000000000001",
                "name": "checkAvailability",
                "kind": "SERVER",
                "timestamp": 1000,
                "duration": 20,
                "localEndpoint": {"serviceName": "front-proxy", "ipv4": "192.0.2.2", "port": 0},
                "annotations": [{"timestamp": 1020, "value": "ss"}],
                "tags": {"component": "proxy"},
                "shared": true
            }])
        );
    }

    #[test]
    fn proto_round_trips() {
        let local = LocalEndpoint {
            service_name: "s".into(),
            ip: None,
        };
        let bytes = encode_proto(&[span()], &local);
        let decoded: proto::ListOfSpans = prost::Message::decode(bytes.as_slice()).unwrap();
        let span = &decoded.spans[0];
        assert_eq!(span.trace_id, 0x463ac35c9f6413adu64.to_be_bytes());
        assert_eq!(span.kind, 2);
        assert_eq!(span.annotations[0].value, "ss");
        assert!(span.shared);
    }
}
