//! A real Jaeger (v2, all-in-one with in-memory storage) for tracing tests and the quick start:
//! built from the Go module proxy by `.ci/build-jaeger`, started with a config that listens on
//! loopback ports only, OTLP (gRPC and HTTP) and Zipkin receivers on, and read through its
//! query API (`/api/traces?service=NAME`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::ChildGuard;
use crate::{free_port, http_get, wait_for};

/// Where `.ci/build-jaeger` puts the binary.
pub const CACHED: &str = "/var/cache/remora/jaeger/v1.75.0/jaeger";

/// The Jaeger binary: `REMORA_JAEGER`, the CI cache, or `jaeger` on PATH.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REMORA_JAEGER") {
        return Some(PathBuf::from(path));
    }
    let cached = PathBuf::from(CACHED);
    if cached.is_file() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("jaeger"))
            .find(|path| path.is_file())
    })
}

/// A running Jaeger; killed on drop.
pub struct Jaeger {
    pub process: ChildGuard,
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub zipkin: SocketAddr,
    /// Query API and UI.
    pub query: SocketAddr,
    _dir: tempfile::TempDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Jaeger's all-in-one pipeline in the OpenTelemetry collector's config format, every
/// endpoint on loopback, its own telemetry off (it would bind port 8888).
pub fn config(otlp_grpc: u16, otlp_http: u16, zipkin: u16, query: u16, query_grpc: u16) -> String {
    format!(
        r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp, zipkin]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
  zipkin:
    endpoint: 127.0.0.1:{zipkin}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
    )
}

impl Jaeger {
    /// Starts Jaeger on fresh loopback ports and waits until its query API answers.
    pub fn start(binary: &std::path::Path) -> Jaeger {
        let (grpc, http, zipkin, query, query_grpc) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jaeger.yaml");
        std::fs::write(&path, config(grpc, http, zipkin, query, query_grpc))
            .expect("write jaeger config");
        let mut command = Command::new(binary);
        command.arg("--config").arg(&path);
        let process = ChildGuard::spawn("jaeger", command);
        let jaeger = Jaeger {
            process,
            otlp_grpc: loopback(grpc),
            otlp_http: loopback(http),
            zipkin: loopback(zipkin),
            query: loopback(query),
            _dir: dir,
        };
        wait_for("jaeger query API", Duration::from_secs(60), || {
            http_get(jaeger.query, "/api/services")
                .ok()
                .filter(|(status, ..)| *status == 200)
                .map(|_| ())
        });
        wait_for("jaeger receivers", Duration::from_secs(30), || {
            [jaeger.otlp_grpc, jaeger.zipkin]
                .iter()
                .all(|addr| std::net::TcpStream::connect(addr).is_ok())
                .then_some(())
        });
        jaeger
    }

    /// The traces Jaeger holds for `service` (its query API's `data` list).
    pub fn traces(&self, service: &str) -> Vec<serde_json::Value> {
        let Ok((200, _, body)) = http_get(
            self.query,
            &format!("/api/traces?service={service}&limit=100"),
        ) else {
            return Vec::new();
        };
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value["data"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// One span of a Jaeger trace, flattened for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub operation: String,
    pub service: String,
    /// The span it is a child of, if any.
    pub parent: Option<String>,
    pub kind: Option<String>,
    pub tags: serde_json::Map<String, serde_json::Value>,
}

/// The spans of one trace of the query API, with their services resolved.
pub fn spans(trace: &serde_json::Value) -> Vec<Span> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|span| {
                    let tags: serde_json::Map<String, serde_json::Value> = span["tags"]
                        .as_array()
                        .map(|tags| {
                            tags.iter()
                                .filter_map(|tag| {
                                    Some((tag["key"].as_str()?.to_string(), tag["value"].clone()))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Span {
                        trace_id: span["traceID"].as_str().unwrap_or_default().to_string(),
                        span_id: span["spanID"].as_str().unwrap_or_default().to_string(),
                        operation: span["operationName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        service: span["processID"]
                            .as_str()
                            .and_then(|id| processes[id]["serviceName"].as_str())
                            .unwrap_or_default()
                            .to_string(),
                        parent: span["references"].as_array().and_then(|refs| {
                            refs.iter()
                                .find(|r| r["refType"] == "CHILD_OF")
                                .and_then(|r| r["spanID"].as_str())
                                .map(str::to_string)
                        }),
                        kind: tags
                            .get("span.kind")
                            .and_then(|k| k.as_str())
                            .map(str::to_string),
                        tags,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}
