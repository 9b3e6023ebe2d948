//! Telemetry a user reads from the admin endpoint and the access log: the latency histograms
//! (`/stats` P-lines, JSON `computed_quantiles`, Prometheus buckets) under the same names and
//! bucket bounds as real Envoy's for the same bootstrap and traffic, and the tracing access-log
//! operators (`%TRACE_ID%`, `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`).

mod common;
#[path = "common/metrics_service.rs"]
mod metrics_service;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Proxy, admin_block, bootstrap, catch_all, loopback, static_cluster};
use remora_tests::echo::EchoServer;
use remora_tests::{free_port, http_get, wait_for};

const HISTOGRAMS: [&str; 5] = [
    "cluster.app.upstream_rq_time",
    "cluster.app.upstream_cx_connect_ms",
    "cluster.app.upstream_cx_length_ms",
    "http.edge.downstream_rq_time",
    "http.edge.downstream_cx_length_ms",
];

/// Upstream connections closed after 0.2 s idle, so `upstream_cx_length_ms` gets values.
const IDLE_CLOSE: &str = "    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {idle_timeout: 0.2s}\n        explicit_http_config: {http_protocol_options: {}}\n";

fn edge_bootstrap(admin_yaml: &str, port: u16, app: std::net::SocketAddr, extra: &str) -> String {
    bootstrap(
        admin_yaml,
        &[common::http_listener(
            "edge",
            port,
            extra,
            &catch_all("app", "5s"),
        )],
        &[static_cluster("app", &[app])],
    )
}

/// Envoy or Remora (`envoy` says which) on the bootstrap `yaml`, once its listener on `port`
/// takes connections; stopped when dropped.
fn start_proxy(
    envoy: bool,
    yaml: &str,
    admin: std::net::SocketAddr,
    port: u16,
) -> Box<dyn std::any::Any> {
    let (dir, file) = common::write_config(yaml);
    let proxy: Box<dyn std::any::Any> = if envoy {
        Box::new((remora_tests::envoy::Envoy::start(&file, admin, &[]), dir))
    } else {
        Box::new(Proxy::start(yaml, admin, &[]))
    };
    wait_for("the listener", Duration::from_secs(30), || {
        std::net::TcpStream::connect(loopback(port)).ok()
    });
    proxy
}

/// An HCM's `access_log` (its YAML, indented for [`edge_bootstrap`]'s `extra`): one file logger
/// writing `format` and a newline to `path`.
fn file_access_log(path: &std::path::Path, format: &str) -> String {
    format!(
        r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format: {{text_format_source: {{inline_string: "{format}\n"}}}}
"#,
        path.display()
    )
}

/// The histogram lines of `/stats` (name → summary).
fn histogram_lines(admin: std::net::SocketAddr) -> Vec<(String, String)> {
    let (_, _, body) = http_get(admin, "/stats?type=Histograms").expect("stats");
    body.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            HISTOGRAMS
                .contains(&name)
                .then(|| (name.to_string(), value.to_string()))
        })
        .collect()
}

/// `/stats/prometheus` as `metric{labels}` → value, and the metric names it has a `# TYPE`
/// line for (each once: a second line for one metric would be a format error).
fn prometheus_series(
    admin: std::net::SocketAddr,
) -> (std::collections::BTreeMap<String, String>, BTreeSet<String>) {
    let (_, _, body) = http_get(admin, "/stats/prometheus").expect("prometheus");
    let mut types = BTreeSet::new();
    let mut series = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let metric = declared.split(' ').next().unwrap_or_default().to_string();
            assert!(types.insert(metric), "two TYPE lines: {line}");
        } else if let Some((key, value)) = line.rsplit_once(' ') {
            series.insert(key.to_string(), value.to_string());
        }
    }
    (series, types)
}

/// Every `le` bound Prometheus shows for `metric`.
fn buckets(admin: std::net::SocketAddr, metric: &str) -> Vec<String> {
    let (_, _, body) = http_get(admin, "/stats/prometheus").expect("prometheus");
    body.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{metric}_bucket"))?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            Some(le.to_string())
        })
        .collect()
}

/// Sends requests over fresh connections (so connection histograms get values too) and waits
/// until the connection-length histograms have theirs.
fn traffic(port: u16, admin: std::net::SocketAddr) {
    for _ in 0..3 {
        let (status, _, _) = http_get(loopback(port), "/").expect("request");
        assert_eq!(status, 200);
    }
    wait_for("every histogram recorded", Duration::from_secs(30), || {
        let lines = histogram_lines(admin);
        (lines.len() == HISTOGRAMS.len() && lines.iter().all(|(_, v)| v.starts_with("P0(")))
            .then_some(())
    });
}

#[test]
fn latency_histograms_have_envoys_names_buckets_and_formats() {
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    // A short idle timeout closes the upstream connections, for upstream_cx_length_ms.
    let yaml =
        edge_bootstrap(&admin_yaml, port, app.addr, "").replace("    type: STATIC\n", IDLE_CLOSE);
    let proxy = Proxy::start(&yaml, admin, &[]);
    traffic(port, admin);

    let lines = histogram_lines(proxy.admin);
    for (name, summary) in &lines {
        let quantiles: Vec<&str> = summary
            .split(' ')
            .map(|q| q.split('(').next().unwrap_or(""))
            .collect();
        assert_eq!(
            quantiles,
            [
                "P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"
            ],
            "{name}: {summary}"
        );
    }
    let (_, _, json) = http_get(admin, "/stats?format=json&filter=upstream_rq_time").unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let histograms = json["stats"]
        .as_array()
        .and_then(|stats| stats.iter().find_map(|s| s.get("histograms")))
        .expect("a histograms entry");
    assert_eq!(
        histograms["supported_quantiles"],
        serde_json::json!([0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0])
    );
    // The router's dynamic stats also keep the external requests' own histogram.
    let computed = histograms["computed_quantiles"]
        .as_array()
        .expect("computed");
    let names: Vec<&str> = computed.iter().filter_map(|h| h["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "cluster.app.external.upstream_rq_time",
            "cluster.app.upstream_rq_time"
        ]
    );
    assert_eq!(computed[1]["values"].as_array().map(Vec::len), Some(10));
    let (_, _, prometheus) = http_get(admin, "/stats/prometheus").unwrap();
    // Envoy's tags: the cluster's name is a label, not part of the metric's name.
    assert!(prometheus.contains("# TYPE envoy_cluster_upstream_rq_time histogram\n"));
    assert!(prometheus.contains(
        "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"app\",le=\"+Inf\"} 3\n"
    ));
    assert!(
        prometheus.contains("envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"app\"} 3\n")
    );
    assert!(prometheus.contains("envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"app\"} "));
    // Filters and types apply to histograms as to other stats.
    let (_, _, counters) = http_get(admin, "/stats?type=Counters").unwrap();
    assert!(!counters.contains("upstream_rq_time:"));
}

#[test]
fn histogram_names_and_buckets_match_envoys() {
    if !remora_tests::envoy::available_or_skip("histogram_names_and_buckets_match_envoys") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let port = free_port();
        let (admin, admin_yaml) = admin_block();
        let yaml = edge_bootstrap(&admin_yaml, port, app.addr, "")
            .replace("    type: STATIC\n", IDLE_CLOSE);
        let _proxy = start_proxy(envoy, &yaml, admin, port);
        traffic(port, admin);
        let names: BTreeSet<String> = histogram_lines(admin).into_iter().map(|(n, _)| n).collect();
        let bounds = buckets(admin, "envoy_cluster_upstream_rq_time");
        seen.push((names, bounds));
    }
    assert_eq!(seen[0].0, seen[1].0, "histogram names (envoy, remora)");
    assert_eq!(
        seen[0].1, seen[1].1,
        "upstream_rq_time bucket bounds (envoy, remora)"
    );
    assert_eq!(seen[0].1.len(), 20);
}

#[test]
fn access_log_prints_the_trace_id_and_the_attempt_count() {
    let app = EchoServer::start("app", "127.0.0.1");
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = file_access_log(&log, "%TRACE_ID% %UPSTREAM_REQUEST_ATTEMPT_COUNT%")
        + r#"          tracing:
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: app}}
"#;
    let _proxy = Proxy::start(
        &edge_bootstrap(&admin_yaml, port, app.addr, &extra),
        admin,
        &[],
    );
    let (_, _, body) = http_get(loopback(port), "/").unwrap();
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let traceparent = seen["headers"]["traceparent"].as_str().unwrap().to_string();
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();
    let line = wait_for("the access log line", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|text| text.ends_with('\n'))
    });
    assert_eq!(line, format!("{trace_id} 1\n"));
}

/// The same bootstrap under Envoy and Remora, with a `stats_config` of the kinds Istio writes
/// (a fixed tag, a pattern with a lookahead, a stats matcher), and the same requests: every
/// Prometheus series Remora prints for a metric Envoy also prints is in Envoy's output, or (a
/// stat Envoy makes only when first used, like a response class not seen) carries the same
/// labels as one that is; and the counts under them agree.
#[test]
fn prometheus_series_carry_envoys_tags() {
    if !remora_tests::envoy::available_or_skip("prometheus_series_carry_envoys_tags") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    let stats_config = r#"stats_config:
  stats_tags:
  - {tag_name: mesh, fixed_value: blue}
  - tag_name: dotted_cluster
    regex: '^cluster(?=\.).*?\.((.+?\.local)\.)'
  stats_matcher:
    exclusion_list:
      patterns: [{prefix: "cluster.app.circuit_breakers"}]
"#;
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/dotted"}
                route: {cluster: app.ns.svc.local}
              - match: {prefix: "/"}
                route: {cluster: app}
"#;
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let (http_port, tcp_port) = (free_port(), free_port());
        let (admin, admin_yaml) = admin_block();
        let yaml = bootstrap(
            &admin_yaml,
            &[
                common::http_listener("edge", http_port, "", routes),
                common::tcp_listener("raw", tcp_port, "app.ns.svc.local", ""),
            ],
            &[
                static_cluster("app", &[app.addr]),
                static_cluster("app.ns.svc.local", &[app.addr]),
            ],
        ) + stats_config;
        let _proxy = start_proxy(envoy, &yaml, admin, http_port);
        for path in ["/", "/a", "/dotted"] {
            let (status, _, _) = http_get(loopback(http_port), path).expect("request");
            assert_eq!(status, 200);
        }
        let rq_2xx = "envoy_http_downstream_rq_xx{envoy_response_code_class=\"2\",mesh=\"blue\",envoy_http_conn_manager_prefix=\"edge\"}";
        wait_for("requests counted", Duration::from_secs(10), || {
            (prometheus_series(admin).0.get(rq_2xx).map(String::as_str) == Some("3")).then_some(())
        });
        // The two runs' listener ports differ; their labels are compared by role.
        let (series, types) = prometheus_series(admin);
        let series: std::collections::BTreeMap<String, String> = series
            .into_iter()
            .map(|(key, value)| {
                let key = key
                    .replace(&format!("127.0.0.1_{http_port}\""), "127.0.0.1_HTTP\"")
                    .replace(&format!("127.0.0.1_{tcp_port}\""), "127.0.0.1_TCP\"");
                (key, value)
            })
            .collect();
        seen.push((series, types));
    }
    let ((envoy, envoy_types), (remora, remora_types)) = (&seen[0], &seen[1]);
    let metric = |key: &str| key.split(['{', ' ']).next().unwrap_or_default().to_string();
    let label_names = |key: &str| -> Vec<String> {
        key.split(['{', ','])
            .skip(1)
            .filter_map(|label| label.split_once('=').map(|(name, _)| name.to_string()))
            .collect()
    };
    let family_of = |key: &str| {
        let m = metric(key);
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .filter(|f| remora_types.contains(*f))
            .map_or(m.clone(), str::to_string)
    };
    let shared: Vec<&String> = remora
        .keys()
        .filter(|key| envoy_types.contains(&family_of(key)))
        .collect();
    let exact = shared
        .iter()
        .filter(|key| envoy.contains_key(**key))
        .count();
    let unlike: Vec<&&String> = shared
        .iter()
        .filter(|key| {
            !envoy.contains_key(**key)
                && !envoy
                    .keys()
                    .any(|k| metric(k) == metric(key) && label_names(k) == label_names(key))
        })
        .collect();
    assert!(
        unlike.is_empty(),
        "series Envoy labels otherwise: {unlike:#?}"
    );
    assert!(exact >= 60, "only {exact} series printed alike");
    // The tags Remora's names depend on, spelt out.
    for key in [
        "envoy_cluster_upstream_rq_total{mesh=\"blue\",envoy_cluster_name=\"app\"}",
        "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",mesh=\"blue\",envoy_cluster_name=\"app\"}",
        "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",mesh=\"blue\",envoy_cluster_name=\"app\",dotted_cluster=\"app.ns.svc.local\"}",
        "envoy_cluster_upstream_cx_total{mesh=\"blue\",envoy_cluster_name=\"app\",dotted_cluster=\"app.ns.svc.local\"}",
        "envoy_listener_downstream_cx_total{mesh=\"blue\",envoy_listener_address=\"127.0.0.1_TCP\"}",
        "envoy_listener_downstream_cx_total{mesh=\"blue\",envoy_listener_address=\"127.0.0.1_HTTP\"}",
        "envoy_tcp_downstream_cx_total{mesh=\"blue\",envoy_tcp_prefix=\"raw\"}",
    ] {
        assert!(envoy.contains_key(key), "envoy lacks {key}");
        assert!(remora.contains_key(key), "remora lacks {key}");
    }
    for series in [envoy, remora] {
        assert_eq!(
            series["envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",mesh=\"blue\",envoy_cluster_name=\"app\"}"],
            "2"
        );
        // Excluded by the stats matcher.
        assert!(
            !series
                .keys()
                .any(|k| k.contains("circuit_breakers") && k.contains("_name=\"app\"}"))
        );
    }
}

/// A cluster's `alt_stat_name` names its stats and what `%UPSTREAM_CLUSTER%` prints, while
/// `%UPSTREAM_CLUSTER_RAW%` prints its name: the same under Envoy and Remora.
#[test]
fn alt_stat_name_names_the_stats_and_the_logged_cluster_as_in_envoy() {
    let app = EchoServer::start("app", "127.0.0.1");
    let run = |envoy: bool| {
        let port = free_port();
        let (admin, admin_yaml) = admin_block();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let extra = file_access_log(&log, "%UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW%");
        let yaml = edge_bootstrap(&admin_yaml, port, app.addr, &extra).replace(
            "  - name: app\n",
            "  - name: app\n    alt_stat_name: app_seen;\n",
        );
        assert!(yaml.contains("alt_stat_name"), "{yaml}");
        let _proxy = start_proxy(envoy, &yaml, admin, port);
        let (status, _, _) = http_get(loopback(port), "/").unwrap();
        assert_eq!(status, 200);
        let line = wait_for("the access log line", Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| text.ends_with('\n'))
        });
        let (_, _, stats) = http_get(admin, "/stats?filter=upstream_rq_total").unwrap();
        (line, stats)
    };
    let remora = run(false);
    assert_eq!(remora.0, "app_seen; app\n");
    assert!(
        remora
            .1
            .contains("cluster.app_seen;.upstream_rq_total: 1\n"),
        "{}",
        remora.1
    );
    assert!(!remora.1.contains("cluster.app.upstream_rq_total"));
    if remora_tests::envoy::available_or_skip("the Envoy half of the alt_stat_name test") {
        let envoy = run(true);
        assert_eq!(envoy.0, remora.0);
        assert!(
            envoy.1.contains("cluster.app_seen;.upstream_rq_total: 1\n"),
            "{}",
            envoy.1
        );
    }
}

/// The bootstrap's (deprecated) `tracing.http`, as Istio's bootstrap writes it, traces the
/// connection managers whose `tracing` names no tracer: their requests go upstream with B3
/// headers, sampled, under Envoy and Remora alike; without it they carry none.
#[test]
fn the_bootstrap_tracer_serves_connection_managers_that_name_none() {
    let app = EchoServer::start("app", "127.0.0.1");
    let collector = common::closed_port();
    let bootstrap_tracing = "tracing:\n  http:\n    name: envoy.tracers.zipkin\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig\n      collector_cluster: zipkin\n      collector_endpoint: /api/v2/spans\n      collector_endpoint_version: HTTP_JSON\n";
    let seen = |envoy: bool, with_tracer: bool| {
        let port = free_port();
        let (admin, admin_yaml) = admin_block();
        let yaml = bootstrap(
            &admin_yaml,
            &[common::http_listener(
                "edge",
                port,
                "          tracing: {random_sampling: {value: 100}}\n",
                &catch_all("app", "5s"),
            )],
            &[
                static_cluster("app", &[app.addr]),
                static_cluster("zipkin", &[collector]),
            ],
        ) + if with_tracer { bootstrap_tracing } else { "" };
        let _proxy = start_proxy(envoy, &yaml, admin, port);
        let (status, _, body) = http_get(loopback(port), "/").unwrap();
        assert_eq!(status, 200);
        let headers = common::echo_json(&body)["headers"].clone();
        (
            headers["x-b3-traceid"].as_str().map(str::len),
            headers["x-b3-sampled"].as_str().map(str::to_string),
        )
    };
    let remora = [seen(false, true), seen(false, false)];
    // Zipkin's trace ids are 64-bit unless `trace_id_128bit`.
    assert_eq!(
        remora[0],
        (Some(16), Some("1".to_string())),
        "with the tracer"
    );
    assert_eq!(remora[1], (None, None), "without");
    if remora_tests::envoy::available_or_skip("the Envoy half of the bootstrap tracer test") {
        assert_eq!(
            [seen(true, true), seen(true, false)],
            remora,
            "envoy, remora"
        );
    }
}

/// `count` requests to the listener on `port`, each on a connection of its own, all answered
/// 200.
fn requests(port: u16, count: usize) {
    for _ in 0..count {
        let (status, _, _) = http_get(loopback(port), "/").expect("request");
        assert_eq!(status, 200);
    }
}

/// A statsd collector on loopback: every line it received, a datagram's lines split apart.
struct Collector {
    addr: std::net::SocketAddr,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    datagrams: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Collector {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a collector");
        let addr = socket.local_addr().expect("its address");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let datagrams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (into_lines, into_datagrams) = (lines.clone(), datagrams.clone());
        // The thread ends with the test process; a blocked receive holds nothing else.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                into_lines
                    .lock()
                    .unwrap()
                    .extend(text.split('\n').map(str::to_string));
                into_datagrams.lock().unwrap().push(text);
            }
        });
        Collector {
            addr,
            lines,
            datagrams,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The sum of the values of the lines `NAME:VALUE|KIND` (a counter's changes add up to its
    /// count; a timer's lines, `KIND` `ms`, count 1 each). `KIND` may go on with the tags a
    /// line must have; without them, it matches any.
    fn total(&self, name: &str, kind: &str) -> u64 {
        self.lines()
            .iter()
            .filter_map(|line| {
                let (head, rest) = line.split_once(':')?;
                let (value, tail) = rest.split_once('|')?;
                (head == name && (tail == kind || tail.starts_with(&format!("{kind}|")))).then(
                    || {
                        if kind.starts_with("ms") {
                            1
                        } else {
                            value.parse().unwrap_or(0)
                        }
                    },
                )
            })
            .sum()
    }
}

/// The bootstrap of [`edge_bootstrap`] with a statsd sink (prefix `mesh`) and a DogStatsD one
/// (default prefix, lines batched up to 512 bytes), flushed as the `flush` lines say
/// (`stats_flush_interval: 1s\n`, say).
fn sink_bootstrap(
    admin_yaml: &str,
    port: u16,
    app: std::net::SocketAddr,
    statsd: &Collector,
    dog: &Collector,
    flush: &str,
) -> String {
    edge_bootstrap(admin_yaml, port, app, "")
        + flush
        + &format!(
            r#"stats_sinks:
- name: envoy.stat_sinks.statsd
  typed_config:
    "@type": type.googleapis.com/envoy.config.metrics.v3.StatsdSink
    address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}
    prefix: mesh
- name: envoy.stat_sinks.dog_statsd
  typed_config:
    "@type": type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink
    address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}
    max_bytes_per_datagram: 512
"#,
            statsd.addr.port(),
            dog.addr.port()
        )
}

/// Envoy (`envoy`) or Remora on [`sink_bootstrap`] with its two collectors, after `count`
/// requests to its listener.
struct SinkRun {
    statsd: Collector,
    dog: Collector,
    admin: std::net::SocketAddr,
    port: u16,
    process: remora_tests::process::ChildGuard,
    proxy: &'static str,
    _keep: Box<dyn std::any::Any>,
}

fn sink_run(envoy: bool, app: std::net::SocketAddr, flush: &str, count: usize) -> SinkRun {
    let (statsd, dog) = (Collector::start(), Collector::start());
    let port = free_port();
    let (admin, admin_yaml) = admin_block();
    let yaml = sink_bootstrap(&admin_yaml, port, app, &statsd, &dog, flush);
    let (process, _keep) = start_signalled(envoy, &yaml, admin, port);
    requests(port, count);
    SinkRun {
        statsd,
        dog,
        admin,
        port,
        process,
        proxy: if envoy { "envoy" } else { "remora" },
        _keep,
    }
}

/// Starts Envoy (`envoy`) or Remora on `yaml` and waits for its listener on `port`; the
/// process, to signal, and what must live as long as it.
fn start_signalled(
    envoy: bool,
    yaml: &str,
    admin: std::net::SocketAddr,
    port: u16,
) -> (remora_tests::process::ChildGuard, Box<dyn std::any::Any>) {
    let (dir, file) = common::write_config(yaml);
    let process = if envoy {
        remora_tests::envoy::Envoy::start(&file, admin, &[]).process
    } else {
        // One worker, as Envoy here: a second would add `worker_1` lines Envoy has not.
        Proxy::start(yaml, admin, &["--drain-time-s", "1", "--concurrency", "1"]).process
    };
    wait_for("the listener", Duration::from_secs(30), || {
        std::net::TcpStream::connect(loopback(port)).ok()
    });
    (process, Box::new(dir))
}

/// statsd and DogStatsD collectors get from Remora the lines Envoy sends them for the same
/// bootstrap and traffic: counters as changes per flush, gauges as values, each histogram value
/// as a timer line when recorded, under the full name (statsd) or the tag-extracted name with
/// Envoy's tags (DogStatsD).
#[test]
fn stats_sinks_get_the_lines_envoy_sends() {
    if !remora_tests::envoy::available_or_skip("stats_sinks_get_the_lines_envoy_sends") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let SinkRun {
            statsd,
            dog,
            port,
            proxy,
            ..
        } = &sink_run(envoy, app.addr, "stats_flush_interval: 0.2s\n", 3);
        let totals = || {
            [
                statsd.total("mesh.cluster.app.upstream_rq_total", "c"),
                statsd.total("mesh.http.edge.downstream_rq_2xx", "c"),
                statsd.total("mesh.cluster.app.upstream_rq_time", "ms"),
                statsd.total("mesh.http.edge.downstream_rq_time", "ms"),
                dog.total("envoy.cluster.upstream_rq_total", "c"),
                dog.total(
                    "envoy.http.downstream_rq_time",
                    "ms|#envoy.http_conn_manager_prefix:edge",
                ),
            ]
        };
        let arrived = remora_tests::poll_until(Duration::from_secs(20), || {
            (totals() == [3; 6]).then_some(())
        });
        assert!(
            arrived.is_some(),
            "{proxy}: counts and timers at the collectors: {:?}, want all 3\n{:#?}",
            totals(),
            statsd.lines()
        );
        // The same counts at later flushes: changes of zero, not the totals again.
        let flushes = statsd.total("mesh.cluster.app.membership_total", "g");
        wait_for("two more flushes", Duration::from_secs(20), || {
            (statsd.total("mesh.cluster.app.membership_total", "g") >= flushes + 2).then_some(())
        });
        assert_eq!(statsd.total("mesh.cluster.app.upstream_rq_total", "c"), 3);
        let port_name = format!("127.0.0.1_{port}");
        let normal = |lines: Vec<String>| -> Vec<String> {
            lines
                .into_iter()
                .map(|line| line.replace(&port_name, "127.0.0.1_PORT"))
                .collect()
        };
        let datagrams = dog.datagrams.lock().unwrap().clone();
        assert!(
            datagrams
                .iter()
                .all(|d| d.len() <= 512 && !d.ends_with('\n')),
            "{proxy}: a DogStatsD datagram over its bound"
        );
        assert!(
            datagrams.iter().any(|d| d.contains('\n')),
            "{proxy}: no flushed lines shared a datagram"
        );
        seen.push((normal(statsd.lines()), normal(dog.lines())));
    }
    let ((envoy_statsd, envoy_dog), (remora_statsd, remora_dog)) = (&seen[0], &seen[1]);
    // A line without its value: the name, its kind and its tags.
    let shape = |line: &str| -> Option<String> {
        let (head, rest) = line.split_once(':')?;
        let (value, tail) = rest.split_once('|')?;
        value.parse::<u64>().ok()?;
        Some(format!("{head}|{tail}"))
    };
    for (lines, sink) in [(remora_statsd, "statsd"), (remora_dog, "DogStatsD")] {
        let unreadable: Vec<&String> = lines.iter().filter(|l| shape(l).is_none()).collect();
        assert!(unreadable.is_empty(), "{sink}: {unreadable:?}");
    }
    for (envoy, remora, sink, least) in [
        (envoy_statsd, remora_statsd, "statsd", 25),
        (envoy_dog, remora_dog, "DogStatsD", 25),
    ] {
        let envoy: BTreeSet<String> = envoy.iter().filter_map(|l| shape(l)).collect();
        let remora: BTreeSet<String> = remora.iter().filter_map(|l| shape(l)).collect();
        // Name and kind as Envoy sends them, for the stats both have: the same tags.
        let name_kind = |s: &String| s.split("|#").next().unwrap_or_default().to_string();
        let envoy_names: BTreeSet<String> = envoy.iter().map(name_kind).collect();
        let shared: Vec<&String> = remora
            .iter()
            .filter(|s| envoy_names.contains(&name_kind(s)))
            .collect();
        let unlike: Vec<&&String> = shared.iter().filter(|s| !envoy.contains(**s)).collect();
        assert!(
            unlike.is_empty(),
            "{sink}: tagged otherwise than by Envoy: {unlike:#?}"
        );
        assert!(
            shared.len() >= least,
            "{sink}: only {} lines alike: {shared:#?}",
            shared.len()
        );
    }
    for line in [
        "mesh.cluster.app.upstream_rq_total|c",
        "mesh.cluster.app.membership_total|g",
        "mesh.cluster.app.upstream_rq_time|ms",
        "mesh.listener.127.0.0.1_PORT.downstream_cx_total|c",
    ] {
        let has = |lines: &Vec<String>| lines.iter().any(|l| shape(l).as_deref() == Some(line));
        assert!(has(envoy_statsd), "envoy lacks {line}");
        assert!(has(remora_statsd), "remora lacks {line}");
    }
    for line in [
        "envoy.cluster.upstream_rq_xx|c|#envoy.response_code_class:2,envoy.cluster_name:app",
        "envoy.cluster.upstream_rq_time|ms|#envoy.cluster_name:app",
        "envoy.http.downstream_rq_time|ms|#envoy.http_conn_manager_prefix:edge",
        "envoy.listener.downstream_cx_total|c|#envoy.listener_address:127.0.0.1_PORT",
    ] {
        let has = |lines: &Vec<String>| lines.iter().any(|l| shape(l).as_deref() == Some(line));
        assert!(has(envoy_dog), "envoy lacks {line}");
        assert!(has(remora_dog), "remora lacks {line}");
    }
}

/// Counts made after the last interval's flush still reach the collector: both proxies flush
/// once more when they stop.
#[test]
fn stats_sinks_get_a_last_flush_at_shutdown() {
    if !remora_tests::envoy::available_or_skip("stats_sinks_get_a_last_flush_at_shutdown") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    for envoy in [true, false] {
        // No flush by interval while the test runs.
        let run = &mut sink_run(envoy, app.addr, "stats_flush_interval: 120s\n", 2);
        let (statsd, dog, proxy) = (&run.statsd, &run.dog, run.proxy);
        let process = &mut run.process;
        assert_eq!(
            statsd.total("mesh.cluster.app.upstream_rq_total", "c"),
            0,
            "{proxy} flushed before the interval"
        );
        process.signal("TERM");
        let status = process.wait_timeout(Duration::from_secs(20));
        assert!(status.is_some(), "{proxy} did not exit on SIGTERM");
        wait_for(
            &format!("{proxy}'s last flush"),
            Duration::from_secs(10),
            || {
                (statsd.total("mesh.cluster.app.upstream_rq_total", "c") == 2
                    && dog.total("envoy.cluster.upstream_rq_total", "c") == 2)
                    .then_some(())
            },
        );
    }
}

/// What a metrics service got from one proxy: per flush, its stream and families.
type Flushes = Vec<(
    usize,
    bool,
    Vec<xds_api::io::prometheus::client::MetricFamily>,
)>;

fn flushes(server: &metrics_service::MetricsServer) -> Flushes {
    server
        .messages()
        .into_iter()
        .map(|(stream, message)| (stream, message.identifier.is_some(), message.envoy_metrics))
        .collect()
}

/// The value of family `name` of `kind` in one flush (a counter's or gauge's value, a summary's
/// or histogram's sample count).
fn family_value(
    families: &[xds_api::io::prometheus::client::MetricFamily],
    name: &str,
    kind: xds_api::io::prometheus::client::MetricType,
) -> Option<f64> {
    let family = families
        .iter()
        .find(|f| f.name() == name && f.r#type() == kind)?;
    let metric = family.metric.first()?;
    metric
        .counter
        .map(|c| c.value())
        .or(metric.gauge.map(|g| g.value()))
        .or(metric.summary.as_ref().map(|s| s.sample_count() as f64))
        .or(metric.histogram.as_ref().map(|h| h.sample_count() as f64))
}

/// The metrics service sink under Envoy and Remora, from one bootstrap with two of them (the
/// defaults; and tags as labels with counters as deltas): the node in each stream's first
/// message only; counters, gauges, and per histogram a summary and a histogram family of the
/// flush's interval (so a later flush without traffic has no samples), with Envoy's quantiles,
/// bucket bounds and names.
#[test]
fn the_metrics_service_gets_the_families_envoy_sends() {
    use xds_api::io::prometheus::client::MetricType;
    if !remora_tests::envoy::available_or_skip("the_metrics_service_gets_the_families_envoy_sends")
    {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let (plain, tagged) = (
            metrics_service::MetricsServer::start(),
            metrics_service::MetricsServer::start(),
        );
        let port = free_port();
        let (admin, admin_yaml) = admin_block();
        let sink = |cluster: &str, extra: &str| {
            format!(
                "- name: envoy.stat_sinks.metrics_service\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig\n    transport_api_version: V3\n    grpc_service: {{envoy_grpc: {{cluster_name: {cluster}}}}}\n{extra}"
            )
        };
        let yaml = format!(
            "node: {{id: sidecar-1, cluster: mesh}}\n{}stats_flush_interval: 0.3s\nstats_sinks:\n{}{}",
            bootstrap(
                &admin_yaml,
                &[common::http_listener(
                    "edge",
                    port,
                    "",
                    &catch_all("app", "5s")
                )],
                &[
                    static_cluster("app", &[app.addr]),
                    common::http2_cluster("plain", plain.addr),
                    common::http2_cluster("tagged", tagged.addr),
                ],
            ),
            sink("plain", ""),
            sink(
                "tagged",
                "    emit_tags_as_labels: true\n    report_counters_as_deltas: true\n",
            ),
        );
        let _proxy = start_proxy(envoy, &yaml, admin, port);
        requests(port, 3);
        let proxy = if envoy { "envoy" } else { "remora" };
        // Every request counted, and a flush after that without new samples.
        wait_for(
            &format!("{proxy}: the requests, then a quiet flush"),
            Duration::from_secs(20),
            || {
                let flushes = flushes(&plain);
                let counted = flushes.iter().position(|(_, _, f)| {
                    family_value(f, "cluster.app.upstream_rq_total", MetricType::Counter)
                        == Some(3.0)
                        && flushes
                            .iter()
                            .map(|(_, _, f)| {
                                family_value(
                                    f,
                                    "cluster.app.upstream_rq_time",
                                    MetricType::Histogram,
                                )
                                .unwrap_or(0.0)
                            })
                            .sum::<f64>()
                            == 3.0
                })?;
                (flushes.len() > counted + 1 && tagged.messages().len() > counted + 1).then_some(())
            },
        );
        seen.push((flushes(&plain), flushes(&tagged)));
    }
    for ((plain, tagged), proxy) in seen.iter().zip(["envoy", "remora"]) {
        for flushes in [plain, tagged] {
            let identified: Vec<(usize, bool)> = flushes.iter().map(|(s, i, _)| (*s, *i)).collect();
            assert!(
                identified[0] == (1, true) && identified[1..].iter().all(|f| *f == (1, false)),
                "{proxy}: {identified:?}"
            );
        }
        // Summaries and histograms are of the interval: they add up to the requests, and the
        // last flush (after the traffic) has none.
        for kind in [MetricType::Summary, MetricType::Histogram] {
            let total: f64 = plain
                .iter()
                .filter_map(|(_, _, f)| family_value(f, "http.edge.downstream_rq_time", kind))
                .sum();
            assert_eq!(total, 3.0, "{proxy}: {kind:?}");
            let last = &plain.last().unwrap().2;
            assert_eq!(
                family_value(last, "http.edge.downstream_rq_time", kind),
                Some(0.0),
                "{proxy}"
            );
        }
        // Tags as labels, counters as their changes.
        let changes: f64 = tagged
            .iter()
            .filter_map(|(_, _, families)| {
                let family = families.iter().find(|f| {
                    f.name() == "cluster.upstream_rq_total"
                        && f.metric[0]
                            .label
                            .iter()
                            .any(|l| l.name() == "envoy.cluster_name" && l.value() == "app")
                })?;
                family.metric[0].counter.map(|c| c.value())
            })
            .sum();
        assert_eq!(changes, 3.0, "{proxy}");
    }
    // The shapes Envoy sends, for the families both proxies send.
    let shape = |families: &[xds_api::io::prometheus::client::MetricFamily]| {
        families
            .iter()
            .map(|f| {
                let metric = &f.metric[0];
                let labels: Vec<String> = metric
                    .label
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect();
                let quantiles: Vec<f64> = metric
                    .summary
                    .iter()
                    .flat_map(|s| s.quantile.iter().map(|q| q.quantile()))
                    .collect();
                let bounds: Vec<f64> = metric
                    .histogram
                    .iter()
                    .flat_map(|h| h.bucket.iter().map(|b| b.upper_bound()))
                    .collect();
                (
                    (f.name().to_string(), f.r#type, labels),
                    format!("{quantiles:?} {bounds:?}"),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    for (pick, least) in [(0usize, 15usize), (1, 15)] {
        let envoy = shape(
            &if pick == 0 { &seen[0].0 } else { &seen[0].1 }
                .last()
                .unwrap()
                .2,
        );
        let remora = shape(
            &if pick == 0 { &seen[1].0 } else { &seen[1].1 }
                .last()
                .unwrap()
                .2,
        );
        let shared: Vec<_> = remora.keys().filter(|k| envoy.contains_key(*k)).collect();
        let unlike: Vec<_> = shared
            .iter()
            .filter(|k| envoy[**k] != remora[**k])
            .map(|k| (k, &envoy[*k], &remora[*k]))
            .collect();
        assert!(unlike.is_empty(), "sink {pick}: {unlike:#?}");
        assert!(
            shared.len() >= least,
            "sink {pick}: only {} families alike",
            shared.len()
        );
    }
}

/// `stats_eviction_interval` evicts only stats that extensions create as evictable; the
/// stats of clusters, listeners and connection managers stay, with their counts, through
/// several eviction rounds, under Envoy as under Remora.
#[test]
fn stats_eviction_leaves_the_proxys_own_stats() {
    if !remora_tests::envoy::available_or_skip("stats_eviction_leaves_the_proxys_own_stats") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    for envoy in [true, false] {
        let SinkRun {
            statsd,
            admin,
            proxy,
            ..
        } = &sink_run(
            envoy,
            app.addr,
            "stats_flush_interval: 0.2s\nstats_eviction_interval: 0.4s\n",
            3,
        );
        let admin = *admin;
        // Flushes are counted by a gauge every flush carries; six make three eviction rounds.
        let flushes = || statsd.total("mesh.cluster.app.membership_total", "g");
        let before = flushes();
        wait_for(
            &format!("{proxy}: three eviction rounds"),
            Duration::from_secs(20),
            || (flushes() >= before + 6).then_some(()),
        );
        for name in [
            "cluster.app.upstream_rq_total",
            "http.edge.downstream_rq_2xx",
        ] {
            assert_eq!(
                remora_tests::admin_stat(admin, name),
                Some(3),
                "{proxy}: {name}"
            );
        }
        let (_, _, histograms) = http_get(admin, "/stats?filter=upstream_rq_time").expect("stats");
        assert!(
            histograms.contains("cluster.app.upstream_rq_time: P0("),
            "{proxy}: {histograms}"
        );
    }
}

/// `histogram_bucket_settings`: the first rule whose matcher takes a histogram's full name gives
/// its buckets, sorted (a prefix on `envoy` takes none of the proxy's own names); other
/// histograms keep the default ones. Prometheus shows the same `le` bounds under both proxies.
#[test]
fn histogram_bucket_settings_pick_buckets_as_in_envoy() {
    if !remora_tests::envoy::available_or_skip("histogram_bucket_settings_pick_buckets_as_in_envoy")
    {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    let settings = "stats_config:
  histogram_bucket_settings:
  - match: {exact: cluster.app.upstream_rq_time}
    buckets: [3, 1, 2]
  - match: {prefix: envoy}
    buckets: [7, 8]
  - match: {suffix: downstream_rq_time}
    buckets: [4, 400]
";
    let metrics = [
        "envoy_cluster_upstream_rq_time",
        "envoy_http_downstream_rq_time",
        "envoy_cluster_upstream_cx_connect_ms",
    ];
    let mut seen = Vec::new();
    for envoy in [true, false] {
        let port = free_port();
        let (admin, admin_yaml) = admin_block();
        // Upstream connections closed when idle, so every histogram gets values.
        let yaml = edge_bootstrap(&admin_yaml, port, app.addr, "")
            .replace("    type: STATIC\n", IDLE_CLOSE)
            + settings;
        let _proxy = start_proxy(envoy, &yaml, admin, port);
        traffic(port, admin);
        let (_, _, body) = http_get(admin, "/stats/prometheus").expect("prometheus");
        assert!(
            body.contains(
                "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"app\",le=\"+Inf\"} 3"
            ),
            "{body}"
        );
        // The edge connection manager's: Remora keeps no stats of the admin's.
        seen.push(metrics.map(|metric| {
            body.lines()
                .filter(|line| line.starts_with(&format!("{metric}_bucket{{")))
                .filter(|line| !line.contains("prefix=\"admin\""))
                .filter_map(|line| {
                    line.split("le=\"")
                        .nth(1)?
                        .split('"')
                        .next()
                        .map(str::to_string)
                })
                .collect::<Vec<String>>()
        }));
    }
    assert_eq!(seen[0], seen[1], "envoy, remora");
    let edge = |bounds: &[&str]| -> Vec<String> { bounds.iter().map(|b| b.to_string()).collect() };
    assert_eq!(seen[1][0], edge(&["1", "2", "3", "+Inf"]));
    assert_eq!(seen[1][1], edge(&["4", "400", "+Inf"]));
    assert_eq!(seen[1][2].len(), 20, "the default bounds");
}

/// `stats_flush_on_admin`: no timer flushes the sinks; reading admin's stats does, each time,
/// under Envoy as under Remora.
#[test]
fn stats_flush_on_admin_flushes_when_stats_are_read() {
    if !remora_tests::envoy::available_or_skip("stats_flush_on_admin_flushes_when_stats_are_read") {
        return;
    }
    let app = EchoServer::start("app", "127.0.0.1");
    for envoy in [true, false] {
        let SinkRun {
            statsd,
            admin,
            proxy,
            ..
        } = &sink_run(envoy, app.addr, "stats_flush_on_admin: true\n", 2);
        let admin = *admin;
        let total = || statsd.total("mesh.cluster.app.upstream_rq_total", "c");
        assert_eq!(total(), 0, "{proxy}: flushed before the stats were read");
        for (read, path) in [(1, "/stats"), (2, "/stats/prometheus")] {
            http_get(admin, path).expect("stats");
            let flushes = || statsd.total("mesh.cluster.app.membership_total", "g");
            wait_for(
                &format!("{proxy}: flush {read}, on reading {path}"),
                Duration::from_secs(10),
                || (flushes() >= read).then_some(()),
            );
            assert_eq!(total(), 2, "{proxy}");
        }
    }
}
