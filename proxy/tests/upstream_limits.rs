//! End-to-end: limits that act on a request while it is upstream. The route timeout and the
//! stream idle timeout keep running once response headers are sent (the body is cut, as Envoy
//! does), and circuit breakers queue requests as pending up to `max_pending_requests`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use remora_tests::{free_port, http_get, wait_for};

/// GETs `path` on a fresh HTTP/1.1 connection (`Connection: close`) and reads until the proxy
/// closes it; panics if that takes more than 20 s. Returns what arrived and how long it took.
fn get_until_closed(addr: SocketAddr, path: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("write request");
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{path}: the proxy did not close the connection: {e}"));
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// `get_until_closed` on a thread; the result arrives on the channel.
fn spawn_get(addr: SocketAddr, path: &str) -> mpsc::Receiver<(String, Duration)> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(get_until_closed(addr, &path));
    });
    rx
}

/// A 200 that announces 20 bytes of body but stops after `partial`, cut after `at_least`.
fn assert_truncated(answer: &str, elapsed: Duration, at_least: Duration) {
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("content-length: 20"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\npartial"),
        "body not cut: {answer:?}"
    );
    assert!(
        elapsed >= at_least && elapsed < Duration::from_secs(10),
        "cut after {elapsed:?}"
    );
}

fn with_cluster_extra(cluster: String, extra: &str) -> String {
    cluster.replace("    type: STATIC\n", &format!("    type: STATIC\n{extra}"))
}

#[test]
fn route_timeout_cuts_a_stalled_body_after_headers() {
    // Headers and "partial" at once; "-and-the-rest" (20 bytes in all) only when released.
    let upstream = HeldUpstream::start_stalled_body("partial", "-and-the-rest");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/short"}
                route: {cluster: short, timeout: 1s}
              - match: {prefix: "/unbounded"}
                route: {cluster: unbounded, timeout: 0s}
              - match: {prefix: "/direct"}
                direct_response: {status: 200, body: {inline_string: "alive"}}
"#;
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          codec_type: AUTO\n",
            vhosts,
        )],
        &[
            static_cluster("short", &[upstream.addr]),
            with_cluster_extra(
                static_cluster("unbounded", &[upstream.addr]),
                "    circuit_breakers: {thresholds: [{max_requests: 1}]}\n",
            ),
        ],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);

    // No route timeout: the body is held for as long as the test likes.
    let unbounded = spawn_get(addr, "/unbounded");
    wait_for(
        "the unbounded response streaming",
        Duration::from_secs(10),
        || (upstream.arrived() == 1).then_some(()),
    );
    // Its request stays active until the body ends, so max_requests: 1 still applies.
    assert_eq!(proxy.stat("cluster.unbounded.upstream_rq_active"), 1);
    assert_eq!(proxy.stat("http.ingress.downstream_rq_active"), 1);
    let (status, head, body) = http_get(addr, "/unbounded").expect("second request");
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("x-envoy-overloaded: true"), "{head}");
    assert!(body.ends_with("reset reason: overflow"), "{body}");
    assert_eq!(
        proxy.stat("cluster.unbounded.upstream_rq_active_overflow"),
        1
    );

    // HTTP/1.1: headers and "partial" arrive, then the connection closes mid-body.
    let (answer, elapsed) = get_until_closed(addr, "/short");
    assert_truncated(&answer, elapsed, Duration::from_millis(900));
    wait_for("upstream_rq_timeout", Duration::from_secs(5), || {
        (proxy.stat_or_none("cluster.short.upstream_rq_timeout")? == 1).then_some(())
    });

    // HTTP/2: the stream is reset, the connection stays usable.
    let (runtime, mut sender) = h2_client(addr);
    runtime.block_on(async {
        use http_body_util::BodyExt;
        let get = |path: &str| {
            http::Request::get(format!("http://test{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let started = Instant::now();
        let response = sender
            .send_request(get("/short"))
            .await
            .expect("h2 response");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut received = Vec::new();
        let error = loop {
            match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
                Err(_) => panic!("h2 body neither ended nor was reset"),
                Ok(None) => panic!("h2 body ended normally: {received:?}"),
                Ok(Some(Ok(frame))) => {
                    received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]))
                }
                Ok(Some(Err(error))) => break error,
            }
        };
        assert_eq!(received, b"partial");
        assert!(started.elapsed() >= Duration::from_millis(900));
        let reset = format!("{error:?}");
        assert!(reset.contains("Reset"), "not a stream reset: {reset}");
        let response = sender
            .send_request(get("/direct"))
            .await
            .expect("same h2 connection");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"alive");
    });
    wait_for("upstream_rq_timeout", Duration::from_secs(5), || {
        (proxy.stat_or_none("cluster.short.upstream_rq_timeout")? == 2).then_some(())
    });
    assert_eq!(proxy.stat("cluster.short.upstream_rq_active"), 0);

    // The unbounded one has been held for well over a second: still open, then complete.
    assert!(
        matches!(unbounded.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "timeout: 0s must not cut the body"
    );
    upstream.release();
    let (answer, _) = unbounded
        .recv_timeout(Duration::from_secs(10))
        .expect("unbounded response completes once released");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\npartial-and-the-rest"),
        "{answer:?}"
    );
    wait_for("unbounded request inactive", Duration::from_secs(5), || {
        (proxy.stat_or_none("cluster.unbounded.upstream_rq_active")? == 0
            && proxy.stat_or_none("http.ingress.downstream_rq_active")? == 0)
            .then_some(())
    });
    assert_eq!(proxy.stat("cluster.unbounded.upstream_rq_timeout"), 0);
    assert_eq!(proxy.stat("http.ingress.downstream_rq_idle_timeout"), 0);
}

/// An upstream that answers each request with `chunks` body pieces, `gap` apart.
fn paced_upstream(chunks: usize, gap: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                if read_head(&mut stream).is_none() {
                    return;
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", chunks * 8);
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                // Pacing is the behaviour under test here, not synchronisation.
                let pieces: Vec<String> = (0..chunks).map(|i| format!("chunk-{i:02}")).collect();
                let pieces: Vec<&[u8]> = pieces.iter().map(|p| p.as_bytes()).collect();
                let _ = remora_tests::write_paced(&mut stream, &pieces, gap);
            });
        }
    });
    addr
}

#[test]
fn stream_idle_timeout_cuts_a_stalled_body_not_a_slow_one() {
    let stalled = HeldUpstream::start_stalled_body("partial", "-and-the-rest");
    // Six pieces 250 ms apart: 1.5 s in all, longer than the 1 s idle timeout.
    let paced = paced_upstream(6, Duration::from_millis(250));
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/stalled"}
                route: {cluster: stalled}
              - match: {prefix: "/paced"}
                route: {cluster: paced, timeout: 5s}
              - match: {prefix: "/no-idle"}
                route: {cluster: no_idle, idle_timeout: 0s}
"#;
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "          stream_idle_timeout: 1s\n",
            vhosts,
        )],
        &[
            static_cluster("stalled", &[stalled.addr]),
            static_cluster("paced", &[paced]),
            static_cluster("no_idle", &[stalled.addr]),
        ],
    );
    let proxy = Proxy::start(&yaml, admin, &[]);
    let addr = loopback(port);

    // A route idle_timeout of 0s turns the HCM's stream idle timeout off for that route.
    let no_idle = spawn_get(addr, "/no-idle");
    wait_for(
        "the no-idle response streaming",
        Duration::from_secs(10),
        || (stalled.arrived() == 1).then_some(()),
    );

    let (answer, elapsed) = get_until_closed(addr, "/stalled");
    assert_truncated(&answer, elapsed, Duration::from_millis(900));
    wait_for("downstream_rq_idle_timeout", Duration::from_secs(5), || {
        (proxy.stat_or_none("http.ingress.downstream_rq_idle_timeout")? == 1).then_some(())
    });
    // An idle timeout is not a route timeout.
    assert_eq!(proxy.stat("cluster.stalled.upstream_rq_timeout"), 0);

    // Every frame resets the idle timer.
    let (answer, elapsed) = get_until_closed(addr, "/paced");
    let expected: String = (0..6).map(|i| format!("chunk-{i:02}")).collect();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("\r\n\r\n{expected}")),
        "{answer:?}"
    );
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    assert_eq!(proxy.stat("cluster.paced.upstream_rq_timeout"), 0);

    // Held for longer than the idle timeout by now.
    assert!(matches!(no_idle.try_recv(), Err(mpsc::TryRecvError::Empty)));
    stalled.release();
    let (answer, _) = no_idle
        .recv_timeout(Duration::from_secs(10))
        .expect("no-idle response completes once released");
    assert!(
        answer.ends_with("\r\n\r\npartial-and-the-rest"),
        "{answer:?}"
    );
    assert_eq!(proxy.stat("http.ingress.downstream_rq_idle_timeout"), 1);
}

/// What a client and the admin see of one circuit-breaker scenario, to compare with Envoy.
type Observed = std::collections::BTreeMap<String, String>;

/// `max_connections: 1, max_pending_requests: 1` in front of a held upstream: request A takes
/// the only connection, B queues as pending, C overflows; then the upstream answers.
fn queue_scenario(
    addr: SocketAddr,
    cluster: &str,
    upstream: &HeldUpstream,
    stat: &dyn Fn(&str) -> u64,
) -> Observed {
    let mut seen = Observed::new();
    let stat_of = |name: &str| stat(&format!("cluster.{cluster}.{name}"));
    let path = |request: &str| format!("/{cluster}/{request}");
    upstream.hold();
    let arrived = upstream.arrived();
    let a = spawn_get(addr, &path("a"));
    wait_for("A upstream", Duration::from_secs(10), || {
        (upstream.arrived() == arrived + 1).then_some(())
    });
    let b = spawn_get(addr, &path("b"));
    wait_for("B pending", Duration::from_secs(10), || {
        (stat_of("upstream_rq_pending_active") == 1).then_some(())
    });
    let (status, head, body) = http_get(addr, &path("c")).expect("request C");
    seen.insert("C".into(), format!("{status} {body}"));
    seen.insert(
        "C x-envoy-overloaded".into(),
        head.to_ascii_lowercase()
            .contains("x-envoy-overloaded: true")
            .to_string(),
    );
    seen.insert(
        "B reached upstream while pending".into(),
        (upstream.arrived() > arrived + 1).to_string(),
    );
    upstream.release();
    for (name, rx) in [("A", a), ("B", b)] {
        let (answer, _) = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{name} answered once released"));
        let status = answer.split_whitespace().nth(1).unwrap_or("?").to_string();
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        seen.insert(name.into(), format!("{status} {body}"));
    }
    wait_for("nothing pending or active", Duration::from_secs(10), || {
        (stat_of("upstream_rq_pending_active") == 0 && stat_of("upstream_rq_active") == 0)
            .then_some(())
    });
    // A later request still gets through: no pending count or connection slot leaked.
    let (status, _, body) = http_get(addr, &path("d")).expect("request D");
    seen.insert("D".into(), format!("{status} {body}"));
    for name in [
        "upstream_rq_pending_total",
        "upstream_rq_pending_overflow",
        "upstream_cx_overflow",
        "upstream_cx_total",
        "upstream_rq_total",
    ] {
        seen.insert(name.into(), stat_of(name).to_string());
    }
    seen
}

/// As [`queue_scenario`], but B waits longer than its route timeout (1 s; A's is 15 s).
fn queue_timeout_scenario(
    addr: SocketAddr,
    upstream: &HeldUpstream,
    stat: &dyn Fn(&str) -> u64,
) -> Observed {
    let mut seen = Observed::new();
    let stat_of = |name: &str| stat(&format!("cluster.queue_timeout.{name}"));
    upstream.hold();
    let arrived = upstream.arrived();
    let a = spawn_get(addr, "/queue_timeout/a");
    wait_for("A upstream", Duration::from_secs(10), || {
        (upstream.arrived() == arrived + 1).then_some(())
    });
    let (answer, elapsed) = get_until_closed(addr, "/queue_timeout/b");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let status = answer.split_whitespace().nth(1).unwrap_or("?");
    seen.insert("B".into(), format!("{status} {body}"));
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    seen.insert(
        "pending_active after B".into(),
        stat_of("upstream_rq_pending_active").to_string(),
    );
    upstream.release();
    let (answer, _) = a.recv_timeout(Duration::from_secs(10)).expect("A answered");
    seen.insert(
        "A".into(),
        answer.split_whitespace().nth(1).unwrap_or("?").into(),
    );
    for name in ["upstream_rq_pending_total", "upstream_rq_timeout"] {
        seen.insert(name.into(), stat_of(name).to_string());
    }
    seen
}

fn expected(pairs: &[(&str, &str)]) -> Observed {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn pending_requests_queue_for_a_connection_as_in_envoy() {
    // Keep-alive: B gets A's connection back from the pool. Closing: the upstream closes A's
    // connection, so B gets the freed connection slot and connects.
    let keepalive = HeldUpstream::start("kept");
    let closing = HeldUpstream::start_closing("closed");
    let slow = HeldUpstream::start("slow");
    let admin_port = free_port();
    let port = free_port();
    let vhosts = r#"            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/queue_keepalive/"}
                route: {cluster: queue_keepalive}
              - match: {prefix: "/queue_closing/"}
                route: {cluster: queue_closing}
              - match: {prefix: "/queue_timeout/b"}
                route: {cluster: queue_timeout, timeout: 1s}
              - match: {prefix: "/queue_timeout/"}
                route: {cluster: queue_timeout}
"#;
    let breakers =
        "    circuit_breakers: {thresholds: [{max_connections: 1, max_pending_requests: 1}]}\n";
    let yaml = bootstrap(
        &format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}\n"
        ),
        &[http_listener("ingress", port, "", vhosts)],
        &[
            with_cluster_extra(
                static_cluster("queue_keepalive", &[keepalive.addr]),
                breakers,
            ),
            with_cluster_extra(static_cluster("queue_closing", &[closing.addr]), breakers),
            with_cluster_extra(static_cluster("queue_timeout", &[slow.addr]), breakers),
        ],
    );
    let (_dir, file) = write_config(&yaml);
    let admin = loopback(admin_port);
    let addr = loopback(port);

    let run = |stat: &dyn Fn(&str) -> u64| {
        (
            queue_scenario(addr, "queue_keepalive", &keepalive, stat),
            queue_scenario(addr, "queue_closing", &closing, stat),
            queue_timeout_scenario(addr, &slow, stat),
        )
    };
    // One worker, as Envoy below: with more, B could land on a worker whose pool has no
    // connection yet, which (as in Envoy) may open one over the limit instead of queueing.
    let remora = {
        let proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run(&|name| proxy.stat(name))
    };
    let overflow =
        "503 upstream connect error or disconnect/reset before headers. reset reason: overflow";
    let common = [
        ("C", overflow),
        ("C x-envoy-overloaded", "true"),
        ("B reached upstream while pending", "false"),
        ("upstream_rq_pending_total", "2"),
        ("upstream_rq_pending_overflow", "1"),
        ("upstream_cx_overflow", "1"),
        ("upstream_rq_total", "3"),
    ];
    let mut keepalive_expected = expected(&common);
    keepalive_expected.extend(expected(&[
        ("A", "200 kept"),
        ("B", "200 kept"),
        ("D", "200 kept"),
        ("upstream_cx_total", "1"),
    ]));
    let mut closing_expected = expected(&common);
    closing_expected.extend(expected(&[
        ("A", "200 closed"),
        ("B", "200 closed"),
        ("D", "200 closed"),
        ("upstream_cx_total", "3"),
    ]));
    // D opens a fresh connection: counted as pending while it connects, as Envoy does.
    closing_expected.insert("upstream_rq_pending_total".into(), "3".into());
    let timeout_expected = expected(&[
        ("A", "200"),
        ("B", "504 upstream request timeout"),
        ("pending_active after B", "0"),
        ("upstream_rq_pending_total", "2"),
        ("upstream_rq_timeout", "1"),
    ]);
    assert_eq!(remora.0, keepalive_expected, "keep-alive upstream");
    assert_eq!(remora.1, closing_expected, "closing upstream");
    assert_eq!(remora.2, timeout_expected, "pending past the route timeout");

    if !remora_tests::envoy::available_or_skip("the Envoy half of the pending-queue test") {
        return;
    }
    remora_tests::envoy::validate(&file).expect("envoy accepts the bootstrap");
    let envoy = {
        let envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(addr, Duration::from_secs(20));
        run(&|name| envoy.stat(name).unwrap_or(u64::MAX))
    };
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}

#[test]
fn a_worker_without_a_connection_opens_one_over_the_limit() {
    // With max_connections: 1 and two workers, the first worker's idle pooled connection holds
    // the only slot. Envoy lets a pool with no connection to the host open one anyway, so the
    // other worker's requests do not queue behind a connection they can never use.
    let echo = remora_tests::echo::EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = catch_all("one", "2s");
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &vhosts)],
        &[with_cluster_extra(
            static_cluster("one", &[echo.addr]),
            "    circuit_breakers: {thresholds: [{max_connections: 1}]}\n",
        )],
    );
    let proxy = Proxy::start(&yaml, admin, &["--concurrency", "2"]);
    let addr = loopback(port);
    // Each request is a new downstream connection, which the kernel spreads over both
    // workers' sockets; 64 all on one worker would be a 2^-63 chance.
    for _ in 0..64 {
        let (status, _, body) = http_get(addr, "/spread").expect("request");
        assert_eq!(status, 200, "{body}");
        if proxy.stat("cluster.one.upstream_cx_total") == 2 {
            break;
        }
    }
    assert_eq!(proxy.stat("cluster.one.upstream_cx_total"), 2);
    assert_eq!(proxy.stat("cluster.one.upstream_cx_overflow"), 1);
    // From now on each worker reuses its own connection.
    for _ in 0..8 {
        let (status, _, _) = http_get(addr, "/again").expect("request");
        assert_eq!(status, 200);
    }
    assert_eq!(proxy.stat("cluster.one.upstream_cx_total"), 2);
    assert_eq!(proxy.stat("cluster.one.upstream_rq_pending_overflow"), 0);
}

/// POSTs 12 bytes in 3 pieces 600 ms apart (1.2 s, longer than the 1 s route timeout) on a
/// `Connection: close` request; returns the whole answer. The pace is what is under test.
fn slow_upload(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 12\r\nConnection: close\r\n\r\n",
        )
        .expect("headers");
    let started = Instant::now();
    remora_tests::write_paced(
        &mut stream,
        &[b"abcd", b"efgh", b"ijkl"],
        Duration::from_millis(600),
    )
    .expect("body pieces");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "upload too fast to test anything"
    );
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn route_timeout_starts_when_the_request_body_ends() {
    // As in Envoy, an upload slower than the route timeout is not cut: the timeout counts from
    // the end of the request body. The echo upstream answers as soon as it has the body.
    let echo = remora_tests::echo::EchoServer::start("echo", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let vhosts = catch_all("echo", "1s");
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &vhosts)],
        &[static_cluster("echo", &[echo.addr])],
    );
    let check = |answer: &str| {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        assert_eq!(echo_json(body)["body_len"], 12, "{answer}");
    };
    {
        let proxy = Proxy::start(&yaml, admin, &[]);
        check(&slow_upload(loopback(port)));
        assert_eq!(proxy.stat("cluster.echo.upstream_rq_timeout"), 0);
    }

    if !remora_tests::envoy::available_or_skip("the Envoy half of the slow-upload test") {
        return;
    }
    let (_dir, file) = write_config(&yaml);
    let envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
    remora_tests::wait_for_port(loopback(port), Duration::from_secs(20));
    check(&slow_upload(loopback(port)));
    assert_eq!(envoy.stat("cluster.echo.upstream_rq_timeout"), Some(0));
}

/// An upstream that answers each connection's first request with 200 and then closes it,
/// without a `Connection: close` to warn the proxy. Returns its address and a count of the
/// connections it accepted.
fn upstream_closing_silently() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            // Dropped: the connection closes.
        }
    });
    (addr, accepted)
}

#[test]
fn a_pooled_connection_the_upstream_closed_is_not_reused() {
    let (upstream, accepted) = upstream_closing_silently();
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener(
            "ingress",
            port,
            "",
            &catch_all("closing", "5s"),
        )],
        &[static_cluster("closing", &[upstream])],
    );
    let proxy = Proxy::start(&yaml, admin, &["--concurrency", "1"]);
    let addr = loopback(port);
    for i in 0..20 {
        // Once the proxy has seen the close (the gauge drops): a request racing the FIN
        // would meet a reset, in Envoy as here (`connection termination`), which is not what
        // this test is about.
        wait_for(
            "the last connection's close seen",
            Duration::from_secs(10),
            || {
                (proxy
                    .stat_or_none("cluster.closing.upstream_cx_active")
                    .unwrap_or(0)
                    == 0)
                    .then_some(())
            },
        );
        let (status, _, body) = http_get(addr, &format!("/again/{i}")).expect("request");
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
    }
    // Every request needed a connection of its own, and none was lost to a dead one.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert_eq!(proxy.stat("cluster.closing.upstream_cx_total"), 20);
    assert_eq!(proxy.stat("cluster.closing.upstream_rq_total"), 20);
    wait_for(
        "closed connections leave the gauge",
        Duration::from_secs(10),
        || (proxy.stat_or_none("cluster.closing.upstream_cx_active")? == 0).then_some(()),
    );
}

#[test]
fn idle_upstream_connections_close_after_the_clusters_idle_timeout_as_in_envoy() {
    let echo = remora_tests::echo::EchoServer::start("e", "127.0.0.1");
    let (admin, admin_yaml) = admin_block();
    let port = free_port();
    let options = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        common_http_protocol_options: {idle_timeout: 1s}\n        explicit_http_config: {http_protocol_options: {}}\n";
    let yaml = bootstrap(
        &admin_yaml,
        &[http_listener("ingress", port, "", &catch_all("idle", "5s"))],
        &[with_cluster_extra(
            static_cluster("idle", &[echo.addr]),
            options,
        )],
    );
    let (_dir, file) = write_config(&yaml);
    let addr = loopback(port);
    // One request, the connection left idle until the timeout closes it, then another.
    let run = |stat: &dyn Fn(&str) -> u64| {
        let stat_of = |name: &str| stat(&format!("cluster.idle.{name}"));
        let (status, _, _) = http_get(addr, "/first").expect("first request");
        assert_eq!(status, 200);
        assert_eq!(stat_of("upstream_cx_active"), 1);
        wait_for(
            "the idle connection to close",
            Duration::from_secs(10),
            || (stat_of("upstream_cx_active") == 0).then_some(()),
        );
        let (status, _, _) = http_get(addr, "/second").expect("second request");
        assert_eq!(status, 200);
        ["upstream_cx_total", "upstream_cx_idle_timeout"]
            .map(|name| (name, stat_of(name)))
            .to_vec()
    };
    let remora = {
        let proxy = Proxy::start_file(&file, admin, &["--concurrency", "1"]);
        run(&|name| proxy.stat(name))
    };
    assert_eq!(
        remora,
        [("upstream_cx_total", 2), ("upstream_cx_idle_timeout", 1)]
    );
    if !remora_tests::envoy::available_or_skip("the Envoy half of the idle timeout test") {
        return;
    }
    let envoy = {
        let envoy = remora_tests::envoy::Envoy::start(&file, admin, &[]);
        remora_tests::wait_for_port(addr, Duration::from_secs(20));
        run(&|name| envoy.stat(name).unwrap_or(u64::MAX))
    };
    assert_eq!(envoy, remora, "left: envoy, right: remora");
}
