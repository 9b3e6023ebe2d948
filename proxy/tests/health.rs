//! Health checks and outlier detection, Envoy against Remora: each scenario runs the same
//! bootstrap through real Envoy 1.40 and through remora-proxy, drives the upstreams the same
//! way, and compares what an operator sees from outside: which upstream serves, the
//! `/clusters` health flags, the stats. Intervals are short (200 ms) and every wait polls
//! with a generous deadline.
//!
//! Skipped (with a message) when `envoy` is not installed; CI installs it.

#[path = "common/ads.rs"]
mod ads;
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Proxy, loopback};
use remora_tests::health::{ControlledUpstream, GrpcHealthServer, NOT_SERVING, SERVING};
use remora_tests::{envoy, free_port, http_get, http_request, poll_until, wait_for, wait_for_port};

const DEADLINE: Duration = Duration::from_secs(30);

/// One proxy (Envoy or Remora) running a scenario's bootstrap.
struct Side {
    name: &'static str,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Side {
    /// GET through the proxy: (status, the upstream that answered, if one did).
    fn get(&self, path: &str) -> (u16, Option<String>) {
        match http_request(self.listener, "GET", path, &[], "") {
            Ok((status, head, _)) => {
                let upstream = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("x-upstream")
                        .then(|| value.trim().to_string())
                });
                (status, upstream)
            }
            Err(_) => (0, None),
        }
    }

    fn clusters(&self) -> String {
        http_get(self.admin, "/clusters")
            .map(|(_, _, body)| body)
            .unwrap_or_default()
    }

    /// The `health_flags` `/clusters` shows for `host` of `cluster`.
    fn flags(&self, cluster: &str, host: SocketAddr) -> String {
        let prefix = format!("{cluster}::{host}::health_flags::");
        self.clusters()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_default()
    }

    fn wait_flags(&self, cluster: &str, host: SocketAddr, want: &str) {
        let mut last = String::new();
        let found = poll_until(DEADLINE, || {
            last = self.flags(cluster, host);
            (last == want).then_some(())
        });
        assert!(
            found.is_some(),
            "{}: {cluster} {host} health_flags still {last:?} after {DEADLINE:?}, not {want:?}",
            self.name
        );
    }

    /// `health_status` of `host` in `/clusters?format=json`.
    fn health_json(&self, cluster: &str, host: SocketAddr) -> serde_json::Value {
        let body = http_get(self.admin, "/clusters?format=json")
            .map(|(_, _, body)| body)
            .unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["cluster_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == cluster)
            .flat_map(|c| c["host_statuses"].as_array().cloned().unwrap_or_default())
            .find(|h| {
                h["address"]["socket_address"]["port_value"] == host.port()
                    && h["address"]["socket_address"]["address"] == host.ip().to_string()
            })
            .map(|h| h["health_status"].clone())
            .unwrap_or_default()
    }

    fn stat(&self, name: &str) -> u64 {
        remora_tests::admin_stat(self.admin, name).unwrap_or(0)
    }

    /// Sends requests until `n` in a row are answered by upstreams in `allowed` only; the set
    /// of upstreams that answered those `n`.
    /// Requests until each of `wanted` has answered one (the flags in `/clusters` can show a
    /// host healthy a moment before balancing uses it, in both proxies); the upstreams seen.
    fn all_serve(&self, path: &str, wanted: &[&str]) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        wait_for(
            &format!("{}: each of {wanted:?} serving", self.name),
            DEADLINE,
            || {
                if let (200, Some(name)) = self.get(path) {
                    seen.insert(name);
                }
                wanted.iter().all(|w| seen.contains(*w)).then_some(())
            },
        );
        seen
    }

    fn settle_on(&self, path: &str, allowed: &[&str], n: usize) -> BTreeSet<String> {
        let mut run = BTreeSet::new();
        let mut streak = 0;
        wait_for(
            &format!("{}: {n} requests in a row served by {allowed:?}", self.name),
            DEADLINE,
            || {
                let (status, upstream) = self.get(path);
                match upstream {
                    Some(name) if status == 200 && allowed.contains(&name.as_str()) => {
                        streak += 1;
                        run.insert(name);
                    }
                    _ => {
                        streak = 0;
                        run.clear();
                    }
                }
                (streak >= n).then_some(())
            },
        );
        run
    }
}

/// Runs `scenario` against Envoy, then against Remora, with the same bootstrap (`yaml` with
/// `${ADMIN}` and `${LISTENER}` filled in); `reset` puts the upstreams back before each run.
/// `None` when Envoy is not installed (the test is skipped).
fn both<T>(
    test: &str,
    yaml: &str,
    reset: impl Fn(),
    scenario: impl Fn(&Side) -> T,
) -> Option<(T, T)> {
    if !envoy::available_or_skip(test) {
        return None;
    }
    let admin = loopback(free_port());
    let listener = loopback(free_port());
    let text = yaml
        .replace("${ADMIN}", &admin.port().to_string())
        .replace("${LISTENER}", &listener.port().to_string());
    let (_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the {test} bootstrap: {e}"));
    let run = |name: &'static str, start: &dyn Fn(&Path) -> Box<dyn std::any::Any>| {
        reset();
        let process = start(&file);
        wait_for_port(listener, DEADLINE);
        let side = Side {
            name,
            admin,
            listener,
        };
        let result = scenario(&side);
        drop(process);
        result
    };
    let envoy_result = run("envoy", &|file| {
        Box::new(envoy::Envoy::start(file, admin, &[]))
    });
    let remora_result = run("remora", &|file| {
        Box::new(Proxy::start_file(file, admin, &[]))
    });
    Some((envoy_result, remora_result))
}

fn bootstrap(cluster_name: &str, cluster_extra: &str, endpoints: &[SocketAddr]) -> String {
    let lb: String = endpoints
        .iter()
        .map(|e| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
                e.ip(),
                e.port()
            )
        })
        .collect();
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ${{ADMIN}}}}}}}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: ${{LISTENER}}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster_name}}}
  clusters:
  - name: {cluster_name}
    connect_timeout: 1s
    type: STATIC
{cluster_extra}    load_assignment:
      cluster_name: {cluster_name}
      endpoints:
      - lb_endpoints:
{lb}"#
    )
}

/// Checks every 200 ms, also before the cluster carries traffic.
const FAST_CHECKS: &str = "timeout: 1s, interval: 0.2s, no_traffic_interval: 0.2s";

#[derive(Debug, PartialEq, Eq)]
struct Flip {
    failed_flags: String,
    failed_json: serde_json::Value,
    served_while_failed: BTreeSet<String>,
    healthy_gauge_while_failed: u64,
    membership_healthy_while_failed: u64,
    /// Checks between answering 200 again and being healthy: at least `healthy_threshold`.
    enough_checks_to_recover: bool,
    recovered_flags: String,
    served_after: BTreeSet<String>,
    failures_counted: bool,
}

#[test]
fn http_check_flips_a_host_unhealthy_and_back_like_envoy() {
    let a = ControlledUpstream::start("a", "/healthz");
    let b = ControlledUpstream::start("b", "/healthz");
    let hc = format!(
        "    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 2, healthy_threshold: 3, \
         http_health_check: {{path: /healthz, host: hc.example}}}}\n"
    );
    let yaml = bootstrap("web", &hc, &[a.addr, b.addr]);
    let Some((envoy, remora)) = both(
        "http_check_flips_a_host_unhealthy_and_back_like_envoy",
        &yaml,
        || {
            a.set_health_status(200);
            b.set_health_status(200);
        },
        |side| {
            side.wait_flags("web", a.addr, "healthy");
            side.wait_flags("web", b.addr, "healthy");
            side.settle_on("/", &["a", "b"], 4);
            // A status outside expected_statuses fails the host at once.
            b.set_health_status(503);
            side.wait_flags("web", b.addr, "/failed_active_hc");
            let served_while_failed = side.settle_on("/", &["a"], 10);
            let healthy_gauge_while_failed = side.stat("cluster.web.health_check.healthy");
            let membership_healthy_while_failed = side.stat("cluster.web.membership_healthy");
            let failed_json = side.health_json("web", b.addr);
            let checks_before = b.checks();
            b.set_health_status(200);
            side.wait_flags("web", b.addr, "healthy");
            let enough_checks_to_recover = b.checks() - checks_before >= 3;
            Flip {
                failed_flags: "/failed_active_hc".into(),
                failed_json,
                served_while_failed,
                healthy_gauge_while_failed,
                membership_healthy_while_failed,
                enough_checks_to_recover,
                recovered_flags: side.flags("web", b.addr),
                served_after: side.all_serve("/", &["a", "b"]),
                failures_counted: side.stat("cluster.web.health_check.failure") > 0
                    && side.stat("cluster.web.health_check.attempt")
                        > side.stat("cluster.web.health_check.failure"),
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.failed_json["failed_active_health_check"], true);
    assert_eq!(envoy.served_while_failed, BTreeSet::from(["a".to_string()]));
    assert_eq!(envoy.healthy_gauge_while_failed, 1);
    assert!(envoy.enough_checks_to_recover);
}

#[derive(Debug, PartialEq, Eq)]
struct Immediate {
    active_flags: String,
    active_json: serde_json::Value,
    excluded: u64,
    passive_seen: bool,
    passive_failures: bool,
}

const IMMEDIATE_FAIL: (&str, &str) = ("x-envoy-immediate-health-check-fail", "true");

#[test]
fn immediate_health_check_fail_excludes_a_host_like_envoy() {
    let a = ControlledUpstream::start("a", "/healthz");
    let b = ControlledUpstream::start("b", "/healthz");
    let hc = format!(
        "    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 2, healthy_threshold: 3, \
         http_health_check: {{path: /healthz}}}}\n"
    );
    let yaml = bootstrap("imm", &hc, &[a.addr, b.addr]);
    let Some((envoy, remora)) = both(
        "immediate_health_check_fail_excludes_a_host_like_envoy",
        &yaml,
        || {
            b.set_health_status(200);
            b.set_check_headers(&[]);
            b.set_response_headers(&[]);
        },
        |side| {
            side.wait_flags("imm", b.addr, "healthy");
            // From the checker: a failing answer with the header also excludes the host.
            b.set_check_headers(&[IMMEDIATE_FAIL]);
            b.set_health_status(503);
            side.wait_flags(
                "imm",
                b.addr,
                "/failed_active_hc/excluded_via_immediate_hc_fail",
            );
            let active_flags = side.flags("imm", b.addr);
            let active_json = side.health_json("imm", b.addr);
            let excluded = side.stat("cluster.imm.membership_excluded");
            b.set_check_headers(&[]);
            b.set_health_status(200);
            side.wait_flags("imm", b.addr, "healthy");
            // From traffic: a proxied response with the header fails and excludes it at once.
            b.set_response_headers(&[IMMEDIATE_FAIL]);
            let passive_seen = wait_for("a passive failure", DEADLINE, || {
                side.get("/");
                side.flags("imm", b.addr)
                    .contains("/excluded_via_immediate_hc_fail")
                    .then_some(true)
            });
            Immediate {
                active_flags,
                active_json,
                excluded,
                passive_seen,
                passive_failures: side.stat("cluster.imm.health_check.passive_failure") > 0,
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.excluded, 1);
    assert!(envoy.passive_failures);
}

#[derive(Debug, PartialEq, Eq)]
struct TcpObservation {
    closed_flags: String,
    live_flags: String,
    served: BTreeSet<String>,
    network_failures: bool,
    membership_healthy: u64,
    mismatch_flags: String,
}

#[test]
fn tcp_checks_fail_a_closed_port_and_a_wrong_answer_like_envoy() {
    let live = ControlledUpstream::start("live", "/tcp-check");
    let closed = loopback(free_port());
    // The probe speaks HTTP over TCP: it writes a request and waits for a 200 status line.
    let send = hex("GET /tcp-check HTTP/1.1\r\nHost: x\r\n\r\n");
    let receive = hex("HTTP/1.1 200");
    let hc = format!(
        "    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 2, healthy_threshold: 1, \
         tcp_health_check: {{send: {{text: '{send}'}}, receive: [{{text: '{receive}'}}]}}}}\n"
    );
    let yaml = bootstrap("tcp", &hc, &[live.addr, closed]);
    let Some((envoy, remora)) = both(
        "tcp_checks_fail_a_closed_port_and_a_wrong_answer_like_envoy",
        &yaml,
        || live.set_health_status(200),
        |side| {
            side.wait_flags("tcp", live.addr, "healthy");
            side.wait_flags("tcp", closed, "/failed_active_hc");
            let served = side.settle_on("/", &["live"], 5);
            let observation = TcpObservation {
                closed_flags: side.flags("tcp", closed),
                live_flags: side.flags("tcp", live.addr),
                served,
                network_failures: side.stat("cluster.tcp.health_check.network_failure") > 0,
                membership_healthy: side.stat("cluster.tcp.membership_healthy"),
                mismatch_flags: String::new(),
            };
            // No matching answer: each probe waits out its timeout, and the host fails after
            // unhealthy_threshold of them, flagged as timed out.
            live.set_health_status(500);
            side.wait_flags("tcp", live.addr, "/failed_active_hc/active_hc_timeout");
            TcpObservation {
                mismatch_flags: side.flags("tcp", live.addr),
                ..observation
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.membership_healthy, 1);
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, PartialEq, Eq)]
struct GrpcObservation {
    serving: String,
    not_serving: String,
    unknown_service: String,
    recovered: String,
    healthy_gauge: u64,
}

#[test]
fn grpc_checks_follow_the_serving_status_like_envoy() {
    let one = GrpcHealthServer::start();
    let two = GrpcHealthServer::start();
    let three = GrpcHealthServer::start();
    let hc = format!(
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 3, healthy_threshold: 2, \
         grpc_health_check: {{service_name: orders, authority: orders.internal}}}}\n"
    );
    let yaml = bootstrap("grpc", &hc, &[one.addr, two.addr, three.addr]);
    let Some((envoy, remora)) = both(
        "grpc_checks_follow_the_serving_status_like_envoy",
        &yaml,
        || {
            one.set("orders", SERVING);
            two.set("orders", NOT_SERVING);
            // `three` does not know the service: NOT_FOUND.
        },
        |side| {
            side.wait_flags("grpc", one.addr, "healthy");
            side.wait_flags("grpc", two.addr, "/failed_active_hc");
            side.wait_flags("grpc", three.addr, "/failed_active_hc");
            let observation = GrpcObservation {
                serving: side.flags("grpc", one.addr),
                not_serving: side.flags("grpc", two.addr),
                unknown_service: side.flags("grpc", three.addr),
                recovered: String::new(),
                healthy_gauge: side.stat("cluster.grpc.health_check.healthy"),
            };
            two.set("orders", SERVING);
            side.wait_flags("grpc", two.addr, "healthy");
            two.set("orders", NOT_SERVING);
            GrpcObservation {
                recovered: "healthy".into(),
                ..observation
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.healthy_gauge, 1);
    assert!(one.checks() > 0 && two.checks() > 0);
}

#[derive(Debug, PartialEq, Eq)]
struct Ejection {
    ejected_flags: String,
    ejected_json: serde_json::Value,
    served_while_ejected: BTreeSet<String>,
    active: u64,
    detected: u64,
    enforced: u64,
    back_after_base_ejection_time: bool,
    flags_after: String,
    /// `cluster_manager.outlier_detection.event_log_path`'s lines, the time masked.
    events: Vec<String>,
}

/// The outlier event log's lines so far, with `timestamp` masked and the file emptied for the
/// next run; `secs_since_last_action` is kept only as present or not (it rounds with timing).
fn take_events(path: &Path, want: usize) -> Vec<String> {
    let text = wait_for("the outlier event log", DEADLINE, || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|text| text.lines().count() >= want)
    });
    std::fs::write(path, "").expect("empty the event log");
    text.lines()
        .map(|line| {
            let mut event: serde_json::Value = serde_json::from_str(line).expect(line);
            let fields = event.as_object_mut().expect("an object");
            let stamp = fields.insert("timestamp".into(), "T".into());
            assert!(stamp.is_some_and(|t| t.as_str().is_some_and(|t| t.ends_with('Z'))));
            if let Some(secs) = fields.get_mut("secs_since_last_action") {
                assert!(
                    secs.as_str().is_some_and(|s| s.parse::<u64>().is_ok()),
                    "{line}"
                );
                *secs = "S".into();
            }
            // The line's own field order too, as log readers may split on it.
            let order: Vec<&str> = line
                .split("\":")
                .map(|part| part.rsplit('"').next().unwrap_or_default())
                .collect();
            format!("{event} {}", order.join(","))
        })
        .collect()
}

#[test]
fn consecutive_5xx_ejects_a_host_until_its_ejection_time_is_up_like_envoy() {
    let a = ControlledUpstream::start("a", "/never");
    let b = ControlledUpstream::start("b", "/never");
    let c = ControlledUpstream::start("c", "/never");
    let od = "    outlier_detection: {consecutive_5xx: 3, interval: 0.2s, base_ejection_time: 2s, \
              max_ejection_percent: 100}\n";
    let dir = tempfile::tempdir().expect("temp dir");
    let events = dir.path().join("outlier.log");
    let yaml = bootstrap("od", od, &[a.addr, b.addr, c.addr])
        + &format!(
            "cluster_manager: {{outlier_detection: {{event_log_path: {}}}}}\n",
            events.display()
        );
    let Some((envoy, remora)) = both(
        "consecutive_5xx_ejects_a_host_until_its_ejection_time_is_up_like_envoy",
        &yaml,
        || c.set_status(500),
        |side| {
            wait_for("c ejected", DEADLINE, || {
                side.get("/");
                (side.flags("od", c.addr) == "/failed_outlier_check").then_some(())
            });
            let ejected_at = Instant::now();
            c.set_status(200);
            let served_while_ejected = side.settle_on("/", &["a", "b"], 6);
            let observation = Ejection {
                ejected_flags: side.flags("od", c.addr),
                ejected_json: side.health_json("od", c.addr),
                served_while_ejected,
                active: side.stat("cluster.od.outlier_detection.ejections_active"),
                detected: side
                    .stat("cluster.od.outlier_detection.ejections_detected_consecutive_5xx"),
                enforced: side
                    .stat("cluster.od.outlier_detection.ejections_enforced_consecutive_5xx"),
                back_after_base_ejection_time: false,
                flags_after: String::new(),
                events: Vec::new(),
            };
            side.wait_flags("od", c.addr, "healthy");
            Ejection {
                back_after_base_ejection_time: ejected_at.elapsed() >= Duration::from_millis(1500),
                flags_after: side.flags("od", c.addr),
                events: take_events(&events, 2),
                ..observation
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!((envoy.active, envoy.detected, envoy.enforced), (1, 1, 1));
    assert_eq!(envoy.events.len(), 2, "{:#?}", envoy.events);
    assert!(envoy.events[0].contains("\"action\":\"EJECT\""));
}

#[derive(Debug, PartialEq, Eq)]
struct Overflow {
    ejected: usize,
    active: u64,
    overflowed: bool,
}

#[test]
fn max_ejection_percent_caps_ejections_like_envoy() {
    let hosts: Vec<ControlledUpstream> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| ControlledUpstream::start(name, "/never"))
        .collect();
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
    let od = "    outlier_detection: {consecutive_5xx: 2, interval: 0.2s, base_ejection_time: 60s, \
              max_ejection_percent: 25}\n";
    let yaml = bootstrap("cap", od, &addrs);
    let Some((envoy, remora)) = both(
        "max_ejection_percent_caps_ejections_like_envoy",
        &yaml,
        || {
            hosts[0].set_status(500);
            hosts[1].set_status(500);
        },
        |side| {
            // Two bad hosts of four, 25% allowed: one ejection, then overflows.
            wait_for("one ejection and an overflow", DEADLINE, || {
                side.get("/");
                (side.stat("cluster.cap.outlier_detection.ejections_active") == 1
                    && side.stat("cluster.cap.outlier_detection.ejections_overflow") > 0)
                    .then_some(())
            });
            let clusters = side.clusters();
            Overflow {
                ejected: clusters
                    .matches("health_flags::/failed_outlier_check")
                    .count(),
                active: side.stat("cluster.cap.outlier_detection.ejections_active"),
                overflowed: side.stat("cluster.cap.outlier_detection.ejections_overflow") > 0,
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.ejected, 1);
}

#[derive(Debug, PartialEq, Eq)]
struct SuccessRate {
    bad_flags: String,
    enforced: u64,
    detected: bool,
    consecutive: u64,
    others_healthy: bool,
}

#[test]
fn success_rate_ejection_with_enough_volume_like_envoy() {
    let hosts: Vec<ControlledUpstream> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|name| ControlledUpstream::start(name, "/never"))
        .collect();
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
    // Consecutive-error ejection is out of the way (a threshold never reached), so only the
    // success-rate statistics can eject.
    let od = "    outlier_detection: {consecutive_5xx: 100000, consecutive_gateway_failure: 100000, \
              interval: 2s, base_ejection_time: 60s, max_ejection_percent: 50, \
              success_rate_request_volume: 10, success_rate_minimum_hosts: 5}\n";
    let yaml = bootstrap("sr", od, &addrs);
    let bad = addrs[4];
    let Some((envoy, remora)) = both(
        "success_rate_ejection_with_enough_volume_like_envoy",
        &yaml,
        || hosts[4].set_status(500),
        |side| {
            // Steady traffic (bounded by the deadline) until the statistics eject the bad host.
            wait_for("success-rate ejection", DEADLINE, || {
                for _ in 0..25 {
                    side.get("/");
                }
                (side.flags("sr", bad) == "/failed_outlier_check").then_some(())
            });
            let clusters = side.clusters();
            SuccessRate {
                bad_flags: side.flags("sr", bad),
                enforced: side.stat("cluster.sr.outlier_detection.ejections_enforced_success_rate"),
                detected: side.stat("cluster.sr.outlier_detection.ejections_detected_success_rate")
                    > 0,
                consecutive: side
                    .stat("cluster.sr.outlier_detection.ejections_enforced_consecutive_5xx"),
                others_healthy: clusters.matches("health_flags::healthy").count() == 4,
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.enforced, 1);
}

/// Requests answered 200, of all sent, in `total` requests over `workers` keep-alive-free
/// clients; `event` runs once when `at` requests have completed.
fn load(side: &Side, total: u64, workers: u64, events: &[(u64, &(dyn Fn() + Sync))]) -> (u64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (done, ok) = (done.clone(), ok.clone());
            scope.spawn(move || {
                while done.fetch_add(1, Ordering::SeqCst) < total {
                    if side.get("/").0 == 200 {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        for (at, event) in events {
            poll_until(Duration::from_secs(120), || {
                (done.load(Ordering::SeqCst) >= *at).then_some(())
            });
            event();
        }
    });
    (ok.load(Ordering::SeqCst), total)
}

/// Issue 14's fault test: three endpoints under steady bounded load; one is killed (active
/// checks and outlier detection take it out), then, with it still dead, another answers 503s,
/// to its checks too. With two of three out both proxies balance over all hosts in panic, and
/// the route's retries (on another host each time) hide that: at least 99.9% succeed. Both
/// proxies' success ratios are printed. The retry breaker is raised from its default of 3:
/// with four clients and two hosts of three failing, three retries in flight are often not
/// enough, and both proxies then fail what they may not retry (Envoy 0.84-0.98, Remora 0.69
/// in runs here, Remora lower because it spends longer in panic).
#[test]
fn fault_under_steady_load_with_health_checks_and_outlier_detection() {
    let a = ControlledUpstream::start("a", "/healthz");
    let c = ControlledUpstream::start("c", "/healthz");
    let b_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind b");
    let b_addr = b_listener.local_addr().expect("b address");
    let b = std::sync::Mutex::new(Some(ControlledUpstream::start_on(
        "b", "/healthz", b_listener,
    )));
    let extra = format!(
        "    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 2, healthy_threshold: 2, \
         http_health_check: {{path: /healthz}}}}\n    outlier_detection: {{consecutive_5xx: 3, \
         interval: 0.2s, base_ejection_time: 30s, max_ejection_percent: 100}}\n    \
         circuit_breakers: {{thresholds: [{{max_retries: 100}}]}}\n"
    );
    let yaml = bootstrap("fault", &extra, &[a.addr, b_addr, c.addr]).replace(
        "route: {cluster: fault}",
        "route: {cluster: fault, retry_policy: {retry_on: \"5xx,reset,connect-failure\", \
         num_retries: 3, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, \
         typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}], \
         host_selection_retry_max_attempts: 5}}",
    );
    assert!(yaml.contains("retry_policy"), "the route gains its retries");
    let kill_b = || drop(b.lock().unwrap_or_else(|p| p.into_inner()).take());
    let c_503 = || {
        c.set_status(503);
        c.set_health_status(503);
    };
    let Some((envoy, remora)) = both(
        "fault_under_steady_load_with_health_checks_and_outlier_detection",
        &yaml,
        || {
            c.set_status(200);
            c.set_health_status(200);
            let mut slot = b.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                let listener = poll_until(DEADLINE, || std::net::TcpListener::bind(b_addr).ok())
                    .expect("b's port again");
                *slot = Some(ControlledUpstream::start_on("b", "/healthz", listener));
            }
        },
        |side| {
            for host in [a.addr, b_addr, c.addr] {
                side.wait_flags("fault", host, "healthy");
            }
            let b_flags = std::sync::Mutex::new(String::new());
            // Connection failures may eject it first; the checks fail it too.
            let note_b = || {
                wait_for("b failing its checks", DEADLINE, || {
                    side.flags("fault", b_addr)
                        .contains("/failed_active_hc")
                        .then_some(())
                });
                *b_flags.lock().unwrap_or_else(|p| p.into_inner()) = side.flags("fault", b_addr);
            };
            let (ok, total) = load(
                side,
                4000,
                4,
                &[(500, &kill_b), (700, &note_b), (1500, &c_503)],
            );
            // Whichever saw it first, its checks fail it too and keep it out.
            let c_flags = poll_until(DEADLINE, || {
                side.flags("fault", c.addr)
                    .contains("/failed_active_hc")
                    .then_some(())
            })
            .is_some();
            let b_flags = b_flags.into_inner().unwrap_or_else(|p| p.into_inner());
            (ok, total, b_flags, c_flags)
        },
    ) else {
        return;
    };
    let ratio = |(ok, total, ..): &(u64, u64, String, bool)| *ok as f64 / *total as f64;
    println!(
        "fault test success ratio: envoy {:.4} ({}/{}), remora {:.4} ({}/{})",
        ratio(&envoy),
        envoy.0,
        envoy.1,
        ratio(&remora),
        remora.0,
        remora.1
    );
    assert!(
        envoy.2.contains("/failed_active_hc"),
        "envoy b: {}",
        envoy.2
    );
    assert!(
        remora.2.contains("/failed_active_hc"),
        "remora b: {}",
        remora.2
    );
    assert!(
        envoy.3 && remora.3,
        "c failed: envoy {}, remora {}",
        envoy.3,
        remora.3
    );
    assert!(
        ratio(&remora) >= 0.999,
        "remora success ratio {}",
        ratio(&remora)
    );
}

#[derive(Debug, PartialEq, Eq)]
struct LocalOrigin {
    closed_flags: String,
    local_origin_enforced: u64,
    consecutive_5xx_enforced: u64,
    gateway_detected: u64,
}

#[test]
fn connect_failures_are_local_origin_errors_when_split_like_envoy() {
    let live = ControlledUpstream::start("live", "/never");
    let closed = loopback(free_port());
    let od = "    outlier_detection: {consecutive_5xx: 2, consecutive_gateway_failure: 2, \
              enforcing_consecutive_gateway_failure: 100, split_external_local_origin_errors: true, \
              consecutive_local_origin_failure: 3, interval: 0.2s, base_ejection_time: 60s, \
              max_ejection_percent: 50}\n";
    let yaml = bootstrap("split", od, &[live.addr, closed]);
    let Some((envoy, remora)) = both(
        "connect_failures_are_local_origin_errors_when_split_like_envoy",
        &yaml,
        || {},
        |side| {
            // Connection failures count as local-origin errors only: neither the 5xx nor the
            // gateway-error runs see them.
            wait_for("the closed port ejected", DEADLINE, || {
                side.get("/");
                (side.flags("split", closed) == "/failed_outlier_check").then_some(())
            });
            LocalOrigin {
                closed_flags: side.flags("split", closed),
                local_origin_enforced: side.stat(
                    "cluster.split.outlier_detection.ejections_enforced_consecutive_local_origin_failure",
                ),
                consecutive_5xx_enforced: side
                    .stat("cluster.split.outlier_detection.ejections_enforced_consecutive_5xx"),
                gateway_detected: side.stat(
                    "cluster.split.outlier_detection.ejections_detected_consecutive_gateway_failure",
                ),
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.local_origin_enforced, 1);
}

#[test]
fn connect_failures_are_gateway_errors_without_the_split_like_envoy() {
    let live = ControlledUpstream::start("live", "/never");
    let closed = loopback(free_port());
    let od = "    outlier_detection: {consecutive_5xx: 3, consecutive_gateway_failure: 2, \
              enforcing_consecutive_gateway_failure: 100, interval: 0.2s, \
              base_ejection_time: 60s, max_ejection_percent: 50}\n";
    let yaml = bootstrap("nosplit", od, &[live.addr, closed]);
    let Some((envoy, remora)) = both(
        "connect_failures_are_gateway_errors_without_the_split_like_envoy",
        &yaml,
        || {},
        |side| {
            // A failed connection is a 503 to the detector: the gateway-error run (2) ends
            // first.
            wait_for("the closed port ejected", DEADLINE, || {
                side.get("/");
                (side.flags("nosplit", closed) == "/failed_outlier_check").then_some(())
            });
            let stat = |kind: &str| side.stat(&format!("cluster.nosplit.outlier_detection.{kind}"));
            (
                stat("ejections_enforced_consecutive_gateway_failure"),
                stat("ejections_enforced_consecutive_5xx"),
                stat("ejections_enforced_consecutive_local_origin_failure"),
            )
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy, (1, 0, 0));
}

#[test]
fn http2_checks_with_expected_and_retriable_statuses_like_envoy() {
    let a = ControlledUpstream::start("a", "/ready");
    let b = ControlledUpstream::start("b", "/ready");
    let hc = format!(
        "    health_checks:\n    - {{{FAST_CHECKS}, unhealthy_threshold: 3, healthy_threshold: 1, \
         http_health_check: {{path: /ready, codec_client_type: HTTP2, \
         expected_statuses: [{{start: 200, end: 300}}], retriable_statuses: [{{start: 429, end: 430}}], \
         request_headers_to_add: [{{header: {{key: x-probe, value: remora}}}}]}}}}\n"
    );
    let yaml = bootstrap("h2", &hc, &[a.addr, b.addr]);
    let Some((envoy, remora)) = both(
        "http2_checks_with_expected_and_retriable_statuses_like_envoy",
        &yaml,
        || {
            a.set_health_status(202);
            b.set_health_status(200);
        },
        |side| {
            // 202 is within [200, 300): healthy.
            side.wait_flags("h2", a.addr, "healthy");
            side.wait_flags("h2", b.addr, "healthy");
            // A retriable status counts toward unhealthy_threshold; a 404 fails at once.
            b.set_health_status(429);
            side.wait_flags("h2", b.addr, "/failed_active_hc");
            let checks_after_429 = b.checks();
            b.set_health_status(200);
            side.wait_flags("h2", b.addr, "healthy");
            a.set_health_status(404);
            side.wait_flags("h2", a.addr, "/failed_active_hc");
            (
                side.flags("h2", a.addr),
                side.flags("h2", b.addr),
                checks_after_429 > 0,
            )
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
}

#[derive(Debug, PartialEq, Eq)]
struct Lingering {
    removed_but_passing: String,
    eds_unhealthy: String,
    total_while_lingering: u64,
    gone_once_failing: bool,
    membership_changes: u64,
}

fn cla(hosts: &[(SocketAddr, &str)]) -> prost_types::Any {
    let endpoints: String = hosts
        .iter()
        .map(|(addr, health)| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}, \
                 health_status: {health}}}, ",
                addr.ip(),
                addr.port()
            )
        })
        .collect();
    ads::endpoints(&format!(
        "{{cluster_name: svc, endpoints: [{{lb_endpoints: [{endpoints}]}}]}}"
    ))
}

#[test]
fn eds_removals_wait_for_failing_checks_and_eds_health_combines_like_envoy() {
    let a = ControlledUpstream::start("a", "/healthz");
    let b = ControlledUpstream::start("b", "/healthz");
    let c = ControlledUpstream::start("c", "/healthz");
    let server = ads::AdsServer::start();
    let yaml = format!(
        r#"node: {{id: health-test, cluster: test}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ${{ADMIN}}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: ${{LISTENER}}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            validate_clusters: false
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: svc}}}}]}}
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}}}}}}}]}}]
"#,
        ads_port = server.addr.port()
    );
    server.set(
        xds_api::type_urls::CLUSTER,
        vec![ads::cluster(&format!(
            "{{name: svc, type: EDS, connect_timeout: 1s, eds_cluster_config: {{eds_config: \
             {{ads: {{}}, resource_api_version: V3}}}}, health_checks: [{{{FAST_CHECKS}, \
             unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: {{path: /healthz}}}}]}}"
        ))],
    );
    let Some((envoy, remora)) = both(
        "eds_removals_wait_for_failing_checks_and_eds_health_combines_like_envoy",
        &yaml,
        || {
            b.set_health_status(200);
            server.set(
                xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT,
                vec![cla(&[
                    (a.addr, "HEALTHY"),
                    (b.addr, "HEALTHY"),
                    (c.addr, "UNHEALTHY"),
                ])],
            );
        },
        |side| {
            side.wait_flags("svc", a.addr, "healthy");
            side.wait_flags("svc", b.addr, "healthy");
            side.wait_flags("svc", c.addr, "/failed_eds_health");
            // b leaves EDS while its checks pass: it stays, pending removal.
            server.set(
                xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT,
                vec![cla(&[(a.addr, "HEALTHY"), (c.addr, "UNHEALTHY")])],
            );
            side.wait_flags("svc", b.addr, "/pending_dynamic_removal");
            let removed_but_passing = side.flags("svc", b.addr);
            let total_while_lingering = side.stat("cluster.svc.membership_total");
            // Once its checks fail, it goes.
            b.set_health_status(503);
            let gone_once_failing = poll_until(DEADLINE, || {
                (!side.clusters().contains(&format!("svc::{}::", b.addr))).then_some(())
            })
            .is_some();
            Lingering {
                removed_but_passing,
                eds_unhealthy: side.flags("svc", c.addr),
                total_while_lingering,
                gone_once_failing,
                // Hosts came (the first set) and went (b); health alone changes no membership.
                membership_changes: side.stat("cluster.svc.membership_change"),
            }
        },
    ) else {
        return;
    };
    assert_eq!(remora, envoy);
    assert_eq!(envoy.total_while_lingering, 3);
    assert!(envoy.gone_once_failing);
    assert_eq!(remora.membership_changes, 2);
}
