//! Load balancing against real Envoy 1.40: the same bootstrap through Envoy and then through
//! remora-proxy, over the same echo upstreams, and what a client observes compared.
//!
//! - RING_HASH and MAGLEV (legacy and typed configs, xxHash and MurmurHash2, weights, locality
//!   weights): the key → host map of 300 keys must be identical, also with a host removed.
//! - Hash policies (headers with several values, query parameters, cookies, source IP,
//!   combined, `terminal`): identical maps; a generated cookie identical to Envoy's.
//! - ROUND_ROBIN, RANDOM, LEAST_REQUEST, locality weights, the panic threshold and
//!   `fail_traffic_on_panic`: host shares within the stated tolerance of each other and of the
//!   expected share, the same hosts used or avoided.
//! - peak EWMA (Remora only): a slow host is avoided.
//!
//! Skipped (with a message) when `envoy` is not installed; CI installs it.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{HeldUpstream, Proxy, loopback};
use remora_tests::echo::EchoServer;
use remora_tests::{envoy, free_port, wait_for_port};

/// A bootstrap's pieces: admin, one HTTP listener with `routes` (virtual host routes, indented
/// for `routes:`), and `clusters`.
fn bootstrap(admin_port: u16, listener_port: u16, routes: &str, clusters: &str) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}
  clusters:
{clusters}"#
    )
}

/// An upstream of a test cluster: address, weight, locality zone and its weight, health.
#[derive(Clone)]
struct Member {
    addr: SocketAddr,
    weight: u32,
    zone: &'static str,
    zone_weight: Option<u32>,
    health: &'static str,
}

fn member(addr: SocketAddr, weight: u32) -> Member {
    Member {
        addr,
        weight,
        zone: "",
        zone_weight: None,
        health: "HEALTHY",
    }
}

/// A STATIC cluster with `extra` fields (indented by 4) over `members`, grouped by zone in the
/// order zones first appear.
fn cluster(name: &str, extra: &str, members: &[Member]) -> String {
    let mut zones: Vec<(&str, Option<u32>, Vec<&Member>)> = Vec::new();
    for m in members {
        match zones.iter_mut().find(|(zone, _, _)| *zone == m.zone) {
            Some((_, _, list)) => list.push(m),
            None => zones.push((m.zone, m.zone_weight, vec![m])),
        }
    }
    let mut endpoints = String::new();
    for (zone, zone_weight, list) in zones {
        endpoints.push_str(&format!("      - locality: {{zone: \"{zone}\"}}\n"));
        if let Some(weight) = zone_weight {
            endpoints.push_str(&format!("        load_balancing_weight: {weight}\n"));
        }
        endpoints.push_str("        lb_endpoints:\n");
        for m in list {
            endpoints.push_str(&format!(
                "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n          load_balancing_weight: {}\n          health_status: {}\n",
                m.addr.ip(),
                m.addr.port(),
                m.weight,
                m.health
            ));
        }
    }
    let extra: String = extra.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n{endpoints}"
    )
}

/// A route for `prefix` to `cluster` with `hash_policy` YAML (a flow list, may be empty).
fn route(prefix: &str, cluster: &str, hash_policy: &str) -> String {
    let hash = if hash_policy.is_empty() {
        String::new()
    } else {
        format!(", hash_policy: {hash_policy}")
    };
    format!(
        "              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: {cluster}{hash}}}\n"
    )
}

/// Runs `probe` against Envoy, then against remora-proxy, each started with `yaml`.
fn both<T>(
    name: &str,
    yaml: &str,
    admin: u16,
    listener: u16,
    probe: impl Fn(SocketAddr) -> T,
) -> Option<(T, T)> {
    if !envoy::available_or_skip(name) {
        return None;
    }
    let (_dir, file) = common::write_config(yaml);
    envoy::validate(&file).unwrap_or_else(|e| panic!("envoy rejects the bootstrap: {e}\n{yaml}"));
    let admin = loopback(admin);
    let listener = loopback(listener);
    let from_envoy = {
        let _envoy = envoy::Envoy::start(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        probe(listener)
    };
    let from_remora = {
        let _remora = Proxy::start_file(&file, admin, &[]);
        wait_for_port(listener, Duration::from_secs(20));
        probe(listener)
    };
    Some((from_envoy, from_remora))
}

/// One request over a fresh connection from `source` (port 0: any); the status and the
/// response head.
fn request_from(
    source: SocketAddr,
    to: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, String, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("reuse");
    socket.bind(&source.into()).expect("bind client");
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect");
    let mut stream: TcpStream = socket.into();
    let local = stream.local_addr().expect("local address");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut text = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes()).expect("write");
    // The head, then the body by its length: Envoy closes a connection only a second after a
    // local reply (its delayed close), so reading to the end would wait for that.
    let head =
        String::from_utf8_lossy(&common::read_head(&mut stream).unwrap_or_default()).into_owned();
    let length: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    let _ = stream.read_exact(&mut body);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, local)
}

/// A response header's value (the first), by lower-case name.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Which upstream answered (`x-upstream`), or `status N`.
fn served_by(to: SocketAddr, path: &str, headers: &[(&str, String)]) -> String {
    let (status, head, _) = request_from(loopback(0), to, path, headers);
    header(&head, "x-upstream").unwrap_or_else(|| format!("status {status}"))
}

/// `count` requests to `path`; how many each upstream answered.
fn shares(to: SocketAddr, path: &str, count: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..count {
        *counts.entry(served_by(to, path, &[])).or_insert(0) += 1;
    }
    counts
}

/// Key → host maps of `keys` keys sent as header `x-key` to each path.
fn key_maps(to: SocketAddr, paths: &[&str], keys: usize) -> BTreeMap<String, Vec<String>> {
    paths
        .iter()
        .map(|path| {
            let hosts = (0..keys)
                .map(|i| served_by(to, path, &[("x-key", format!("key-{i}"))]))
                .collect();
            (path.to_string(), hosts)
        })
        .collect()
}

/// Asserts identical maps, naming the first differences.
fn assert_same_maps(
    what: &str,
    envoy: &BTreeMap<String, Vec<String>>,
    remora: &BTreeMap<String, Vec<String>>,
) {
    let mut differences = Vec::new();
    for (path, expected) in envoy {
        let actual = &remora[path];
        let differing: Vec<String> = expected
            .iter()
            .zip(actual)
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .map(|(i, (e, a))| format!("key-{i}: envoy {e}, remora {a}"))
            .collect();
        if !differing.is_empty() {
            differences.push(format!(
                "{path}: {} of {} keys differ, e.g. {:?}",
                differing.len(),
                expected.len(),
                &differing[..differing.len().min(5)]
            ));
        }
        // The map must use several hosts, or it would say little.
        let distinct: std::collections::BTreeSet<&String> = expected.iter().collect();
        assert!(
            distinct.len() > 1,
            "{what} {path}: envoy used only {distinct:?}"
        );
    }
    assert!(
        differences.is_empty(),
        "{what}:\n{}",
        differences.join("\n")
    );
}

struct Upstreams {
    servers: Vec<EchoServer>,
}

impl Upstreams {
    /// Echo upstreams named `h1`..`hN`.
    fn start(n: usize) -> Upstreams {
        Upstreams {
            servers: (1..=n)
                .map(|i| EchoServer::start(&format!("h{i}"), "127.0.0.1"))
                .collect(),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr
    }
}

/// The consistent-hashing clusters of the key-map test, over `hosts` (indexes into the
/// upstreams; weights and zones by index so a removed host takes its own with it).
fn hashing_clusters(up: &Upstreams, hosts: &[usize]) -> String {
    let plain: Vec<Member> = hosts.iter().map(|i| member(up.addr(*i), 1)).collect();
    let weighted: Vec<Member> = hosts
        .iter()
        .map(|i| member(up.addr(*i), *i as u32 + 1))
        .collect();
    let zoned: Vec<Member> = hosts
        .iter()
        .map(|i| Member {
            zone: if *i < 2 { "a" } else { "b" },
            zone_weight: Some(if *i < 2 { 1 } else { 3 }),
            ..member(up.addr(*i), *i as u32 % 2 + 1)
        })
        .collect();
    let typed = |type_name: &str, fields: &str| {
        format!(
            "load_balancing_policy:\n  policies:\n  - typed_extension_config:\n      name: p\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.{type_name}\n{}",
            fields
                .lines()
                .map(|l| format!("        {l}\n"))
                .collect::<String>()
        )
    };
    [
        cluster("ring", "lb_policy: RING_HASH", &plain),
        cluster(
            "ring_murmur_weighted",
            "lb_policy: RING_HASH\nring_hash_lb_config: {minimum_ring_size: 100, maximum_ring_size: 333, hash_function: MURMUR_HASH_2}",
            &weighted,
        ),
        cluster(
            "ring_localities",
            "lb_policy: RING_HASH\ncommon_lb_config: {locality_weighted_lb_config: {}}",
            &zoned,
        ),
        cluster("maglev", "lb_policy: MAGLEV", &plain),
        cluster(
            "maglev_weighted",
            "lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 1009}",
            &weighted,
        ),
        cluster(
            "typed_ring",
            &typed("ring_hash.v3.RingHash", "hash_function: XX_HASH\nminimum_ring_size: 64"),
            &weighted,
        ),
        cluster(
            "typed_maglev_localities",
            &typed("maglev.v3.Maglev", "locality_weighted_lb_config: {}"),
            &zoned,
        ),
        cluster(
            "typed_ring_own_policy",
            &typed(
                "ring_hash.v3.RingHash",
                "consistent_hashing_lb_config: {hash_policy: [{query_parameter: {name: user}}]}",
            ),
            &plain,
        ),
    ]
    .concat()
}

const HASH_PATHS: [&str; 7] = [
    "/ring",
    "/ring-murmur-weighted",
    "/ring-localities",
    "/maglev",
    "/maglev-weighted",
    "/typed-ring",
    "/typed-maglev-localities",
];

fn hashing_routes() -> String {
    let header = "[{header: {header_name: x-key}}]";
    [
        route("/ring-murmur-weighted", "ring_murmur_weighted", header),
        route("/ring-localities", "ring_localities", header),
        route("/ring", "ring", header),
        route("/maglev-weighted", "maglev_weighted", header),
        route("/maglev", "maglev", header),
        route("/typed-ring-own-policy", "typed_ring_own_policy", header),
        route("/typed-ring", "typed_ring", header),
        route(
            "/typed-maglev-localities",
            "typed_maglev_localities",
            header,
        ),
    ]
    .concat()
}

#[test]
fn hashing_maps_keys_to_the_hosts_envoy_picks_also_after_a_host_is_removed() {
    let up = Upstreams::start(4);
    let (admin, listener) = (free_port(), free_port());
    for hosts in [&[0, 1, 2, 3][..], &[0, 1, 2][..], &[0, 2, 3][..]] {
        let yaml = bootstrap(
            admin,
            listener,
            &hashing_routes(),
            &hashing_clusters(&up, hosts),
        );
        let Some((envoy, remora)) = both("hashing key maps", &yaml, admin, listener, |to| {
            let mut maps = key_maps(to, &HASH_PATHS, 300);
            // The typed ring's own hash policy (a query parameter) replaces the route's.
            let own: Vec<String> = (0..100)
                .map(|i| {
                    served_by(
                        to,
                        &format!("/typed-ring-own-policy?user=u{i}"),
                        &[("x-key", "same".to_string())],
                    )
                })
                .collect();
            maps.insert("/typed-ring-own-policy".into(), own);
            maps
        }) else {
            return;
        };
        assert_same_maps(&format!("hosts {hosts:?}"), &envoy, &remora);
        eprintln!(
            "hosts {hosts:?}: {} paths × 300 keys identical to Envoy",
            envoy.len()
        );
    }
}

#[test]
fn hash_policies_are_computed_and_combined_as_envoy_does() {
    let up = Upstreams::start(4);
    let (admin, listener) = (free_port(), free_port());
    let plain: Vec<Member> = (0..4).map(|i| member(up.addr(i), 1)).collect();
    let routes = [
        route("/multi", "ring", "[{header: {header_name: x-m}}]"),
        route(
            "/rewrite",
            "ring",
            r#"[{header: {header_name: x-key, regex_rewrite: {pattern: {regex: "^([a-z]+)-.*$"}, substitution: "\\1"}}}]"#,
        ),
        route("/query", "maglev", "[{query_parameter: {name: q}}]"),
        route("/cookie", "ring", "[{cookie: {name: c}}]"),
        route(
            "/combined",
            "ring",
            "[{header: {header_name: x-a}}, {query_parameter: {name: q}}, {header: {header_name: x-a}}]",
        ),
        route(
            "/terminal",
            "maglev",
            "[{header: {header_name: x-none}, terminal: true}, {header: {header_name: x-a}, terminal: true}, {query_parameter: {name: q}}]",
        ),
        route("/source", "ring", "[{connection_properties: {source_ip: true}}]"),
        route("/none", "maglev", "[{header: {header_name: x-none}}, {filter_state: {key: some.key}}]"),
    ]
    .concat();
    let clusters = [
        cluster("ring", "lb_policy: RING_HASH", &plain),
        cluster("maglev", "lb_policy: MAGLEV", &plain),
    ]
    .concat();
    let yaml = bootstrap(admin, listener, &routes, &clusters);
    let Some((envoy, remora)) = both("hash policies", &yaml, admin, listener, |to| {
        let mut maps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut run = |name: &str, f: &dyn Fn(usize) -> String| {
            maps.insert(name.to_string(), (0..150).map(f).collect());
        };
        run("multi", &|i| {
            // Two values, in either order: Envoy sorts them before hashing.
            let (a, b) = (format!("a{i}"), format!("b{}", i % 7));
            let values = if i % 2 == 0 { vec![a, b] } else { vec![b, a] };
            served_by(
                to,
                "/multi",
                &[("x-m", values[0].clone()), ("x-m", values[1].clone())],
            )
        });
        run("rewrite", &|i| {
            served_by(to, "/rewrite", &[("x-key", format!("user{i}-{}", i * 31))])
        });
        run("query", &|i| {
            served_by(to, &format!("/query?a=1&q=v{i}&q=other"), &[])
        });
        run("cookie", &|i| {
            served_by(
                to,
                "/cookie",
                &[("cookie", format!("x=1; c=\"s{i}\"; y=2"))],
            )
        });
        run("combined", &|i| {
            served_by(
                to,
                &format!("/combined?q={}", i % 5),
                &[("x-a", format!("k{i}"))],
            )
        });
        run("terminal", &|i| {
            served_by(
                to,
                &format!("/terminal?q=q{i}"),
                &[("x-a", format!("k{}", i % 3))],
            )
        });
        run("source", &|i| {
            let source = SocketAddr::from(([127, 0, 1, (i % 250) as u8 + 1], 0));
            let (status, head, _) = request_from(source, to, "/source", &[]);
            header(&head, "x-upstream").unwrap_or_else(|| format!("status {status}"))
        });
        maps
    }) else {
        return;
    };
    let mut differences = Vec::new();
    for (name, expected) in &envoy {
        let actual = &remora[name];
        let differing = expected.iter().zip(actual).filter(|(e, a)| e != a).count();
        if differing > 0 {
            differences.push(format!("{name}: {differing} of {} differ", expected.len()));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // The terminal header's three values send everything to at most three hosts.
    let terminal: std::collections::BTreeSet<&String> = envoy["terminal"].iter().collect();
    assert!(terminal.len() <= 3, "{terminal:?}");
}

#[test]
fn a_generated_cookie_is_the_one_envoy_sets_and_sticks() {
    let up = Upstreams::start(3);
    let (admin, listener) = (free_port(), free_port());
    let plain: Vec<Member> = (0..3).map(|i| member(up.addr(i), 1)).collect();
    let routes = [
        route("/session", "ring", "[{cookie: {name: session, ttl: 0s}}]"),
        route(
            "/",
            "ring",
            "[{cookie: {name: sticky, ttl: 3600s, path: /app, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}}]",
        ),
    ]
    .concat();
    let yaml = bootstrap(
        admin,
        listener,
        &routes,
        &cluster("ring", "lb_policy: RING_HASH", &plain),
    );
    let Some((envoy, remora)) = both("generated cookie", &yaml, admin, listener, |to| {
        (0..20)
            .map(|i| {
                let path = if i % 2 == 0 { "/app" } else { "/session" };
                let (_, head, client) = request_from(loopback(0), to, path, &[]);
                let cookie = header(&head, "set-cookie").expect("a generated cookie");
                // The cookie's value, sent back, reaches the same host.
                let value = cookie.split('"').nth(1).unwrap_or("").to_string();
                let name = if i % 2 == 0 { "sticky" } else { "session" };
                let first = header(&head, "x-upstream");
                let again = served_by(to, path, &[("cookie", format!("{name}={value}"))]);
                (client, cookie, first, again)
            })
            .collect::<Vec<_>>()
    }) else {
        return;
    };
    for (i, run) in [envoy, remora].iter().enumerate() {
        for (client, cookie, first, again) in run {
            let expected_value = format!(
                "{:016x}",
                remora_proxy::upstream::lb::hashing::xxhash64(
                    format!("{client}{}", loopback(listener)).as_bytes(),
                    0
                )
            );
            let expected = if cookie.starts_with("sticky") {
                format!(
                    "sticky=\"{expected_value}\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly"
                )
            } else {
                format!("session=\"{expected_value}\"; HttpOnly")
            };
            let who = ["envoy", "remora"][i];
            assert_eq!(cookie, &expected, "{who}'s cookie for client {client}");
            assert_eq!(
                first.as_ref(),
                Some(again),
                "{who}: the cookie sticks to its host"
            );
        }
    }
}

/// Envoy's and Remora's shares: each host's share must be within `tolerance` (a fraction of
/// the requests) of `expected`, for both.
fn assert_shares(
    what: &str,
    envoy: &BTreeMap<String, usize>,
    remora: &BTreeMap<String, usize>,
    expected: &[(&str, f64)],
    tolerance: f64,
) {
    for (who, counts) in [("envoy", envoy), ("remora", remora)] {
        let total: usize = counts.values().sum();
        for (host, share) in expected {
            let got = *counts.get(*host).unwrap_or(&0) as f64 / total as f64;
            assert!(
                (got - share).abs() <= tolerance,
                "{what}: {who} sent {got:.3} to {host}, expected {share} ± {tolerance}: {counts:?} (envoy {envoy:?})"
            );
        }
        let unexpected: Vec<&String> = counts
            .keys()
            .filter(|k| !expected.iter().any(|(h, _)| h == k))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{what}: {who} used {unexpected:?}: {counts:?}"
        );
    }
}

#[test]
fn round_robin_random_and_least_request_share_hosts_as_envoy_does() {
    let up = Upstreams::start(4);
    let (admin, listener) = (free_port(), free_port());
    let weighted: Vec<Member> = (0..4).map(|i| member(up.addr(i), i as u32 + 1)).collect();
    let equal: Vec<Member> = (0..4).map(|i| member(up.addr(i), 1)).collect();
    let two: Vec<Member> = vec![member(up.addr(0), 1), member(up.addr(1), 3)];
    let routes = [
        route("/rr", "rr", ""),
        route("/random-weighted", "random_weighted", ""),
        route("/lr-equal", "lr_equal", ""),
        route("/lr-weighted", "lr_weighted", ""),
        route("/typed-lr", "typed_lr", ""),
        route("/typed-random", "typed_random", ""),
        route("/typed-rr", "typed_rr", ""),
    ]
    .concat();
    let typed = |type_name: &str, fields: &str| {
        format!(
            "load_balancing_policy:\n  policies:\n  - typed_extension_config:\n      name: p\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.{type_name}\n{}",
            fields
                .lines()
                .map(|l| format!("        {l}\n"))
                .collect::<String>()
        )
    };
    let clusters = [
        cluster("rr", "lb_policy: ROUND_ROBIN", &weighted),
        cluster("random_weighted", "lb_policy: RANDOM", &weighted),
        cluster(
            "lr_equal",
            "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {choice_count: 3}",
            &equal,
        ),
        cluster("lr_weighted", "lb_policy: LEAST_REQUEST", &two),
        cluster(
            "typed_lr",
            &typed(
                "least_request.v3.LeastRequest",
                "selection_method: FULL_SCAN",
            ),
            &equal,
        ),
        cluster("typed_random", &typed("random.v3.Random", ""), &equal),
        cluster(
            "typed_rr",
            &typed(
                "round_robin.v3.RoundRobin",
                "slow_start_config: {slow_start_window: 0s}",
            ),
            &weighted,
        ),
    ]
    .concat();
    let yaml = bootstrap(admin, listener, &routes, &clusters);
    let paths = [
        "/rr",
        "/random-weighted",
        "/lr-equal",
        "/lr-weighted",
        "/typed-lr",
        "/typed-random",
        "/typed-rr",
    ];
    let Some((envoy, remora)) = both("policy shares", &yaml, admin, listener, |to| {
        paths
            .iter()
            .map(|path| (path.to_string(), shares(to, path, 1000)))
            .collect::<BTreeMap<_, _>>()
    }) else {
        return;
    };
    // Weighted round robin: 100/200/300/400, in both, within one pick per host: Envoy starts
    // its weighted schedule a seeded number of picks in (so that proxies do not move in step),
    // which can end 1,000 picks one off (seen: 100/200/299/401).
    for (who, run) in [("envoy", &envoy), ("remora", &remora)] {
        for path in ["/rr", "/typed-rr"] {
            let counts: Vec<usize> = (1..=4).map(|i| run[path][&format!("h{i}")]).collect();
            let off_by_at_most_one = counts
                .iter()
                .zip([100, 200, 300, 400])
                .all(|(count, share)| count.abs_diff(share) <= 1);
            assert!(
                off_by_at_most_one && counts.iter().sum::<usize>() == 1000,
                "{who} {path}: {counts:?}"
            );
        }
    }
    let quarter = [("h1", 0.25), ("h2", 0.25), ("h3", 0.25), ("h4", 0.25)];
    // RANDOM ignores weights. 1,000 picks: a share's standard deviation is 1.4 points; 6
    // points is more than four of them.
    assert_shares(
        "RANDOM",
        &envoy["/random-weighted"],
        &remora["/random-weighted"],
        &quarter,
        0.06,
    );
    assert_shares(
        "typed RANDOM",
        &envoy["/typed-random"],
        &remora["/typed-random"],
        &quarter,
        0.06,
    );
    // Sequential requests: nothing is ever in flight, so least request spreads evenly over
    // equal hosts (random among ties) and by weight (1:3) over unequal ones.
    assert_shares(
        "LEAST_REQUEST",
        &envoy["/lr-equal"],
        &remora["/lr-equal"],
        &quarter,
        0.06,
    );
    assert_shares(
        "FULL_SCAN",
        &envoy["/typed-lr"],
        &remora["/typed-lr"],
        &quarter,
        0.06,
    );
    assert_shares(
        "weighted LEAST_REQUEST",
        &envoy["/lr-weighted"],
        &remora["/lr-weighted"],
        &[("h1", 0.25), ("h2", 0.75)],
        0.03,
    );
}

#[test]
fn least_request_avoids_a_host_with_requests_in_flight_as_envoy_does() {
    let echo = Upstreams::start(2);
    let held = HeldUpstream::start("held");
    let (admin, listener) = (free_port(), free_port());
    let members = vec![
        member(held.addr, 1),
        member(echo.addr(0), 1),
        member(echo.addr(1), 1),
    ];
    let typed = "load_balancing_policy:\n  policies:\n  - typed_extension_config:\n      name: p\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest\n        selection_method: FULL_SCAN\n";
    let yaml = bootstrap(
        admin,
        listener,
        &route("/", "lr", ""),
        &cluster("lr", typed, &members),
    );
    let Some((envoy, remora)) = both("least request in flight", &yaml, admin, listener, |to| {
        held.hold();
        let before = held.arrived();
        // Requests one at a time until one is held on the held host (the others answer at
        // once).
        let mut in_flight = None;
        for _ in 0..200 {
            let request = std::thread::spawn(move || served_by(to, "/", &[]));
            remora_tests::wait_for(
                "an answer or a held request",
                Duration::from_secs(20),
                || (held.arrived() > before || request.is_finished()).then_some(()),
            );
            if held.arrived() > before {
                in_flight = Some(request);
                break;
            }
            let _ = request.join();
        }
        let in_flight = in_flight.expect("the held host got a request");
        // With one request in flight there, a full scan never picks it, and breaks the tie
        // between the two idle hosts at random: 200 requests put a fair split 5.7 standard
        // deviations inside the 0.2 tolerance (with 60, Envoy once sent 17 to one host).
        let next = shares(to, "/", 200);
        held.release();
        let _ = in_flight.join();
        next
    }) else {
        return;
    };
    assert_shares(
        "held host",
        &envoy,
        &remora,
        &[("h1", 0.5), ("h2", 0.5)],
        0.2,
    );
}

#[test]
fn locality_weights_and_the_panic_threshold_apply_as_in_envoy() {
    let up = Upstreams::start(4);
    let (admin, listener) = (free_port(), free_port());
    let zoned = vec![
        Member {
            zone: "a",
            zone_weight: Some(1),
            ..member(up.addr(0), 1)
        },
        Member {
            zone: "b",
            zone_weight: Some(3),
            ..member(up.addr(1), 1)
        },
        Member {
            zone: "b",
            zone_weight: Some(3),
            ..member(up.addr(2), 5)
        },
    ];
    let one_healthy = vec![
        member(up.addr(0), 1),
        Member {
            health: "UNHEALTHY",
            ..member(up.addr(1), 1)
        },
        Member {
            health: "UNHEALTHY",
            ..member(up.addr(2), 1)
        },
    ];
    let routes = [
        route("/localities", "localities", ""),
        route("/panic-default", "panic_default", ""),
        route("/panic-30", "panic_30", ""),
        route("/panic-off", "panic_off", ""),
        route("/fail-on-panic", "fail_on_panic", ""),
    ]
    .concat();
    let clusters = [
        cluster(
            "localities",
            "common_lb_config: {locality_weighted_lb_config: {}}",
            &zoned,
        ),
        cluster("panic_default", "", &one_healthy),
        cluster(
            "panic_30",
            "common_lb_config: {healthy_panic_threshold: {value: 30}}",
            &one_healthy,
        ),
        cluster(
            "panic_off",
            "common_lb_config: {healthy_panic_threshold: {value: 0}}",
            &one_healthy,
        ),
        cluster(
            "fail_on_panic",
            "common_lb_config: {zone_aware_lb_config: {fail_traffic_on_panic: true}}",
            &one_healthy,
        ),
    ]
    .concat();
    let yaml = bootstrap(admin, listener, &routes, &clusters);
    let paths = [
        "/localities",
        "/panic-default",
        "/panic-30",
        "/panic-off",
        "/fail-on-panic",
    ];
    let Some((envoy, remora)) = both("localities and panic", &yaml, admin, listener, |to| {
        paths
            .iter()
            .map(|path| (path.to_string(), shares(to, path, 600)))
            .collect::<BTreeMap<_, _>>()
    }) else {
        return;
    };
    // Zone a (weight 1) takes a quarter; zone b (weight 3) splits the rest 1:5 by host weight.
    assert_shares(
        "locality weights",
        &envoy["/localities"],
        &remora["/localities"],
        &[("h1", 0.25), ("h2", 0.125), ("h3", 0.625)],
        0.03,
    );
    // One of three healthy (33%): under the default 50% threshold the priority is in panic
    // and every host takes its turn; under a 30% threshold, or with panic off, only the
    // healthy one; with fail_traffic_on_panic, nobody.
    let third = [("h1", 1.0 / 3.0), ("h2", 1.0 / 3.0), ("h3", 1.0 / 3.0)];
    assert_shares(
        "panic",
        &envoy["/panic-default"],
        &remora["/panic-default"],
        &third,
        0.01,
    );
    for path in ["/panic-30", "/panic-off"] {
        assert_shares(path, &envoy[path], &remora[path], &[("h1", 1.0)], 0.0);
    }
    assert_shares(
        "fail on panic",
        &envoy["/fail-on-panic"],
        &remora["/fail-on-panic"],
        &[("status 503", 1.0)],
        0.0,
    );
}

/// An HTTP/1.1 upstream that answers every request after `delay`, naming itself `name`.
fn slow_upstream(name: &'static str, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        head.clear();
                        std::thread::sleep(delay);
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nx-upstream: {name}\r\ncontent-length: 0\r\n\r\n"
                        );
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn peak_ewma_avoids_a_slow_host() {
    let up = Upstreams::start(2);
    // Slow enough that a fast host's answer delayed by a loaded machine (tens of
    // milliseconds, seen in CI) does not outdo it.
    let slow = slow_upstream("slow", Duration::from_millis(150));
    let (admin, listener) = (free_port(), free_port());
    let members = vec![
        member(slow, 1),
        member(up.addr(0), 1),
        member(up.addr(1), 1),
    ];
    let typed = "load_balancing_policy:\n  policies:\n  - typed_extension_config:\n      name: remora.load_balancing_policies.peak_ewma\n      typed_config:\n        \"@type\": type.googleapis.com/remora.extensions.load_balancing_policies.peak_ewma.v1.PeakEwma\n";
    let yaml = bootstrap(
        admin,
        listener,
        &[route("/ewma", "ewma", ""), route("/rr", "rr", "")].concat(),
        &[
            cluster("ewma", typed, &members),
            cluster("rr", "", &members),
        ]
        .concat(),
    );
    let _remora = Proxy::start(&yaml, loopback(admin), &[]);
    let to = loopback(listener);
    wait_for_port(to, Duration::from_secs(20));
    let ewma = shares(to, "/ewma", 300);
    let rr = shares(to, "/rr", 30);
    assert_eq!(rr.get("slow"), Some(&10), "round robin: {rr:?}");
    // Once the slow host has answered once, it loses every comparison with a fast one, unless
    // a fast host's answer took longer than 150 ms (a stalled machine): peak EWMA then rightly
    // prefers the slow host until that peak decays. So a share, not zero: round robin would
    // give it 100 of 300.
    let slow_share = ewma.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share <= 15,
        "peak EWMA sent {slow_share} of 300 to the slow host: {ewma:?}"
    );
}
