//! The OpenTelemetry tracer against real Envoy: the same bootstrap under both, spans exported to
//! a real OTLP/gRPC receiver, the same requests (sampled, unsampled, forced, client-sampled,
//! with and without an incoming `traceparent`, a 5xx), with and without `spawn_upstream_span`.
//! For each request the span shapes (kind, name, parent links, attributes, status, resource
//! keys) and what the upstream received (`traceparent`, `tracestate`, the decision in
//! `x-request-id`) must agree. Values that differ by nature (ids, times, the SDK's name and the
//! instrumentation scope, see proxy/README.md) are compared by their relation, not their text.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Proxy, admin_block, bootstrap, http2_cluster, loopback, static_cluster};
use remora_tests::echo::EchoServer;
use remora_tests::otlp::{Receiver, Span};
use remora_tests::{free_port, http_request, wait_for};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const UNSAMPLED_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// One request of the scenario: a name, its path and headers, and whether it is sampled.
struct Case {
    name: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
}

fn cases() -> Vec<Case> {
    let parent = |trace: &str, flags: &str| format!("00-{trace}-{PARENT}-{flags}");
    vec![
        Case {
            name: "plain",
            path: "/plain",
            headers: vec![],
        },
        Case {
            name: "incoming sampled traceparent",
            path: "/joined",
            headers: vec![
                ("traceparent", parent(TRACE, "01")),
                ("tracestate", "vendor=a1".into()),
            ],
        },
        Case {
            name: "incoming unsampled traceparent",
            path: "/unsampled",
            headers: vec![("traceparent", parent(UNSAMPLED_TRACE, "00"))],
        },
        Case {
            name: "forced",
            path: "/forced",
            headers: vec![("x-envoy-force-trace", "1".into())],
        },
        Case {
            name: "client sampled",
            path: "/client",
            headers: vec![("x-client-trace-id", "client-1".into())],
        },
        Case {
            name: "upstream 503",
            path: "/status/503",
            headers: vec![("user-agent", "diff-test".into())],
        },
        // Last: sampled under every config, so once its span is in, every earlier one is.
        Case {
            name: "sentinel",
            path: "/sentinel",
            headers: vec![("x-envoy-force-trace", "1".into())],
        },
    ]
}

/// The connection manager's tracing, and what makes the test client (127.0.0.1) internal so
/// that `x-envoy-force-trace` is honoured: Envoy 1.40 treats no address as internal unless
/// `internal_address_config` says so.
fn tracing_block(random: u32, spawn: bool, cluster: &str) -> String {
    let internal = "          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}\n";
    format!(
        r#"{internal}          use_remote_address: true
          tracing:
            random_sampling: {{value: {random}}}
            spawn_upstream_span: {spawn}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {{envoy_grpc: {{cluster_name: {cluster}}}, timeout: 2s}}
                service_name: diff-svc
"#
    )
}

/// The same bootstrap for both proxies.
fn bootstrap_for(
    admin_yaml: &str,
    port: u16,
    random: u32,
    spawn: bool,
    app: SocketAddr,
    receiver: SocketAddr,
) -> String {
    let listener = common::http_listener(
        "ingress",
        port,
        &tracing_block(random, spawn, "otlp"),
        &common::catch_all("app", "5s"),
    )
    .replace(
        "    filter_chains:",
        "    traffic_direction: INBOUND\n    filter_chains:",
    );
    format!(
        "node: {{id: diff-node, cluster: diff-cluster, locality: {{zone: zone-a}}}}\n{}",
        bootstrap(
            admin_yaml,
            &[listener],
            &[
                static_cluster("app", &[app]),
                http2_cluster("otlp", receiver),
            ]
        )
    )
}

/// Envoy (validating the bootstrap first) or Remora on `yaml` (written at `file`), once its
/// listener on `port` takes connections; stopped when dropped.
fn start(
    envoy: bool,
    yaml: &str,
    file: &std::path::Path,
    admin: SocketAddr,
    port: u16,
) -> Box<dyn std::any::Any> {
    if envoy {
        remora_tests::envoy::validate(file).unwrap_or_else(|e| panic!("envoy rejects: {e}"));
        let envoy = remora_tests::envoy::Envoy::start(file, admin, &[]);
        wait_for("envoy listener", Duration::from_secs(30), || {
            std::net::TcpStream::connect(loopback(port)).ok()
        });
        Box::new(envoy)
    } else {
        Box::new(Proxy::start(yaml, admin, &[]))
    }
}

/// What one request left: the headers the app saw, and the spans carrying its request id.
#[derive(Debug)]
struct Seen {
    upstream: serde_json::Value,
    request_id: String,
}

/// Runs every case through one proxy and returns what the app and the receiver saw.
fn run(envoy: bool, random: u32, spawn: bool) -> Option<(Vec<Seen>, Vec<Span>)> {
    let receiver = Receiver::start();
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    let yaml = bootstrap_for(&admin_yaml, port, random, spawn, app.addr, receiver.addr);
    let (_dir, file) = common::write_config(&yaml);
    let _proxy = start(envoy, &yaml, &file, admin, port);
    let mut seen = Vec::new();
    for case in cases() {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (_, _, body) =
            http_request(loopback(port), "GET", case.path, &headers, "").expect(case.name);
        let upstream: serde_json::Value = serde_json::from_str(&body).expect("echo json");
        let request_id = upstream["headers"]["x-request-id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        seen.push(Seen {
            upstream: upstream["headers"].clone(),
            request_id,
        });
    }
    let sentinel = seen
        .last()
        .map(|s| s.request_id.clone())
        .unwrap_or_default();
    let arrived = remora_tests::poll_until(Duration::from_secs(30), || {
        receiver
            .spans()
            .iter()
            .any(|span| span.attributes.get("guid:x-request-id") == Some(&sentinel))
            .then_some(())
    });
    assert!(
        arrived.is_some(),
        "{}: the sentinel's span never arrived; received {:#?}; the app saw {seen:#?}",
        if envoy { "envoy" } else { "remora" },
        receiver.spans()
    );
    Some((seen, receiver.spans()))
}

/// A request's spans and upstream headers in a form both proxies must share.
fn shape(seen: &Seen, spans: &[Span], case: &Case) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let header = |name: &str| seen.upstream[name].as_str().map(str::to_string);
    out.insert(
        "x-request-id decision".into(),
        seen.request_id.get(14..15).unwrap_or("?").to_string(),
    );
    let traceparent = header("traceparent").unwrap_or_default();
    let parts: Vec<&str> = traceparent.split('-').collect();
    out.insert(
        "traceparent form".into(),
        format!(
            "{} parts, version {}, flags {}",
            parts.len(),
            parts.first().unwrap_or(&""),
            parts.get(3).unwrap_or(&"")
        ),
    );
    let trace_id = parts.get(1).copied().unwrap_or("");
    let upstream_parent = parts.get(2).copied().unwrap_or("");
    out.insert(
        "traceparent trace id".into(),
        if trace_id == TRACE || trace_id == UNSAMPLED_TRACE {
            "the incoming trace".into()
        } else {
            "a new trace".into()
        },
    );
    out.insert(
        "tracestate".into(),
        header("tracestate").unwrap_or_else(|| "(absent)".into()),
    );
    let mine: Vec<&Span> = spans
        .iter()
        .filter(|span| {
            span.attributes.get("guid:x-request-id") == Some(&seen.request_id)
                || (span.trace_id == trace_id && span.kind == "SPAN_KIND_CLIENT")
        })
        .collect();
    out.insert("span count".into(), mine.len().to_string());
    for span in &mine {
        let role = if span.kind == "SPAN_KIND_SERVER" {
            "server"
        } else {
            "client"
        };
        let parent = if span.parent_span_id.is_empty() || span.parent_span_id == "0".repeat(16) {
            "root".to_string()
        } else if span.parent_span_id == PARENT {
            "the incoming span".to_string()
        } else if mine
            .iter()
            .any(|other| other.span_id == span.parent_span_id)
        {
            "the server span".to_string()
        } else {
            format!("unknown {}", span.parent_span_id)
        };
        out.insert(format!("{role}.name"), span.name.clone());
        out.insert(format!("{role}.parent"), parent);
        out.insert(
            format!("{role}.trace"),
            (span.trace_id == trace_id).to_string(),
        );
        out.insert(
            format!("{role}.is upstream's parent"),
            (span.span_id == upstream_parent).to_string(),
        );
        out.insert(format!("{role}.status"), span.status.clone());
        out.insert(format!("{role}.trace_state"), span.trace_state.clone());
        for (key, value) in &span.attributes {
            let value = match key.as_str() {
                "guid:x-request-id" => "(the request id)".to_string(),
                "request_size" | "response_size" => "(a size)".to_string(),
                // Each run has its own listener and app ports.
                _ => loopback_ports(value),
            };
            out.insert(format!("{role}.attr.{key}"), value);
        }
        let mut resource: Vec<&String> = span.resource.keys().collect();
        resource.sort();
        out.insert(format!("{role}.resource keys"), format!("{resource:?}"));
        out.insert(
            format!("{role}.service.name"),
            span.resource
                .get("service.name")
                .cloned()
                .unwrap_or_default(),
        );
    }
    let _ = case;
    out
}

/// `127.0.0.1:PORT` for any loopback address with a port.
fn loopback_ports(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find("127.0.0.1:") {
        out.push_str(&rest[..at + 10]);
        rest = &rest[at + 10..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        out.push_str("PORT");
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

fn compare(random: u32, spawn: bool) {
    let test = format!("tracing_differential(random {random}%, spawn_upstream_span {spawn})");
    if !remora_tests::envoy::available_or_skip(&test) {
        return;
    }
    let (Some((envoy_seen, envoy_spans)), Some((remora_seen, remora_spans))) =
        (run(true, random, spawn), run(false, random, spawn))
    else {
        return;
    };
    let mut differences = Vec::new();
    for (index, case) in cases().iter().enumerate() {
        let envoy = shape(&envoy_seen[index], &envoy_spans, case);
        let remora = shape(&remora_seen[index], &remora_spans, case);
        let keys: std::collections::BTreeSet<&String> = envoy.keys().chain(remora.keys()).collect();
        for key in keys {
            let (e, r) = (envoy.get(key), remora.get(key));
            if e != r {
                differences.push(format!("{}: {key}: envoy {e:?}, remora {r:?}", case.name));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "{test}: {} differences:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

#[test]
fn spans_and_propagation_agree_with_envoy_at_full_sampling() {
    compare(100, false);
}

#[test]
fn spans_and_propagation_agree_with_envoy_at_full_sampling_with_upstream_spans() {
    compare(100, true);
}

#[test]
fn spans_and_propagation_agree_with_envoy_at_zero_sampling() {
    compare(0, false);
}

#[test]
fn spans_and_propagation_agree_with_envoy_at_zero_sampling_with_upstream_spans() {
    compare(0, true);
}

/// The health check filter's requests are not traced, answered or passed on: no span, the
/// context sent upstream says "not sampled", and the decision counts as `tracing.health_check`
/// and `tracing.not_traceable`. Health checks are counted by the filter only when it answers,
/// and every answer (and a passed-on health check's response) names the node's cluster, empty
/// here. Remora has every tracer counter Envoy 1.40 has, and `spans_sent` counts the spans
/// sent. Envoy and Remora, one bootstrap.
#[test]
fn health_checks_are_not_traced_and_the_tracer_counts_as_envoy_does() {
    let test = "health checks and the tracer's counters against Envoy";
    let with_envoy = remora_tests::envoy::available_or_skip(test);
    let runs: Vec<(Vec<String>, Vec<String>)> = [false, true]
        .into_iter()
        .filter(|&envoy| !envoy || with_envoy)
        .map(health_check_run)
        .collect();
    let (remora, remora_counters) = &runs[0];
    for counter in ["spans_dropped", "spans_sent", "timer_flushed"] {
        assert!(remora_counters.iter().any(|c| c == counter), "{counter}");
    }
    assert_eq!(
        *remora,
        [
            "/healthz: 200 cluster=Some(\"\") traceparent flags=-",
            "/ping: 200 cluster=Some(\"\") traceparent flags=00",
            "/plain: 200 cluster=None traceparent flags=01",
            "/ping failed: 503 cluster=Some(\"\") traceparent flags=-",
            "/sentinel: 200 cluster=None traceparent flags=01",
            "spans: 2 (/plain, /sentinel), spans_sent 2",
            "http.ingress.tracing.random_sampling: Some(1)",
            "http.ingress.tracing.health_check: Some(3)",
            "http.ingress.tracing.not_traceable: Some(3)",
            "http.ingress.tracing.service_forced: Some(1)",
            "http.ingress.health_check.request_total: Some(2)",
            "http.ingress.health_check.ok: Some(1)",
            "http.ingress.health_check.failed: Some(1)",
        ],
        "remora"
    );
    if let Some((envoy, envoy_counters)) = runs.get(1) {
        assert_eq!(envoy, remora, "envoy, remora");
        let missing: Vec<&String> = envoy_counters
            .iter()
            .filter(|c| !remora_counters.contains(c))
            .collect();
        assert!(
            missing.is_empty(),
            "Envoy's tracer counters Remora lacks: {missing:?}"
        );
    }
}

/// One proxy through [`health_checks_are_not_traced_and_the_tracer_counts_as_envoy_does`]: what
/// each request got back and sent upstream, the spans and the counters; and the names of the
/// tracer's counters.
fn health_check_run(envoy: bool) -> (Vec<String>, Vec<String>) {
    let receiver = Receiver::start();
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    let listener = common::with_http_filters(
        common::http_listener(
            "ingress",
            port,
            &tracing_block(100, false, "otlp"),
            &common::catch_all("app", "5s"),
        ),
        &(common::health_check_filter("/healthz", false, "")
            + &common::health_check_filter("/ping", true, "")),
    );
    // No node cluster: the answers name an empty one.
    let yaml = format!(
        "node: {{id: hc-node}}\n{}",
        bootstrap(
            &admin_yaml,
            &[listener],
            &[
                static_cluster("app", &[app.addr]),
                http2_cluster("otlp", receiver.addr),
            ]
        )
    );
    let (_dir, file) = common::write_config(&yaml);
    let _proxy = start(envoy, &yaml, &file, admin, port);
    let who = if envoy { "envoy" } else { "remora" };
    let mut seen = Vec::new();
    let mut ids = BTreeMap::new();
    let mut ask = |label: &str, path: &str, headers: &[(&str, &str)]| {
        let (status, head, body) =
            http_request(loopback(port), "GET", path, headers, "").expect(label);
        let cluster = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-envoy-upstream-healthchecked-cluster")
                .then(|| value.trim().to_string())
        });
        let upstream: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let flags = upstream["headers"]["traceparent"]
            .as_str()
            .and_then(|t| t.rsplit('-').next())
            .unwrap_or("-")
            .to_string();
        if let Some(id) = upstream["headers"]["x-request-id"].as_str() {
            ids.insert(id.to_string(), path.to_string());
        }
        seen.push(format!(
            "{label}: {status} cluster={cluster:?} traceparent flags={flags}"
        ));
    };
    let post = |path: &str| {
        let (status, _, _) = http_request(admin, "POST", path, &[], "").expect("admin");
        assert_eq!(status, 200, "{who}: POST {path}");
    };
    ask("/healthz", "/healthz", &[]);
    ask("/ping", "/ping", &[]);
    ask("/plain", "/plain", &[]);
    post("/healthcheck/fail");
    ask("/ping failed", "/ping", &[]);
    post("/healthcheck/ok");
    ask("/sentinel", "/sentinel", &[("x-envoy-force-trace", "1")]);
    // Once the last request's span is in, every earlier one is (one exporter, in order).
    let sentinel = ids
        .iter()
        .find_map(|(id, path)| (path == "/sentinel").then(|| id.clone()))
        .unwrap_or_default();
    let spans = wait_for("the sentinel's span", Duration::from_secs(30), || {
        let spans = receiver.spans();
        spans
            .iter()
            .any(|span| span.attributes.get("guid:x-request-id") == Some(&sentinel))
            .then_some(spans)
    });
    let traced: Vec<&str> = spans
        .iter()
        .filter_map(|span| ids.get(span.attributes.get("guid:x-request-id")?))
        .map(String::as_str)
        .collect();
    let spans_sent = wait_for("spans_sent", Duration::from_secs(10), || {
        let sent = remora_tests::admin_stat(admin, "tracing.opentelemetry.spans_sent")?;
        (sent >= spans.len() as u64).then_some(sent)
    });
    seen.push(format!(
        "spans: {} ({}), spans_sent {spans_sent}",
        spans.len(),
        traced.join(", ")
    ));
    for name in [
        "tracing.random_sampling",
        "tracing.health_check",
        "tracing.not_traceable",
        "tracing.service_forced",
        "health_check.request_total",
        "health_check.ok",
        "health_check.failed",
    ] {
        let name = format!("http.ingress.{name}");
        let value = remora_tests::admin_stat(admin, &name);
        seen.push(format!("{name}: {value:?}"));
    }
    let (_, _, stats) = remora_tests::http_get(admin, "/stats").expect("stats");
    let counters = stats
        .lines()
        .filter_map(|line| line.strip_prefix("tracing.opentelemetry."))
        .filter_map(|line| Some(line.split(':').next()?.to_string()))
        .collect();
    (seen, counters)
}
