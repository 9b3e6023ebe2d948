//! End-to-end: the fault and local rate limit filters where the differential corpora cannot
//! reach, run under real Envoy and under remora-proxy with the same bootstrap: a client that
//! goes away during an injected delay leaves nothing active behind, `max_active_faults` lets
//! requests through once reached (and a delay holds no worker: another request on the one
//! worker is answered meanwhile), and a rate limit bucket shared by all workers hands out
//! exactly its tokens to a concurrent burst.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Proxy, loopback, write_config};
use remora_tests::echo::EchoServer;
use remora_tests::{admin_stat, envoy, free_port, http_request, wait_for, wait_for_port};

/// The bootstrap around `http_filters` (each line indented by 10 spaces): one listener, one
/// route to the echo upstream `a`, ports substituted.
fn bootstrap(admin: u16, listener: u16, upstream: SocketAddr, http_filters: &str) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  clusters:
  - name: a
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: a
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          http_filters:
{http_filters}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: a}}
"#,
        port = upstream.port()
    )
}

/// Runs `exercise` against the same bootstrap under Envoy, then under remora-proxy with
/// `workers` workers, and returns what each saw (Envoy's `None` when it is not installed and
/// not required).
fn under_both<T>(
    test: &str,
    http_filters: &str,
    workers: &str,
    exercise: impl Fn(SocketAddr, SocketAddr) -> T,
) -> (Option<T>, T) {
    let upstream = EchoServer::start("a", "127.0.0.1");
    let admin = loopback(free_port());
    let listener = loopback(free_port());
    let text = bootstrap(admin.port(), listener.port(), upstream.addr, http_filters);
    let (_dir, file) = write_config(&text);
    let envoy_saw = envoy::available_or_skip(test).then(|| {
        envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}"));
        let _envoy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        exercise(admin, listener)
    });
    let remora_saw = {
        let _proxy = Proxy::start_file(&file, admin, &["--concurrency", workers]);
        wait_for_port(listener, Duration::from_secs(20));
        exercise(admin, listener)
    };
    (envoy_saw, remora_saw)
}

fn stat(admin: SocketAddr, name: &str) -> u64 {
    admin_stat(admin, name).unwrap_or(0)
}

/// Waits until a gauge or counter reads `value`.
fn wait_for_stat(admin: SocketAddr, name: &str, value: u64) {
    wait_for(
        &format!("{name} to be {value}"),
        Duration::from_secs(20),
        || (stat(admin, name) == value).then_some(()),
    );
}

/// Sends a request and leaves its connection open, the answer unread.
fn send_and_hold(listener: SocketAddr, headers: &str) -> TcpStream {
    let mut stream = TcpStream::connect(listener).expect("connect");
    write!(stream, "GET /held HTTP/1.1\r\nHost: x\r\n{headers}\r\n").expect("send");
    stream
}

const HEADER_FAULTS: &str = r#"          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              delay: {header_delay: {}, percentage: {numerator: 100}}
              abort: {header_abort: {}, percentage: {numerator: 100}}
              max_active_faults: 1
"#;

#[test]
fn a_client_gone_during_a_delay_leaves_no_active_fault_or_request() {
    let (envoy_saw, remora_saw) = under_both(
        "a_client_gone_during_a_delay_leaves_no_active_fault_or_request",
        HEADER_FAULTS,
        "2",
        |admin, listener| {
            // A minute's delay: it must end with the client, long before the timer would.
            let held = send_and_hold(listener, "x-envoy-fault-delay-request: 60000\r\n");
            wait_for_stat(admin, "http.ingress.fault.active_faults", 1);
            wait_for_stat(admin, "http.ingress.downstream_rq_active", 1);
            drop(held);
            wait_for_stat(admin, "http.ingress.fault.active_faults", 0);
            wait_for_stat(admin, "http.ingress.downstream_rq_active", 0);
            // The delayed request never went upstream.
            (
                stat(admin, "http.ingress.fault.delays_injected"),
                stat(admin, "cluster.a.upstream_rq_total"),
            )
        },
    );
    assert_eq!(remora_saw, (1, 0));
    if let Some(envoy_saw) = envoy_saw {
        assert_eq!(envoy_saw, remora_saw);
    }
}

#[test]
fn max_active_faults_lets_requests_through_once_reached() {
    let (envoy_saw, remora_saw) = under_both(
        "max_active_faults_lets_requests_through_once_reached",
        HEADER_FAULTS,
        // One worker: the request answered during the delay shows the delay holds none.
        "1",
        |admin, listener| {
            let abort = [("x-envoy-fault-abort-request", "503")];
            let held = send_and_hold(listener, "x-envoy-fault-delay-request: 60000\r\n");
            wait_for_stat(admin, "http.ingress.fault.active_faults", 1);
            // The one fault allowed is active: this abort is not injected.
            let (overflowing, _, _) = http_request(listener, "GET", "/", &abort, "").unwrap();
            let overflows = stat(admin, "http.ingress.fault.faults_overflow");
            drop(held);
            wait_for_stat(admin, "http.ingress.fault.active_faults", 0);
            let (after, _, body) = http_request(listener, "GET", "/", &abort, "").unwrap();
            (overflowing, overflows, after, body)
        },
    );
    assert_eq!(remora_saw, (200, 1, 503, "fault filter abort".to_string()));
    if let Some(envoy_saw) = envoy_saw {
        assert_eq!(envoy_saw, remora_saw);
    }
}

#[test]
fn a_concurrent_burst_gets_exactly_the_buckets_tokens() {
    const TOKENS: usize = 20;
    const REQUESTS: usize = 60;
    const CLIENTS: usize = 6;
    let filters = format!(
        r#"          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: burst
              token_bucket: {{max_tokens: {TOKENS}, tokens_per_fill: 1, fill_interval: 3600s}}
              filter_enabled: {{default_value: {{numerator: 100}}}}
              filter_enforced: {{default_value: {{numerator: 100}}}}
"#
    );
    let (envoy_saw, remora_saw) = under_both(
        "a_concurrent_burst_gets_exactly_the_buckets_tokens",
        &filters,
        "2",
        |admin, listener| {
            // Bounded: REQUESTS in all, spread over CLIENTS threads (and so over workers).
            let statuses: Vec<u16> = std::thread::scope(|scope| {
                let clients: Vec<_> = (0..CLIENTS)
                    .map(|_| {
                        scope.spawn(move || {
                            (0..REQUESTS / CLIENTS)
                                .map(|_| http_request(listener, "GET", "/", &[], "").unwrap().0)
                                .collect::<Vec<u16>>()
                        })
                    })
                    .collect();
                clients
                    .into_iter()
                    .flat_map(|client| client.join().unwrap())
                    .collect()
            });
            let count = |status| statuses.iter().filter(|s| **s == status).count();
            let stats: Vec<u64> = ["enabled", "ok", "rate_limited", "enforced"]
                .map(|name| stat(admin, &format!("burst.http_local_rate_limit.{name}")))
                .to_vec();
            (count(200), count(429), stats)
        },
    );
    let limited = (REQUESTS - TOKENS) as u64;
    assert_eq!(
        remora_saw,
        (
            TOKENS,
            REQUESTS - TOKENS,
            vec![REQUESTS as u64, TOKENS as u64, limited, limited]
        )
    );
    if let Some(envoy_saw) = envoy_saw {
        assert_eq!(envoy_saw, remora_saw);
    }
}
