//! End-to-end: HCM access logs. The same bootstrap runs under remora-proxy and real Envoy; the
//! lines they write (default format and a text format) must match once the fields that differ
//! by nature (start time, durations) are masked.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::{free_port, http_request, poll_until, wait_for};

/// Routes for what the tests send: `/hello`, `/upload` and `/delay` (the echo answers
/// `/delay/MS` that late) to the echo, the rest 404.
const HELLO_AND_UPLOAD: &str = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/hello"}
                route: {cluster: echo}
              - match: {prefix: "/upload"}
                route: {cluster: echo}
              - match: {prefix: "/delay"}
                route: {cluster: echo}
"#;

/// The HCM fields adding two file loggers: Envoy's default format, and a text format.
fn access_logs(default_log: &Path, custom_log: &Path) -> String {
    format!(
        r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                text_format_source:
                  inline_string: "%RESPONSE_CODE% %REQ(:METHOD)% %REQ(:PATH)% %BYTES_RECEIVED% %UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %REQ(X-MISSING?USER-AGENT):3% 100%%\n"
"#,
        default_log.display(),
        custom_log.display()
    )
}

/// The HCM fields adding one file logger with a text format (`format` as YAML escapes it).
fn file_log_with_format(path: &Path, format: &str) -> String {
    format!(
        r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format: {{text_format: "{format}"}}
"#,
        path.display()
    )
}

/// Sends the same three requests; returns the lines of both logs once all 3 are there.
fn exercise(listener: SocketAddr, default_log: &Path, custom_log: &Path) -> (String, String) {
    let requests = [
        ("GET", "/hello?x=1", "1", "", 200),
        ("POST", "/upload", "2", "12345", 200),
        ("GET", "/nowhere", "3", "", 404),
    ];
    for (method, path, n, body, status) in requests {
        let (ua, rid) = (format!("tester/{n}"), format!("rid-{n}"));
        let answer = http_request(
            listener,
            method,
            path,
            &[("user-agent", ua.as_str()), ("x-request-id", rid.as_str())],
            body,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(answer.0, status, "{method} {path}: {answer:?}");
    }
    // Envoy flushes its file logs about once a second.
    wait_for("3 lines in both logs", Duration::from_secs(15), || {
        let a = std::fs::read_to_string(default_log).ok()?;
        let b = std::fs::read_to_string(custom_log).ok()?;
        (a.lines().count() == 3 && b.lines().count() == 3).then_some((a, b))
    })
}

/// Masks what differs between runs: the start time, the duration, the upstream service time,
/// the upstream port (the echo's is the same, but keep it stable) and the response size (the
/// echo's JSON body names the proxy's own headers).
fn masked(default_lines: &str) -> Vec<String> {
    default_lines
        .lines()
        .map(|line| {
            let (_, rest) = line.split_once("] ").expect("[START_TIME] first");
            let mut fields: Vec<String> = rest.split(' ').map(str::to_string).collect();
            // "METHOD PATH PROTOCOL" CODE FLAGS RECEIVED SENT DURATION SVC_TIME ...
            for index in [6, 7, 8] {
                if fields[index] != "-" {
                    fields[index] = "N".into();
                }
            }
            format!("[T] {}", fields.join(" "))
        })
        .collect()
}

/// A proxy under test and its config file, both kept until dropped (the proxy first).
struct Running {
    _proxy: Box<dyn std::any::Any>,
    _config_dir: tempfile::TempDir,
}

/// Starts remora (or Envoy, with `envoy`) on `yaml` and waits for `port` to listen.
fn serve_with(yaml: &str, admin: SocketAddr, port: u16, envoy: bool) -> Running {
    let (config_dir, file) = write_config(yaml);
    let proxy: Box<dyn std::any::Any> = if envoy {
        Box::new(remora_tests::envoy::Envoy::start(&file, admin, &[]))
    } else {
        Box::new(Proxy::start_file(&file, admin, &[]))
    };
    remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
    Running {
        _proxy: proxy,
        _config_dir: config_dir,
    }
}

/// What the tests comparing lines with Envoy's share: an echo upstream, a directory for the
/// logs, and one listener (routing [`HELLO_AND_UPLOAD`] to the echo, unless a test gives its
/// own routes and clusters), under either proxy.
struct LogRig {
    echo: EchoServer,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    admin_yaml: String,
    port: u16,
}

impl LogRig {
    fn new() -> LogRig {
        let (admin, admin_yaml) = admin_block();
        LogRig {
            echo: EchoServer::start("echo", "127.0.0.1"),
            dir: tempfile::tempdir().expect("dir"),
            admin,
            admin_yaml,
            port: free_port(),
        }
    }

    fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `body` against the listener while remora (or Envoy, with `envoy`) serves it with
    /// `log_fields` in the HCM.
    fn serve<T>(&self, log_fields: &str, envoy: bool, body: impl FnOnce(SocketAddr) -> T) -> T {
        self.serve_routes(log_fields, HELLO_AND_UPLOAD, &[], envoy, body)
    }

    /// [`LogRig::serve`] with `routes` (virtual hosts) over the echo (`echo`) and `clusters`.
    fn serve_routes<T>(
        &self,
        hcm_fields: &str,
        routes: &str,
        clusters: &[String],
        envoy: bool,
        body: impl FnOnce(SocketAddr) -> T,
    ) -> T {
        let mut all = vec![static_cluster("echo", &[self.echo.addr])];
        all.extend_from_slice(clusters);
        let yaml = bootstrap(
            &self.admin_yaml,
            &[http_listener("ingress", self.port, hcm_fields, routes)],
            &all,
        );
        let _running = serve_with(&yaml, self.admin, self.port, envoy);
        body(loopback(self.port))
    }
}

/// The lines of each of `logs` once each has its count in `counts`, or as they are after 15 s
/// (for a test to compare). Each log has its own writer, so one being complete says nothing
/// of the others.
fn lines_settled(logs: &[std::path::PathBuf], counts: &[usize]) -> Vec<Vec<String>> {
    let read = || -> Vec<Vec<String>> {
        logs.iter()
            .map(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                text.lines().map(str::to_string).collect()
            })
            .collect()
    };
    poll_until(Duration::from_secs(15), || {
        let lines = read();
        lines
            .iter()
            .map(Vec::len)
            .eq(counts.iter().copied())
            .then_some(lines)
    })
    .unwrap_or_else(read)
}

/// The lines of `log` once it has `count` (Envoy writes its file logs about once a second).
fn lines_once(log: &Path, count: usize) -> Vec<String> {
    wait_for("a line per request", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(log).ok()?;
        (text.lines().count() == count).then(|| text.lines().map(str::to_string).collect())
    })
}

#[test]
fn access_logs_match_envoys_lines() {
    let rig = LogRig::new();
    let port = rig.port;
    let run = |tag: &str, envoy: bool| {
        let default_log = rig.log_path(&format!("{tag}-default.log"));
        let custom_log = rig.log_path(&format!("{tag}-custom.log"));
        rig.serve(&access_logs(&default_log, &custom_log), envoy, |addr| {
            exercise(addr, &default_log, &custom_log)
        })
    };

    let (default_lines, custom_lines) = run("remora", false);
    let masked_remora = masked(&default_lines);
    let upstream = rig.echo.addr.to_string();
    assert_eq!(
        masked_remora[0],
        format!(
            "[T] \"GET /hello?x=1 HTTP/1.1\" 200 - 0 N N N \"-\" \"tester/1\" \"rid-1\" \"127.0.0.1:{port}\" \"{upstream}\""
        )
    );
    assert!(
        masked_remora[1].starts_with("[T] \"POST /upload HTTP/1.1\" 200 - 5 N N N "),
        "{}",
        masked_remora[1]
    );
    assert!(
        masked_remora[2].starts_with("[T] \"GET /nowhere HTTP/1.1\" 404 NR 0 N N - "),
        "{}",
        masked_remora[2]
    );
    assert!(default_lines.starts_with("[20"), "{default_lines}");
    assert_eq!(
        custom_lines,
        "200 GET /hello?x=1 0 echo - tes 100%\n200 POST /upload 5 echo - tes 100%\n404 GET /nowhere 0 - NR tes 100%\n"
    );

    if !remora_tests::envoy::available_or_skip("the Envoy half of the access log test") {
        return;
    }
    let (envoy_default, envoy_custom) = run("envoy", true);
    assert_eq!(
        masked(&envoy_default),
        masked_remora,
        "left: envoy, right: remora"
    );
    assert_eq!(envoy_custom, custom_lines, "left: envoy, right: remora");
}

/// A generated request id (a UUID) as `<id>`, so lines from two proxies compare.
fn ids_masked(line: &str) -> String {
    line.split(' ')
        .map(|field| {
            let uuid = field.len() == 36
                && field.bytes().enumerate().all(|(i, b)| {
                    matches!(i, 8 | 13 | 18 | 23) == (b == b'-')
                        && (b == b'-' || b.is_ascii_hexdigit())
                });
            if uuid { "<id>" } else { field }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Envoy's log reads a request's headers when it writes the line, so it shows them as the
/// connection manager and the router left them: a generated `x-request-id`, the route's added
/// header, a rewritten path and host. That holds for requests answered without an upstream
/// too (no route, no cluster, no healthy host, a direct response, a redirect), which differ only
/// in how far the router got before it answered.
#[test]
fn requests_are_logged_as_they_left_also_when_answered_locally() {
    let rig = LogRig::new();
    let routes = r#"            - name: all
              domains: ["*"]
              request_headers_to_add: [{header: {key: x-added, value: by-route}}]
              routes:
              - match: {prefix: "/forwarded"}
                name: forwarded
                route: {cluster: echo}
              - match: {prefix: "/rewritten"}
                route: {cluster: echo, prefix_rewrite: "/elsewhere", host_rewrite_literal: other.example}
              - match: {prefix: "/no-cluster"}
                route: {cluster_header: x-no-such-header}
              - match: {prefix: "/no-host"}
                route: {cluster: empty}
              - match: {prefix: "/direct"}
                name: direct
                direct_response: {status: 202}
              - match: {prefix: "/redirect"}
                redirect: {path_redirect: "/forwarded"}
              - match: {prefix: "/refused"}
                route: {cluster: refused}
              - match: {prefix: "/slow"}
                route: {cluster: silent, timeout: 0.3s}
"#;
    let (_silent, silent) = silent_upstream();
    let format = "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)% %REQ(X-ENVOY-ORIGINAL-PATH)% %REQ(:AUTHORITY)% %REQ(X-ENVOY-ORIGINAL-HOST)% %REQ(X-REQUEST-ID)% %REQ(X-FORWARDED-PROTO)% %REQ(X-ENVOY-EXPECTED-RQ-TIMEOUT-MS)% %REQ(X-ADDED)% %ROUTE_NAME% %UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW% %REQUESTED_SERVER_NAME% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% %UPSTREAM_TRANSPORT_FAILURE_REASON% %UPSTREAM_LOCAL_ADDRESS%\\n";
    let paths = [
        "/forwarded",
        "/rewritten/x?q=1",
        "/nowhere",
        "/no-cluster",
        "/no-host",
        "/direct",
        "/redirect",
        "/refused",
        "/slow",
    ];
    let clusters = [
        static_cluster("empty", &[]),
        static_cluster("refused", &[closed_port()]),
        static_cluster("silent", &[silent]),
    ];
    let run = |tag: &str, envoy: bool| -> Vec<String> {
        let log = rig.log_path(&format!("{tag}.log"));
        let fields = file_log_with_format(&log, format);
        let lines = rig.serve_routes(&fields, routes, &clusters, envoy, |listener| {
            for path in paths {
                http_request(listener, "GET", path, &[], "")
                    .unwrap_or_else(|e| panic!("{tag} {path}: {e}"));
            }
            lines_once(&log, paths.len())
        });
        // The upstream connection's local port, last, differs by run.
        let masked = |line: &String| match ids_masked(line).rsplit_once(' ') {
            Some((rest, local)) if local.starts_with("127.0.0.1:") => format!("{rest} <local>"),
            _ => ids_masked(line),
        };
        lines.iter().map(masked).collect()
    };

    let remora = run("remora", false);
    let host = format!("127.0.0.1:{}", rig.port);
    let expected = [
        format!(
            "200 - /forwarded - {host} - <id> http 15000 by-route forwarded echo echo - via_upstream - - <local>"
        ),
        format!(
            "200 - /elsewhere/x?q=1 /rewritten/x?q=1 other.example {host} <id> http 15000 by-route - echo echo - via_upstream - - <local>"
        ),
        format!("404 NR /nowhere - {host} - <id> http - - - - - - route_not_found - - -"),
        format!("503 NC /no-cluster - {host} - <id> http - - - - - - cluster_not_found - - -"),
        format!(
            "503 UH /no-host - {host} - <id> http 15000 by-route - empty empty - no_healthy_upstream - - -"
        ),
        format!("202 - /direct - {host} - <id> http - - direct - - - direct_response - - -"),
        format!("301 - /redirect - {host} - <id> http - - - - - - direct_response - - -"),
        format!(
            "503 UF /refused - {host} - <id> http 15000 by-route - refused refused - upstream_reset_before_response_started{{remote_connection_failure|delayed_connect_error:_Connection_refused}} - delayed_connect_error:_Connection_refused -"
        ),
        format!(
            "504 UT /slow - {host} - <id> http 300 by-route - silent silent - response_timeout - - <local>"
        ),
    ];
    assert_eq!(remora, expected);

    if !remora_tests::envoy::available_or_skip("the Envoy half of the local reply log test") {
        return;
    }
    assert_eq!(run("envoy", true), remora, "left: envoy, right: remora");
}

/// Istio's default access log format (its mesh config's text format), as YAML escapes it.
const ISTIO_FORMAT: &str = r#"[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"#;

/// A bootstrap with Istio's format loads, and its lines are Envoy's once what differs by run is
/// masked: the time, bytes sent (the echo's body names the proxy's headers), durations, and the
/// ports of the two connections' client ends.
#[test]
fn istios_default_format_is_written_as_envoy_writes_it() {
    let rig = LogRig::new();
    let run = |tag: &str, envoy: bool| -> Vec<String> {
        let log = rig.log_path(&format!("{tag}-istio.log"));
        rig.serve(&file_log_with_format(&log, ISTIO_FORMAT), envoy, |addr| {
            for (method, path, body) in [
                ("GET", "/hello?x=1", ""),
                ("POST", "/upload", "12345"),
                ("GET", "/nowhere", ""),
            ] {
                http_request(
                    addr,
                    method,
                    path,
                    &[("user-agent", "tester/1"), ("x-request-id", "rid-1")],
                    body,
                )
                .unwrap_or_else(|e| panic!("{tag} {path}: {e}"));
            }
            wait_for("3 lines", Duration::from_secs(15), || {
                let text = std::fs::read_to_string(&log).ok()?;
                (text.lines().count() == 3).then(|| text.lines().map(str::to_string).collect())
            })
        })
    };
    let mask = |line: &String| -> String {
        let mut fields: Vec<String> = line.split(' ').map(str::to_string).collect();
        assert_eq!(fields.len(), 24, "{line}");
        // Start time, bytes sent, duration, service time, the upstream connection's local
        // address, the client's port.
        for index in [0, 10, 11, 12, 19] {
            if fields[index] != "-" {
                fields[index] = "N".into();
            }
        }
        fields[21] = fields[21].split(':').next().unwrap_or_default().to_string();
        fields.join(" ")
    };
    let remora: Vec<String> = run("remora", false).iter().map(mask).collect();
    let port = rig.port;
    let echo = rig.echo.addr;
    assert_eq!(
        remora[0],
        format!(
            "N \"GET /hello?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 N N N \"-\" \"tester/1\" \"rid-1\" \"127.0.0.1:{port}\" \"{echo}\" echo N 127.0.0.1:{port} 127.0.0.1 - -"
        )
    );
    assert!(
        remora[2].contains(" 404 NR route_not_found - \"-\" 0 "),
        "{}",
        remora[2]
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the Istio format test") {
        return;
    }
    let envoy: Vec<String> = run("envoy", true).iter().map(mask).collect();
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

/// The address operators, whole and in part, with and without `x-forwarded-for`: the
/// remote address is the client the connection manager settles on (the `x-forwarded-for`
/// address, port 0, as `use_remote_address` is off), the direct one the peer.
#[test]
fn address_operators_read_the_addresses_envoy_reads() {
    const FORMAT: &str = r"%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %UPSTREAM_REMOTE_ADDRESS% %UPSTREAM_REMOTE_PORT% %UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %START_TIME(%Y)%\n";
    let rig = LogRig::new();
    let run = |tag: &str, envoy: bool| -> Vec<String> {
        let log = rig.log_path(&format!("{tag}-addresses.log"));
        rig.serve(&file_log_with_format(&log, FORMAT), envoy, |addr| {
            for forwarded in [None, Some("10.1.2.3")] {
                let headers: Vec<(&str, &str)> = forwarded
                    .map(|ip| ("x-forwarded-for", ip))
                    .into_iter()
                    .collect();
                http_request(addr, "GET", "/hello", &headers, "")
                    .unwrap_or_else(|e| panic!("{tag}: {e}"));
            }
            lines_once(&log, 2)
        })
    };
    let remora = run("remora", false);
    let (port, echo) = (rig.port, rig.echo.addr);
    let year = jiff::Timestamp::now().strftime("%Y").to_string();
    let peer = |line: &str| line.split(' ').next().unwrap_or_default().to_string();
    assert_eq!(
        remora[0],
        format!(
            "{} 127.0.0.1 127.0.0.1 {port} 127.0.0.1 {echo} {} 127.0.0.1 {year}",
            peer(&remora[0]),
            echo.port()
        )
    );
    assert_eq!(
        remora[1],
        format!(
            "10.1.2.3:0 10.1.2.3 127.0.0.1 {port} 127.0.0.1 {echo} {} 127.0.0.1 {year}",
            echo.port()
        )
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the address operators") {
        return;
    }
    // The client's port differs from run to run.
    let mask = |lines: Vec<String>| -> Vec<String> {
        lines
            .iter()
            .map(|line| line.replacen(&peer(line), "PEER", 1))
            .collect()
    };
    assert_eq!(
        mask(run("envoy", true)),
        mask(remora),
        "left: envoy, right: remora"
    );
}

/// A `tcp_proxy` writes a line per connection when it closes, as Envoy's does: no request
/// (`"- - -"`, code 0), the bytes each way, the upstream, and UF for a refused connect.
#[test]
fn tcp_proxy_connections_are_logged_as_envoy_logs_them() {
    let echo = EchoServer::start("echo", "127.0.0.1");
    let dir = tempfile::tempdir().expect("dir");
    let (admin, admin_yaml) = admin_block();
    let (open, refused) = (free_port(), free_port());
    let closed = closed_port();
    let format = "%RESPONSE_CODE% %RESPONSE_FLAGS% %PROTOCOL% %REQ(:METHOD)% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_TRANSPORT_FAILURE_REASON% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %ROUTE_NAME% %REQUESTED_SERVER_NAME%\\n";
    let request = "GET /tcp HTTP/1.1\r\nHost: tcp\r\nConnection: close\r\n\r\n";
    // A third log keeps only the connections whose upstream connect failed.
    let run = |tag: &str, envoy: bool| -> (Vec<String>, String, usize, String) {
        let (default_log, custom_log, failed_log) = (
            dir.path().join(format!("{tag}-default.log")),
            dir.path().join(format!("{tag}-custom.log")),
            dir.path().join(format!("{tag}-failed.log")),
        );
        let logs = |log: &Path| {
            format!(
                "          access_log:\n          - name: envoy.access_loggers.file\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n          - name: envoy.access_loggers.file\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n              log_format: {{text_format: \"{format}\"}}\n{}",
                default_log.display(),
                log.display(),
                filtered_log(&failed_log, "{response_flag_filter: {flags: [UF]}}"),
            )
        };
        let yaml = bootstrap(
            &admin_yaml,
            &[
                tcp_listener("tcp_open", open, "echo", &logs(&custom_log)),
                tcp_listener("tcp_refused", refused, "refused", &logs(&custom_log)),
            ],
            &[
                static_cluster("echo", &[echo.addr]),
                static_cluster("refused", &[closed]),
            ],
        );
        let _running = serve_with(&yaml, admin, open, envoy);
        let answer = {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(loopback(open)).expect("connect");
            stream.write_all(request.as_bytes()).expect("write");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).expect("read");
            answer.len()
        };
        {
            use std::io::Read;
            let mut stream = std::net::TcpStream::connect(loopback(refused)).expect("connect");
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        wait_for("a line per connection", Duration::from_secs(15), || {
            let custom = std::fs::read_to_string(&custom_log).ok()?;
            let default = std::fs::read_to_string(&default_log).ok()?;
            let failed = std::fs::read_to_string(&failed_log).ok()?;
            // Three connections: the harness's readiness probe (opened and closed at once,
            // so how far its upstream connect got is a race), the request, the refused one.
            let all_in = custom.lines().count() == 3 && default.lines().count() == 3;
            (all_in && failed.lines().count() == 1).then(|| {
                // The upstream connection's local port differs by run.
                let custom = custom
                    .lines()
                    .filter(|line| !line.starts_with("0 - - - 0 0 "))
                    .map(|line| {
                        line.split(' ')
                            .enumerate()
                            .map(|(i, f)| if i == 8 && f != "-" { "<local>" } else { f })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect();
                // The request's line in the default format, without its time and duration.
                let received = format!("\" 0 - {} ", request.len());
                let first = default
                    .lines()
                    .find(|line| line.contains(&received))
                    .unwrap_or_default();
                let (_, rest) = first.split_once("] ").unwrap_or_default();
                let fields: Vec<&str> = rest.split(' ').collect();
                let default = format!("{} {}", fields[..7].join(" "), fields[8..].join(" "));
                (custom, default, answer, failed.trim_end().to_string())
            })
        })
    };
    let (remora, remora_default, answered, remora_failed) = run("remora", false);
    let echo_addr = echo.addr;
    let (custom_open, custom_refused) = {
        let mut sorted = remora.clone();
        sorted.sort_by_key(|line| line.contains("UF"));
        (sorted[0].clone(), sorted[1].clone())
    };
    assert_eq!(
        custom_open,
        format!(
            "0 - - - {} {answered} {echo_addr} echo <local> - 1 - -",
            request.len()
        )
    );
    assert_eq!(
        custom_refused,
        format!(
            "0 UF,URX - - 0 0 {closed} refused - delayed_connect_error:_Connection_refused 1 - -"
        )
    );
    assert_eq!(
        remora_failed, "- 0 UF,URX",
        "the filtered log keeps the refused connection alone"
    );
    assert_eq!(
        remora_default,
        format!(
            "\"- - -\" 0 - {} {answered} - \"-\" \"-\" \"-\" \"-\" \"{echo_addr}\"",
            request.len()
        )
    );

    if !remora_tests::envoy::available_or_skip("the Envoy half of the tcp_proxy log test") {
        return;
    }
    let (mut envoy, envoy_default, envoy_answered, envoy_failed) = run("envoy", true);
    let mut remora = remora;
    envoy.sort();
    remora.sort();
    assert_eq!(envoy_failed, remora_failed, "left: envoy, right: remora");
    assert_eq!(envoy_answered, answered);
    assert_eq!(envoy, remora, "left: envoy, right: remora");
    assert_eq!(envoy_default, remora_default, "left: envoy, right: remora");
}

/// Two file loggers with the same `json_format`, the second with `omit_empty_values`, and a
/// text logger with `omit_empty_values` into `text_log`.
fn json_access_logs(plain_log: &Path, omitting_log: &Path, text_log: &Path) -> String {
    let logger = |path: &Path, omit: bool| {
        format!(
            r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                omit_empty_values: {omit}
                json_format:
                  code: "%RESPONSE_CODE%"
                  method: "%REQ(:METHOD)%"
                  path: "%REQ(:PATH)%"
                  trimmed: "%REQ(:PATH):4%"
                  agent: "%REQ(X-MISSING?USER-AGENT)%"
                  missing: "%REQ(X-MISSING)%"
                  mixed: "code=%RESPONSE_CODE% missing=%REQ(X-MISSING)%"
                  flags: "%RESPONSE_FLAGS%"
                  received: "%BYTES_RECEIVED%"
                  sent: "%BYTES_SENT%"
                  duration: "%DURATION%"
                  cluster: "%UPSTREAM_CLUSTER%"
                  protocol: "%PROTOCOL%"
                  literal: "text"
                  number: 7
                  flag: true
                  list: ["%RESPONSE_CODE%", "x=%REQ(:METHOD)%", {{missing: "%REQ(X-MISSING)%"}}, [-3, null]]
                  nested: {{request_id: "%REQ(X-REQUEST-ID)%", deeper: {{host: "%REQ(:AUTHORITY)%"}}}}
"#,
            path.display()
        )
    };
    format!(
        r#"          access_log:
{}{}          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                omit_empty_values: true
                text_format: "[%REQ(X-MISSING)%] [%UPSTREAM_CLUSTER%] %RESPONSE_CODE%\n"
"#,
        logger(plain_log, false),
        logger(omitting_log, true),
        text_log.display()
    )
}

/// A JSON log line with the values that differ between runs by nature (duration, response
/// size: the echo's body names the proxy's own headers) replaced by their JSON type.
fn masked_json(line: &str) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    for key in ["duration", "sent"] {
        if let Some(field) = value.get_mut(key) {
            assert!(field.is_u64(), "{key} is a number: {line}");
            *field = "N".into();
        }
    }
    value
}

#[test]
fn json_access_logs_match_envoys() {
    let rig = LogRig::new();
    let port = rig.port;
    let run = |tag: &str, envoy: bool| {
        let plain_log = rig.log_path(&format!("{tag}-plain.log"));
        let omitting_log = rig.log_path(&format!("{tag}-omitting.log"));
        let text_log = rig.log_path(&format!("{tag}-text.log"));
        let logs = json_access_logs(&plain_log, &omitting_log, &text_log);
        // The text log is read while the proxy still runs: its writer may lag the other two,
        // and a stopped proxy writes nothing more.
        let ((plain, omitting), text) = rig.serve(&logs, envoy, |addr| {
            let json = exercise(addr, &plain_log, &omitting_log);
            let text = wait_for("3 lines in the text log", Duration::from_secs(15), || {
                let text = std::fs::read_to_string(&text_log).ok()?;
                (text.lines().count() == 3).then_some(text)
            });
            (json, text)
        });
        let parse = |text: String| text.lines().map(masked_json).collect::<Vec<_>>();
        (parse(plain), parse(omitting), text)
    };

    let (plain, omitting, text) = run("remora", false);
    assert_eq!(
        plain[0],
        serde_json::json!({
            "code": 200, "method": "GET", "path": "/hello?x=1", "trimmed": "/hel",
            "agent": "tester/1", "missing": null, "mixed": "code=200 missing=-", "flags": "-",
            "received": 0, "sent": "N", "duration": "N", "cluster": "echo",
            "protocol": "HTTP/1.1", "literal": "text", "number": 7, "flag": true,
            "list": [200, "x=GET", {"missing": null}, [-3, null]],
            "nested": {"request_id": "rid-1", "deeper": {"host": format!("127.0.0.1:{port}")}},
        })
    );
    assert_eq!(plain[2]["code"], 404);
    assert_eq!(plain[2]["flags"], "NR");
    assert_eq!(plain[2]["cluster"], serde_json::Value::Null);
    assert!(omitting[0].get("missing").is_none(), "{}", omitting[0]);
    assert_eq!(omitting[0]["list"], serde_json::json!([200, "x=GET", [-3]]));
    assert!(omitting[2].get("cluster").is_none(), "{}", omitting[2]);
    assert_eq!(omitting[0]["mixed"], "code=200 missing=");
    assert_eq!(text, "[] [echo] 200\n[] [echo] 200\n[] [] 404\n");

    if !remora_tests::envoy::available_or_skip("the Envoy half of the JSON access log test") {
        return;
    }
    let (envoy_plain, envoy_omitting, envoy_text) = run("envoy", true);
    assert_eq!(envoy_plain, plain, "left: envoy, right: remora");
    assert_eq!(envoy_omitting, omitting, "left: envoy, right: remora");
    assert_eq!(envoy_text, text, "left: envoy, right: remora");
}

#[test]
fn a_body_cut_by_the_route_timeout_is_logged_with_ut() {
    // Headers and 7 bytes of a 20-byte body, then the upstream stalls past the 1 s route
    // timeout: the stream is cut, and the line says 200 UT with the 7 bytes sent, as Envoy's.
    let upstream = HeldUpstream::start_stalled_body("partial", "-and-the-rest");
    let dir = tempfile::tempdir().expect("dir");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let routes = catch_all("stalled", "1s");
    let run = |tag: &str, start: &dyn Fn(&Path) -> Box<dyn std::any::Any>| {
        let log = dir.path().join(format!("{tag}.log"));
        let hcm = file_log_with_format(&log, r"%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_SENT%\n");
        let yaml = bootstrap(
            &admin_yaml,
            &[http_listener("ingress", port, &hcm, &routes)],
            &[static_cluster("stalled", &[upstream.addr])],
        );
        let (_config_dir, file) = write_config(&yaml);
        let _proxy = start(&file);
        remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
        // The cut shows as an error or a short body, depending on the client; the log is
        // what is under test.
        let _ = http_request(loopback(port), "GET", "/", &[], "");
        wait_for("the log line", Duration::from_secs(15), || {
            let text = std::fs::read_to_string(&log).ok()?;
            (!text.is_empty()).then_some(text)
        })
    };
    let remora = run("remora", &|file| {
        Box::new(Proxy::start_file(file, admin, &[]))
    });
    assert_eq!(remora, "200 UT 7\n");
    if !remora_tests::envoy::available_or_skip("the Envoy half of the cut-body log test") {
        return;
    }
    let envoy = run("envoy", &|file| {
        Box::new(remora_tests::envoy::Envoy::start(file, admin, &[]))
    });
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

/// A Remora proxy whose one listener forwards to an echo server and logs each request's path
/// to `log`, a file in `dir`.
struct PathLogger {
    proxy: Proxy,
    /// The listener's port.
    port: u16,
    log: std::path::PathBuf,
    dir: tempfile::TempDir,
    _echo: EchoServer,
}

fn start_path_logger() -> PathLogger {
    let echo = EchoServer::start("echo", "127.0.0.1");
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let hcm = file_log_with_format(&log, r"%REQ(:PATH)%\n");
    // 15 s: Envoy's default route timeout.
    let routes = catch_all("echo", "15s");
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, &hcm, &routes)],
        &[static_cluster("echo", &[echo.addr])],
    );
    PathLogger {
        proxy: Proxy::start(&yaml, admin, &[]),
        port,
        log,
        dir,
        _echo: echo,
    }
}

#[test]
fn sigusr1_reopens_log_files_for_rotation() {
    // logrotate's way, which Envoy supports: move the file away, then SIGUSR1. Lines after the
    // signal go to a fresh file at the configured path; the moved file keeps the earlier ones.
    let PathLogger {
        mut proxy,
        port,
        log,
        dir,
        _echo,
    } = start_path_logger();
    let get = |path: &str| {
        let (status, _, _) =
            http_request(loopback(port), "GET", path, &[], "").expect("request through proxy");
        assert_eq!(status, 200, "{path}");
    };
    get("/before");
    wait_for("the first line", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text == "/before\n").then_some(())
    });
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    proxy.process.signal("USR1");
    // The signal is handled asynchronously: send until a line lands in the reopened file.
    let mut sent = 0;
    let fresh = wait_for(
        "a line in the reopened file",
        Duration::from_secs(15),
        || {
            sent += 1;
            get(&format!("/after-{sent}"));
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| !text.is_empty())
        },
    );
    assert!(
        fresh.lines().all(|line| line.starts_with("/after-")),
        "{fresh}"
    );
    let old = std::fs::read_to_string(&rotated).expect("rotated file");
    assert!(old.starts_with("/before\n"), "{old}");
    assert!(
        proxy.process.try_wait().is_none(),
        "SIGUSR1 must not stop the proxy"
    );
    // Every request above came on its own connection; they all share one writer thread (the
    // kernel truncates thread names to 15 bytes).
    let writers = std::fs::read_dir(format!("/proc/{}/task", proxy.process.id()))
        .expect("proxy threads")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "remora-access-l")
        })
        .count();
    assert_eq!(writers, 1, "one writer thread per log file");
}

/// Lines wait in their writer's buffer for a moment (Envoy's file logger flushes on an
/// interval too); a proxy told to stop writes them before it exits, so no request of its last
/// moments goes unlogged.
#[test]
fn a_stopping_proxy_writes_every_waiting_line() {
    let PathLogger {
        mut proxy,
        port,
        log,
        dir: _dir,
        _echo,
    } = start_path_logger();
    let sent: Vec<String> = (0..200).map(|i| format!("/request-{i}")).collect();
    for path in &sent {
        let (status, _, _) =
            http_request(loopback(port), "GET", path, &[], "").expect("request through proxy");
        assert_eq!(status, 200, "{path}");
    }
    proxy.process.signal("INT");
    wait_for("the proxy to exit", Duration::from_secs(15), || {
        proxy.process.try_wait()
    });
    let text = std::fs::read_to_string(&log).expect("the log");
    // A line is written when its response has ended, so two may swap places.
    let mut logged: Vec<&str> = text.lines().collect();
    logged.sort_unstable();
    let mut sent: Vec<&str> = sent.iter().map(String::as_str).collect();
    sent.sort_unstable();
    assert_eq!(logged, sent, "every request logged once");
}

/// One file log writing `%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%` for the requests its
/// `filter` (YAML, flow style) picks.
fn filtered_log(path: &Path, filter: &str) -> String {
    format!(
        r#"          - name: envoy.access_loggers.file
            filter: {filter}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format: {{text_format: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}
"#,
        path.display()
    )
}

#[test]
fn filters_pick_the_lines_envoy_picks() {
    let rig = LogRig::new();
    let receiver = remora_tests::otlp::Receiver::start();
    let (_silent, silent) = silent_upstream();
    let filters: [(&str, &str); 11] = [
        (
            "errors",
            "{status_code_filter: {comparison: {op: GE, value: {default_value: 400, runtime_key: errors}}}}",
        ),
        (
            "not-503",
            "{status_code_filter: {comparison: {op: NE, value: {default_value: 503, runtime_key: k}}}}",
        ),
        ("uh-or-nr", "{response_flag_filter: {flags: [UH, NR]}}"),
        ("any-flag", "{response_flag_filter: {}}"),
        (
            "marked",
            "{header_filter: {header: {name: x-log, present_match: true}}}",
        ),
        (
            "unmarked",
            "{header_filter: {header: {name: x-log, present_match: true, invert_match: true}}}",
        ),
        (
            "hello-ok",
            "{and_filter: {filters: [{status_code_filter: {comparison: {op: EQ, value: {default_value: 200, runtime_key: k}}}}, {header_filter: {header: {name: ':path', string_match: {prefix: /hello}}}}]}}",
        ),
        (
            "missing-or-slow",
            "{or_filter: {filters: [{status_code_filter: {comparison: {op: EQ, value: {default_value: 404, runtime_key: k}}}}, {duration_filter: {comparison: {op: GE, value: {default_value: 500, runtime_key: k}}}}]}}",
        ),
        (
            "half",
            "{runtime_filter: {runtime_key: half, percent_sampled: {numerator: 50, denominator: HUNDRED}}}",
        ),
        ("forced", "{traceable_filter: {}}"),
        ("not-health-checks", "{not_health_check_filter: {}}"),
    ];
    // The test client is internal, so that its request ids are kept and its forced trace
    // honoured; nothing is sampled at random.
    let tracing = r#"          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}
          use_remote_address: true
          tracing:
            random_sampling: {value: 0}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otlp}, timeout: 2s}
                service_name: filters
"#;
    // `/slow` times out after a second; the duration filter's 500 ms sits well apart from it
    // (Envoy's timer can end the request a millisecond early) and from the other requests.
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/hello"}
                route: {cluster: echo}
              - match: {prefix: "/status"}
                route: {cluster: echo}
              - match: {prefix: "/no-host"}
                route: {cluster: empty}
              - match: {prefix: "/slow"}
                route: {cluster: silent, timeout: 1s}
"#;
    // The runtime filter draws from the request id's first eight hex digits, modulo 100.
    let id = |prefix: &str| format!("{prefix}-0000-4000-8000-000000000000");
    let requests: [(&str, Vec<(&str, String)>); 7] = [
        (
            "/hello/a",
            vec![("x-request-id", id("00000001")), ("x-log", "1".into())],
        ),
        ("/hello/b", vec![("x-request-id", id("00000063"))]),
        ("/status/503", vec![("x-request-id", id("00000002"))]),
        ("/nowhere", vec![("x-request-id", id("00000064"))]),
        (
            "/no-host",
            vec![("x-request-id", id("00000031")), ("x-log", "1".into())],
        ),
        ("/slow", vec![("x-request-id", id("00000032"))]),
        (
            "/hello/forced",
            vec![
                ("x-request-id", id("000000c8")),
                ("x-envoy-force-trace", "1".into()),
            ],
        ),
    ];
    let clusters = [
        static_cluster("empty", &[]),
        static_cluster("silent", &[silent]),
        common::http2_cluster("otlp", receiver.addr),
    ];
    let lines = |lines: &[&str]| {
        lines
            .iter()
            .map(|line| line.to_string())
            .collect::<Vec<_>>()
    };
    let (hello_a, hello_b, upstream_503) =
        ("/hello/a 200 -", "/hello/b 200 -", "/status/503 503 -");
    let (nowhere, no_host, slow) = ("/nowhere 404 NR", "/no-host 503 UH", "/slow 504 UT");
    let forced = "/hello/forced 200 -";
    let every = [
        hello_a,
        hello_b,
        upstream_503,
        nowhere,
        no_host,
        slow,
        forced,
    ];
    let expected = vec![
        ("errors", lines(&[upstream_503, nowhere, no_host, slow])),
        ("not-503", lines(&[hello_a, hello_b, nowhere, slow, forced])),
        ("uh-or-nr", lines(&[nowhere, no_host])),
        ("any-flag", lines(&[nowhere, no_host, slow])),
        ("marked", lines(&[hello_a, no_host])),
        (
            "unmarked",
            lines(&[hello_b, upstream_503, nowhere, slow, forced]),
        ),
        ("hello-ok", lines(&[hello_a, hello_b, forced])),
        ("missing-or-slow", lines(&[nowhere, slow])),
        (
            "half",
            lines(&[hello_a, upstream_503, nowhere, no_host, forced]),
        ),
        ("forced", lines(&[forced])),
        ("not-health-checks", lines(&every)),
    ];
    let expected: Vec<(String, Vec<String>)> = expected
        .into_iter()
        .map(|(name, lines)| (name.to_string(), lines))
        .collect();
    // Each log has its own writer: a test reads them once each has the lines it should, or
    // after 15 s, and then compares.
    let counts: Vec<usize> = expected.iter().map(|(_, lines)| lines.len()).collect();
    let run = |tag: &str, envoy: bool| -> Vec<(String, Vec<String>)> {
        let path = |name: &str| rig.log_path(&format!("{tag}-{name}.log"));
        let logs: String = filters
            .iter()
            .map(|(name, filter)| filtered_log(&path(name), filter))
            .collect();
        let hcm = format!("{tracing}          access_log:\n{logs}");
        rig.serve_routes(&hcm, routes, &clusters, envoy, |listener| {
            for (path, headers) in &requests {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(name, value)| (*name, value.as_str()))
                    .collect();
                http_request(listener, "GET", path, &headers, "")
                    .unwrap_or_else(|e| panic!("{tag} {path}: {e}"));
            }
            let logs: Vec<_> = filters.iter().map(|(name, _)| path(name)).collect();
            let names = filters.iter().map(|(name, _)| name.to_string());
            names.zip(lines_settled(&logs, &counts)).collect()
        })
    };

    let remora = run("remora", false);
    assert_eq!(remora, expected);

    if !remora_tests::envoy::available_or_skip("the Envoy half of the access log filter test") {
        return;
    }
    assert_eq!(run("envoy", true), remora, "left: envoy, right: remora");
}

/// Sends a `POST` whose 5-byte body follows its head by `pause`; returns the response's status
/// line (empty if the proxy closed the connection first).
fn post_with_slow_body(addr: SocketAddr, path: &str, pause: Duration) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("head");
    // The pause is what is measured (a slow upload), not a wait for something to happen.
    std::thread::sleep(pause);
    // A proxy that answered without the body may have closed the connection already.
    let _ = stream.write_all(b"hello");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn phase_durations_are_timed_where_envoy_times_them() {
    let rig = LogRig::new();
    let format = "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %REQUEST_DURATION% %REQUEST_TX_DURATION% %RESPONSE_DURATION% %RESPONSE_TX_DURATION% %DURATION%\\n";
    // Times as classes: the pauses are 300 ms, the rest of a request takes far less. A proxy
    // times a pause from when it read the head, which can lag the client's write by a
    // scheduling delay on a busy machine, so a 300 ms pause may read a few ms short.
    let class = |field: &str| match field.parse::<u64>() {
        Err(_) => field.to_string(),
        Ok(millis) if millis < 150 => "fast".into(),
        Ok(millis) if millis >= 250 => "slow".into(),
        Ok(millis) => format!("{millis} ms, neither fast nor slow"),
    };
    let pause = Duration::from_millis(300);
    let run = |tag: &str, envoy: bool| -> Vec<String> {
        let log = rig.log_path(&format!("{tag}-phases.log"));
        rig.serve(&file_log_with_format(&log, format), envoy, |listener| {
            for path in ["/hello", "/delay/300"] {
                http_request(listener, "GET", path, &[], "")
                    .unwrap_or_else(|e| panic!("{tag} {path}: {e}"));
            }
            let answer = post_with_slow_body(listener, "/upload", pause);
            assert!(answer.contains(" 200 "), "{tag}: {answer}");
            http_request(listener, "GET", "/nowhere", &[], "").expect("404");
            let answer = post_with_slow_body(listener, "/nowhere", pause);
            assert!(answer.contains(" 404 "), "{tag}: {answer}");
            wait_for("a line per request", Duration::from_secs(15), || {
                let text = std::fs::read_to_string(&log).ok()?;
                (text.lines().count() == 5).then(|| {
                    text.lines()
                        .map(|line| {
                            let fields: Vec<&str> = line.split(' ').collect();
                            let (request, times) = fields.split_at(3);
                            let times: Vec<String> = times.iter().map(|t| class(t)).collect();
                            format!("{} {}", request.join(" "), times.join(" "))
                        })
                        .collect()
                })
            })
        })
    };
    let remora = run("remora", false);
    assert_eq!(
        remora,
        [
            "GET /hello 200 fast fast fast fast fast",
            "GET /delay/300 200 fast fast slow fast slow",
            "POST /upload 200 slow slow slow fast slow",
            "GET /nowhere 404 fast - - - fast",
            "POST /nowhere 404 - - - - fast",
        ]
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the phase duration test") {
        return;
    }
    assert_eq!(run("envoy", true), remora, "left: envoy, right: remora");
}

#[test]
fn grpc_statuses_and_trailers_are_logged_as_envoy_logs_them() {
    let rig = LogRig::new();
    // A real gRPC server: its Export answers OK in trailers; any other method, Unimplemented
    // in a head with no body (trailers-only).
    let grpc = remora_tests::otlp::Receiver::start();
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/opentelemetry."}
                route: {cluster: grpc}
              - match: {prefix: "/nope."}
                route: {cluster: grpc}
              - match: {prefix: "/empty."}
                route: {cluster: empty}
              - match: {prefix: "/plain"}
                route: {cluster: echo}
"#;
    let format = "%REQ(:PATH)% %RESPONSE_CODE% %GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)% %TRAILER(GRPC-STATUS)% %TRAILER(X-NONE):3%\\n";
    let export = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    // An empty message: no compression flag, length 0.
    let empty_message = "\0\0\0\0\0";
    let requests: [(&str, &str); 6] = [
        (export, "application/grpc"),
        ("/nope.Service/Call", "application/grpc"),
        ("/empty.Service/Call", "application/grpc+proto"),
        ("/nowhere.Service/Call", "application/grpc"),
        ("/nope.Service/Call", "application/grpc-web"),
        ("/plain", "text/plain"),
    ];
    let clusters = [
        static_cluster("empty", &[]),
        common::http2_cluster("grpc", grpc.addr),
    ];
    let run = |tag: &str, envoy: bool| -> Vec<String> {
        let log = rig.log_path(&format!("{tag}.log"));
        let fields = file_log_with_format(&log, format);
        rig.serve_routes(&fields, routes, &clusters, envoy, |listener| {
            for (path, content_type) in requests {
                http_request(
                    listener,
                    "POST",
                    path,
                    &[("content-type", content_type), ("te", "trailers")],
                    empty_message,
                )
                .unwrap_or_else(|e| panic!("{tag} {path}: {e}"));
            }
            lines_once(&log, requests.len())
        })
    };
    let remora = run("remora", false);
    assert_eq!(
        remora,
        [
            format!("{export} 200 OK OK 0 0 -"),
            "/nope.Service/Call 200 Unimplemented UNIMPLEMENTED 12 - -".to_string(),
            "/empty.Service/Call 200 Unavailable UNAVAILABLE 14 - -".to_string(),
            "/nowhere.Service/Call 200 Unimplemented UNIMPLEMENTED 12 - -".to_string(),
            "/nope.Service/Call 200 - - - - -".to_string(),
            "/plain 200 - - - - -".to_string(),
        ]
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the gRPC status log test") {
        return;
    }
    assert_eq!(run("envoy", true), remora, "left: envoy, right: remora");
}
