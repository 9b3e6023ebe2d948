//! Tracing end to end with a real Jaeger: client → outbound sidecar → inbound sidecar → app,
//! each sidecar exporting its spans (one over OTLP/gRPC, one as Zipkin protobuf to Jaeger's
//! Zipkin receiver), and Jaeger's query API must show one trace with both services and the inbound span
//! a child of the outbound one. The same with real Envoy as the outbound sidecar. And a
//! collector that is down: requests are unaffected, failures are counted.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Proxy, admin_block, bootstrap, catch_all, http2_cluster, loopback, static_cluster};
use remora_tests::echo::EchoServer;
use remora_tests::jaeger::{self, Jaeger};
use remora_tests::{free_port, http_request, wait_for};

fn jaeger_or_skip(test: &str) -> Option<Jaeger> {
    match jaeger::binary() {
        Some(binary) => Some(Jaeger::start(&binary)),
        None => {
            remora_tests::skip(test, "no jaeger binary (run .ci/build-jaeger)");
            None
        }
    }
}

/// An HCM listener with `tracing` and a direction.
fn traced_listener(name: &str, port: u16, direction: &str, tracing: &str, cluster: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    traffic_direction: {direction}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          generate_request_id: true
          tracing:
{tracing}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: {name}_routes
            virtual_hosts:
{routes}"#,
        routes = catch_all(cluster, "5s")
    )
}

fn otlp_grpc_tracing(cluster: &str, service: &str) -> String {
    format!(
        r#"            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {{envoy_grpc: {{cluster_name: {cluster}}}, timeout: 2s}}
                service_name: {service}"#
    )
}

fn zipkin_tracing(cluster: &str, encoding: &str) -> String {
    format!(
        r#"            provider:
              name: envoy.tracers.zipkin
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                collector_cluster: {cluster}
                collector_endpoint: "/api/v2/spans"
                shared_span_context: false
                collector_endpoint_version: {encoding}"#
    )
}

fn node(id: &str, cluster: &str) -> String {
    format!("node: {{id: {id}, cluster: {cluster}}}\n")
}

/// The outbound sidecar writes W3C and B3 (Remora's runtime key), so a B3-only inbound tracer
/// joins the trace.
const BOTH_FORMATS: &str = "layered_runtime:\n  layers:\n  - name: static\n    static_layer: {remora.tracing.propagate_w3c_and_b3: true}\n";

/// Sends one request through `entry` and returns the x-request-id the app saw.
fn send(entry: SocketAddr, path: &str) -> String {
    let (status, _, body) = http_request(entry, "GET", path, &[], "").expect("request");
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo json");
    seen["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until Jaeger holds a trace of `service` whose spans come from all of `services`.
fn one_trace_with(jaeger: &Jaeger, service: &str, services: &[&str]) -> Vec<jaeger::Span> {
    wait_for(
        &format!("a trace with spans from {services:?}"),
        Duration::from_secs(60),
        || {
            jaeger.traces(service).into_iter().find_map(|trace| {
                let spans = jaeger::spans(&trace);
                services
                    .iter()
                    .all(|s| spans.iter().any(|span| span.service == *s))
                    .then_some(spans)
            })
        },
    )
}

#[test]
fn jaeger_shows_one_trace_through_two_remora_sidecars() {
    let Some(jaeger) = jaeger_or_skip("jaeger_shows_one_trace_through_two_remora_sidecars") else {
        return;
    };
    let app = EchoServer::start("app", "127.0.0.1");
    let (inbound_port, outbound_port) = (free_port(), free_port());

    // Inbound: Zipkin protobuf to Jaeger's Zipkin receiver (the Envoy test below sends JSON).
    let (in_admin, in_admin_yaml) = admin_block();
    let inbound = Proxy::start(
        &format!(
            "{}{}",
            node("backend-1", "backend"),
            bootstrap(
                &in_admin_yaml,
                &[traced_listener(
                    "inbound",
                    inbound_port,
                    "INBOUND",
                    &zipkin_tracing("jaeger_zipkin", "HTTP_PROTO"),
                    "app",
                )],
                &[
                    static_cluster("app", &[app.addr]),
                    static_cluster("jaeger_zipkin", &[jaeger.zipkin]),
                ],
            )
        ),
        in_admin,
        &[],
    );
    // Outbound: OTLP/gRPC to Jaeger.
    let (out_admin, out_admin_yaml) = admin_block();
    let outbound = Proxy::start(
        &format!(
            "{}{BOTH_FORMATS}{}",
            node("frontend-1", "frontend"),
            bootstrap(
                &out_admin_yaml,
                &[traced_listener(
                    "outbound",
                    outbound_port,
                    "OUTBOUND",
                    &otlp_grpc_tracing("jaeger_otlp", "frontend"),
                    "backend",
                )],
                &[
                    static_cluster("backend", &[loopback(inbound_port)]),
                    http2_cluster("jaeger_otlp", jaeger.otlp_grpc),
                ],
            )
        ),
        out_admin,
        &[],
    );

    let request_id = send(loopback(outbound_port), "/checkout");
    let spans = one_trace_with(&jaeger, "frontend", &["frontend", "backend"]);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let front = spans.iter().find(|s| s.service == "frontend").unwrap();
    let back = spans.iter().find(|s| s.service == "backend").unwrap();
    assert_eq!(front.trace_id, back.trace_id);
    // Egress spans are CLIENT spans named after the host; the inbound Zipkin span is a SERVER
    // span, child of the outbound one.
    assert_eq!(front.operation, format!("egress 127.0.0.1:{outbound_port}"));
    assert_eq!(front.kind.as_deref(), Some("client"));
    assert_eq!(back.kind.as_deref(), Some("server"));
    assert_eq!(
        back.parent.as_deref(),
        Some(front.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(front.parent, None);
    for span in [front, back] {
        assert_eq!(
            span.tags["guid:x-request-id"],
            request_id.as_str(),
            "{span:#?}"
        );
        assert_eq!(span.tags["http.status_code"], "200");
        assert_eq!(span.tags["component"], "proxy");
    }
    assert_eq!(front.tags["upstream_cluster"], "backend");
    assert_eq!(back.tags["upstream_cluster"], "app");
    assert_eq!(back.tags["node_id"], "backend-1");
    // Both exporters report what they sent.
    wait_for("spans_sent counted", Duration::from_secs(30), || {
        (outbound.stat("tracing.opentelemetry.spans_sent") >= 1
            && inbound.stat("tracing.zipkin.spans_sent") >= 1)
            .then_some(())
    });
    assert_eq!(outbound.stat("tracing.opentelemetry.spans_dropped"), 0);
}

#[test]
fn jaeger_shows_one_trace_with_envoy_as_the_outbound_sidecar() {
    if !remora_tests::envoy::available_or_skip(
        "jaeger_shows_one_trace_with_envoy_as_the_outbound_sidecar",
    ) {
        return;
    }
    let Some(jaeger) = jaeger_or_skip("jaeger_shows_one_trace_with_envoy_as_the_outbound_sidecar")
    else {
        return;
    };
    let app = EchoServer::start("app", "127.0.0.1");
    let (inbound_port, outbound_port) = (free_port(), free_port());

    // Inbound: Remora with the OpenTelemetry tracer, reading the B3 Envoy's Zipkin tracer sends.
    let (in_admin, in_admin_yaml) = admin_block();
    let _inbound = Proxy::start(
        &format!(
            "{}{BOTH_FORMATS}{}",
            node("backend-1", "backend"),
            bootstrap(
                &in_admin_yaml,
                &[traced_listener(
                    "inbound",
                    inbound_port,
                    "INBOUND",
                    &otlp_grpc_tracing("jaeger_otlp", "backend"),
                    "app",
                )],
                &[
                    static_cluster("app", &[app.addr]),
                    http2_cluster("jaeger_otlp", jaeger.otlp_grpc),
                ],
            )
        ),
        in_admin,
        &[],
    );
    // Outbound: Envoy with Envoy's Jaeger example tracing (Zipkin JSON to 9411).
    let (out_admin, out_admin_yaml) = admin_block();
    let envoy_bootstrap = format!(
        "{}{}",
        node("frontend-1", "frontend"),
        bootstrap(
            &out_admin_yaml,
            &[traced_listener(
                "outbound",
                outbound_port,
                "OUTBOUND",
                &zipkin_tracing("jaeger_zipkin", "HTTP_JSON"),
                "backend",
            )],
            &[
                static_cluster("backend", &[loopback(inbound_port)]),
                static_cluster("jaeger_zipkin", &[jaeger.zipkin]),
            ],
        )
    );
    let (_dir, file) = common::write_config(&envoy_bootstrap);
    let _envoy = remora_tests::envoy::Envoy::start(&file, out_admin, &[]);
    wait_for("envoy listener", Duration::from_secs(30), || {
        std::net::TcpStream::connect(loopback(outbound_port)).ok()
    });

    send(loopback(outbound_port), "/checkout");
    let spans = one_trace_with(&jaeger, "backend", &["frontend", "backend"]);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let front = spans.iter().find(|s| s.service == "frontend").unwrap();
    let back = spans.iter().find(|s| s.service == "backend").unwrap();
    assert_eq!(
        back.parent.as_deref(),
        Some(front.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(back.operation, "ingress");
    assert_eq!(back.kind.as_deref(), Some("server"));
}

#[test]
fn a_collector_that_is_down_fails_no_request_and_its_failures_are_counted() {
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    // Nothing listens on the collector's port.
    let dead = loopback(free_port());
    let proxy = Proxy::start(
        &bootstrap(
            &admin_yaml,
            &[traced_listener(
                "edge",
                port,
                "INBOUND",
                &format!(
                    "{}\n                max_cache_size: 10",
                    otlp_grpc_tracing("collector", "edge")
                ),
                "app",
            )],
            &[
                static_cluster("app", &[app.addr]),
                http2_cluster("collector", dead),
            ],
        ),
        admin,
        &[],
    );
    for _ in 0..50 {
        send(loopback(port), "/");
    }
    // Every batch is tried and its spans counted as sent, whatever becomes of them, as Envoy
    // counts; the failures show in Remora's own counter.
    wait_for("every span tried", Duration::from_secs(30), || {
        (proxy.stat("tracing.opentelemetry.spans_sent") == 50).then_some(())
    });
    wait_for("failed exports counted", Duration::from_secs(30), || {
        (proxy.stat("tracing.opentelemetry.http_reports_failed") >= 1).then_some(())
    });
    assert_eq!(proxy.stat("tracing.opentelemetry.http_reports_success"), 0);
    assert_eq!(proxy.stat("tracing.opentelemetry.spans_dropped"), 0);
    assert_eq!(proxy.stat("http.edge.tracing.random_sampling"), 50);
}

#[test]
fn a_collector_that_never_answers_costs_a_bounded_queue_and_drops_are_counted() {
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    // Accepts connections and never answers: every export waits for its timeout.
    let (_silent, silent) = common::silent_upstream();
    let proxy = Proxy::start(
        &bootstrap(
            &admin_yaml,
            &[traced_listener(
                "edge",
                port,
                "INBOUND",
                &format!(
                    "{}\n                max_cache_size: 10",
                    otlp_grpc_tracing("collector", "edge")
                ),
                "app",
            )],
            &[
                static_cluster("app", &[app.addr]),
                http2_cluster("collector", silent),
            ],
        ),
        admin,
        &[],
    );
    // The queue holds 4 × max_cache_size spans and one batch is in flight: of 200 requests'
    // spans, at least 150 cannot be kept. Every request is still served.
    for _ in 0..200 {
        send(loopback(port), "/");
    }
    wait_for("dropped spans counted", Duration::from_secs(30), || {
        (proxy.stat("tracing.opentelemetry.spans_dropped") >= 150).then_some(())
    });
    // What was not dropped was tried: at most the queue and the batch in flight.
    assert!(proxy.stat("tracing.opentelemetry.spans_sent") <= 50);
}
