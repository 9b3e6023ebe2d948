//! The admin endpoints against Envoy's: one bootstrap and the same requests under both, then
//! what `/clusters`, `/listeners`, `/stats`, `/logging` and `/drain_listeners` answer, compared.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::{free_port, http_get, http_request, wait_for};
use serde_json::Value;

/// Two listeners (one INBOUND), a cluster with per-host settings and breakers, one whose only
/// host refuses connections, and one whose hosts carry every EDS health status.
fn bootstrap_yaml(admin: &str, inbound: u16, outbound: u16, echo: SocketAddr) -> String {
    let down = closed_port();
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/down"}
                route: {cluster: down, timeout: 5s}
              - match: {prefix: "/"}
                route: {cluster: svc, timeout: 5s}
"#;
    let listener = |name: &str, port: u16, direction: &str| {
        http_listener(name, port, "", routes).replacen(
            "    filter_chains:\n",
            &format!("    traffic_direction: {direction}\n    filter_chains:\n"),
            1,
        )
    };
    // One `lb_endpoints` entry; `extra` holds its further fields, one per line.
    let endpoint = |port: u16, hostname: &str, extra: &[&str]| {
        let mut entry = format!(
            "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}, hostname: '{hostname}'}}\n"
        );
        for field in extra {
            entry.push_str(&format!("          {field}\n"));
        }
        entry
    };
    let svc = format!(
        "  - name: svc\n    connect_timeout: 1s\n    circuit_breakers:\n      thresholds:\n      - {{max_connections: 100, max_retries: 5}}\n      - {{priority: HIGH, max_requests: 7}}\n    load_assignment:\n      cluster_name: svc\n      endpoints:\n      - lb_endpoints:\n{}",
        endpoint(
            echo.port(),
            "echo-1",
            &["health_status: HEALTHY", "load_balancing_weight: 4"]
        )
    );
    let mut mixed = String::from(
        "  - name: mixed\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: mixed\n      endpoints:\n      - lb_endpoints:\n",
    );
    for (port, status) in [
        (1, "UNHEALTHY"),
        (2, "DRAINING"),
        (3, "DEGRADED"),
        (4, "TIMEOUT"),
        (5, "UNKNOWN"),
    ] {
        mixed.push_str(&endpoint(port, "", &[&format!("health_status: {status}")]));
    }
    mixed.push_str(&format!(
        "      - priority: 1\n        lb_endpoints:\n{}",
        endpoint(6, "", &[])
    ));
    bootstrap(
        admin,
        &[
            listener("inbound", inbound, "INBOUND"),
            listener("outbound", outbound, "OUTBOUND"),
        ],
        &[svc, static_cluster("down", &[down]), mixed],
    )
}

/// What one proxy's admin answered, with the order of its lists made canonical.
#[derive(Debug, PartialEq)]
struct Answers {
    clusters_text: Vec<String>,
    clusters_json: Value,
    listeners_json: Value,
    used_stats: String,
    statuses: Vec<(String, u16, String)>,
    after_inbound_drain: (bool, u16),
}

fn sorted_by_name(list: &Value, key: &str) -> Value {
    let mut items = list[key].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|item| item["name"].as_str().unwrap_or_default().to_string());
    serde_json::json!({ key: items })
}

/// The requests, then the admin's answers. Requests and admin calls are sequential, so both
/// proxies (one worker each) see the same counts.
fn exercise(admin: SocketAddr, inbound: u16, outbound: u16) -> Answers {
    let send = |port: u16, path: &str| http_get(loopback(port), path).expect("request").0;
    assert_eq!(send(inbound, "/ok"), 200);
    assert_eq!(send(inbound, "/status/503"), 503);
    assert_eq!(send(outbound, "/down"), 503);
    let get = |path: &str| http_get(admin, path).expect("admin request");
    let json = |path: &str| serde_json::from_str::<Value>(&get(path).2).expect("admin JSON");
    // Grouped by cluster (Envoy lists clusters in no fixed order), in order within each.
    let mut clusters_text: Vec<String> = get("/clusters").2.lines().map(str::to_string).collect();
    clusters_text.sort_by_key(|line| line.split("::").next().unwrap_or_default().to_string());
    let used_stats = get(
        "/stats?usedonly&filter=%5Ecluster%5C.(svc%7Cdown%7Cmixed)%5C.upstream_(cx_total%7Ccx_active%7Crq_total%7Crq_pending_active%7Ccx_destroy(_local%7C_remote)%3F%7Ccx_connect_fail)%24",
    )
    .2;
    let mut statuses = Vec::new();
    let mut record = |method: &str, path: &str| {
        let (status, _, body) = http_request(admin, method, path, &[], "").expect("admin");
        // The first line names the problem; usage lines and logger lists differ, and so do
        // the two regex engines' words for what is wrong with a pattern.
        let first = body.lines().next().unwrap_or_default();
        let first = match first.split_once(": ") {
            Some((kind @ "Invalid re2 regex", _)) => kind,
            _ => first,
        }
        .to_string();
        statuses.push((format!("{method} {path}"), status, first));
    };
    record("GET", "/stats?filter=(");
    record("GET", "/stats?type=Bogus");
    record(
        "GET",
        "/stats?type=Counters&filter=%5Ecluster%5C.svc%5C.upstream_rq_total%24",
    );
    record("GET", "/logging");
    record("POST", "/logging?nosuch=debug");
    record("POST", "/logging?level=verbose");
    record("POST", "/logging?paths=http:bogus");
    record("GET", "/drain_listeners");
    let (status, _, body) =
        http_request(admin, "POST", "/logging?http=debug", &[], "").expect("admin");
    statuses.push((
        "POST /logging?http=debug".into(),
        status,
        body.lines()
            .find(|l| l.trim_start().starts_with("http:"))
            .unwrap_or_default()
            .to_string(),
    ));
    let answers = Answers {
        clusters_text,
        clusters_json: sorted_by_name(&json("/clusters?format=json"), "cluster_statuses"),
        listeners_json: sorted_by_name(&json("/listeners?format=json"), "listener_statuses"),
        used_stats,
        statuses,
        after_inbound_drain: (false, 0),
    };
    // Only the INBOUND listener stops accepting; the OUTBOUND one still serves.
    let (status, _, _) =
        http_request(admin, "POST", "/drain_listeners?inboundonly", &[], "").expect("drain");
    assert_eq!(status, 200);
    wait_for("inbound listener closed", Duration::from_secs(10), || {
        TcpStream::connect(loopback(inbound)).is_err().then_some(())
    });
    Answers {
        after_inbound_drain: (true, send(outbound, "/after")),
        ..answers
    }
}

#[test]
fn admin_endpoints_answer_as_envoys_do() {
    let echo = EchoServer::start("svc", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (inbound, outbound) = (free_port(), free_port());
    let (_dir, file) = write_config(&bootstrap_yaml(&admin_yaml, inbound, outbound, echo.addr));
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        exercise(admin, inbound, outbound)
    };
    // Checked on their own too, so the test says something without Envoy.
    for line in [
        format!("svc::{}::rq_total::2", echo.addr),
        format!("svc::{}::rq_success::1", echo.addr),
        format!("svc::{}::rq_error::1", echo.addr),
        format!("svc::{}::cx_total::1", echo.addr),
        format!("svc::{}::hostname::echo-1", echo.addr),
        "svc::high_priority::max_requests::7".into(),
        "mixed::127.0.0.1:2::health_flags::/eds_status_draining".into(),
    ] {
        assert!(
            remora.clusters_text.contains(&line),
            "{line} in {:#?}",
            remora.clusters_text
        );
    }
    // The refused connect: the upstream's end, in the failure and destroy counts.
    for line in [
        "cluster.down.upstream_cx_connect_fail: 1",
        "cluster.down.upstream_cx_destroy_remote: 1",
    ] {
        assert!(
            remora.used_stats.contains(line),
            "{line} in {}",
            remora.used_stats
        );
    }
    assert_eq!(remora.statuses[0].1, 400, "{:?}", remora.statuses);
    assert_eq!(remora.after_inbound_drain, (true, 200));
    if !remora_tests::envoy::available_or_skip("the Envoy half of the admin comparison") {
        return;
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(loopback(inbound), Duration::from_secs(20));
        exercise(admin, inbound, outbound)
    };
    assert_eq!(
        envoy.clusters_text, remora.clusters_text,
        "left: envoy, right: remora"
    );
    assert_eq!(
        envoy.clusters_json, remora.clusters_json,
        "left: envoy, right: remora"
    );
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

#[test]
fn logging_levels_change_what_the_proxy_logs() {
    let echo = EchoServer::start("svc", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (inbound, outbound) = (free_port(), free_port());
    let yaml = bootstrap_yaml(&admin_yaml, inbound, outbound, echo.addr);
    let proxy = Proxy::start(&yaml, admin, &["--log-level", "info"]);
    // A failed connect makes a local reply, which the `http` logger reports at debug level.
    let local_reply = || {
        let (status, _, _) = http_get(loopback(inbound), "/down").expect("request");
        assert_eq!(status, 503);
    };
    local_reply();
    assert!(
        !proxy.process.log().contains("local reply"),
        "{}",
        proxy.process.log()
    );
    let (status, _, body) =
        http_request(admin, "POST", "/logging?http=debug", &[], "").expect("admin");
    assert_eq!(status, 200);
    assert!(
        body.contains("  http: debug\n") && body.contains("  pool: info\n"),
        "{body}"
    );
    local_reply();
    wait_for("a debug line from http", Duration::from_secs(5), || {
        proxy.process.log().contains("local reply").then_some(())
    });
}

/// A cluster whose endpoints sit in localities (region, zone, sub-zone; locality and endpoint
/// weights) across two priorities, with health statuses and a hostname; nothing is sent to it.
fn located_cluster() -> String {
    let host = |port: u16, extra: &str| {
        format!(
            "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}{extra}}}\n"
        )
    };
    format!(
        "  - name: located\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: located\n      endpoints:\n      - locality: {{region: eu-west, zone: eu-west-1a, sub_zone: rack-7}}\n        load_balancing_weight: 3\n        lb_endpoints:\n{}          load_balancing_weight: 2\n{}          health_status: DEGRADED\n      - locality: {{region: eu-west, zone: eu-west-1b}}\n        load_balancing_weight: 1\n        lb_endpoints:\n{}      - locality: {{region: us-east}}\n        priority: 1\n        lb_endpoints:\n{}          health_status: UNHEALTHY\n{}",
        host(1, ""),
        host(2, ""),
        host(3, ""),
        host(4, ", hostname: backup"),
        host(5, ""),
    )
}

#[test]
fn clusters_show_localities_and_priorities_as_envoy_does() {
    let (admin, admin_yaml) = admin_block();
    let yaml = bootstrap(&admin_yaml, &[], &[located_cluster()]).replace(
        "static_resources:\n  listeners:\n  clusters:\n",
        "static_resources:\n  clusters:\n",
    );
    let (_dir, file) = write_config(&yaml);
    let answers = || {
        let text: Vec<String> = http_get(admin, "/clusters")
            .expect("/clusters")
            .2
            .lines()
            .map(str::to_string)
            .collect();
        let json: Value =
            serde_json::from_str(&http_get(admin, "/clusters?format=json").expect("json").2)
                .expect("/clusters JSON");
        (text, json)
    };
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        answers()
    };
    for line in [
        "located::127.0.0.1:1::region::eu-west",
        "located::127.0.0.1:1::zone::eu-west-1a",
        "located::127.0.0.1:1::sub_zone::rack-7",
        "located::127.0.0.1:1::weight::2",
        "located::127.0.0.1:1::priority::0",
        "located::127.0.0.1:2::health_flags::/degraded_eds_health",
        "located::127.0.0.1:3::zone::eu-west-1b",
        "located::127.0.0.1:3::sub_zone::",
        "located::127.0.0.1:4::hostname::backup",
        "located::127.0.0.1:4::region::us-east",
        "located::127.0.0.1:4::zone::",
        "located::127.0.0.1:4::priority::1",
        "located::127.0.0.1:4::canary::false",
        "located::127.0.0.1:4::health_flags::/failed_eds_health",
        "located::127.0.0.1:5::health_flags::healthy",
    ] {
        assert!(
            remora.0.iter().any(|l| l == line),
            "{line} in {:#?}",
            remora.0
        );
    }
    let hosts = &remora.1["cluster_statuses"][0]["host_statuses"];
    assert_eq!(
        hosts[0]["locality"],
        serde_json::json!({"region": "eu-west", "zone": "eu-west-1a", "sub_zone": "rack-7"})
    );
    assert_eq!(hosts[3]["priority"], 1);
    if !remora_tests::envoy::available_or_skip("the Envoy half of /clusters localities") {
        return;
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        answers()
    };
    assert_eq!(envoy.0, remora.0, "left: envoy, right: remora");
    assert_eq!(envoy.1, remora.1, "left: envoy, right: remora");
}

/// Sends admin requests (with a user agent, one with a request id) and returns the lines of
/// both admin access logs once all of them are there.
fn admin_log_lines(admin: SocketAddr, logs: &[&std::path::Path; 2]) -> (Vec<String>, Vec<String>) {
    let requests = [
        ("GET", "/ready?probe=1", "tester/1", ""),
        ("GET", "/stats?filter=(", "tester/2", "rid-2"),
        ("POST", "/logging", "tester/3", ""),
    ];
    for (method, path, agent, request_id) in requests {
        let mut headers = vec![("user-agent", agent)];
        if !request_id.is_empty() {
            headers.push(("x-request-id", request_id));
        }
        http_request(admin, method, path, &headers, "").expect("admin request");
    }
    // Envoy flushes its file logs about once a second.
    wait_for(
        "3 lines in both admin logs",
        Duration::from_secs(15),
        || {
            let read = |path: &std::path::Path| -> Option<Vec<String>> {
                let lines: Vec<String> = std::fs::read_to_string(path)
                    .ok()?
                    .lines()
                    .filter(|l| l.contains("tester/"))
                    .map(str::to_string)
                    .collect();
                (lines.len() == 3).then_some(lines)
            };
            Some((read(logs[0])?, read(logs[1])?))
        },
    )
}

/// An admin access log line with what differs by run masked: the start time and the
/// duration (and the bytes sent, for the answers whose bodies are worded differently).
fn masked_admin_line(line: &str) -> String {
    let (_, rest) = line.split_once("] ").expect("[START_TIME] first");
    let mut fields: Vec<String> = rest.split(' ').map(str::to_string).collect();
    // "METHOD PATH PROTOCOL" CODE FLAGS RECEIVED SENT DURATION ...
    fields[7] = "N".into();
    if !fields[1].starts_with("/ready") {
        fields[6] = "N".into();
    }
    format!("[T] {}", fields.join(" "))
}

#[test]
fn admin_access_logs_write_envoys_lines() {
    let dir = tempfile::tempdir().expect("dir");
    let (new_log, old_log) = (
        dir.path().join("admin.log"),
        dir.path().join("admin-path.log"),
    );
    let (admin, admin_yaml) = admin_block();
    // `access_log` (a FileAccessLog) and the deprecated `access_log_path`, side by side.
    let admin_yaml = format!(
        "{admin_yaml}  access_log_path: {}\n  access_log:\n  - name: envoy.access_loggers.file\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n      path: {}\n",
        old_log.display(),
        new_log.display()
    );
    let yaml = bootstrap(
        &admin_yaml,
        &[],
        &[static_cluster("unused", &[closed_port()])],
    )
    .replace(
        "static_resources:\n  listeners:\n  clusters:\n",
        "static_resources:\n  clusters:\n",
    );
    let (_conf, file) = write_config(&yaml);
    let logs = [new_log.as_path(), old_log.as_path()];
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        admin_log_lines(admin, &logs)
    };
    assert_eq!(remora.0, remora.1, "both loggers write the same lines");
    let masked =
        |lines: &[String]| -> Vec<String> { lines.iter().map(|l| masked_admin_line(l)).collect() };
    let remora = masked(&remora.0);
    assert!(
        remora[0].starts_with("[T] \"GET /ready?probe=1 HTTP/1.1\" 200 - 0 5 N "),
        "{remora:?}"
    );
    assert!(
        remora[1].contains(" 400 ") && remora[1].contains("\"rid-2\""),
        "{remora:?}"
    );
    // The admin records its peer in x-forwarded-for as an edge proxy does.
    let xff = remora[0]
        .split(' ')
        .nth(10)
        .unwrap_or_default()
        .trim_matches('"');
    assert!(xff.parse::<std::net::IpAddr>().is_ok(), "{remora:?}");
    if !remora_tests::envoy::available_or_skip("the Envoy half of the admin access log") {
        return;
    }
    for log in logs {
        std::fs::remove_file(log).expect("start the logs afresh");
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        admin_log_lines(admin, &logs)
    };
    assert_eq!(envoy.0, envoy.1);
    assert_eq!(masked(&envoy.0), remora, "left: envoy, right: remora");
}

/// `application_log_config` shapes the proxy's own lines as Envoy's: Istio's text pattern
/// (tab-separated UTC time with microseconds, level, logger, source, message, thread), and a
/// JSON object of patterns. Both proxies' lines, from the same bootstrap, fit one shape.
#[test]
fn application_log_lines_take_the_bootstrap_format_as_envoys_do() {
    let echo = EchoServer::start("svc", "127.0.0.1");
    let istio = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\t(trace|debug|info|warning|error|critical)\tenvoy [a-z_]+ [^ \t]+:\d+\t[^\t]+\tthread=\d+$";
    let istio = regex::Regex::new(istio).unwrap();
    let formats = [
        r#"{text_format: "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"}"#,
        r#"{json_format: {time: "%Y-%m-%dT%T.%eZ", level: "%l", logger: "%n", msg: "%j", pid: "%P", fixed: 5}}"#,
    ];
    let lines = |envoy: bool, format: &str| -> Vec<String> {
        let (admin, admin_yaml) = admin_block();
        let (inbound, outbound) = (free_port(), free_port());
        let yaml = bootstrap_yaml(&admin_yaml, inbound, outbound, echo.addr)
            + &format!("application_log_config:\n  log_format: {format}\n");
        let (_dir, file) = write_config(&yaml);
        let log = if envoy {
            let envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
            wait_for("envoy's lines", Duration::from_secs(30), || {
                let shaped = envoy
                    .process
                    .log()
                    .lines()
                    .filter(|l| !l.starts_with("[20"))
                    .count();
                (shaped >= 3).then_some(())
            });
            envoy.process.log()
        } else {
            let proxy = Proxy::start(&yaml, admin, &["--log-level", "info"]);
            wait_for("remora's lines", Duration::from_secs(30), || {
                (proxy.process.log().lines().count() >= 3).then_some(())
            });
            proxy.process.log()
        };
        // Envoy writes its first lines, before it has read the bootstrap, in its default shape.
        log.lines()
            .filter(|line| !(envoy && line.starts_with("[20")))
            .map(str::to_string)
            .collect()
    };
    let mut runs = vec![false];
    if remora_tests::envoy::available_or_skip("the Envoy half of the application log test") {
        runs.push(true);
    }
    for envoy in runs {
        let who = if envoy { "envoy" } else { "remora" };
        let text = lines(envoy, formats[0]);
        assert!(
            !text.is_empty() && text.iter().all(|l| istio.is_match(l)),
            "{who}: {text:#?}"
        );
        let json = lines(envoy, formats[1]);
        for line in &json {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{who}: {e}: {line}"));
            let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["fixed", "level", "logger", "msg", "pid", "time"],
                "{who}"
            );
            assert_eq!(value["fixed"], 5, "{who}");
            assert_eq!(
                value["pid"].as_str().map(|p| p.parse::<u32>().is_ok()),
                Some(true)
            );
            assert!(
                value["time"].as_str().unwrap().ends_with('Z'),
                "{who}: {line}"
            );
        }
    }
}

/// What [`server_gauges_runtime_memory_and_help_answer_as_envoys_do`] reads from one proxy.
#[derive(Debug, PartialEq)]
struct ServerView {
    runtime: Value,
    memory_keys: Vec<String>,
    /// `server.*` gauges whose value both proxies must share.
    gauges: Vec<(String, Option<u64>)>,
    /// `server.total_connections` with one client connection open, then after it closed.
    connections: (u64, u64),
}

/// Reads one proxy: `/runtime`, `/memory`'s keys, the `server.*` gauges, and how
/// `server.total_connections` follows a client connection; also returns `/help`'s lines and
/// the names of the `server.*` stats.
fn server_view(admin: SocketAddr, http_port: u16) -> (ServerView, String, Vec<String>) {
    use std::io::Write;
    let get = |path: &str| http_get(admin, path).expect("admin request").2;
    let gauge = |name: &str| remora_tests::admin_stat(admin, name);
    let mut client = TcpStream::connect(loopback(http_port)).expect("connect");
    client
        .write_all(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let open = wait_for("the connection counted", Duration::from_secs(15), || {
        (gauge("server.total_connections") == Some(1)).then_some(1)
    });
    drop(client);
    let closed = wait_for("the connection gone", Duration::from_secs(15), || {
        (gauge("server.total_connections") == Some(0)).then_some(0)
    });
    let memory: Value = serde_json::from_str(&get("/memory")).expect("memory JSON");
    let mut memory_keys: Vec<String> = memory
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    memory_keys.sort();
    let names: Vec<String> = get("/stats")
        .lines()
        .filter(|line| line.starts_with("server."))
        .filter_map(|line| Some(line.split(':').next()?.to_string()))
        .collect();
    let view = ServerView {
        runtime: serde_json::from_str(&get("/runtime")).expect("runtime JSON"),
        memory_keys,
        gauges: [
            "server.concurrency",
            "server.parent_connections",
            "server.days_until_first_cert_expiring",
        ]
        .iter()
        .map(|name| (name.to_string(), gauge(name)))
        .collect(),
        connections: (open, closed),
    };
    (view, get("/help"), names)
}

/// The server's own gauges (`server.*`), `/runtime`, `/memory` and `/help`, under Envoy and
/// Remora from one bootstrap: the same runtime layers and values, the same `/memory` keys,
/// connections counted alike, the first certificate's expiry in days alike, and every command
/// Remora lists listed by Envoy with the same method.
#[test]
fn server_gauges_runtime_memory_and_help_answer_as_envoys_do() {
    let echo = EchoServer::start("svc", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (http_port, tls_port) = (free_port(), free_port());
    // A certificate that expires in 40 days (to the second): the first to expire.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["server.test".to_string()]).expect("p");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(now + 40 * 86_400 + 3_600);
    let certificate = params.self_signed(&key).expect("certificate");
    let tls = format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{inline_string: {:?}}}
              private_key: {{inline_string: {:?}}}
"#,
        certificate.pem(),
        key.serialize_pem()
    );
    let yaml = format!(
        r#"stats_flush_interval: 1s
layered_runtime:
  layers:
  - name: base
    static_layer: {{re2.max_program_size.error_level: 200, envoy: {{reloadable_features: {{http_reject_path_with_fragment: false}}}}}}
  - name: over
    static_layer: {{re2.max_program_size.error_level: "300"}}
  - name: admin
    admin_layer: {{}}
{}"#,
        bootstrap(
            &admin_yaml,
            &[
                http_listener("plain", http_port, "", &catch_all("svc", "5s")),
                tcp_listener("secure", tls_port, "svc", &tls),
            ],
            &[static_cluster("svc", &[echo.addr])],
        )
    );
    let (_dir, file) = write_config(&yaml);
    let (remora, remora_help, remora_names) = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        server_view(admin, http_port)
    };
    // On its own: the runtime as layered, and the certificate's 40 days.
    let entry = |key: &str| remora.runtime["entries"][key].clone();
    assert_eq!(
        entry("re2.max_program_size.error_level"),
        serde_json::json!({"final_value": "300", "layer_values": ["200", "300", ""]})
    );
    assert_eq!(
        entry("envoy.reloadable_features.http_reject_path_with_fragment"),
        serde_json::json!({"final_value": "false", "layer_values": ["false", "", ""]})
    );
    assert_eq!(
        remora.gauges,
        [
            ("server.concurrency".to_string(), Some(1)),
            ("server.parent_connections".to_string(), Some(0)),
            (
                "server.days_until_first_cert_expiring".to_string(),
                Some(40)
            ),
        ]
    );
    assert_eq!(remora.connections, (1, 0));
    for line in ["  /runtime: ", "  /memory: ", "  /quitquitquit (POST): "] {
        assert!(remora_help.contains(line), "{line} in {remora_help}");
    }
    if !remora_tests::envoy::available_or_skip("the Envoy half of the server gauges comparison") {
        return;
    }
    let (envoy, envoy_help, envoy_names) = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(loopback(http_port), Duration::from_secs(20));
        server_view(admin, http_port)
    };
    assert_eq!(envoy, remora, "left: envoy, right: remora");
    let commands = |help: &str| -> Vec<String> {
        help.lines()
            .filter(|line| line.starts_with("  /"))
            .filter_map(|line| Some(line.split(": ").next()?.trim().to_string()))
            .collect()
    };
    let envoy_commands = commands(&envoy_help);
    for command in commands(&remora_help) {
        assert!(
            envoy_commands.contains(&command),
            "{command:?} is not in Envoy's /help: {envoy_commands:?}"
        );
    }
    for name in &remora_names {
        assert!(
            envoy_names.contains(name),
            "{name} is not among Envoy's stats"
        );
    }
}

/// Whole families of Envoy's stats Remora keeps none of: the admin's own listener and
/// connection manager, Envoy's internal HTTP client, its codecs' counters, its file flusher,
/// runtime layers, watchdogs and overload manager.
const FAMILIES_NOT_KEPT: &[&str] = &[
    "http.admin.",
    "listener.admin.",
    "http.async-client.",
    "http1.",
    "http2.",
    "filesystem.",
    "runtime.",
    "workers.",
    "main_thread.",
    "thread_local_cluster_manager.",
    "overload.",
    "envoy.overload_actions.",
];

/// Envoy's stats that Remora does not keep yet, by prefix and name under the bootstrap of
/// [`stat_names_are_envoys`] (`{listener}`: each listener's address). Each stat Remora gains
/// must leave this list (the test fails until it does), so the list only shrinks, and a stat
/// Remora loses fails the test too.
const NOT_KEPT_YET: &[(&str, &[&str])] = &[
    (
        "cluster.app.",
        &[
            "assignment_stale",
            "assignment_timeout_received",
            "assignment_use_cached",
            "bind_errors",
            "default.total_match_count",
            "http1.dropped_headers_with_underscores",
            "http1.metadata_not_supported_error",
            "http1.requests_rejected_with_underscores_in_headers",
            "http1.response_flood",
            "lb_local_cluster_not_ok",
            "lb_recalculate_zone_structures",
            "lb_subsets_active",
            "lb_subsets_created",
            "lb_subsets_fallback",
            "lb_subsets_fallback_panic",
            "lb_subsets_removed",
            "lb_subsets_selected",
            "lb_zone_cluster_too_small",
            "lb_zone_no_capacity_left",
            "lb_zone_routing_all_directly",
            "lb_zone_routing_cross_zone",
            "lb_zone_routing_sampled",
            "max_host_weight",
            "original_dst_host_invalid",
            "retry_or_shadow_abandoned",
            "upstream_cx_close_notify",
            "upstream_cx_connect_attempts_exceeded",
            "upstream_cx_connect_with_0_rtt",
            "upstream_cx_http3_total",
            "upstream_cx_max_duration_reached",
            "upstream_cx_pool_overflow",
            "upstream_cx_preconnect_skipped",
            "upstream_cx_rx_bytes_buffered",
            "upstream_cx_tx_bytes_buffered",
            "upstream_flow_control_backed_up_total",
            "upstream_flow_control_drained_total",
            "upstream_flow_control_paused_reading_total",
            "upstream_flow_control_resumed_reading_total",
            "upstream_http3_broken",
            "upstream_internal_redirect_failed_total",
            "upstream_internal_redirect_succeeded_total",
            "upstream_queue_overloaded",
            "upstream_rq_0rtt",
            "upstream_rq_cancelled",
            "upstream_rq_maintenance_mode",
            "upstream_rq_max_duration_reached",
            "upstream_rq_retry_backoff_ratelimited",
            "upstream_rq_rx_reset_no_error",
            "warming_state",
        ],
    ),
    (
        "cluster_manager.",
        &[
            "cluster_updated",
            "cluster_updated_via_merge",
            "update_merge_cancelled",
            "update_out_of_merge_window",
        ],
    ),
    (
        "http.ing.",
        &[
            "downstream_cx_delayed_close_timeout",
            "downstream_cx_http1_soft_drain",
            "downstream_cx_max_duration_reached",
            "downstream_cx_overload_disable_keepalive",
            "downstream_cx_rx_bytes_buffered",
            "downstream_cx_tx_bytes_buffered",
            "downstream_flow_control_paused_reading_total",
            "downstream_flow_control_resumed_reading_total",
            "downstream_rq_non_relative_path",
            "downstream_rq_overload_close",
            "downstream_rq_redirected_with_normalized_path",
            "downstream_rq_rejected_via_ip_detection",
            "downstream_rq_response_before_rq_complete",
            "downstream_rq_too_large",
            "downstream_rq_too_many_premature_resets",
            "downstream_rq_ws_on_non_ws_route",
            "passthrough_internal_redirect_bad_location",
            "passthrough_internal_redirect_no_route",
            "passthrough_internal_redirect_predicate",
            "passthrough_internal_redirect_too_many_redirects",
            "passthrough_internal_redirect_unsafe_scheme",
            "rq_overload_local_reply",
            "rq_reset_after_downstream_response_started",
            "rs_too_large",
        ],
    ),
    (
        "listener.{listener}.",
        &[
            "connections_accepted_per_socket_event",
            "downstream_cx_overload_reject",
            "downstream_cx_transport_socket_connect_timeout",
            "downstream_listener_filter_error",
            "downstream_listener_filter_remote_close",
            "extension_config_missing",
            "network_extension_config_missing",
        ],
    ),
    (
        "listener_manager.",
        &[
            "listener_create_failure",
            "listener_in_place_updated",
            "listener_stopped",
            "total_filter_chains_draining",
            "workers_pinned",
        ],
    ),
    (
        "tcp.tcpin.",
        &[
            "downstream_cx_drain_close",
            "downstream_cx_overload_close",
            "downstream_cx_rx_bytes_buffered",
            "downstream_cx_tx_bytes_buffered",
            "downstream_flow_control_paused_reading_total",
            "downstream_flow_control_resumed_reading_total",
            "early_data_received_count_total",
            "max_downstream_connection_duration",
            "route_delayed_total",
            "upstream_flush_active",
        ],
    ),
    (
        "server.",
        &[
            "compilation_settings.fips_mode",
            "debug_assertion_failures",
            "dropped_stat_flushes",
            "dynamic_unknown_fields",
            "envoy_bug_failures",
            "envoy_notifications",
            "hot_restart_epoch",
            "main_thread.watchdog_mega_miss",
            "main_thread.watchdog_miss",
            "seconds_until_first_ocsp_response_expiring",
            "static_unknown_fields",
            "stats_recent_lookups",
            "version",
            "wip_protos",
            "worker_0.watchdog_mega_miss",
            "worker_0.watchdog_miss",
        ],
    ),
];

/// Stats Remora keeps that Envoy does not.
const REMORA_ONLY: &[&str] = &["access_log.dropped_lines"];

/// Every stat and histogram name `/stats` lists.
fn stat_names(admin: SocketAddr) -> std::collections::BTreeSet<String> {
    let body = http_get(admin, "/stats").expect("stats").2;
    body.lines()
        .filter_map(|line| line.split_once(": ").map(|(name, _)| name.to_string()))
        .collect()
}

/// One bootstrap (an HTTP listener, a TCP proxy, one cluster), the same traffic through both
/// proxies, then the names `/stats` lists: Remora's are Envoy's, less [`NOT_KEPT_YET`], plus
/// [`REMORA_ONLY`]. Dashboards and alerts find their series by these names.
#[test]
fn stat_names_are_envoys() {
    let echo = EchoServer::start("app", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (http, tcp) = (free_port(), free_port());
    let yaml = bootstrap(
        &admin_yaml,
        &[
            http_listener("ing", http, "", &catch_all("app", "5s")),
            tcp_listener("tcpin", tcp, "app", ""),
        ],
        &[static_cluster("app", &[echo.addr])],
    );
    let (_dir, file) = write_config(&yaml);
    let not_kept: std::collections::BTreeSet<String> = NOT_KEPT_YET
        .iter()
        .flat_map(|(prefix, names)| names.iter().map(move |name| format!("{prefix}{name}")))
        .flat_map(|name| {
            [http, tcp].map(|port| name.replace("{listener}", &format!("127.0.0.1_{port}")))
        })
        .collect();
    let in_family = |name: &str| FAMILIES_NOT_KEPT.iter().any(|f| name.starts_with(f));
    let run = || {
        // HTTP/1.1 (closed by the proxy, as the requests ask), one of them a 503; HTTP/2
        // (closed by the client).
        let (status, _, _) = http_get(loopback(http), "/ok").expect("request");
        assert_eq!(status, 200);
        let (status, _, _) = http_get(loopback(http), "/status/503").expect("request");
        assert_eq!(status, 503);
        let (runtime, mut sender) = h2_client(loopback(http));
        runtime.block_on(async {
            use http_body_util::BodyExt;
            let request = http::Request::get(format!("http://127.0.0.1:{http}/ok"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("h2 response");
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.expect("h2 body");
        });
        drop((sender, runtime));
        // Through the TCP proxy, bytes both ways.
        let (status, _, _) = http_get(loopback(tcp), "/ok").expect("tunnelled request");
        assert_eq!(status, 200);
        wait_for("every connection closed", Duration::from_secs(15), || {
            let (_, _, body) = http_get(admin, "/stats?filter=downstream_cx_active").ok()?;
            body.lines()
                .all(|line| line.ends_with(": 0") || line.contains("admin"))
                .then_some(())
        });
        stat_names(admin)
    };
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run()
    };
    let listed_yet_kept: Vec<&String> = remora
        .iter()
        .filter(|name| not_kept.contains(*name) || in_family(name))
        .collect();
    assert!(
        listed_yet_kept.is_empty(),
        "kept now: take these out of NOT_KEPT_YET or FAMILIES_NOT_KEPT: {listed_yet_kept:#?}"
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the stat names") {
        return;
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(loopback(http), Duration::from_secs(20));
        run()
    };
    let missing: Vec<&String> = envoy
        .difference(&remora)
        .filter(|name| !not_kept.contains(*name) && !in_family(name))
        .collect();
    let extra: Vec<&String> = remora
        .difference(&envoy)
        .filter(|name| !REMORA_ONLY.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "Envoy's, not Remora's: {missing:#?}\nRemora's, not Envoy's: {extra:#?}"
    );
}
