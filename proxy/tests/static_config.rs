//! End-to-end: remora-proxy as a real process with static bootstraps, real echo upstreams,
//! HTTP/1.1, h2c, TCP, WebSocket, local replies, bad input, admin and the CLI.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use remora_tests::echo::EchoServer;
use remora_tests::{free_port, http_get, http_request, wait_for, workspace_binary};

const ALL_ROUTES: &str = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: echo}
"#;

/// `remora-proxy --mode validate -c FILE` on a bootstrap of one listener and one cluster, with
/// extra HCM fields and extra cluster fields: (exit code, stderr).
fn validate(hcm_extra: &str, cluster_extra: &str) -> (Option<i32>, String) {
    let (_, admin) = admin_block();
    let yaml = bootstrap(
        &admin,
        &[http_listener("ingress", free_port(), hcm_extra, ALL_ROUTES)],
        &[static_cluster("echo", &[loopback(free_port())]) + cluster_extra],
    );
    let (_dir, path) = write_config(&yaml);
    let output = Command::new(workspace_binary("remora-proxy"))
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The CLI end of the config gate (its cases are unit tests in `config/tests/gate`): the exit
/// code says the verdict and stderr names the field.
#[test]
fn validate_mode_exits_by_verdict_and_names_the_field() {
    let (code, stderr) = validate("", "");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = validate("", "    cleanup_interval: 1s\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("static_resources.clusters[0].cleanup_interval: field is not supported"),
        "{stderr}"
    );
    let (code, stderr) = validate("          stat_prefx: typo\n", "");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefx"
        ),
        "{stderr}"
    );
}

#[test]
fn http1_routing_rewrites_headers_and_stats() {
    let a = EchoServer::start("a", "127.0.0.1");
    let b = EchoServer::start("b", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: api
              domains: ["api.example.com"]
              request_headers_to_add:
              - header: {key: x-vhost, value: "1"}
              routes:
              - match: {prefix: "/v1/"}
                route: {cluster: b, prefix_rewrite: "/", host_rewrite_literal: backend.internal}
              - match: {prefix: "/"}
                route: {cluster: a}
                response_headers_to_add:
                - header: {key: x-route, value: root}
"#;
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          use_remote_address: true\n",
            vhosts,
        )],
        &[
            static_cluster("a", &[a.addr]),
            static_cluster("b", &[b.addr]),
        ],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);

    let (status, head, body) = http_request(
        addr,
        "GET",
        "/v1/items?x=1",
        &[("Host", "API.example.com")],
        "",
    )
    .expect("request");
    assert_eq!(status, 200, "{head}");
    let json = echo_json(&body);
    assert_eq!(json["upstream"], "b");
    assert_eq!(json["path"], "/items?x=1");
    assert_eq!(json["host"], "backend.internal");
    assert_eq!(json["headers"]["x-vhost"], "1");
    // One address: the peer's (a loopback peer is recorded as the host's own address, as by
    // Envoy; the differential corpora compare the exact value with Envoy's).
    let xff = json["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_default();
    assert!(
        xff.parse::<std::net::IpAddr>().is_ok(),
        "x-forwarded-for {xff:?}"
    );
    assert_eq!(json["headers"]["x-forwarded-proto"], "http");
    assert_eq!(json["headers"]["x-envoy-expected-rq-timeout-ms"], "15000");
    assert_eq!(
        json["headers"]["x-request-id"].as_str().map(str::len),
        Some(36)
    );
    assert!(head.to_ascii_lowercase().contains("server: envoy"));
    assert!(
        head.to_ascii_lowercase()
            .contains("x-envoy-upstream-service-time:")
    );

    let (status, head, body) = http_request(
        addr,
        "POST",
        "/other",
        &[("Host", "api.example.com")],
        "hello",
    )
    .expect("request");
    assert_eq!(status, 200);
    assert!(head.contains("x-route: root"), "{head}");
    let json = echo_json(&body);
    assert_eq!(
        (
            json["upstream"].as_str(),
            json["method"].as_str(),
            json["body_len"].as_u64()
        ),
        (Some("a"), Some("POST"), Some(5))
    );

    // Unknown host: 404 (NR).
    let (status, _, body) =
        http_request(addr, "GET", "/", &[("Host", "nope")], "").expect("request");
    assert_eq!((status, body.as_str()), (404, ""));

    // Keep-alive: several requests on one connection reuse it.
    let mut stream = TcpStream::connect(addr).expect("connect");
    let request = "GET /ka HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    stream
        .write_all(format!("{request}{request}").as_bytes())
        .expect("pipelined write");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut seen = String::new();
    let mut buf = [0u8; 8192];
    while seen.matches("HTTP/1.1 200").count() < 2 {
        let n = stream.read(&mut buf).expect("read pipelined responses");
        assert!(n > 0, "connection closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }

    wait_for("stats", Duration::from_secs(30), || {
        (proxy.stat_or_none("http.ingress.downstream_rq_2xx")? >= 4).then_some(())
    });
    assert_eq!(proxy.stat("cluster.b.upstream_rq_total"), 1);
    assert!(proxy.stat("cluster.a.upstream_rq_total") >= 3);
    assert_eq!(proxy.stat("http.ingress.downstream_rq_4xx"), 1);
    assert!(proxy.stat(&format!("listener.127.0.0.1_{port}.downstream_cx_total")) >= 4);
}

#[test]
fn http2_downstream_and_upstream() {
    let echo = EchoServer::start("h2", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let h2_cluster = http2_cluster("echo", echo.addr);
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          codec_type: AUTO\n",
            ALL_ROUTES,
        )],
        &[h2_cluster],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let (runtime, mut sender) = h2_client(loopback(port));
    runtime.block_on(async {
        use http_body_util::BodyExt;
        for i in 0..3 {
            let request = http::Request::get(format!("http://svc.local/h2/{i}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("h2 response");
            assert_eq!(response.status(), 200);
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let json = echo_json(&String::from_utf8_lossy(&body));
            assert_eq!(json["version"], "HTTP/2.0", "upstream must be HTTP/2");
            assert_eq!(json["path"], format!("/h2/{i}"));
            // As Envoy's codec: the Host travels as :authority, not as a header.
            assert_eq!(json["authority"], "svc.local");
            assert!(json["headers"].get("host").is_none(), "{json}");
        }
    });
    // Three streams, multiplexed on one upstream connection.
    assert_eq!(proxy.stat("cluster.echo.upstream_cx_total"), 1);
    assert_eq!(proxy.stat("cluster.echo.upstream_rq_total"), 3);
}

/// An HTTP/1.1 upstream that answers every request on a connection with `response`, as
/// written (a misbehaving server: the proxy's own codecs would not write it).
fn raw_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                    if stream.write_all(response).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream's 204 that claims a body (`content-length: 5`) reaches an HTTP/2 client as a
/// 204 without the length, which the client would take as a protocol error.
#[test]
fn a_204_with_a_length_reaches_an_http2_client_without_it() {
    let upstream =
        raw_upstream(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\nx-from: up\r\n\r\nhello");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", ALL_ROUTES)],
        &[static_cluster("echo", &[upstream])],
    );
    let _proxy = Proxy::start(&yaml, admin, &[]);
    let (runtime, mut sender) = h2_client(loopback(port));
    runtime.block_on(async {
        let request = http::Request::get("http://svc.local/anything")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = sender
            .send_request(request)
            .await
            .expect("a response, not a reset");
        assert_eq!(response.status(), 204);
        assert_eq!(response.headers()["x-from"], "up");
        assert!(response.headers().get("content-length").is_none());
    });
}

#[test]
fn http2_upstream_requests_share_one_connect_and_count_as_pending_meanwhile() {
    let echo = EchoServer::start("h2", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &catch_all("echo", "5s"))],
        &[http2_cluster("echo", echo.addr)],
    );
    let proxy = Proxy::start(&yaml, admin, &["--concurrency", "1"]);
    // Eight requests at once on a pool with no connection yet: they all wait for one connect.
    let addr = loopback(port);
    let clients: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || http_get(addr, &format!("/burst/{i}"))))
        .collect();
    for client in clients {
        let (status, _, body) = client.join().expect("client thread").expect("request");
        assert_eq!(status, 200, "{body}");
        assert_eq!(echo_json(&body)["version"], "HTTP/2.0");
    }
    assert_eq!(proxy.stat("cluster.echo.upstream_cx_total"), 1);
    assert_eq!(proxy.stat("cluster.echo.upstream_rq_total"), 8);
    // At least the request that opened the connection waited for it; none is left waiting.
    let pending = proxy.stat("cluster.echo.upstream_rq_pending_total");
    assert!((1..=8).contains(&pending), "{pending}");
    assert_eq!(proxy.stat("cluster.echo.upstream_rq_pending_active"), 0);
}

/// The same bootstrap file under Remora (with `remora_args`), then under Envoy when it is
/// installed (once `port` listens): what `run` saw under each.
fn remora_then_envoy<T>(
    file: &std::path::Path,
    admin: std::net::SocketAddr,
    port: u16,
    remora_args: &[&str],
    run: impl Fn() -> T,
) -> (T, Option<T>) {
    let remora = {
        let _proxy = Proxy::start_file(file, admin, remora_args);
        run()
    };
    if !remora_tests::envoy::available_or_skip("the Envoy half of this test") {
        return (remora, None);
    }
    let _envoy = remora_tests::envoy::Envoy::start(file, admin, &[]);
    remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
    (remora, Some(run()))
}

/// `max_requests_per_connection` (in the protocol options, or the cluster's deprecated field)
/// closes an upstream connection after that many requests, HTTP/1.1 and HTTP/2 alike: five
/// requests at two per connection open three connections of the cluster's protocol
/// (`upstream_cx_http1_total` or `_http2_total`) and close two at the bound
/// (`upstream_cx_max_requests`, `upstream_cx_destroy`), under Envoy as under Remora.
#[test]
fn max_requests_per_connection_closes_upstream_connections_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let bounded = |cluster: String, deprecated: bool| {
        if deprecated {
            cluster.replace(
                "    type: STATIC\n",
                "    type: STATIC\n    max_requests_per_connection: 2\n",
            )
        } else if cluster.contains("explicit_http_config") {
            cluster.replace(
                "        explicit_http_config:",
                "        common_http_protocol_options: {max_requests_per_connection: 2}\n        explicit_http_config:",
            )
        } else {
            cluster.replace(
                "    type: STATIC\n",
                "    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {max_requests_per_connection: 2}\n        explicit_http_config: {http_protocol_options: {}}\n",
            )
        }
    };
    let cases = [
        (
            "http1",
            bounded(static_cluster("echo", &[echo.addr]), false),
        ),
        (
            "http1, deprecated field",
            bounded(static_cluster("echo", &[echo.addr]), true),
        ),
        ("http2", bounded(http2_cluster("echo", echo.addr), false)),
    ];
    for (case, cluster) in cases {
        assert!(
            cluster.contains("max_requests_per_connection: 2"),
            "{cluster}"
        );
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        let yaml = bootstrap(
            &admin_yaml,
            &[http_listener("ingress", port, "", &catch_all("echo", "5s"))],
            &[cluster],
        );
        let (_dir, file) = write_config(&yaml);
        let run = || {
            for i in 0..5 {
                let (status, _, _) = http_get(loopback(port), &format!("/{i}")).expect("request");
                assert_eq!(status, 200, "{case}");
            }
            let stat = |name: &str| {
                wait_for(name, Duration::from_secs(10), || {
                    remora_tests::admin_stat(admin, &format!("cluster.echo.{name}"))
                })
            };
            // The connection closed at the fifth request's bound may be counted just after.
            wait_for("closes counted", Duration::from_secs(10), || {
                (stat("upstream_cx_max_requests") == 2 && stat("upstream_cx_destroy") == 2)
                    .then_some(())
            });
            let counts = [
                "upstream_cx_total",
                "upstream_cx_max_requests",
                "upstream_cx_destroy",
                "upstream_cx_destroy_local",
                "upstream_cx_destroy_remote",
                "upstream_cx_http1_total",
                "upstream_cx_http2_total",
            ]
            .map(stat);
            // Requests per closed connection: the cumulative side of each quantile (Envoy's
            // once its stats flush has merged them, within 5 s).
            let per_cx = wait_for("upstream_rq_per_cx", Duration::from_secs(10), || {
                let (_, _, body) = http_get(
                    admin,
                    "/stats?filter=%5Ecluster%5C.echo%5C.upstream_rq_per_cx%24",
                )
                .ok()?;
                let quantiles: Vec<f64> = body
                    .split_whitespace()
                    .filter_map(|q| q.split_once(',')?.1.trim_end_matches(')').parse().ok())
                    .collect();
                (!quantiles.is_empty()).then_some(quantiles)
            });
            (counts, per_cx)
        };
        let (remora, envoy) = remora_then_envoy(&file, admin, port, &["--concurrency", "1"], run);
        let by_protocol = match case {
            "http2" => [0, 3],
            _ => [3, 0],
        };
        // Both closes are the proxy's.
        assert_eq!(
            remora.0,
            [3, 2, 2, 2, 0, by_protocol[0], by_protocol[1]],
            "{case}"
        );
        // Two connections closed, each after its two requests: every quantile is 2 (Envoy may
        // write its bucket's upper edge, 2.05).
        let all_two = |quantiles: &[f64]| {
            quantiles.len() == 10 && quantiles.iter().all(|q| (2.0..2.1).contains(q))
        };
        assert!(all_two(&remora.1), "{case}: {:?}", remora.1);
        if let Some(envoy) = envoy {
            assert_eq!(envoy.0, remora.0, "{case}: envoy, remora");
            assert!(all_two(&envoy.1), "{case}: Envoy's {:?}", envoy.1);
        }
    }
}

/// The HCM's `max_requests_per_connection`: over HTTP/1.1 the request that reaches it gets
/// `connection: close` and the connection closes after its response; over HTTP/2 the
/// connection is drained (GOAWAY) and closes; under Envoy as under Remora.
#[test]
fn downstream_max_requests_per_connection_ends_connections_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          common_http_protocol_options: {max_requests_per_connection: 2}\n",
            &catch_all("echo", "5s"),
        )],
        &[static_cluster("echo", &[echo.addr])],
    );
    let (_dir, file) = write_config(&yaml);
    let run = || {
        // HTTP/1.1: three requests on one connection, each after the last response.
        let mut stream = TcpStream::connect(loopback(port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answers = Vec::new();
        for _ in 0..3 {
            if stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .is_err()
            {
                answers.push("refused".to_string());
                break;
            }
            let Some(head) = read_head(&mut stream) else {
                answers.push("closed".to_string());
                break;
            };
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            stream.read_exact(&mut body).expect("body");
            answers.push(format!(
                "{} close={}",
                &head[9..12],
                head.contains("connection: close")
            ));
        }
        let reached =
            remora_tests::admin_stat(admin, "http.ingress.downstream_cx_max_requests_reached");
        // HTTP/2: two requests, then the proxy ends the connection without a third: the
        // client's connection task finishes while its sender is still held.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let closed = runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(loopback(port))
                .await
                .expect("connect");
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .expect("h2 handshake");
            let connection = tokio::spawn(connection);
            for _ in 0..2 {
                let request = http::Request::get(format!("http://127.0.0.1:{port}/"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let response = sender.send_request(request).await.expect("h2 request");
                assert_eq!(response.status(), 200);
            }
            let ended = tokio::time::timeout(Duration::from_secs(10), connection)
                .await
                .is_ok();
            drop(sender);
            ended
        });
        (answers, reached, closed)
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(
        remora,
        (
            vec![
                "200 close=false".to_string(),
                "200 close=true".to_string(),
                "closed".to_string()
            ],
            Some(1),
            true
        )
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "envoy, remora");
    }
}

/// Istio's runtime: `http_reject_path_with_fragment: false` cuts a target's `#fragment` off
/// instead of refusing the request (as Envoy then does); the keys it sets beside it that change
/// nothing here are taken. Without the key, the request is refused with 400, in both proxies.
#[test]
fn a_path_fragment_is_cut_or_refused_by_the_runtime_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let runtime = "layered_runtime:\n  layers:\n  - name: global config\n    static_layer:\n      envoy.reloadable_features.http_reject_path_with_fragment: false\n      envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst: true\n      envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update: false\n      envoy.reloadable_features.fixed_heap_use_allocated: true\n      re2.max_program_size.error_level: 32768\n";
    for strip in [true, false] {
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        let mut yaml = bootstrap(
            &admin_yaml,
            &[http_listener("ingress", port, "", &catch_all("echo", "5s"))],
            &[static_cluster("echo", &[echo.addr])],
        );
        if strip {
            yaml.push_str(runtime);
        }
        let (_dir, file) = write_config(&yaml);
        let run = || {
            let reply = raw_exchange(
                loopback(port),
                b"GET /a?q=1#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            let status = reply.get(9..12).unwrap_or_default().to_string();
            let path = reply
                .split_once("\r\n\r\n")
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
                .map(|json| json["path"].clone());
            (status, path)
        };
        let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
        if strip {
            assert_eq!(remora, ("200".into(), Some("/a?q=1".into())));
        } else {
            assert_eq!(remora.0, "400");
        }
        if let Some(envoy) = envoy {
            assert_eq!(envoy, remora, "strip {strip}: envoy, remora");
        }
    }
}

/// Istio's `explicit_internal_address_config` runtime key, either way, leaves a loopback client
/// external (`x-envoy-external-address`, no `x-envoy-internal`) unless the connection manager's
/// `internal_address_config` names it: the same under Envoy 1.40 and Remora.
#[test]
fn only_internal_address_config_makes_a_client_internal_whatever_the_runtime_says() {
    let echo = EchoServer::start("e", "127.0.0.1");
    for (flag, ranges) in [
        (Some(true), ""),
        (Some(false), ""),
        (None, ""),
        (
            Some(false),
            "          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.1, prefix_len: 32}]}\n",
        ),
    ] {
        let (admin, admin_yaml) = admin_block();
        let port = free_port();
        let hcm = format!("          use_remote_address: true\n{ranges}");
        let mut yaml = bootstrap(
            &admin_yaml,
            &[http_listener(
                "ingress",
                port,
                &hcm,
                &catch_all("echo", "5s"),
            )],
            &[static_cluster("echo", &[echo.addr])],
        );
        if let Some(flag) = flag {
            yaml.push_str(&format!("layered_runtime:\n  layers:\n  - name: global config\n    static_layer:\n      envoy.reloadable_features.explicit_internal_address_config: {flag}\n"));
        }
        let (_dir, file) = write_config(&yaml);
        let run = || {
            let (status, _, body) = http_get(loopback(port), "/").expect("request");
            let json: serde_json::Value = serde_json::from_str(&body).expect("echo json");
            let header = |name: &str| json["headers"][name].as_str().map(str::to_string);
            (
                status,
                header("x-envoy-internal"),
                header("x-envoy-external-address"),
            )
        };
        let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
        if ranges.is_empty() {
            assert_eq!(remora, (200, None, Some("127.0.0.1".into())), "{flag:?}");
        } else {
            assert_eq!(remora, (200, Some("true".into()), None), "{flag:?}");
        }
        if let Some(envoy) = envoy {
            assert_eq!(envoy, remora, "{flag:?} {ranges}: envoy, remora");
        }
    }
}

/// The health check filter and `/healthcheck/fail`: a matching request is answered here (200,
/// naming the node's cluster) or passed on (pass-through); a listed cluster that is missing fails
/// it; after `/healthcheck/fail` health checks get 503, every response through the filter says
/// `x-envoy-immediate-health-check-fail`, kept-alive connections close after their response and
/// `/ready` says DRAINING, until `/healthcheck/ok`. Health checks stay out of an access log
/// with `not_health_check_filter`, and are counted alike. Envoy and Remora, one bootstrap.
#[test]
fn health_checks_are_answered_and_failed_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let dir = tempfile::tempdir().expect("dir");
    let (admin, admin_yaml) = admin_block();
    let (port, through_port) = (free_port(), free_port());
    let log = dir.path().join("access.log");
    let edge = with_http_filters(
        http_listener(
            "edge",
            port,
            &format!(
                "          access_log:\n          - name: envoy.access_loggers.file\n            filter: {{not_health_check_filter: {{}}}}\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n              path: {}\n              log_format: {{text_format_source: {{inline_string: \"%REQ(:PATH)% %RESPONSE_CODE%\\n\"}}}}\n",
                log.display()
            ),
            &catch_all("echo", "5s"),
        ),
        &(health_check_filter("/healthz", false, "echo: {value: 100}")
            + &health_check_filter("/deep", false, "missing: {value: 10}")),
    );
    let through = with_http_filters(
        http_listener("through", through_port, "", &catch_all("echo", "5s")),
        &health_check_filter("/ping", true, ""),
    );
    let yaml = format!(
        "node: {{id: n1, cluster: front}}\n{}",
        bootstrap(
            &admin_yaml,
            &[edge, through],
            &[static_cluster("echo", &[echo.addr])]
        )
    );
    let (_dir, file) = write_config(&yaml);
    let run = || {
        // Both proxies append to the one file: each run reads what it added.
        let start = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut seen = Vec::new();
        let ask = |what: &str, addr, path: &str| {
            let (status, head, body) = http_get(addr, path).expect("request");
            let head = head.to_ascii_lowercase();
            let has = |header: &str| head.contains(header);
            format!(
                "{what}: {status} cluster={} fail={} body={}",
                has("x-envoy-upstream-healthchecked-cluster: front"),
                has("x-envoy-immediate-health-check-fail: true"),
                if body.is_empty() {
                    "empty"
                } else if body.contains("\"upstream\"") {
                    "upstream"
                } else {
                    "other"
                },
            )
        };
        seen.push(ask("health", loopback(port), "/healthz"));
        seen.push(ask("deep", loopback(port), "/deep"));
        seen.push(ask("plain", loopback(port), "/"));
        seen.push(ask("through", loopback(through_port), "/ping"));
        let post = |path: &str| http_request(admin, "POST", path, &[], "").expect("admin").0;
        seen.push(format!("fail: {}", post("/healthcheck/fail")));
        seen.push(ask("health failed", loopback(port), "/healthz"));
        seen.push(ask("plain failed", loopback(port), "/"));
        seen.push(ask("through failed", loopback(through_port), "/ping"));
        let kept_alive = raw_exchange(loopback(port), b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .to_ascii_lowercase();
        seen.push(format!(
            "kept alive: closed={}",
            kept_alive.contains("connection: close")
        ));
        let (ready, _, state) = http_get(admin, "/ready").expect("ready");
        seen.push(format!("ready: {ready} {}", state.trim()));
        seen.push(format!("ok: {}", post("/healthcheck/ok")));
        seen.push(ask("health ok", loopback(port), "/healthz"));
        let (ready, _, _) = http_get(admin, "/ready").expect("ready");
        seen.push(format!("ready: {ready}"));
        seen.push(format!(
            "GET fail: {}",
            http_get(admin, "/healthcheck/fail").expect("admin").0
        ));
        for name in ["request_total", "ok", "failed", "failed_cluster_not_found"] {
            seen.push(format!(
                "{name}: {:?}",
                remora_tests::admin_stat(admin, &format!("http.edge.health_check.{name}"))
            ));
        }
        let logged = wait_for("the access log", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log).ok()?;
            let added = text.get(start..)?.to_string();
            (added.lines().count() >= 3).then_some(added)
        });
        seen.push(format!(
            "logged: {}",
            logged.lines().collect::<Vec<_>>().join(", ")
        ));
        seen
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(
        remora,
        [
            "health: 200 cluster=true fail=false body=empty",
            "deep: 503 cluster=true fail=false body=empty",
            "plain: 200 cluster=false fail=false body=upstream",
            "through: 200 cluster=true fail=false body=upstream",
            "fail: 200",
            "health failed: 503 cluster=true fail=true body=empty",
            "plain failed: 200 cluster=false fail=true body=upstream",
            "through failed: 503 cluster=true fail=true body=empty",
            "kept alive: closed=true",
            "ready: 503 DRAINING",
            "ok: 200",
            "health ok: 200 cluster=true fail=false body=empty",
            "ready: 200",
            "GET fail: 405",
            "request_total: Some(4)",
            "ok: Some(2)",
            "failed: Some(2)",
            "failed_cluster_not_found: Some(1)",
            "logged: / 200, / 200, /a 200",
        ]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "envoy, remora");
    }
}

/// The compressor filter as Istio chains it (brotli, zstd, gzip): for each `Accept-Encoding`
/// the same encoding is picked (or none), with the same `Vary` and framing, the body decodes to
/// what the upstream sent, and the filters count the same negotiation stats; under Envoy and
/// Remora from one bootstrap.
#[test]
fn compressors_pick_and_encode_as_envoys_do() {
    use std::io::Read as _;
    let echo = EchoServer::start("e", "127.0.0.1");
    let compressor = |name: &str, library: &str, message: &str| {
        format!(
            "          - name: envoy.filters.http.compressor.{name}\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor\n              compressor_library:\n                name: stats_{name}\n                typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.compression.{library}.compressor.v3.{message}}}\n"
        )
    };
    let chain = [
        compressor("brotli", "brotli", "Brotli"),
        compressor("zstd", "zstd", "Zstd"),
        compressor("gzip", "gzip", "Gzip"),
    ]
    .concat();
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[with_http_filters(
            http_listener("ingress", port, "", &catch_all("echo", "5s")),
            &chain,
        )],
        &[static_cluster("echo", &[echo.addr])],
    );
    assert!(yaml.contains("compressor.zstd"), "{yaml}");
    let (_dir, file) = write_config(&yaml);
    let accepts = [
        "gzip",
        "br",
        "zstd",
        "gzip, br",
        "br;q=0.5, gzip;q=0.8",
        "*",
        "identity",
        "gzip;q=0",
        "deflate",
    ];
    let run = || {
        let mut seen = Vec::new();
        for accept in accepts {
            let request = format!(
                "GET /same HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {accept}\r\nConnection: close\r\n\r\n"
            );
            // Bytes as they come: a compressed body is not text.
            let mut stream = TcpStream::connect(loopback(port)).expect("connect");
            stream.write_all(request.as_bytes()).expect("write");
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).expect("read");
            let split = reply
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a head");
            let head = String::from_utf8_lossy(&reply[..split]).into_owned();
            let body = &reply[split + 4..];
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let encoding = header("content-encoding");
            let chunked = header("transfer-encoding") == "chunked";
            // The body as sent: chunks joined, then decoded by its encoding.
            let raw = if chunked {
                let mut out = Vec::new();
                let mut rest = body;
                while let Some(at) = rest.windows(2).position(|w| w == b"\r\n") {
                    let size = usize::from_str_radix(std::str::from_utf8(&rest[..at]).unwrap(), 16)
                        .unwrap();
                    if size == 0 {
                        break;
                    }
                    out.extend_from_slice(&rest[at + 2..at + 2 + size]);
                    rest = &rest[at + 4 + size..];
                }
                out
            } else {
                body.to_vec()
            };
            let mut decoded = Vec::new();
            match encoding.as_str() {
                "gzip" => {
                    flate2::read::GzDecoder::new(&raw[..])
                        .read_to_end(&mut decoded)
                        .unwrap();
                }
                "br" => {
                    brotli::Decompressor::new(&raw[..], 4096)
                        .read_to_end(&mut decoded)
                        .unwrap();
                }
                "zstd" => decoded = zstd::decode_all(&raw[..]).unwrap(),
                _ => decoded = raw,
            }
            let json: serde_json::Value = serde_json::from_slice(&decoded)
                .unwrap_or_else(|e| panic!("{accept}: {e}: {decoded:?}"));
            assert_eq!(json["path"], "/same", "{accept}");
            seen.push((
                accept,
                encoding,
                header("vary"),
                chunked,
                header("content-length").is_empty(),
            ));
        }
        let stat = |name: &str| {
            remora_tests::admin_stat(admin, &format!("http.ingress.compressor.{name}"))
        };
        let stats = [
            "stats_gzip.gzip.header_compressor_used",
            "stats_gzip.gzip.header_compressor_overshadowed",
            "stats_gzip.gzip.header_not_valid",
            "stats_brotli.brotli.header_wildcard",
            "stats_brotli.brotli.header_identity",
            // Without `response_direction_config`, Envoy's older names.
            "stats_brotli.brotli.compressed",
            "stats_zstd.zstd.compressed",
            "stats_zstd.zstd.not_compressed",
            "stats_zstd.zstd.request.not_compressed",
        ]
        .map(|name| (name, stat(name)));
        (seen, stats)
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    let picked: Vec<&str> = remora.0.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        picked,
        ["gzip", "br", "zstd", "gzip", "gzip", "br", "", "", ""]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "envoy, remora");
    }
}

/// An HTTP/1.0 upstream's response reaches an HTTP/1.1 client as HTTP/1.1 (Envoy's codec
/// writes it so), not as HTTP/1.0 with the connection closed after it.
#[test]
fn an_http10_upstream_answer_goes_out_as_http11() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in upstream.incoming().flatten() {
            let mut stream = stream;
            let _ = read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        }
    });
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &catch_all("old", "5s"))],
        &[static_cluster("old", &[upstream_addr])],
    );
    let (_dir, file) = write_config(&yaml);
    let run = || {
        let reply = raw_exchange(
            loopback(port),
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        (
            reply.lines().next().unwrap_or_default().to_string(),
            reply.ends_with("hi"),
        )
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(remora, ("HTTP/1.1 200 OK".to_string(), true));
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "envoy, remora");
    }
}

#[test]
fn local_replies_match_envoys_statuses() {
    let (silent, silent_addr) = silent_upstream();
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/down"}
                route: {cluster: down}
              - match: {prefix: "/slow"}
                route: {cluster: slow, timeout: 0.3s}
              - match: {prefix: "/empty"}
                route: {cluster: empty}
              - match: {prefix: "/direct"}
                direct_response: {status: 418, body: {inline_string: "short and stout"}}
              - match: {prefix: "/old"}
                redirect: {path_redirect: "/new", response_code: PERMANENT_REDIRECT}
              - match: {prefix: "/missing"}
                route: {cluster: no_such_cluster}
"#;
    let empty = static_cluster("empty", &[])
        .replace("      - lb_endpoints:\n", "      []\n")
        .replace("      endpoints:\n      []\n", "      endpoints: []\n");
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", vhosts)],
        &[
            static_cluster("down", &[closed_port()]),
            static_cluster("slow", &[silent_addr]),
            empty,
        ],
    )
    // Like Envoy, unknown clusters in an inline route config are an error unless told otherwise.
    .replace(
        "name: ingress_routes\n",
        "name: ingress_routes\n            validate_clusters: false\n",
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);
    let (status, _, body) = http_get(addr, "/down").expect("request");
    assert_eq!(status, 503);
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    let (status, _, body) = http_get(addr, "/slow").expect("request");
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    let (status, _, body) = http_get(addr, "/empty").expect("request");
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    let (status, _, body) = http_get(addr, "/direct").expect("request");
    assert_eq!((status, body.as_str()), (418, "short and stout"));
    let (status, head, _) = http_get(addr, "/old?q=1").expect("request");
    assert_eq!(status, 308);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("location: http://127.0.0.1:{port}/new?q=1")),
        "{head}"
    );
    let (status, _, _) = http_get(addr, "/missing").expect("request");
    assert_eq!(status, 503);
    assert_eq!(proxy.stat("cluster.down.upstream_cx_connect_fail"), 1);
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_timeout"), 1);
    drop(silent);
}

#[test]
fn tcp_proxy_passes_half_close_and_counts_bytes() {
    // An upstream that reads until EOF, then answers with what it read, then closes.
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut stream, _)) = upstream.accept() else {
                return;
            };
            let mut data = Vec::new();
            stream.read_to_end(&mut data).expect("read to EOF");
            stream.write_all(b"got:").expect("write");
            stream.write_all(&data).expect("write");
        }
    });
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[tcp_listener("tcp", port, "up", "")],
        &[static_cluster("up", &[upstream_addr])],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    for _ in 0..2 {
        let mut stream = TcpStream::connect(loopback(port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        stream.write_all(b"ping-pong").expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("read answer after half-close");
        assert_eq!(answer, "got:ping-pong");
    }
    server.join().expect("upstream thread");
    wait_for("byte stats", Duration::from_secs(30), || {
        (proxy.stat_or_none("tcp.tcp.downstream_cx_rx_bytes_total")? == 18).then_some(())
    });
    assert_eq!(proxy.stat("tcp.tcp.downstream_cx_tx_bytes_total"), 26);
    assert_eq!(proxy.stat("cluster.up.upstream_cx_total"), 2);
}

#[test]
fn tcp_proxy_retries_connect_failures_on_other_hosts() {
    let echo = EchoServer::start("ok", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[tcp_listener(
            "tcp",
            port,
            "mixed",
            "          max_connect_attempts: 3\n",
        )],
        &[static_cluster("mixed", &[closed_port(), echo.addr])],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    for _ in 0..4 {
        let (status, _, body) =
            http_get(loopback(port), "/through-tcp").expect("request through tcp_proxy");
        assert_eq!(status, 200);
        assert_eq!(echo_json(&body)["upstream"], "ok");
    }
    assert!(proxy.stat("cluster.mixed.upstream_cx_connect_fail") >= 1);
}

/// Sends a WebSocket upgrade for `path`; on a 101, checks that bytes are spliced both ways.
/// Returns the status line.
fn websocket_through(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(loopback(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: ws.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes())
        .expect("write upgrade");
    let head = read_head(&mut stream).expect("a response head");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if head.starts_with("http/1.1 101") {
        assert!(head.contains("upgrade: websocket"), "{head}");
        stream.write_all(b"frame-bytes").expect("write frame");
        let mut echoed = [0u8; 11];
        stream.read_exact(&mut echoed).expect("echoed frame");
        assert_eq!(&echoed, b"frame-bytes");
    }
    head.lines().next().unwrap_or_default().to_string()
}

/// A proxy with listener `ws` (HCM settings `hcm_extra`) routing everything to cluster `echo`
/// at `upstream`; and the listener's port.
fn websocket_proxy(upstream: std::net::SocketAddr, hcm_extra: &str) -> (Proxy, u16) {
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ws", port, hcm_extra, ALL_ROUTES)],
        &[static_cluster("echo", &[upstream])],
    );
    (Proxy::start(&yaml, admin, &[]), port)
}

const WEBSOCKET: &str = "          upgrade_configs: [{upgrade_type: websocket}]\n";

#[test]
fn websocket_upgrade_is_spliced_when_enabled() {
    let upstream_addr = upgrade_echo_upstream();
    let (_proxy, port) = websocket_proxy(upstream_addr, WEBSOCKET);
    assert_eq!(
        websocket_through(port, "/chat"),
        "http/1.1 101 switching protocols"
    );

    // Without upgrade_configs the upgrade is refused (403) as Envoy does.
    let (_proxy2, port2) = websocket_proxy(upstream_addr, "");
    assert_eq!(websocket_through(port2, "/chat"), "http/1.1 403 forbidden");

    // To an HTTP/2 cluster it would take an extended CONNECT: refused, not sent as a GET.
    let (admin, admin_yaml) = admin_block();
    let port3 = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ws", port3, WEBSOCKET, ALL_ROUTES)],
        &[http2_cluster("echo", upstream_addr)],
    );
    let _proxy3 = Proxy::start(&yaml, admin, &[]);
    assert_eq!(
        websocket_through(port3, "/chat"),
        "http/1.1 501 not implemented"
    );
}

/// The tunnel after a 101: bytes sent behind either head arrive first and in order, megabytes
/// pass whole both ways, a half-close passes through and the upstream's answer to it comes
/// back, and the cluster counts the bytes (the plain path moves them with splice, unseen).
#[test]
fn websocket_tunnel_carries_early_bytes_bulk_and_half_close() {
    let upstream_addr = upgrade_greeting_echo_upstream(b"upstream-first");
    let (proxy, port) = websocket_proxy(upstream_addr, WEBSOCKET);
    let sent = tunnel_round_trip(loopback(port), 4_000_000);
    wait_for("tunnel byte stats", Duration::from_secs(30), || {
        (proxy.stat("cluster.echo.upstream_cx_tx_bytes_total") >= sent
            && proxy.stat("cluster.echo.upstream_cx_rx_bytes_total") >= sent)
            .then_some(())
    });
}

/// An upgraded stream no byte crosses for the stream idle timeout is closed, as Envoy closes
/// an idle WebSocket, and counted as an idle timeout.
#[test]
fn idle_websocket_tunnel_is_closed_after_the_stream_idle_timeout() {
    let upstream_addr = upgrade_echo_upstream();
    let (proxy, port) = websocket_proxy(
        upstream_addr,
        &format!("          stream_idle_timeout: 0.5s\n{WEBSOCKET}"),
    );
    assert_eq!(
        websocket_through(port, "/chat"),
        "http/1.1 101 switching protocols"
    );
    let mut stream = TcpStream::connect(loopback(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(UPGRADE_HEAD.as_bytes())
        .expect("write upgrade");
    read_head(&mut stream).expect("a response head");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("closed by the proxy before the read timeout");
    assert!(rest.is_empty(), "nothing but the close");
    wait_for("the idle timeout counted", Duration::from_secs(30), || {
        (proxy.stat("http.ws.downstream_rq_idle_timeout") >= 1).then_some(())
    });
}

#[test]
fn route_upgrade_configs_override_the_hcms() {
    let upstream_addr = upgrade_echo_upstream();
    let (admin, admin_yaml) = admin_block();
    let (open, closed) = (free_port(), free_port());
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/on"}
                route: {cluster: echo, upgrade_configs: [{upgrade_type: WebSocket}]}
              - match: {prefix: "/off"}
                route: {cluster: echo, upgrade_configs: [{upgrade_type: websocket, enabled: false}]}
              - match: {prefix: "/"}
                route: {cluster: echo}
"#;
    let yaml = bootstrap(
        &admin_yaml,
        &[
            // The HCM allows no upgrade: only the route that enables it lets one through.
            http_listener("closed", closed, "", routes),
            // The HCM allows WebSocket: the route that disables it refuses.
            http_listener("open", open, WEBSOCKET, routes),
        ],
        &[static_cluster("echo", &[upstream_addr])],
    );
    let _proxy = Proxy::start(&yaml, admin, &[]);
    let switched = "http/1.1 101 switching protocols";
    let forbidden = "http/1.1 403 forbidden";
    assert_eq!(websocket_through(closed, "/on"), switched);
    assert_eq!(websocket_through(closed, "/off"), forbidden);
    assert_eq!(websocket_through(closed, "/other"), forbidden);
    assert_eq!(websocket_through(open, "/on"), switched);
    assert_eq!(websocket_through(open, "/off"), forbidden);
    assert_eq!(websocket_through(open, "/other"), switched);
}

/// An echo upstream and a proxy with one listener (`ingress`, Envoy's defaults) routing all of
/// it there: (echo, proxy, admin address, listener port).
fn proxy_to_echo() -> (EchoServer, Proxy, std::net::SocketAddr, u16) {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", ALL_ROUTES)],
        &[static_cluster("echo", &[echo.addr])],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    (echo, proxy, admin, port)
}

#[test]
fn default_header_count_limit_is_envoys_100() {
    let (_echo, _proxy, _, port) = proxy_to_echo();
    let addr = loopback(port);
    let request = |extra: usize| {
        let headers: String = (0..extra).map(|i| format!("X-H{i}: v\r\n")).collect();
        raw_exchange(
            addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
        )
    };
    // Host and Connection plus 98 more make 100 headers: allowed; one more is refused.
    let answer = request(98);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = request(99);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[test]
fn bad_input_gets_the_right_status_and_proxy_keeps_serving() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          max_request_headers_kb: 2\n          common_http_protocol_options: {max_headers_count: 20}\n",
            ALL_ROUTES,
        )],
        &[static_cluster("echo", &[echo.addr])],
    );
    let _proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);
    let garbage = raw_exchange(addr, b"\x16\x03garbage that is not http\r\n\r\n");
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    let big = "x".repeat(8 * 1024);
    let answer = raw_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // And it still serves.
    let (status, _, body) = http_get(addr, "/still-up").expect("request");
    assert_eq!(status, 200);
    assert_eq!(echo_json(&body)["path"], "/still-up");
}

#[test]
fn admin_endpoints_and_quitquitquit() {
    let (echo, mut proxy, admin, port) = proxy_to_echo();
    let (status, _, body) = http_get(admin, "/ready").expect("ready");
    assert_eq!((status, body.trim()), (200, "LIVE"));
    let (_, _, info) = http_get(admin, "/server_info").expect("server_info");
    assert_eq!(echo_json(&info)["state"], "LIVE");
    let (_, _, clusters) = http_get(admin, "/clusters").expect("clusters");
    assert!(
        clusters.contains(&format!("echo::{}::health_flags::healthy", echo.addr)),
        "{clusters}"
    );
    let (_, _, listeners) = http_get(admin, "/listeners").expect("listeners");
    assert!(
        listeners.contains(&format!("ingress::127.0.0.1:{port}")),
        "{listeners}"
    );
    let (_, _, dump) = http_get(
        admin,
        "/config_dump?resource=static_clusters&mask=cluster.name",
    )
    .expect("config_dump");
    let dump = echo_json(&dump);
    assert_eq!(
        dump["configs"][0]["cluster"],
        serde_json::json!({"name": "echo"})
    );
    assert_eq!(
        dump["configs"][0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.StaticCluster"
    );
    let (_, _, full) = http_get(admin, "/config_dump").expect("config_dump");
    assert!(
        echo_json(&full)["configs"]
            .as_array()
            .is_some_and(|c| c.len() == 5)
    );
    http_get(loopback(port), "/x").expect("request");
    let (_, _, prom) = http_get(admin, "/stats/prometheus").expect("prometheus");
    assert!(
        prom.contains("# TYPE envoy_cluster_upstream_rq_total counter"),
        "{prom}"
    );
    assert!(
        prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"echo\"} 1"),
        "{prom}"
    );
    // Graceful listener drain: the listener stops accepting, the admin keeps answering.
    let (status, _, _) =
        http_request(admin, "POST", "/drain_listeners?graceful", &[], "").expect("drain");
    assert_eq!(status, 200);
    wait_for("listener closed", Duration::from_secs(30), || {
        TcpStream::connect(loopback(port)).is_err().then_some(())
    });
    let (status, _, _) = http_get(admin, "/quitquitquit").expect("GET quit");
    assert_eq!(status, 405, "mutating endpoints need POST");
    let (status, _, _) = http_request(admin, "POST", "/quitquitquit", &[], "").expect("quit");
    assert_eq!(status, 200);
    let exit = proxy
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("exits after /quitquitquit");
    assert!(exit.success());
}

#[test]
fn wait_ready_and_bootstrap_from_env() {
    let admin_port = free_port();
    // Not up yet: wait-ready fails after its timeout.
    let status = Command::new(workspace_binary("remora-proxy"))
        .args([
            "wait-ready",
            "--admin-port",
            &admin_port.to_string(),
            "--timeout-s",
            "1",
        ])
        .status()
        .expect("run wait-ready");
    assert_eq!(status.code(), Some(1));
    // The injector's environment produces a bootstrap Envoy's format accepts.
    let output = Command::new(workspace_binary("remora-proxy"))
        .args(["--bootstrap-from-env", "--mode", "validate"])
        .env(
            "REMORA_NODE_ID",
            "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local",
        )
        .env("REMORA_NODE_CLUSTER", "pod")
        .env("REMORA_XDS_ADDRESS", "127.0.0.1:15010")
        .env("REMORA_ADMIN_PORT", admin_port.to_string())
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // With REMORA_XDS_CA the stream is TLS checked against that bundle (read when the
    // cluster is built: a missing file is an error naming the field and the file).
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca, params.self_signed(&key).expect("ca").pem()).expect("write");
    let with_ca = |ca: &std::path::Path| {
        Command::new(workspace_binary("remora-proxy"))
            .args(["--bootstrap-from-env", "--mode", "validate"])
            .env(
                "REMORA_NODE_ID",
                "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local",
            )
            .env("REMORA_XDS_ADDRESS", "remora-cp.remora-system.svc:15010")
            .env("REMORA_XDS_CA", ca)
            .env(
                "REMORA_XDS_SAN",
                "spiffe://cluster.local/ns/remora-system/sa/remora-cp",
            )
            .output()
            .expect("run")
    };
    let output = with_ca(&ca);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = with_ca(&dir.path().join("missing.pem"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("missing.pem"), "{stderr}");
    // With a static bootstrap the proxy becomes ready and wait-ready succeeds.
    let echo = EchoServer::start("e", "127.0.0.1");
    let admin = loopback(admin_port);
    let yaml = bootstrap(
        &format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}\n"
        ),
        &[http_listener("ingress", free_port(), "", ALL_ROUTES)],
        &[static_cluster("echo", &[echo.addr])],
    );
    let _proxy = Proxy::start(&yaml, admin, &[]);
    let status = Command::new(workspace_binary("remora-proxy"))
        .args([
            "wait-ready",
            "--admin-port",
            &admin_port.to_string(),
            "--timeout-s",
            "10",
        ])
        .status()
        .expect("run wait-ready");
    assert!(status.success());
}

#[test]
fn slow_clients_are_timed_out_and_circuit_breakers_overflow() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (silent, silent_addr) = silent_upstream();
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/hang"}
                route: {cluster: silent, timeout: 120s}
              - match: {prefix: "/"}
                route: {cluster: echo}
"#;
    let limited = static_cluster("silent", &[silent_addr]).replace(
        "    type: STATIC\n",
        "    type: STATIC\n    circuit_breakers: {thresholds: [{max_requests: 1}]}\n",
    );
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          request_timeout: 0.5s\n          request_headers_timeout: 0.5s\n          common_http_protocol_options: {idle_timeout: 0.5s}\n",
            vhosts,
        )],
        &[static_cluster("echo", &[echo.addr]), limited],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);
    // A body that never finishes: 408 after request_timeout.
    let started = std::time::Instant::now();
    let (answer, _) = exchange_until_closed(
        addr,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-part",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the timeout"
    );
    // Headers that never finish: the proxy closes the connection after
    // request_headers_timeout (the client would wait a minute).
    let started = std::time::Instant::now();
    let (answer, closed) = exchange_until_closed(addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ");
    assert!(closed, "slow headers hold the connection: {answer}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the timeout"
    );
    // max_requests: 1 — a second concurrent request to the cluster overflows (503, UO).
    let hanging = std::thread::spawn(move || http_get(addr, "/hang").map(|(s, _, _)| s));
    wait_for("one request active", Duration::from_secs(30), || {
        (proxy.stat_or_none("cluster.silent.upstream_rq_active")? == 1).then_some(())
    });
    let (status, head, body) = http_get(addr, "/hang").expect("second request");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overflow"), "{body}");
    assert!(head.contains("x-envoy-overloaded: true"), "{head}");
    // Envoy 1.40 counts a max_requests overflow as active_overflow, not pending_overflow.
    assert_eq!(proxy.stat("cluster.silent.upstream_rq_active_overflow"), 1);
    assert_eq!(proxy.stat("cluster.silent.upstream_rq_pending_overflow"), 0);
    drop(silent);
    let _ = hanging.join();
    // Still serving.
    let (status, _, _) = http_get(addr, "/fine").expect("request");
    assert_eq!(status, 200);
    // An idle keep-alive connection is closed after common_http_protocol_options.idle_timeout
    // (0.5 s; the defaults would keep it an hour, the client waits a minute).
    let started = std::time::Instant::now();
    let (answer, closed) = exchange_until_closed(addr, b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "the proxy closes the idle connection");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the timeout"
    );
}

/// Sends raw bytes and reads until the peer closes, or a minute passes: (what was read, whether
/// the peer closed).
fn exchange_until_closed(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream.write_all(bytes).expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    (String::from_utf8_lossy(&seen).into_owned(), closed)
}

/// The hosts `/clusters` lists for `cluster` (lines `CLUSTER::ADDRESS::health_flags::...`),
/// sorted.
fn cluster_hosts(clusters_text: &str, cluster: &str) -> Vec<String> {
    let prefix = format!("{cluster}::");
    let mut hosts: Vec<String> = clusters_text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (address, _) = rest.split_once("::health_flags::")?;
            Some(address.to_string())
        })
        .collect();
    hosts.sort();
    hosts
}

#[test]
fn dns_clusters_honour_dns_lookup_family() {
    // Each cluster keeps its family's share of what the system resolver answers for
    // `localhost`: 127.0.0.1, and ::1 too where /etc/hosts has it (stock Debian does). V4_ONLY
    // takes the IPv4 addresses, V6_ONLY the IPv6 ones (none: no host, 503 no healthy upstream,
    // as Envoy), AUTO the IPv6 ones if any, else the IPv4 ones. LOGICAL_DNS resolves the same
    // way, to one host: the first address.
    use std::net::ToSocketAddrs;
    let echo = EchoServer::start("echo", "127.0.0.1");
    let echo_port = echo.addr.port();
    let mut answer: Vec<std::net::SocketAddr> = ("localhost", echo_port)
        .to_socket_addrs()
        .expect("resolve localhost")
        .collect();
    answer.dedup();
    let (v4, v6): (Vec<_>, Vec<_>) = answer.iter().copied().partition(|a| a.is_ipv4());
    let auto = if v6.is_empty() {
        v4.clone()
    } else {
        v6.clone()
    };
    let clusters = [
        ("v6only", "STRICT_DNS", "V6_ONLY", v6.clone()),
        ("v4only", "STRICT_DNS", "V4_ONLY", v4.clone()),
        ("auto", "STRICT_DNS", "AUTO", auto.clone()),
        ("logical", "LOGICAL_DNS", "AUTO", auto[..1].to_vec()),
    ];
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let cluster = |name: &str, kind: &str, family: &str| {
        format!(
            "  - name: {name}\n    connect_timeout: 0.5s\n    type: {kind}\n    dns_lookup_family: {family}\n    dns_refresh_rate: 60s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: localhost, port_value: {echo_port}}}}}}}\n"
        )
    };
    let mut routes = String::from(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n",
    );
    for (name, _, _, _) in &clusters {
        routes.push_str(&format!(
            "              - match: {{prefix: \"/{name}\"}}\n                route: {{cluster: {name}}}\n"
        ));
    }
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &routes)],
        &clusters
            .iter()
            .map(|(name, kind, family, _)| cluster(name, kind, family))
            .collect::<Vec<_>>(),
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);
    for (name, _, family, expected) in &clusters {
        let mut expected: Vec<String> = expected.iter().map(|a| a.to_string()).collect();
        expected.sort();
        // Resolved (the answer taken in), not merely not yet resolved.
        wait_for(
            &format!("{name} ({family}) resolved to {expected:?}"),
            Duration::from_secs(20),
            || {
                (proxy.stat_or_none(&format!("cluster.{name}.update_success"))? >= 1)
                    .then_some(())?;
                let (_, _, text) = http_get(admin, "/clusters").ok()?;
                (cluster_hosts(&text, name) == expected).then_some(())
            },
        );
        let (status, head, body) = http_get(addr, &format!("/{name}")).expect("request");
        if expected.is_empty() {
            assert_eq!(
                (status, body.as_str()),
                (503, "no healthy upstream"),
                "{name}: {head}"
            );
        } else if expected.iter().all(|host| host.starts_with("127.")) {
            assert_eq!(status, 200, "{name}: {head}{body}");
            assert_eq!(echo_json(&body)["upstream"], "echo");
        }
        // An IPv6 host: nothing listens on ::1 (tests bind to 127.0.0.0/8 only), so its
        // place in /clusters is what shows the family was honoured.
    }
}

/// SETTINGS and PING frame types, and the SETTINGS identifiers checked below.
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;

#[test]
fn http2_protocol_options_reach_the_wire_both_ways() {
    use std::io::Write;
    // The upstream is a bare socket: it reads what the proxy's HTTP/2 client sends.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let keepalive = "connection_keepalive: {interval: 0.2s, timeout: 5s}";
    let cluster = static_cluster("raw", &[upstream.local_addr().expect("addr")]).replace(
        "    type: STATIC\n",
        &format!("    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{initial_stream_window_size: 200000, {keepalive}}}}}\n"),
    );
    let hcm = format!(
        "          http2_protocol_options: {{max_concurrent_streams: 7, initial_stream_window_size: 100000, {keepalive}}}\n"
    );
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            &hcm,
            &catch_all("raw", "3s"),
        )],
        &[cluster],
    );
    let _proxy = Proxy::start(&yaml, admin, &[]);

    // Downstream: the proxy's SETTINGS carry the HCM's options, and it pings an idle client.
    let mut client = std::net::TcpStream::connect(loopback(port)).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    client.write_all(H2_PREFACE).expect("preface");
    client.write_all(H2_EMPTY_SETTINGS).expect("settings");
    let settings = read_h2_frame_until(&mut client, |kind, flags| {
        kind == FRAME_SETTINGS && flags & FLAG_ACK == 0
    })
    .expect("server SETTINGS");
    let settings = h2_settings(&settings);
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(INITIAL_WINDOW_SIZE, 100_000)),
        "{settings:?}"
    );
    read_h2_frame_until(&mut client, |kind, flags| {
        kind == FRAME_PING && flags & FLAG_ACK == 0
    })
    .expect("a keepalive PING from the proxy");

    // Upstream: a request makes the pool connect; its SETTINGS carry the cluster's options.
    let request = std::thread::spawn(move || http_get(loopback(port), "/to-raw"));
    let (mut conn, _) = upstream.accept().expect("the proxy connects upstream");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut preface = [0u8; 24];
    std::io::Read::read_exact(&mut conn, &mut preface).expect("preface");
    assert_eq!(&preface[..], H2_PREFACE);
    let settings = read_h2_frame_until(&mut conn, |kind, flags| {
        kind == FRAME_SETTINGS && flags & FLAG_ACK == 0
    })
    .expect("client SETTINGS");
    let settings = h2_settings(&settings);
    assert!(
        settings.contains(&(INITIAL_WINDOW_SIZE, 200_000)),
        "{settings:?}"
    );
    conn.write_all(H2_EMPTY_SETTINGS).expect("settings");
    read_h2_frame_until(&mut conn, |kind, flags| {
        kind == FRAME_PING && flags & FLAG_ACK == 0
    })
    .expect("a keepalive PING from the pool");
    drop(conn);
    let _ = request.join();
}

/// Whether the proxy closes a fresh connection without reading from it.
fn closed_at_once(stream: &mut TcpStream) -> bool {
    // Generous: only a proxy that fails the check waits this long.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A connection that has been served a request, so the proxy has accepted and counted it;
/// `None` when the proxy closes it instead.
fn try_served_connection(port: u16) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(loopback(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("write");
    let head = read_head(&mut stream)?;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Some(stream)
}

fn served_connection(port: u16) -> TcpStream {
    try_served_connection(port).expect("a response on the held connection")
}

/// Waits until connections from before (readiness probes, admin requests), which count against
/// the limits until the proxy has seen them close, are gone: `probes` connections to `port` at
/// once are all served, and once closed the listeners are `idle` again.
fn settle(
    session: &mut AdminSession,
    port: u16,
    probes: usize,
    idle: impl Fn(&mut AdminSession) -> bool,
) {
    wait_for(
        "earlier connections released",
        Duration::from_secs(60),
        || {
            let held: Vec<Option<TcpStream>> =
                (0..probes).map(|_| try_served_connection(port)).collect();
            let settled = held.iter().all(Option::is_some);
            drop(held);
            wait_for("probes closed", Duration::from_secs(30), || {
                idle(session).then_some(())
            });
            settled.then_some(())
        },
    );
}

/// One keep-alive connection to the admin, for reading stats without opening (and leaving
/// behind) a connection per read: a closed connection counts against
/// `global_downstream_max_connections` until the proxy has seen the close, which Envoy's
/// admin, closing half-way and waiting for the client, may see late.
struct AdminSession {
    runtime: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl AdminSession {
    fn open(admin: std::net::SocketAddr) -> AdminSession {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let sender = runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(admin)
                .await
                .expect("connect to admin");
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("admin handshake");
            tokio::spawn(connection);
            sender
        });
        AdminSession { runtime, sender }
    }

    /// The stat's value; `None` when the proxy does not have it.
    fn stat(&mut self, name: &str) -> Option<u64> {
        use http_body_util::BodyExt;
        let path = format!("/stats?filter=%5E{}%24", name.replace('.', "%5C."));
        let sender = &mut self.sender;
        let body = self.runtime.block_on(async {
            sender.ready().await.expect("admin connection open");
            let request = http::Request::get(path)
                .header("host", "admin")
                .body(http_body_util::Empty::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("admin answer");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        });
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
            .and_then(|value| value.trim().parse().ok())
    }
}

#[test]
fn runtime_connection_limits_close_extra_connections_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (limited, other) = (free_port(), free_port());
    // A global limit of 4: the admin session, and 3 connections to the listeners.
    let runtime = "layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      envoy: {resource_limits: {listener: {limited: {connection_limit: 2}}}}\n      overload: {global_downstream_max_connections: 4}\n  - name: admin\n    admin_layer: {}\n";
    let yaml = format!(
        "{}{runtime}",
        bootstrap(
            &admin_yaml,
            &[
                http_listener("limited", limited, "", &catch_all("echo", "5s")),
                http_listener("other", other, "", &catch_all("echo", "5s")),
            ],
            &[static_cluster("echo", &[echo.addr])],
        )
    );
    let (_dir, file) = write_config(&yaml);
    let overflows = [
        format!("listener.127.0.0.1_{limited}.downstream_cx_overflow"),
        format!("listener.127.0.0.1_{other}.downstream_global_cx_overflow"),
    ];
    // Admin connections count towards the global limit too (as in Envoy): every stat is read
    // on one admin connection held open throughout.
    let run = || {
        let mut session = AdminSession::open(admin);
        let listeners_idle = |session: &mut AdminSession| {
            [limited, other].iter().all(|port| {
                session.stat(&format!("listener.127.0.0.1_{port}.downstream_cx_active")) == Some(0)
            })
        };
        // Settled means three probes beside the session are all served. A refused probe
        // counts an overflow, so overflows are measured from here.
        settle(&mut session, other, 3, listeners_idle);
        let before = overflows.clone().map(|name| session.stat(&name));
        let mut seen = Vec::new();
        // Two connections fill the listener's limit; a third is closed at once.
        let held = [served_connection(limited), served_connection(limited)];
        let mut third = TcpStream::connect(loopback(limited)).expect("connect");
        seen.push(("third on limited closed", closed_at_once(&mut third)));
        // A third listener connection in all (the fourth with the session) is within the
        // global limit; one more is not, nor is another admin connection.
        let other_held = served_connection(other);
        let mut fourth = TcpStream::connect(loopback(other)).expect("connect");
        seen.push(("fourth overall closed", closed_at_once(&mut fourth)));
        let mut to_admin = TcpStream::connect(admin).expect("connect");
        seen.push(("admin closed", closed_at_once(&mut to_admin)));
        // Freed places are usable again.
        drop((held, other_held));
        wait_for("all closed", Duration::from_secs(30), || {
            listeners_idle(&mut session).then_some(())
        });
        let (status, _, _) = http_get(loopback(limited), "/again").expect("request");
        seen.push(("served after", status == 200));
        let after = overflows.clone().map(|name| session.stat(&name));
        let counted: Vec<Option<u64>> = after
            .iter()
            .zip(before)
            .map(|(after, before)| Some(after.as_ref()? - before?))
            .collect();
        (seen, counted)
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, limited, &["--concurrency", "1"], run);
    assert!(remora.0.iter().all(|(_, ok)| *ok), "{:?}", remora.0);
    assert_eq!(remora.1, [Some(1), Some(1)]);
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "left: envoy, right: remora");
    }
}

/// The overload manager's downstream-connections monitor sets the global limit (over the
/// runtime key, as in Envoy) for listeners only: unlike the runtime key's, it leaves admin
/// connections alone. A listener with `ignore_global_conn_limit` is neither counted nor
/// refused by it; `bypass_overload_manager` is taken. Same outcome under Envoy.
#[test]
fn overload_monitor_limits_connections_except_on_exempt_listeners_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let (counted, exempt) = (free_port(), free_port());
    // A limit of 3 connections to `counted`; the admin session is not counted.
    let overload = "overload_manager:\n  refresh_interval: 0.25s\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig\n      max_active_downstream_connections: 3\nlayered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      overload: {global_downstream_max_connections: 100}\n";
    let exempt_listener = http_listener("exempt", exempt, "", &catch_all("echo", "5s")).replace(
        "    filter_chains:\n",
        "    ignore_global_conn_limit: true\n    bypass_overload_manager: true\n    filter_chains:\n",
    );
    let yaml = format!(
        "{}{overload}",
        bootstrap(
            &admin_yaml,
            &[
                http_listener("counted", counted, "", &catch_all("echo", "5s")),
                exempt_listener,
            ],
            &[static_cluster("echo", &[echo.addr])],
        )
    );
    let (_dir, file) = write_config(&yaml);
    let overflows = [counted, exempt]
        .map(|port| format!("listener.127.0.0.1_{port}.downstream_global_cx_overflow"));
    let run = || {
        let mut session = AdminSession::open(admin);
        let idle = |session: &mut AdminSession| {
            session.stat(&format!(
                "listener.127.0.0.1_{counted}.downstream_cx_active"
            )) == Some(0)
        };
        settle(&mut session, counted, 3, idle);
        let before = overflows.clone().map(|name| session.stat(&name));
        let mut seen = Vec::new();
        let held = [(); 3].map(|()| served_connection(counted));
        let mut fourth = TcpStream::connect(loopback(counted)).expect("connect");
        seen.push(("fourth on counted closed", closed_at_once(&mut fourth)));
        // Nor is a second admin connection refused.
        seen.push(("admin served", http_get(admin, "/ready").is_ok()));
        // The limit is reached, yet the exempt listener serves.
        let exempt_held: Vec<Option<TcpStream>> =
            (0..3).map(|_| try_served_connection(exempt)).collect();
        seen.push(("exempt served", exempt_held.iter().all(Option::is_some)));
        drop((held, exempt_held));
        wait_for("all closed", Duration::from_secs(30), || {
            idle(&mut session).then_some(())
        });
        let after = overflows.clone().map(|name| session.stat(&name));
        let counted: Vec<Option<u64>> = after
            .iter()
            .zip(before)
            .map(|(after, before)| Some(after.as_ref()? - before?))
            .collect();
        (seen, counted)
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, counted, &["--concurrency", "1"], run);
    assert!(remora.0.iter().all(|(_, ok)| *ok), "{:?}", remora.0);
    assert_eq!(remora.1, [Some(1), Some(0)]);
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "left: envoy, right: remora");
    }
}

#[test]
fn cors_shadow_mode_counts_origins_without_enforcing_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              typed_per_filter_config:
                envoy.filters.http.cors:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
                  allow_origin_string_match: [{exact: "https://ok.example"}]
                  filter_enabled: {default_value: {numerator: 0}}
                  shadow_enabled: {default_value: {numerator: 100}}
              routes:
              - match: {prefix: "/"}
                route: {cluster: echo}
"#;
    let yaml = bootstrap(&admin_yaml, &[http_listener("ingress", port, "", vhosts)], &[
        static_cluster("echo", &[echo.addr]),
    ])
    .replace(
        "          http_filters:\n",
        "          http_filters:\n          - name: envoy.filters.http.cors\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}\n",
    );
    let (_dir, file) = write_config(&yaml);
    let run = |stat: &dyn Fn(&str) -> u64| {
        let mut seen = Vec::new();
        for origin in ["https://ok.example", "https://other.example"] {
            let (status, head, _) =
                http_request(loopback(port), "GET", "/", &[("origin", origin)], "")
                    .expect("request");
            let cors = head
                .to_ascii_lowercase()
                .contains("access-control-allow-origin");
            seen.push((status, cors));
        }
        let counts = ["cors.origin_valid", "cors.origin_invalid"]
            .map(|name| stat(&format!("http.ingress.{name}")));
        (seen, counts)
    };
    let remora = {
        let proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run(&|name| proxy.stat(name))
    };
    assert_eq!(remora, (vec![(200, false), (200, false)], [1, 1]));
    if !remora_tests::envoy::available_or_skip("the Envoy half of the CORS shadow test") {
        return;
    }
    let envoy = {
        let envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
        run(&|name| envoy.stat(name).unwrap_or(u64::MAX))
    };
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

#[test]
fn tcp_proxy_listener_connection_limit_closes_extra_connections_as_in_envoy() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let runtime = "layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      envoy: {resource_limits: {listener: {tcp_in: {connection_limit: 2}}}}\n";
    let yaml = format!(
        "{}{runtime}",
        bootstrap(
            &admin_yaml,
            &[tcp_listener("tcp_in", port, "echo", "")],
            &[static_cluster("echo", &[echo.addr])],
        )
    );
    let (_dir, file) = write_config(&yaml);
    let stat = |name: &str| remora_tests::admin_stat(admin, name);
    let run = || {
        // The probe is a proxied connection too (counted below).
        remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
        let open = || stat(&format!("listener.127.0.0.1_{port}.downstream_cx_active"));
        wait_for("no connection open", Duration::from_secs(10), || {
            (open() == Some(0)).then_some(())
        });
        let mut seen = Vec::new();
        // Two proxied connections (each has carried a request to the echo) fill the limit; a
        // third is closed at accept, before anything reaches the upstream.
        let held = [served_connection(port), served_connection(port)];
        let mut third = TcpStream::connect(loopback(port)).expect("connect");
        seen.push(("third closed", closed_at_once(&mut third)));
        drop(held);
        wait_for("all closed", Duration::from_secs(10), || {
            (open() == Some(0)).then_some(())
        });
        // A freed place is usable again (served_connection checks the answer).
        drop(served_connection(port));
        wait_for("closed again", Duration::from_secs(10), || {
            (open() == Some(0)).then_some(())
        });
        let counts = [
            format!("listener.127.0.0.1_{port}.downstream_cx_overflow"),
            format!("listener.127.0.0.1_{port}.downstream_cx_total"),
            "tcp.tcp_in.downstream_cx_total".to_string(),
            "cluster.echo.upstream_cx_total".to_string(),
        ]
        .map(|name| (name.clone(), stat(&name)));
        (seen, counts)
    };
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run()
    };
    assert!(remora.0.iter().all(|(_, ok)| *ok), "{:?}", remora.0);
    // Four proxied connections (the probe's, two held, one after); the one closed at accept
    // counts as overflow only.
    let counts: Vec<Option<u64>> = remora.1.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        counts,
        [Some(1), Some(4), Some(4), Some(4)],
        "{:?}",
        remora.1
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the tcp_proxy connection limit") {
        return;
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        run()
    };
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

/// A keep-alive HTTP/1.1 GET on `stream`; the name of the echo upstream that answered
/// (its `x-upstream` header), after reading the whole response.
fn answered_by(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: lb\r\n\r\n").as_bytes())
        .expect("write request");
    let head = String::from_utf8(read_head(stream).expect("a response")).expect("utf-8 head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("a content-length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("body");
    header("x-upstream").expect("the echo names itself")
}

/// Envoy's priority load split, per cluster: the share of requests each echo upstream should
/// get, from the healthy and degraded availability of each priority (share of such hosts ×
/// the overprovisioning factor 1.4, capped at 100%) and the panic threshold (50%).
const PRIORITY_SCENARIOS: [(&str, &[(&str, f64)]); 4] = [
    // Everything healthy: priority 0 takes all, split by round robin.
    ("all_healthy", &[("e0", 0.5), ("e1", 0.5)]),
    // Half of priority 0 unhealthy: it is 70% available, priority 1 takes the other 30%.
    (
        "p0_half_unhealthy",
        &[("e0", 0.7), ("e2", 0.15), ("e3", 0.15)],
    ),
    // Priority 0 all degraded, priority 1 half healthy (70%): degraded hosts take only what
    // healthy ones leave, 30%.
    ("p0_degraded", &[("e2", 0.7), ("e0", 0.15), ("e1", 0.15)]),
    // Both priorities under the panic threshold (1 of 3 healthy, 0 of 2): total panic, load by
    // host count (3/5, 2/5) over all hosts, healthy or not.
    (
        "panic",
        &[
            ("e0", 0.2),
            ("e1", 0.2),
            ("e4", 0.2),
            ("e2", 0.2),
            ("e3", 0.2),
        ],
    ),
];

#[test]
fn priority_load_split_degraded_and_panic_match_envoy() {
    const REQUESTS: usize = 1000;
    let echoes: Vec<EchoServer> = (0..5)
        .map(|i| EchoServer::start(&format!("e{i}"), "127.0.0.1"))
        .collect();
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    // `hosts`: (echo index, health status) per priority.
    let cluster = |name: &str, hosts: &[&[(usize, &str)]]| {
        let mut yaml = format!(
            "  - name: {name}\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n"
        );
        for (priority, level) in hosts.iter().enumerate() {
            yaml.push_str(&format!(
                "      - priority: {priority}\n        lb_endpoints:\n"
            ));
            for (echo, health) in level.iter() {
                yaml.push_str(&format!(
                    "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n          health_status: {health}\n",
                    echoes[*echo].addr.port()
                ));
            }
        }
        yaml
    };
    let clusters = [
        cluster(
            "all_healthy",
            &[
                &[(0, "HEALTHY"), (1, "HEALTHY")],
                &[(2, "HEALTHY"), (3, "HEALTHY")],
            ],
        ),
        cluster(
            "p0_half_unhealthy",
            &[
                &[(0, "HEALTHY"), (1, "UNHEALTHY")],
                &[(2, "HEALTHY"), (3, "HEALTHY")],
            ],
        ),
        cluster(
            "p0_degraded",
            &[
                &[(0, "DEGRADED"), (1, "DEGRADED")],
                &[(2, "HEALTHY"), (3, "UNHEALTHY")],
            ],
        ),
        cluster(
            "panic",
            &[
                &[(0, "HEALTHY"), (1, "UNHEALTHY"), (4, "UNHEALTHY")],
                &[(2, "UNHEALTHY"), (3, "UNHEALTHY")],
            ],
        ),
    ];
    let mut routes = String::from(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n",
    );
    for (name, _) in PRIORITY_SCENARIOS {
        routes.push_str(&format!(
            "              - match: {{prefix: \"/{name}\"}}\n                route: {{cluster: {name}}}\n"
        ));
    }
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("lb", port, "", &routes)],
        &clusters,
    );
    let (_dir, file) = write_config(&yaml);
    // Which upstream answered, per scenario, over one keep-alive connection.
    let run = || -> Vec<std::collections::BTreeMap<String, usize>> {
        let mut stream = TcpStream::connect(loopback(port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        PRIORITY_SCENARIOS
            .iter()
            .map(|(name, _)| {
                let mut counts = std::collections::BTreeMap::new();
                for _ in 0..REQUESTS {
                    *counts
                        .entry(answered_by(&mut stream, &format!("/{name}")))
                        .or_insert(0) += 1;
                }
                counts
            })
            .collect()
    };
    // Priorities are chosen at random per request (as Envoy does), so each count is binomial:
    // within 5 standard deviations of its expectation (a false alarm about once in 10^6 per
    // count), and exactly zero where the share is zero.
    let check = |proxy: &str, seen: &[std::collections::BTreeMap<String, usize>]| {
        eprintln!("{proxy}: {seen:?}");
        for ((scenario, shares), counts) in PRIORITY_SCENARIOS.iter().zip(seen) {
            for (host, count) in counts {
                assert!(
                    shares.iter().any(|(h, _)| h == host),
                    "{proxy} {scenario}: {host} got {count} requests, expected none: {counts:?}"
                );
            }
            for (host, share) in shares.iter() {
                let count = counts.get(*host).copied().unwrap_or(0) as f64;
                let n = REQUESTS as f64;
                let tolerance = 5.0 * (n * share * (1.0 - share)).sqrt();
                assert!(
                    (count - n * share).abs() <= tolerance,
                    "{proxy} {scenario}: {host} got {count} of {n}, expected {share} ± {tolerance}: {counts:?}"
                );
            }
        }
    };
    let remora = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run()
    };
    check("remora", &remora);
    if !remora_tests::envoy::available_or_skip("the Envoy half of the priority load split") {
        return;
    }
    let envoy = {
        let _envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
        run()
    };
    check("envoy", &envoy);
}

/// The connection manager's counts by protocol, of completed responses (also under its
/// listener) and of closed connections: two HTTP/1.1 requests on one connection (one a 503),
/// two HTTP/2 requests on another, one request on a third, under Envoy as under Remora.
#[test]
fn connection_manager_counts_protocols_and_completions_as_envoy_does() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ing", port, "", &catch_all("app", "5s"))],
        &[static_cluster("app", &[echo.addr])],
    );
    let (_dir, file) = write_config(&yaml);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code} "])
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The connection manager's, and the response counts it keeps again under its listener.
    let names = format!(
        "^(listener\\.127\\.0\\.0\\.1_{port}\\.)?http\\.ing\\.(downstream_\
         (rq_(total|active|completed|http[12]_total|[1-5]xx)\
         |cx_(total|active|http[12]_(total|active)|(rx|tx)_bytes_total\
         |destroy(_local|_remote)?(_active_rq)?))|rq_(total|direct_response))$"
    );
    let query: String = names
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| match b.is_ascii_alphanumeric() || b == b'_' {
            true => (b as char).to_string(),
            false => format!("%{b:02X}"),
        })
        .collect();
    let run = || {
        assert_eq!(curl(&[&url("/ok"), &url("/status/503")]), "200 503 ");
        // Two streams on one HTTP/2 connection (curl 7.88 fails the second on reuse), closed
        // when the runtime that drives it is dropped.
        let (runtime, mut sender) = h2_client(loopback(port));
        runtime.block_on(async {
            use http_body_util::BodyExt;
            for _ in 0..2 {
                let request = http::Request::get(url("/ok"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request");
                let response = sender.send_request(request).await.expect("h2 response");
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.expect("h2 body");
            }
        });
        assert_eq!(
            remora_tests::admin_stat(admin, "http.ing.downstream_cx_http2_active"),
            Some(1),
            "while the HTTP/2 connection is open"
        );
        drop((sender, runtime));
        assert_eq!(http_get(loopback(port), "/ok").expect("request").0, 200);
        wait_for("every connection closed", Duration::from_secs(15), || {
            let (_, _, body) = http_get(admin, &format!("/stats?filter={query}")).ok()?;
            let mut stats: std::collections::BTreeMap<String, u64> = body
                .lines()
                .filter_map(|line| {
                    let (name, value) = line.split_once(": ")?;
                    let name = match name.strip_prefix(&format!("listener.127.0.0.1_{port}.")) {
                        Some(scoped) => format!("listener.{}", scoped.strip_prefix("http.ing.")?),
                        None => name.strip_prefix("http.ing.")?.to_string(),
                    };
                    Some((name, value.parse().ok()?))
                })
                .collect();
            // The harness's readiness probe is a connection too, so the totals are not fixed:
            // every one of them, and at least the three with requests, has closed.
            let total = stats.remove("downstream_cx_total")?;
            let destroyed = stats.remove("downstream_cx_destroy")?;
            let done =
                total >= 3 && destroyed == total && stats.get("downstream_cx_active") == Some(&0);
            // Probes connect and close with nothing sent: ended by the client.
            *stats.get_mut("downstream_cx_destroy_remote")? -= total - 3;
            done.then_some(stats)
        })
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    let mut expected: std::collections::BTreeMap<String, u64> = [
        ("downstream_cx_active", 0),
        ("downstream_cx_http1_active", 0),
        ("downstream_cx_http1_total", 2),
        ("downstream_cx_http2_active", 0),
        ("downstream_cx_http2_total", 1),
        ("downstream_rq_1xx", 0),
        ("downstream_rq_2xx", 4),
        ("downstream_rq_3xx", 0),
        ("downstream_rq_4xx", 0),
        ("downstream_rq_5xx", 1),
        ("downstream_rq_active", 0),
        ("downstream_rq_completed", 5),
        ("downstream_rq_http1_total", 3),
        ("downstream_rq_http2_total", 2),
        ("downstream_rq_total", 5),
        ("listener.downstream_rq_1xx", 0),
        ("listener.downstream_rq_2xx", 4),
        ("listener.downstream_rq_3xx", 0),
        ("listener.downstream_rq_4xx", 0),
        ("listener.downstream_rq_5xx", 1),
        ("listener.downstream_rq_completed", 5),
        ("rq_direct_response", 0),
        ("rq_total", 5),
    ]
    .map(|(name, value)| (name.to_string(), value))
    .into();
    let mut counted = remora.clone();
    // The bytes depend on the clients' heads: here only that they moved; Envoy's below.
    for wire in [
        "downstream_cx_rx_bytes_total",
        "downstream_cx_tx_bytes_total",
    ] {
        assert!(counted.remove(wire) > Some(0), "{wire}");
    }
    expected.extend(
        [
            // The request asking to close, closed by the proxy; the others, by the client.
            ("downstream_cx_destroy_local", 1),
            ("downstream_cx_destroy_remote", 2),
            ("downstream_cx_destroy_active_rq", 0),
            ("downstream_cx_destroy_local_active_rq", 0),
            ("downstream_cx_destroy_remote_active_rq", 0),
        ]
        .map(|(name, value)| (name.to_string(), value)),
    );
    assert_eq!(counted, expected);
    if let Some(mut envoy) = envoy {
        // What the proxy wrote differs in its heads and HTTP/2 frames; what it read does not.
        let mut remora = remora;
        for stats in [&mut envoy, &mut remora] {
            stats.remove("downstream_cx_tx_bytes_total");
        }
        assert_eq!(envoy, remora, "Envoy, then Remora");
    }
}

/// HTTP/2 upstream streams that end before their response: one the upstream resets, one the
/// proxy resets because its client left. Counted by who reset them, under Envoy as under
/// Remora.
#[test]
fn http2_upstream_stream_resets_count_as_envoys_do() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ing", port, "", &catch_all("h2", "5s"))],
        &[http2_cluster("h2", echo.addr)],
    );
    let (_dir, file) = write_config(&yaml);
    let stat = |name: &str| remora_tests::admin_stat(admin, &format!("cluster.h2.{name}"));
    let run = || {
        let (status, _, body) = http_get(loopback(port), "/reset").expect("request");
        assert_eq!(status, 503, "{body}");
        assert!(body.ends_with("reset reason: remote reset"), "{body}");
        // A client that leaves while the upstream takes its time.
        let mut leaver = TcpStream::connect(loopback(port)).expect("connect");
        leaver
            .write_all(b"GET /delay/3000 HTTP/1.1\r\nhost: a\r\n\r\n")
            .expect("write");
        wait_for("the request upstream", Duration::from_secs(10), || {
            (stat("upstream_rq_active")? == 1).then_some(())
        });
        drop(leaver);
        wait_for("the stream reset", Duration::from_secs(10), || {
            (stat("upstream_rq_active")? == 0).then_some(())
        });
        wait_for("the resets counted", Duration::from_secs(10), || {
            (stat("upstream_rq_tx_reset")? == 1).then_some(())
        });
        [
            "upstream_rq_rx_reset",
            "upstream_rq_tx_reset",
            "upstream_rq_pending_failure_eject",
        ]
        .map(|name| (name, stat(name).expect(name)))
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(
        remora,
        [
            ("upstream_rq_rx_reset", 1),
            ("upstream_rq_tx_reset", 1),
            ("upstream_rq_pending_failure_eject", 0),
        ]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "Envoy, then Remora");
    }
}

/// `request_headers_timeout` runs from a head's first byte: a head still arriving then gets
/// Envoy's 408 and the connection closes, on a new connection as after a kept-alive request;
/// counted as a header timeout and a reset stream, under Envoy as under Remora.
#[test]
fn a_head_that_takes_too_long_gets_envoys_408() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ing",
            port,
            "          request_headers_timeout: 0.3s\n",
            &catch_all("app", "5s"),
        )],
        &[static_cluster("app", &[echo.addr])],
    );
    let (_dir, file) = write_config(&yaml);
    let stat = |name: &str| remora_tests::admin_stat(admin, &format!("http.ing.{name}"));
    let timed_out = "HTTP/1.1 408 Request Timeout";
    let run = || {
        let (first, closed) =
            exchange_until_closed(loopback(port), b"GET /a HTTP/1.1\r\nhost: a\r\n");
        assert!(closed);
        let (kept_alive, closed) = exchange_until_closed(
            loopback(port),
            b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\nho",
        );
        assert!(closed);
        for (answer, before) in [(&first, ""), (&kept_alive, "HTTP/1.1 200 OK")] {
            assert!(answer.starts_with(before), "{answer}");
            assert!(answer.contains(timed_out), "{answer}");
            assert!(
                answer.ends_with("\r\n\r\nrequest header timeout"),
                "{answer}"
            );
        }
        wait_for("both connections closed", Duration::from_secs(10), || {
            (stat("downstream_cx_active")? == 0).then_some(())
        });
        [
            "downstream_rq_header_timeout",
            "downstream_rq_rx_reset",
            "downstream_rq_4xx",
            "downstream_cx_protocol_error",
        ]
        .map(|name| (name, stat(name).expect(name)))
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(
        remora,
        [
            ("downstream_rq_header_timeout", 2),
            ("downstream_rq_rx_reset", 2),
            ("downstream_rq_4xx", 2),
            ("downstream_cx_protocol_error", 0),
        ]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "Envoy, then Remora");
    }
}

/// An upstream that answers each request with a head, three of the hundred body bytes it
/// promises, and its end of the connection.
fn cut_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc");
            }
        }
    });
    addr
}

/// How connections and streams end, as the connection manager counts it: a client that leaves
/// with its request in flight, a response the upstream stops short, a client that sends what
/// no codec reads, one left idle until the connection idle timeout; and the router's direct
/// responses and redirects. Under Envoy as under Remora.
#[test]
fn connection_ends_and_router_answers_count_as_envoys_do() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let routes = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/direct"}
                direct_response: {status: 204}
              - match: {prefix: "/moved"}
                redirect: {path_redirect: "/ok"}
              - match: {prefix: "/cut"}
                route: {cluster: cut, timeout: 5s}
              - match: {prefix: "/garbage"}
                route: {cluster: garbage, timeout: 5s}
              - match: {prefix: "/"}
                route: {cluster: app, timeout: 5s}
"#;
    let cut = cut_upstream();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ing",
            port,
            // Envoy closes an idle connection after a drain of `drain_timeout`.
            "          common_http_protocol_options: {idle_timeout: 0.5s}\n          drain_timeout: 0.1s\n",
            routes,
        )],
        &[
            static_cluster("app", &[echo.addr]),
            static_cluster("cut", &[cut]),
            static_cluster("garbage", &[raw_upstream(b"NOT HTTP AT ALL\r\n\r\n")]),
        ],
    );
    let (_dir, file) = write_config(&yaml);
    let stat = |name: &str| remora_tests::admin_stat(admin, &format!("http.ing.{name}"));
    let run = || {
        let probes = stat("downstream_cx_total").unwrap_or(0);
        assert_eq!(http_get(loopback(port), "/direct").expect("request").0, 204);
        assert_eq!(http_get(loopback(port), "/moved").expect("request").0, 301);
        // A request the upstream answers in 3 s, left after its head is in (Envoy sees the
        // client gone only then).
        let mut leaver = TcpStream::connect(loopback(port)).expect("connect");
        leaver
            .write_all(b"GET /delay/3000 HTTP/1.1\r\nhost: a\r\n\r\n")
            .expect("write");
        // On its upstream connection, not only in the proxy: a client that left during the
        // connect would leave no request on a connection to count.
        wait_for("the request upstream", Duration::from_secs(10), || {
            let upstream = remora_tests::admin_stat(admin, "cluster.app.upstream_rq_active");
            (stat("downstream_rq_active") == Some(1) && upstream == Some(1)).then_some(())
        });
        drop(leaver);
        // The upstream's body stops short: the proxy cuts the response it had begun.
        let (reply, closed) =
            exchange_until_closed(loopback(port), b"GET /cut HTTP/1.1\r\nhost: a\r\n\r\n");
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("abc"),
            "{reply}"
        );
        assert!(closed);
        // An upstream that does not speak HTTP: the codec's protocol error, a 502.
        let (status, _, body) = http_get(loopback(port), "/garbage").expect("request");
        let garbage = (
            status,
            body,
            remora_tests::admin_stat(admin, "cluster.garbage.upstream_cx_protocol_error"),
        );
        // Not HTTP: refused with a 400, and the connection closed.
        let (reply, closed) = exchange_until_closed(loopback(port), b"NOT HTTP\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(closed);
        // One request, then nothing: the idle timeout closes the connection.
        let mut idle = TcpStream::connect(loopback(port)).expect("connect");
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        idle.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
            .expect("write");
        let mut seen = Vec::new();
        idle.read_to_end(&mut seen).expect("closed by the proxy");
        assert!(seen.starts_with(b"HTTP/1.1 200"));
        wait_for("every connection closed", Duration::from_secs(15), || {
            let total = stat("downstream_cx_total")?;
            // At least: the harness's readiness probe may be counted late.
            (total >= probes + 7 && stat("downstream_cx_destroy")? == total).then_some(())
        });
        // Upstream, each connection those requests were on ended: the one left (given up by
        // the proxy), the one cut (ended by the upstream), the one that broke HTTP (closed by
        // the proxy), each with its request in flight.
        let cluster = |name: &str| remora_tests::admin_stat(admin, &format!("cluster.{name}"));
        wait_for(
            "the upstream connections closed",
            Duration::from_secs(10),
            || {
                ["app", "cut", "garbage"]
                    .iter()
                    .all(|c| cluster(&format!("{c}.upstream_cx_destroy_with_active_rq")) == Some(1))
                    .then_some(())
            },
        );
        let upstream: Vec<(String, u64)> = ["app", "cut", "garbage"]
            .iter()
            .flat_map(|c| {
                ["local", "remote"].map(|side| {
                    let name = format!("{c}.upstream_cx_destroy_{side}_with_active_rq");
                    let value = cluster(&name).expect("stat");
                    (name, value)
                })
            })
            .collect();
        let counts = [
            "downstream_rq_rx_reset",
            "downstream_rq_tx_reset",
            "downstream_cx_destroy_local",
            "downstream_cx_destroy_local_active_rq",
            "downstream_cx_destroy_remote_active_rq",
            "downstream_cx_destroy_active_rq",
            "downstream_cx_idle_timeout",
            "downstream_cx_protocol_error",
            "rq_total",
            "rq_direct_response",
            "rq_redirect",
            "no_route",
        ]
        .map(|name| (name, stat(name).expect(name)))
        .into_iter()
        .collect::<Vec<_>>();
        (counts, garbage, upstream)
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, port, &[], run);
    assert_eq!(
        remora.1,
        (
            502,
            "upstream connect error or disconnect/reset before headers. reset reason: protocol \
             error"
                .to_string(),
            Some(1)
        )
    );
    let side =
        |c: &str, side: &str, n: u64| (format!("{c}.upstream_cx_destroy_{side}_with_active_rq"), n);
    assert_eq!(
        remora.2,
        [
            side("app", "local", 1),
            side("app", "remote", 0),
            side("cut", "local", 0),
            side("cut", "remote", 1),
            side("garbage", "local", 1),
            side("garbage", "remote", 0),
        ]
    );
    assert_eq!(
        remora.0,
        [
            // Every reset stream: the client that left, the response cut, the refused head;
            // and of them, the one the proxy reset.
            ("downstream_rq_rx_reset", 3),
            ("downstream_rq_tx_reset", 1),
            // The direct response, the redirect, the cut response, the 502, the refused head
            // and the idle connection.
            ("downstream_cx_destroy_local", 6),
            ("downstream_cx_destroy_local_active_rq", 0),
            ("downstream_cx_destroy_remote_active_rq", 1),
            ("downstream_cx_destroy_active_rq", 1),
            ("downstream_cx_idle_timeout", 1),
            ("downstream_cx_protocol_error", 1),
            // The direct response, the redirect, the one left, the cut one, the 502 and the
            // idle connection's.
            ("rq_total", 6),
            ("rq_direct_response", 2),
            ("rq_redirect", 0),
            ("no_route", 0),
        ]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "Envoy, then Remora");
    }
}

/// The router's dynamic stats (on unless `dynamic_stats: false`): each cluster's
/// `upstream_rq_completed`, `upstream_rq_<N>xx`, `upstream_rq_<code>` and `upstream_rq_time`,
/// plain and under `external.` or, for an internal client, `internal.`; none of them with the
/// stats off. Three listeners, each to its own cluster, under Envoy and Remora.
#[test]
fn dynamic_stats_are_charged_as_envoy_charges_them() {
    let echo = EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let ports = [free_port(), free_port(), free_port()];
    let internal = "          use_remote_address: true\n          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}\n";
    let listeners = [
        http_listener("dyn", ports[0], "", &catch_all("app", "5s")),
        http_listener("inside", ports[1], internal, &catch_all("app_in", "5s")),
        http_listener("quiet", ports[2], "", &catch_all("app_quiet", "5s"))
            .replace("Router}", "Router, dynamic_stats: false}"),
    ];
    assert!(listeners[2].contains("dynamic_stats: false"));
    let yaml = format!(
        "stats_flush_interval: 1s\n{}",
        bootstrap(
            &admin_yaml,
            &listeners,
            &[
                static_cluster("app", &[echo.addr]),
                static_cluster("app_in", &[echo.addr]),
                static_cluster("app_quiet", &[echo.addr]),
            ],
        )
    );
    let (_dir, file) = write_config(&yaml);
    let run = || {
        let send = |port: u16, path: &str| http_get(loopback(port), path).expect("request").0;
        assert_eq!(send(ports[0], "/ok"), 200);
        assert_eq!(send(ports[0], "/ok"), 200);
        assert_eq!(send(ports[0], "/status/503"), 503);
        assert_eq!(send(ports[1], "/status/404"), 404);
        assert_eq!(send(ports[2], "/ok"), 200);
        let read = |query: &str| {
            let (_, _, body) = http_get(admin, query).expect("stats");
            body.lines()
                .filter(|line| !line.contains("No recorded values"))
                .map(|line| match line.split_once(": P0(") {
                    // A histogram: its name, not its quantiles.
                    Some((name, _)) => format!("{name}: (histogram)"),
                    None => line.to_string(),
                })
                .collect::<Vec<_>>()
        };
        let mut seen = read(
            "/stats?usedonly&type=Counters&filter=%5Ecluster%5C.app%5Ba-z_%5D*%5C.(external%5C.%7Cinternal%5C.)%3Fupstream_rq_(completed%7C%5Cd(xx%7C%5Cd%5Cd))%24",
        );
        // Envoy shows a histogram's values once a stats flush has merged them (each second
        // here).
        seen.extend(wait_for("the histograms", Duration::from_secs(15), || {
            let histograms = read(
                "/stats?usedonly&type=Histograms&filter=%5Ecluster%5C.app.*upstream_rq_time%24",
            );
            (histograms.len() >= 4).then_some(histograms)
        }));
        seen
    };
    let (remora, envoy) = remora_then_envoy(&file, admin, ports[0], &[], run);
    assert_eq!(
        remora,
        [
            "cluster.app.external.upstream_rq_200: 2",
            "cluster.app.external.upstream_rq_2xx: 2",
            "cluster.app.external.upstream_rq_503: 1",
            "cluster.app.external.upstream_rq_5xx: 1",
            "cluster.app.external.upstream_rq_completed: 3",
            "cluster.app.upstream_rq_200: 2",
            "cluster.app.upstream_rq_2xx: 2",
            "cluster.app.upstream_rq_503: 1",
            "cluster.app.upstream_rq_5xx: 1",
            "cluster.app.upstream_rq_completed: 3",
            "cluster.app_in.internal.upstream_rq_404: 1",
            "cluster.app_in.internal.upstream_rq_4xx: 1",
            "cluster.app_in.internal.upstream_rq_completed: 1",
            "cluster.app_in.upstream_rq_404: 1",
            "cluster.app_in.upstream_rq_4xx: 1",
            "cluster.app_in.upstream_rq_completed: 1",
            "cluster.app.external.upstream_rq_time: (histogram)",
            "cluster.app.upstream_rq_time: (histogram)",
            "cluster.app_in.internal.upstream_rq_time: (histogram)",
            "cluster.app_in.upstream_rq_time: (histogram)",
        ]
    );
    if let Some(envoy) = envoy {
        assert_eq!(envoy, remora, "envoy, remora");
    }
}
