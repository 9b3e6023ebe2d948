//! Retries, per-try timeouts, the retry circuit breaker, request mirroring and `grpc-timeout`,
//! compared with Envoy: the same bootstrap runs through real Envoy 1.40 and then through
//! remora-proxy, against scripted upstreams that fail the way the scenario needs (a status, a
//! delay, a reset, a gRPC status). For each request the client's status, the attempt count
//! and the response flags in the access log must match, and so must what each upstream saw
//! (how many attempts, their `x-envoy-attempt-count`, body lengths, `Host`) and the cluster's
//! retry stats.
//!
//! Skipped (with a message) when `envoy` is not installed; CI installs it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Proxy, loopback};
use remora_tests::scripted::{Scripted, Step};
use remora_tests::{envoy, free_port, http_request, wait_for_port};

/// One request of a scenario.
struct Req {
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
}

/// An answer slower than any timeout in these scenarios.
const SLOW: Step = Step::Delayed(Duration::from_secs(4), 200);

const GET: Req = Req {
    method: "GET",
    path: "/",
    headers: &[],
    body: "",
};

/// A scenario: the route action's extra YAML, the cluster's extra YAML, the upstreams'
/// scripts (the cluster has one endpoint per script, plus `dead_hosts` closed ports), an
/// optional mirror cluster (one more scripted upstream) and the requests.
struct Scenario {
    name: &'static str,
    route: &'static str,
    vhost: &'static str,
    /// More YAML for the connection manager.
    hcm: &'static str,
    cluster: &'static str,
    scripts: &'static [&'static [Step]],
    dead_hosts: usize,
    /// Dead hosts in priority 0 and the scripted ones in priority 1 (else all in priority 0).
    dead_in_priority_0: bool,
    mirror: Option<&'static [Step]>,
    requests: &'static [Req],
    stats: &'static [&'static str],
    /// What of the observations is compared (all of it, unless a scenario depends on
    /// where a load balancer starts).
    compare: fn(Observed) -> Observed,
}

const BASE: Scenario = Scenario {
    name: "",
    route: "",
    vhost: "",
    hcm: "",
    cluster: "",
    scripts: &[],
    dead_hosts: 0,
    dead_in_priority_0: false,
    mirror: None,
    requests: &[GET],
    stats: &[
        "upstream_rq_retry",
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_per_try_timeout",
    ],
    compare: |observed| observed,
};

/// What a client, the upstreams and the stats saw.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// Per request: status, `x-envoy-attempt-count` and `grpc-status` of the response, body
    /// if not JSON.
    responses: Vec<(u16, Option<String>, Option<String>, String)>,
    /// Per upstream: per request it saw, (attempt count header, body length, host).
    upstreams: Vec<Vec<(Option<String>, usize, String)>>,
    mirror: Vec<(usize, String)>,
    /// Access log lines: the response flags.
    flags: Vec<String>,
    stats: Vec<(String, u64)>,
}

fn bootstrap(s: &Scenario, upstreams: &[u16], mirror: Option<u16>, dead: &[u16]) -> String {
    let endpoint = |port: &u16| {
        format!(
            "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}\n"
        )
    };
    let endpoints: String = if s.dead_in_priority_0 {
        format!(
            "{}      - priority: 1\n        lb_endpoints:\n{}",
            dead.iter().map(endpoint).collect::<String>(),
            upstreams.iter().map(endpoint).collect::<String>()
        )
    } else {
        upstreams.iter().chain(dead).map(endpoint).collect()
    };
    let mirror_cluster = mirror
        .map(|port| {
            format!(
                "  - name: m\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: m\n      endpoints:\n      - lb_endpoints:\n{}",
                endpoint(&port)
            )
        })
        .unwrap_or_default();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ${{ADMIN_PORT}}}}}}
static_resources:
  clusters:
  - name: c
    connect_timeout: 1s
    type: STATIC
{cluster}    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
{endpoints}{mirror_cluster}  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: ${{LISTENER_PORT}}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
{hcm}          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: ${{LOG}}
              log_format: {{text_format_source: {{inline_string: "%RESPONSE_FLAGS%\n"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              include_attempt_count_in_response: true
{vhost}              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: c
{route}"#,
        cluster = s.cluster,
        hcm = s.hcm,
        vhost = s.vhost,
        route = s.route,
    )
}

fn observe(
    listener: std::net::SocketAddr,
    s: &Scenario,
    upstreams: &[Scripted],
    mirror: Option<&Scripted>,
    log: &Path,
    stat: &dyn Fn(&str) -> u64,
) -> Observed {
    let mut responses = Vec::new();
    for req in s.requests {
        let (status, head, body) =
            http_request(listener, req.method, req.path, req.headers, req.body).expect("request");
        let header = |wanted: &str| {
            head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case(wanted)
                    .then(|| value.trim().to_string())
            })
        };
        let body = if body.starts_with('{') {
            String::new()
        } else {
            body
        };
        responses.push((
            status,
            header("x-envoy-attempt-count"),
            header("grpc-status"),
            body,
        ));
    }
    let seen = |upstream: &Scripted| -> Vec<(Option<String>, usize, String)> {
        upstream
            .seen()
            .into_iter()
            .map(|seen| {
                let header = |name: &str| {
                    seen.headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                (
                    header("x-envoy-attempt-count"),
                    seen.body_len,
                    header("host").unwrap_or_default(),
                )
            })
            .collect()
    };
    // The mirror's copies arrive on their own time.
    let mirror = match mirror {
        Some(upstream) => {
            let wanted = s.requests.len();
            remora_tests::wait_for("mirrored copies", Duration::from_secs(20), || {
                (upstream.seen().len() >= wanted).then_some(())
            });
            seen(upstream)
                .into_iter()
                .map(|(_, len, host)| (len, host))
                .collect()
        }
        None => Vec::new(),
    };
    // Access log lines are written when responses end, Envoy's on a flush timer.
    let flags = remora_tests::wait_for("access log lines", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= s.requests.len()).then_some(lines)
    });
    Observed {
        responses,
        upstreams: upstreams.iter().map(seen).collect(),
        mirror,
        flags,
        stats: s
            .stats
            .iter()
            .map(|name| {
                let full = if name.contains('.') {
                    name.to_string()
                } else {
                    format!("cluster.c.{name}")
                };
                (name.to_string(), stat(&full))
            })
            .collect(),
    }
}

fn run(s: Scenario) {
    if !envoy::available_or_skip(s.name) {
        return;
    }
    let upstreams: Vec<Scripted> = s
        .scripts
        .iter()
        .enumerate()
        .map(|(i, script)| Scripted::start(&format!("u{i}"), script))
        .collect();
    let mirror = s.mirror.map(|script| Scripted::start("m", script));
    // Closed ports: bound, then released, so nothing listens there.
    let dead: Vec<u16> = (0..s.dead_hosts).map(|_| free_port()).collect();
    let ports: Vec<u16> = upstreams.iter().map(|u| u.addr.port()).collect();
    let template = bootstrap(&s, &ports, mirror.as_ref().map(|m| m.addr.port()), &dead);
    let dir = tempfile::tempdir().expect("temp dir");
    let admin_port = free_port();
    let listener_port = free_port();
    let envoy_log = dir.path().join("envoy.log");
    let remora_log = dir.path().join("remora.log");
    let write = |log: &Path, file: &str| {
        let text = template
            .replace("${ADMIN_PORT}", &admin_port.to_string())
            .replace("${LISTENER_PORT}", &listener_port.to_string())
            .replace("${LOG}", &log.display().to_string());
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write bootstrap");
        path
    };
    let envoy_file = write(&envoy_log, "envoy.yaml");
    let remora_file = write(&remora_log, "remora.yaml");
    envoy::validate(&envoy_file).unwrap_or_else(|e| panic!("envoy rejects {}: {e}", s.name));
    let admin = loopback(admin_port);
    let listener = loopback(listener_port);
    let restart = || {
        for (upstream, script) in upstreams.iter().zip(s.scripts) {
            upstream.reset(script);
        }
        if let (Some(upstream), Some(script)) = (&mirror, s.mirror) {
            upstream.reset(script);
        }
    };

    let from_envoy = {
        // Envoy writes access logs out every 10 s unless told otherwise.
        let proxy = envoy::Envoy::start(&envoy_file, admin, &["--file-flush-interval-msec", "50"]);
        wait_for_port(listener, Duration::from_secs(20));
        observe(
            listener,
            &s,
            &upstreams,
            mirror.as_ref(),
            &envoy_log,
            &|name| proxy.stat(name).unwrap_or(0),
        )
    };
    restart();
    let from_remora = {
        let proxy = Proxy::start_file(&remora_file, admin, &["--concurrency", "1"]);
        wait_for_port(listener, Duration::from_secs(20));
        observe(
            listener,
            &s,
            &upstreams,
            mirror.as_ref(),
            &remora_log,
            &|name| proxy.stat(name),
        )
    };
    let (from_remora, from_envoy) = ((s.compare)(from_remora), (s.compare)(from_envoy));
    assert_eq!(
        from_remora, from_envoy,
        "scenario {}: remora (left) vs envoy (right)",
        s.name
    );
    eprintln!("{}: identical to Envoy: {from_envoy:?}", s.name);
}

#[test]
fn failed_statuses_are_retried_until_one_succeeds() {
    run(Scenario {
        name: "5xx retried",
        route: "                  retry_policy: {retry_on: 5xx, num_retries: 2}\n",
        scripts: &[&[Step::Status(503), Step::Status(500), Step::Status(200)]],
        ..BASE
    });
}

#[test]
fn retries_stop_at_num_retries_with_the_last_answer_and_urx() {
    run(Scenario {
        name: "limit exceeded",
        route: "                  retry_policy: {retry_on: gateway-error, num_retries: 1}\n",
        scripts: &[&[Step::Status(503), Step::Status(502), Step::Status(200)]],
        ..BASE
    });
}

#[test]
fn only_the_conditions_named_are_retried() {
    run(Scenario {
        name: "retriable status codes, then a 500 gateway-error does not cover",
        route: "                  retry_policy: {retry_on: \"retriable-status-codes,gateway-error,retriable-4xx\", num_retries: 5, retriable_status_codes: [418]}\n",
        scripts: &[&[
            Step::Status(418),
            Step::Status(409),
            Step::Status(500),
            Step::Status(200),
        ]],
        ..BASE
    });
}

#[test]
fn a_per_try_timeout_cuts_one_attempt_and_the_next_one_answers() {
    run(Scenario {
        name: "per-try timeout",
        route: "                  timeout: 10s\n                  retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 0.3s}\n",
        scripts: &[&[SLOW, Step::Status(200)]],
        ..BASE
    });
}

#[test]
fn resets_and_connect_failures_are_retried_on_another_host() {
    run(Scenario {
        name: "reset",
        route: "                  retry_policy: {retry_on: reset, num_retries: 1}\n",
        scripts: &[&[Step::Reset, Step::Status(200)]],
        ..BASE
    });
    run(Scenario {
        name: "connect failure with previous_hosts",
        route: "                  retry_policy:\n                    retry_on: connect-failure\n                    num_retries: 2\n                    retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]\n                    host_selection_retry_max_attempts: 5\n",
        scripts: &[&[Step::Status(200)]],
        dead_hosts: 1,
        requests: &[GET, GET, GET, GET],
        stats: &["upstream_rq_retry", "upstream_cx_connect_fail"],
        // Which host round robin starts on is Envoy's random choice: compare that every
        // request succeeded on the live host, each connect failure was retried, and no
        // request took more than one retry.
        compare: |observed| Observed {
            responses: observed
                .responses
                .iter()
                .map(|(status, attempts, grpc, _)| {
                    let retried = attempts.as_deref().is_some_and(|a| a == "1" || a == "2");
                    (
                        *status,
                        Some(retried.to_string()),
                        grpc.clone(),
                        String::new(),
                    )
                })
                .collect(),
            upstreams: vec![vec![(None, observed.upstreams[0].len(), String::new())]],
            stats: vec![(
                "retries == connect failures".into(),
                u64::from(observed.stats[0].1 == observed.stats[1].1),
            )],
            ..observed
        },
        ..BASE
    });
}

#[test]
fn the_retry_breaker_refuses_retries_beyond_max_retries() {
    run(Scenario {
        name: "retry overflow",
        route: "                  retry_policy: {retry_on: 5xx, num_retries: 3}\n",
        cluster: "    circuit_breakers: {thresholds: [{max_retries: 0}]}\n",
        scripts: &[&[Step::Status(503), Step::Status(200)]],
        ..BASE
    });
}

#[test]
fn request_bodies_are_replayed_unless_they_outgrow_the_buffer() {
    const POST: Req = Req {
        method: "POST",
        path: "/upload",
        headers: &[],
        body: "a body of thirty-two bytes, long",
    };
    run(Scenario {
        name: "body replayed",
        route: "                  retry_policy: {retry_on: 5xx, num_retries: 1}\n",
        scripts: &[&[Step::Status(503), Step::Status(200)]],
        requests: &[POST],
        ..BASE
    });
    run(Scenario {
        name: "body over the buffer limit",
        vhost: "              per_request_buffer_limit_bytes: 16\n",
        route: "                  retry_policy: {retry_on: 5xx, num_retries: 1}\n",
        scripts: &[&[Step::Status(503), Step::Status(200)]],
        requests: &[POST],
        ..BASE
    });
}

#[test]
fn grpc_statuses_are_retried_when_named() {
    run(Scenario {
        name: "grpc unavailable",
        route: "                  retry_policy: {retry_on: \"unavailable,cancelled\", num_retries: 2}\n",
        scripts: &[&[Step::Grpc(14), Step::Grpc(1), Step::Grpc(0)]],
        requests: &[Req {
            method: "POST",
            path: "/pkg.Service/Method",
            headers: &[("content-type", "application/grpc"), ("te", "trailers")],
            body: "",
        }],
        ..BASE
    });
}

#[test]
fn a_virtual_host_policy_applies_unless_the_route_has_its_own() {
    run(Scenario {
        name: "vhost policy",
        vhost: "              retry_policy: {retry_on: 5xx, num_retries: 3}\n",
        scripts: &[&[Step::Status(503), Step::Status(503), Step::Status(200)]],
        ..BASE
    });
}

#[test]
fn mirrored_copies_go_to_the_shadow_host_and_never_touch_the_answer() {
    run(Scenario {
        name: "mirror",
        route: "                  request_mirror_policies: [{cluster: m}]\n",
        scripts: &[&[Step::Status(200)]],
        mirror: Some(&[Step::Status(503)]),
        requests: &[
            GET,
            Req {
                method: "POST",
                path: "/p",
                headers: &[("host", "api.example:8080")],
                body: "mirrored body",
            },
        ],
        stats: &["upstream_rq_retry"],
        ..BASE
    });
}

#[test]
fn grpc_timeout_sets_the_route_timeout_when_the_route_allows() {
    run(Scenario {
        name: "grpc-timeout",
        route: "                  max_grpc_timeout: 0s\n",
        scripts: &[&[SLOW]],
        requests: &[Req {
            method: "POST",
            path: "/pkg.Service/Method",
            headers: &[
                ("content-type", "application/grpc"),
                ("grpc-timeout", "300m"),
            ],
            body: "",
        }],
        stats: &["upstream_rq_timeout"],
        ..BASE
    });
}

#[test]
fn max_stream_duration_ends_the_stream_as_envoy_does() {
    run(Scenario {
        name: "connection manager max_stream_duration",
        hcm: "          common_http_protocol_options: {max_stream_duration: 0.3s}\n",
        scripts: &[&[SLOW]],
        stats: &["http.ingress.downstream_rq_max_duration_reached"],
        ..BASE
    });
    run(Scenario {
        name: "route max_stream_duration overrides the connection manager's",
        hcm: "          common_http_protocol_options: {max_stream_duration: 60s}\n",
        route: "                  max_stream_duration: {max_stream_duration: 0.3s}\n",
        scripts: &[&[SLOW]],
        stats: &["http.ingress.downstream_rq_max_duration_reached"],
        ..BASE
    });
    run(Scenario {
        name: "grpc-timeout sets the stream's bound",
        route: "                  max_stream_duration: {grpc_timeout_header_max: 0s}\n",
        scripts: &[&[SLOW]],
        requests: &[Req {
            method: "POST",
            path: "/pkg.Service/Method",
            headers: &[
                ("content-type", "application/grpc"),
                ("grpc-timeout", "300m"),
            ],
            body: "",
        }],
        stats: &["http.ingress.downstream_rq_max_duration_reached"],
        ..BASE
    });
}

#[test]
fn circuit_breaker_gauges_are_named_and_valued_as_envoys() {
    if !envoy::available_or_skip("circuit breaker gauges") {
        return;
    }
    let upstream = Scripted::start("u", &[Step::Status(200)]);
    let s = Scenario {
        cluster: "    circuit_breakers:\n      thresholds:\n      - {max_connections: 7, max_pending_requests: 5, max_requests: 9, max_retries: 2, track_remaining: true}\n      - {priority: HIGH, max_requests: 4, retry_budget: {budget_percent: {value: 25}, min_retry_concurrency: 1}, track_remaining: true}\n",
        ..BASE
    };
    let template = bootstrap(&s, &[upstream.addr.port()], None, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (admin_port, listener_port) = (free_port(), free_port());
    let text = template
        .replace("${ADMIN_PORT}", &admin_port.to_string())
        .replace("${LISTENER_PORT}", &listener_port.to_string())
        .replace("${LOG}", &dir.path().join("log").display().to_string());
    let file = dir.path().join("bootstrap.yaml");
    std::fs::write(&file, text).expect("write");
    let admin = loopback(admin_port);
    let gauges = |stats: String| -> Vec<String> {
        let mut lines: Vec<String> = stats
            .lines()
            .filter(|line| line.starts_with("cluster.c.circuit_breakers."))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let from_envoy = {
        let proxy = envoy::Envoy::start(&file, admin, &[]);
        gauges(proxy.admin_get("/stats"))
    };
    let from_remora = {
        let proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        gauges(
            remora_tests::http_get(proxy.admin, "/stats")
                .expect("stats")
                .2,
        )
    };
    assert!(!from_envoy.is_empty(), "Envoy shows circuit breaker gauges");
    assert_eq!(from_remora, from_envoy);
}

#[test]
fn previous_priorities_moves_a_retry_to_the_next_priority() {
    let retry = |priority: &'static str| Scenario {
        name: "previous_priorities",
        route: priority,
        scripts: &[&[Step::Status(200)]],
        dead_hosts: 1,
        dead_in_priority_0: true,
        requests: &[GET, GET],
        stats: &["upstream_rq_retry", "upstream_cx_connect_fail"],
        ..BASE
    };
    // Without it, the retry goes back to the (dead) priority 0.
    run(retry(
        "                  retry_policy: {retry_on: connect-failure, num_retries: 1}\n",
    ));
    run(retry(
        "                  retry_policy:\n                    retry_on: connect-failure\n                    num_retries: 1\n                    retry_priority: {name: envoy.retry_priorities.previous_priorities, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig, update_frequency: 1}}\n",
    ));
}

#[test]
fn failures_without_and_after_retries_read_as_envoys() {
    run(Scenario {
        name: "connect failure, no retry policy",
        scripts: &[],
        dead_hosts: 1,
        ..BASE
    });
    run(Scenario {
        name: "upstream closes the connection, no retry policy",
        scripts: &[&[Step::Reset]],
        ..BASE
    });
    run(Scenario {
        name: "resets until the retries run out",
        route: "                  retry_policy: {retry_on: reset, num_retries: 1}\n",
        scripts: &[&[Step::Reset]],
        ..BASE
    });
    run(Scenario {
        name: "per-try timeouts until the retries run out",
        route: "                  retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 0.2s}\n",
        scripts: &[&[SLOW]],
        ..BASE
    });
}
