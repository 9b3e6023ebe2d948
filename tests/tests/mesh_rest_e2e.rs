//! The generated mesh end to end without Kubernetes: services, endpoints and traffic policies
//! registered through the REST API, pods in network namespaces on a bridge (addresses from
//! 198.18.0.0/15, service IPs blackholed at the node), each pod with the capture rules of
//! `remora-init` and a sidecar started as the injector's pod spec starts it.
//!
//! - `remora_sidecars_carry_service_traffic_and_follow_changes`: app A calls service B by its
//!   virtual IP and by name through both sidecars (stats on both sides); B scales up and down
//!   under load with no failed request; a TrafficPolicy's route timeout and traffic split
//!   change what A sees, and its status shows A's sidecar ACKed it.
//! - `envoy_sidecars_take_the_same_config_and_honour_retries_and_ring_hash`: a real Envoy as
//!   A's sidecar (on delta xDS) gets the same generated config; a retry policy and RING_HASH on
//!   a header change what happens to its requests, and the policy's status shows Envoy's ACK
//!   and the NACKs of B's Remora sidecars, which do not support those fields yet.
//!
//! Needs root, iproute2, iptables, util-linux; the second test also Envoy.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use remora_tests::echo::EchoServer;
use remora_tests::mesh::{
    ControlPlane, SidecarSpec, cluster_hosts, pod_ip, start_envoy_sidecar, start_sidecar,
};
use remora_tests::netns::{listen_in, missing_prerequisite};
use remora_tests::pods::{Node, PodNet, call, request_from, sidecar_admin, sidecar_stat};
use remora_tests::process::ChildGuard;
use remora_tests::wait_for;
use serde_json::{Value, json};

const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP_CANARY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const CLUSTER_B: &str = "b.shop.svc.cluster.local:80";

fn prerequisites(test: &str) -> bool {
    match missing_prerequisite(&["ip", "iptables-restore", "iptables-save", "setpriv"]) {
        Some(reason) => {
            remora_tests::skip(test, &reason);
            false
        }
        None => true,
    }
}

/// A pod running an echo app on 8080 and a sidecar.
struct App {
    pod: PodNet,
    _echo: EchoServer,
    sidecar: ChildGuard,
}

fn start_app(node: &Node, name: &str, ip: Ipv4Addr, group: &str) -> App {
    let pod = node.add_pod(name, ip);
    let echo = EchoServer::start_on(name, listen_in(&pod.netns, "0.0.0.0:8080".parse().unwrap()));
    let sidecar = start_sidecar(&pod, &SidecarSpec::injected(name, "shop", group));
    App {
        pod,
        _echo: echo,
        sidecar,
    }
}

fn endpoint(pod: &str, ip: Ipv4Addr, state: &str) -> Value {
    let (ready, serving, terminating) = match state {
        "ready" => (true, true, false),
        "terminating" => (false, true, true),
        "unready" => (false, false, false),
        other => panic!("unknown endpoint state {other}"),
    };
    json!({"address": ip.to_string(), "zone": "z1", "ready": ready, "serving": serving, "terminating": terminating, "workload": pod})
}

fn set_b_endpoints(cp: &ControlPlane, endpoints: Vec<Value>) {
    cp.put(
        "/v1/mesh/endpoints/shop/b",
        json!({"ports": {"http": 8080}, "endpoints": endpoints}),
    );
}

fn register_b(cp: &ControlPlane) {
    cp.put(
        "/v1/mesh/services/shop/b",
        json!({"vip": VIP_B.to_string(), "ports": [{"name": "http", "port": 80}]}),
    );
}

/// Requests from `pod` to B in a loop until stopped (at most 100,000), counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(pod: &PodNet) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (pod, stop2, done2, failed2) =
            (pod.clone(), stop.clone(), done.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            for _ in 0..100_000 {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                match request_from(&pod, SocketAddr::from((VIP_B, 80)), "GET", "/load", &[]) {
                    Ok((200, _, _)) => {}
                    Ok((status, head, _)) => {
                        failed2.fetch_add(1, Ordering::Relaxed);
                        failures.push(format!("{status}: {head}"));
                    }
                    Err(error) => {
                        failed2.fetch_add(1, Ordering::Relaxed);
                        failures.push(error.to_string());
                    }
                }
                done2.fetch_add(1, Ordering::Relaxed);
            }
            failures
        });
        Load {
            stop,
            done,
            failed,
            thread: Some(thread),
        }
    }

    /// Waits for `more` requests beyond those done so far.
    fn wait_for_requests(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        wait_for("requests under load", Duration::from_secs(60), || {
            (self.done.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .thread
            .take()
            .map(|thread| thread.join().unwrap_or_default())
            .unwrap_or_default();
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            failures,
        )
    }
}

#[test]
fn remora_sidecars_carry_service_traffic_and_follow_changes() {
    let test = "remora_sidecars_carry_service_traffic_and_follow_changes";
    if !prerequisites(test) {
        return;
    }
    let node = Node::create(&format!("rm{}", std::process::id()));
    let cp = ControlPlane::start(&node.netns, &["--mesh"], &[]);
    register_b(&cp);
    cp.put(
        "/v1/mesh/services/shop/b-canary",
        json!({"vip": VIP_CANARY.to_string(), "ports": [{"name": "http", "port": 80}]}),
    );
    let b1 = start_app(&node, "b-1", pod_ip(2, 1), "b");
    let b2 = start_app(&node, "b-2", pod_ip(2, 2), "b");
    let canary = start_app(&node, "b-canary-1", pod_ip(2, 9), "b-canary");
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-1", b1.pod.ip, "ready"),
            endpoint("b-2", b2.pod.ip, "ready"),
        ],
    );
    cp.put(
        "/v1/mesh/endpoints/shop/b-canary",
        json!({"ports": {"http": 8080}, "endpoints": [endpoint("b-canary-1", canary.pod.ip, "ready")]}),
    );
    let a = node.add_pod("a-1", pod_ip(1, 1));
    let _a_sidecar = start_sidecar(&a, &SidecarSpec::injected("a-1", "shop", "a"));
    wait_for("A's sidecar in sync", Duration::from_secs(30), || {
        cp.in_sync("a-1.shop").then_some(())
    });
    wait_for("B's endpoints at A", Duration::from_secs(30), || {
        (cluster_hosts(&a, CLUSTER_B).len() == 2).then_some(())
    });

    // By virtual IP: round robin over both pods, each request through both sidecars.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (status, upstream) = call(&a, VIP_B, "/by-ip", None);
        assert_eq!(status, 200);
        seen.insert(upstream);
    }
    assert_eq!(seen, ["b-1", "b-2"].map(String::from).into());
    // By name, as a client that resolved b.shop to the virtual IP sends it.
    for host in ["b", "b.shop", "b.shop.svc.cluster.local:80"] {
        let (status, upstream) = call(&a, VIP_B, "/by-name", Some(host));
        assert_eq!(status, 200, "Host {host}");
        assert!(upstream.starts_with("b-"), "{upstream}");
    }
    // A name that is not B's is not routed to B.
    assert_eq!(call(&a, VIP_B, "/", Some("c.shop")).0, 404);
    let outbound = sidecar_stat(&a, "http.outbound.downstream_rq_total").unwrap_or(0);
    assert!(
        outbound >= 8,
        "A's sidecar saw {outbound} outbound requests"
    );
    // Envoy and Remora write the ':' of a cluster name as '_' in stat names.
    let total = format!("cluster.{}.upstream_rq_total", CLUSTER_B.replace(':', "_"));
    assert!(sidecar_stat(&a, &total).unwrap_or(0) >= 7, "{total}");
    let inbound = sidecar_stat(&b1.pod, "http.inbound.downstream_rq_total").unwrap_or(0)
        + sidecar_stat(&b2.pod, "http.inbound.downstream_rq_total").unwrap_or(0);
    assert!(inbound >= 7, "B's sidecars saw {inbound} inbound requests");

    // A destination the mesh does not know (a pod's own address) goes through the passthrough
    // to where it was headed, captured inbound there.
    let (status, _, body) = request_from(
        &a,
        SocketAddr::from((b2.pod.ip, 8080)),
        "GET",
        "/direct",
        &[],
    )
    .expect("a direct request");
    assert_eq!(status, 200);
    assert!(body.contains("\"upstream\":\"b-2\""), "{body}");
    assert!(sidecar_stat(&a, "tcp.passthrough.downstream_cx_total").unwrap_or(0) >= 1);
    // What escapes capture (the proxy's own uid is never captured) dies in the blackhole.
    assert!(
        !remora_tests::pods::escapes_capture(&a, SocketAddr::from((VIP_B, 80))),
        "a connection past capture reached something"
    );

    // Scale up under load: a third pod; A uses it once its endpoint is registered.
    let load = Load::start(&a);
    load.wait_for_requests(20);
    let b3 = start_app(&node, "b-3", pod_ip(2, 3), "b");
    // Listed as not ready first, as Kubernetes lists a starting pod: its sidecar gets its
    // inbound listener, A gets no traffic to it yet.
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-1", b1.pod.ip, "ready"),
            endpoint("b-2", b2.pod.ip, "ready"),
            endpoint("b-3", b3.pod.ip, "unready"),
        ],
    );
    wait_for("b-3's inbound listener", Duration::from_secs(30), || {
        sidecar_admin(&b3.pod, "/listeners")
            .filter(|listeners| listeners.contains("inbound"))
            .map(|_| ())
    });
    assert!(
        !cluster_hosts(&a, CLUSTER_B)
            .iter()
            .any(|(host, flags)| host.starts_with(&b3.pod.ip.to_string()) && flags == "healthy")
    );
    let changed = Instant::now();
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-1", b1.pod.ip, "ready"),
            endpoint("b-2", b2.pod.ip, "ready"),
            endpoint("b-3", b3.pod.ip, "ready"),
        ],
    );
    let b3_host = format!("{}:8080", b3.pod.ip);
    wait_for("b-3 at A", Duration::from_secs(30), || {
        cluster_hosts(&a, CLUSTER_B)
            .iter()
            .any(|(host, flags)| *host == b3_host && flags == "healthy")
            .then_some(())
    });
    eprintln!("scale-up reached A's sidecar in {:?}", changed.elapsed());
    wait_for("a request answered by b-3", Duration::from_secs(30), || {
        (call(&a, VIP_B, "/b3", None).1 == "b-3").then_some(())
    });

    // Scale down under load, as Kubernetes does it: b-1 terminating (still serving), then
    // gone from the endpoints, then stopped.
    let b1_host = format!("{}:8080", b1.pod.ip);
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-1", b1.pod.ip, "terminating"),
            endpoint("b-2", b2.pod.ip, "ready"),
            endpoint("b-3", b3.pod.ip, "ready"),
        ],
    );
    wait_for("b-1 draining at A", Duration::from_secs(30), || {
        cluster_hosts(&a, CLUSTER_B)
            .iter()
            .any(|(host, flags)| *host == b1_host && flags.contains("draining"))
            .then_some(())
    });
    load.wait_for_requests(20);
    let removed = Instant::now();
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-2", b2.pod.ip, "ready"),
            endpoint("b-3", b3.pod.ip, "ready"),
        ],
    );
    wait_for("b-1 gone at A", Duration::from_secs(30), || {
        (!cluster_hosts(&a, CLUSTER_B)
            .iter()
            .any(|(host, _)| *host == b1_host))
        .then_some(())
    });
    eprintln!("scale-down reached A's sidecar in {:?}", removed.elapsed());
    load.wait_for_requests(20);
    let App {
        pod: b1_pod,
        _echo: b1_echo,
        sidecar: mut b1_sidecar,
    } = b1;
    b1_sidecar.kill();
    drop(b1_echo);
    node.remove_pod(&b1_pod);
    load.wait_for_requests(50);
    let (done, failed, failures) = load.finish();
    assert_eq!(
        failed, 0,
        "{failed} of {done} requests failed under scaling: {failures:?}"
    );
    assert!(done >= 110, "only {done} requests ran");

    // A TrafficPolicy with a route timeout: a slow request now times out at A's sidecar.
    assert_eq!(call(&a, VIP_B, "/delay/1500", None).0, 200);
    let (status, answer) = cp.call(
        "PUT",
        "/v1/mesh/trafficpolicies/shop/b",
        &json!({"spec": {"service": "b", "timeout": "300ms", "routes": [{"prefix": "/v2", "split": [{"service": "b-canary", "weight": 100}]}]}}),
    );
    assert_eq!(status, 200, "{answer}");
    wait_for("the timeout at A", Duration::from_secs(30), || {
        (call(&a, VIP_B, "/delay/1500", None).0 == 504).then_some(())
    });
    assert_eq!(call(&a, VIP_B, "/delay/10", None).0, 200);
    // And its split: /v2 goes to the canary, the rest stays with B.
    assert_eq!(call(&a, VIP_B, "/v2/x", None).1, "b-canary-1");
    assert!(call(&a, VIP_B, "/v1/x", None).1.starts_with("b-"));
    // Its status names A's sidecar among those that ACKed it.
    wait_for("the policy status", Duration::from_secs(30), || {
        let (_, policy) = cp.call("GET", "/v1/mesh/trafficpolicies/shop/b", &Value::Null);
        let acked = policy["status"]["ackedProxies"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (policy["status"]["conditions"][0]["status"] == "True"
            && policy["status"]["conditions"][1]["type"] == "RemoraProxyCompatible"
            && policy["status"]["conditions"][1]["status"] == "True"
            && acked.iter().any(|node| node == "a-1.shop")
            && policy["status"]["proxies"]["nacked"] == 0)
            .then_some(())
    });
    // A bad policy is refused with the field that is wrong.
    let (status, answer) = cp.call(
        "PUT",
        "/v1/mesh/trafficpolicies/shop/bad",
        &json!({"spec": {"service": "b", "timeout": "soon"}}),
    );
    assert_eq!(status, 400);
    assert!(answer.to_string().contains("not a duration"), "{answer}");
    drop(canary);
}

#[test]
fn envoy_sidecars_take_the_same_config_and_honour_retries_and_ring_hash() {
    let test = "envoy_sidecars_take_the_same_config_and_honour_retries_and_ring_hash";
    if !prerequisites(test) || !remora_tests::envoy::available_or_skip(test) {
        return;
    }
    let node = Node::create(&format!("re{}", std::process::id()));
    let cp = ControlPlane::start(&node.netns, &["--mesh"], &[]);
    register_b(&cp);
    let b1 = start_app(&node, "b-1", pod_ip(2, 1), "b");
    let b2 = start_app(&node, "b-2", pod_ip(2, 2), "b");
    set_b_endpoints(
        &cp,
        vec![
            endpoint("b-1", b1.pod.ip, "ready"),
            endpoint("b-2", b2.pod.ip, "ready"),
        ],
    );
    let a = node.add_pod("a-1", pod_ip(1, 1));
    let dir = tempfile::tempdir().expect("temp dir");
    let _envoy = start_envoy_sidecar(&a, "shop", dir.path());
    wait_for("Envoy in sync", Duration::from_secs(30), || {
        cp.in_sync("a-1.shop").then_some(())
    });
    wait_for("B's endpoints at Envoy", Duration::from_secs(30), || {
        (cluster_hosts(&a, CLUSTER_B).len() == 2).then_some(())
    });
    let upstream_requests = || {
        sidecar_stat(&b1.pod, "http.inbound.downstream_rq_total").unwrap_or(0)
            + sidecar_stat(&b2.pod, "http.inbound.downstream_rq_total").unwrap_or(0)
    };
    // Without a policy: round robin, and the mesh defaults retry a 503 twice.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (status, upstream) = call(&a, VIP_B, "/", Some("b.shop"));
        assert_eq!(status, 200);
        seen.insert(upstream);
    }
    assert_eq!(seen.len(), 2, "round robin over both pods: {seen:?}");
    let before = upstream_requests();
    assert_eq!(call(&a, VIP_B, "/status/503", None).0, 503);
    wait_for("three upstream tries", Duration::from_secs(10), || {
        (upstream_requests() == before + 3).then_some(())
    });

    cp.put(
        "/v1/mesh/trafficpolicies/shop/b",
        json!({"spec": {
            "service": "b",
            "loadBalancer": {"algorithm": "RingHash", "hashKey": {"header": "x-user"}},
            "retries": {"attempts": 1, "retryOn": ["retriable-status-codes"], "retriableStatusCodes": [503], "budget": {"percent": 50.0, "minConcurrency": 5}}
        }}),
    );
    wait_for(
        "the RING_HASH cluster at Envoy",
        Duration::from_secs(30),
        || {
            let dump = sidecar_admin(&a, "/config_dump?resource=dynamic_active_clusters");
            dump.is_some_and(|dump| dump.contains("RING_HASH"))
                .then_some(())
        },
    );
    wait_for("Envoy in sync again", Duration::from_secs(30), || {
        cp.in_sync("a-1.shop").then_some(())
    });
    // The policy's retries replace the defaults': one 503 request now reaches the upstreams
    // twice (1 + 1 retry).
    let before = upstream_requests();
    assert_eq!(call(&a, VIP_B, "/status/503", None).0, 503);
    wait_for("two upstream tries", Duration::from_secs(10), || {
        (upstream_requests() == before + 2).then_some(())
    });
    // Envoy writes the ':' of a cluster name as '_' in stat names.
    let retries = format!("cluster.{}.upstream_rq_retry", CLUSTER_B.replace(':', "_"));
    assert!(sidecar_stat(&a, &retries).unwrap_or(0) >= 2, "{retries}");
    // Ring hash: each user sticks to one pod, whatever the round robin would have done.
    let mut users_per_pod = std::collections::BTreeMap::<String, usize>::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut pods = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (status, _, body) = request_from(
                &a,
                SocketAddr::from((VIP_B, 80)),
                "GET",
                "/",
                &[("x-user", user)],
            )
            .expect("request");
            assert_eq!(status, 200);
            let answer: Value = serde_json::from_str(&body).expect("echo JSON");
            pods.insert(answer["upstream"].as_str().unwrap_or_default().to_string());
        }
        assert_eq!(pods.len(), 1, "{user} went to {pods:?}");
        *users_per_pod
            .entry(pods.into_iter().next().unwrap())
            .or_default() += 1;
    }
    eprintln!("users per pod under RING_HASH: {users_per_pod:?}");
    // The policy's status: Envoy (A) and B's Remora sidecars, which also receive service b,
    // all ACKed it; Remora proxies take RING_HASH and retries.
    wait_for("the policy status", Duration::from_secs(30), || {
        let (_, policy) = cp.call("GET", "/v1/mesh/trafficpolicies/shop/b", &Value::Null);
        let status = &policy["status"];
        let acked = status["ackedProxies"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let nacked = status["nackedProxies"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (["a-1.shop", "b-1.shop", "b-2.shop"]
            .iter()
            .all(|node| acked.iter().any(|acked| acked == node))
            && status["conditions"][1]["status"] == "True"
            && nacked.is_empty())
        .then_some(())
    });
}
