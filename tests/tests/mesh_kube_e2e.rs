//! The mesh on a real Kubernetes API server, with the test acting as the node's kubelet.
//!
//! The cluster (`remora_tests::kube`: etcd, kube-apiserver, kube-controller-manager) gets
//! Remora's manifests (`remora-injector manifests`, with the webhook's CA), and the
//! TrafficPolicy CRD (`remora-cp manifests`) only later, while the mesh already runs: the
//! control plane serves without it and picks it up; the injector and `remora-cp --kubernetes` run in
//! the node, the control plane with exactly its ServiceAccount's token (the manifest's
//! ClusterRole). Pods are created through the API server, mutated by the webhook, and then
//! run as their stored spec says: each in its own network namespace on the node's bridge
//! (198.18.0.0/15; service IPs blackholed past capture), the injected init container's
//! command as root, the app, the sidecar's command and environment (downward API resolved) as
//! its `runAsUser`, the startup probe until it passes; status (IP, Ready) is written through
//! the API as a kubelet does, and the controller manager builds the EndpointSlices.
//!
//! Then: A calls service B by ClusterIP and by name through both sidecars; B scales up and
//! down under load without a failed request; a TrafficPolicy's timeout changes what A sees and
//! its status subresource names A's sidecar as having ACKed it.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use remora_tests::echo::EchoServer;
use remora_tests::kube::{self, CertificateAuthority, KubeCluster, NODE_NAME};
use remora_tests::mesh::{XDS_PORT, cluster_hosts, pod_ip};
use remora_tests::netns::{PortForward, in_namespace, listen_in};
use remora_tests::pods::{
    NODE_IP, Node, PodNet, call, escapes_capture, request_from, run_in_pod, sidecar_stat,
    spawn_in_pod,
};
use remora_tests::process::ChildGuard;
use remora_tests::{http_request, wait_for, workspace_binary};
use serde_json::{Value, json};

const NAMESPACE: &str = "shop";
const B_CLUSTER: &str = "b.shop.svc.cluster.local:80";
/// Where the injector listens inside the node (its Service is routed there).
const WEBHOOK_LISTEN: &str = "127.0.0.1:9443";
const WEBHOOK_HOST: &str = "remora-injector.remora-system.svc";

/// Runs a workspace binary's `manifests` and returns its output.
fn manifests(binary: &str, args: &[&str]) -> String {
    let out = Command::new(workspace_binary(binary))
        .arg("manifests")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{binary} manifests: {error}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The cluster with Remora installed and running.
struct Mesh {
    cluster: KubeCluster,
    node: Node,
    _injector: ChildGuard,
    control_plane: ChildGuard,
    api: PortForward,
}

impl Mesh {
    fn install(cluster: KubeCluster) -> Mesh {
        cluster.add_node(NODE_NAME, Some("z1"));
        // Remora's manifests with the webhook's CA (docs/injection.md); the TrafficPolicy CRD
        // only once the control plane runs (`install_crd`), which must not wait for it.
        let tls = cluster.dir().join("webhook-tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        let ca = CertificateAuthority::generate("remora-webhook-ca");
        ca.write(&tls.join("ca.crt"));
        ca.issue_server(&[WEBHOOK_HOST], &tls.join("tls"));
        let ca_file = tls.join("ca.crt").display().to_string();
        cluster.apply(&manifests(
            "remora-injector",
            &["--ca-bundle-file", &ca_file],
        ));

        let node = Node::attach(cluster.netns(), &format!("rk{}", std::process::id()));
        let xds = format!("{NODE_IP}:{XDS_PORT}");
        // The injector with its Deployment's flags, pointing pods at the control plane on the
        // node's bridge address.
        let mut command = cluster.node_command(workspace_binary("remora-injector"));
        command
            .args(["serve", "--listen", WEBHOOK_LISTEN])
            .arg("--tls-cert")
            .arg(tls.join("tls.crt"))
            .arg("--tls-key")
            .arg(tls.join("tls.key"))
            .args(["--xds-address", &xds]);
        let injector = ChildGuard::spawn("remora-injector", command);
        let netns = cluster.netns().to_string();
        wait_for("the injector in the node", Duration::from_secs(30), || {
            let netns = netns.clone();
            in_namespace(&netns, || {
                TcpStream::connect_timeout(&WEBHOOK_LISTEN.parse().unwrap(), Duration::from_secs(1))
                    .ok()
                    .map(|_| ())
            })
        });
        cluster.route_service(
            "remora-system",
            "remora-injector",
            443,
            WEBHOOK_LISTEN.parse().unwrap(),
        );

        // The control plane, as the manifest's Deployment runs it, with its ServiceAccount's
        // token and nothing more.
        let kubeconfig = cluster.service_account_kubeconfig(
            "remora-system",
            "remora-cp",
            Some(&cluster.node_api_url()),
        );
        let data = cluster.dir().join("remora-cp-data");
        let mut command = cluster.node_command(workspace_binary("remora-cp"));
        command
            .args([
                "--xds-addr",
                &xds,
                "--api-addr",
                "127.0.0.1:19000",
                "--kubernetes",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "info,remora_control_plane::mesh=debug");
        let control_plane = ChildGuard::spawn("remora-cp", command);
        let api = PortForward::start(cluster.netns(), "127.0.0.1:19000".parse().unwrap());
        let mesh = Mesh {
            cluster,
            node,
            _injector: injector,
            control_plane,
            api,
        };
        wait_for("remora-cp's API", Duration::from_secs(60), || {
            http_request(mesh.api.local_addr(), "GET", "/healthz", &[], "")
                .ok()
                .map(|_| ())
        });
        mesh
    }

    fn install_crd(&self) {
        self.cluster.apply(&manifests("remora-cp", &[]));
        self.cluster.kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/trafficpolicies.remora.io",
        ]);
    }

    fn proxies(&self) -> Vec<Value> {
        let (_, _, body) = http_request(self.api.local_addr(), "GET", "/v1/proxies", &[], "")
            .expect("GET /v1/proxies");
        serde_json::from_str::<Value>(&body).unwrap_or_default()["proxies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn in_sync(&self, node_id: &str) -> bool {
        self.proxies().iter().any(|proxy| {
            proxy["node_id"] == node_id
                && proxy["types"].as_object().is_some_and(|types| {
                    types.len() >= 4
                        && types.values().all(|status| {
                            status["pending_nonce"].is_null() && status["last_nack"].is_null()
                        })
                })
        })
    }

    fn pod_json(&self, name: &str) -> Value {
        serde_json::from_str(
            &self
                .cluster
                .kubectl_ok(&["get", "pod", name, "-n", NAMESPACE, "-o", "json"]),
        )
        .expect("pod JSON")
    }

    /// Creates a pod of `app` through the API server (the webhook mutates it).
    fn create_pod(&self, name: &str, app: &str) -> Value {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app}},
            "spec": {
                "nodeName": NODE_NAME,
                "containers": [{
                    "name": "app",
                    "image": "example.invalid/echo:1",
                    "ports": [{"name": "http", "containerPort": 8080}]
                }]
            }
        });
        self.cluster.apply(&pod.to_string());
        self.pod_json(name)
    }

    fn patch_status(&self, name: &str, status: Value) {
        self.cluster.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &json!({"status": status}).to_string(),
        ]);
    }

    /// Acts as the kubelet for a stored pod: network namespace, init container, app,
    /// sidecar, startup probe, status.
    fn run_pod(&self, name: &str, ip: Ipv4Addr) -> RunningPod {
        let spec = self.pod_json(name);
        let net = self.node.add_pod(name, ip);
        let not_ready = |ready: &str| {
            json!({
                "phase": "Running",
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "hostIP": kube::NODE_ADDRESS.to_string(),
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": ready},
                    {"type": "Ready", "status": ready}
                ]
            })
        };
        self.patch_status(name, not_ready("False"));
        let init_containers = spec["spec"]["initContainers"].as_array().expect("injected");
        let mut sidecar = None;
        for container in init_containers {
            let command = container_command(container);
            if container["restartPolicy"] == "Always" {
                // A native sidecar: started, and the next container waits for its startup
                // probe.
                let env = container_env(container, &spec, ip);
                let user = container["securityContext"]["runAsUser"]
                    .as_u64()
                    .unwrap_or(0) as u32;
                let group = container["securityContext"]["runAsGroup"]
                    .as_u64()
                    .unwrap_or(0) as u32;
                let mut process = spawn_in_pod(
                    &format!("{}-{name}", container["name"].as_str().unwrap_or("sidecar")),
                    &net,
                    &command,
                    &env,
                    user,
                    group,
                );
                let probe = container_probe(container);
                wait_for(
                    &format!("the startup probe of {name}"),
                    Duration::from_secs(60),
                    || {
                        assert!(
                            process.try_wait().is_none(),
                            "{name}'s sidecar exited:\n{}",
                            process.log()
                        );
                        probe_passes(&net, &probe, user).then_some(())
                    },
                );
                sidecar = Some(process);
            } else {
                run_in_pod(&net, &command);
            }
        }
        let echo =
            EchoServer::start_on(name, listen_in(&net.netns, "0.0.0.0:8080".parse().unwrap()));
        self.patch_status(name, not_ready("True"));
        RunningPod {
            net,
            _echo: echo,
            sidecar: sidecar.expect("an injected sidecar"),
        }
    }

    /// Whether the EndpointSlices of `service` list `ip` with `ready`.
    fn endpoint_ready(&self, service: &str, ip: Ipv4Addr) -> Option<bool> {
        let slices: Value = serde_json::from_str(&self.cluster.kubectl_ok(&[
            "get",
            "endpointslices",
            "-n",
            NAMESPACE,
            "-l",
            &format!("kubernetes.io/service-name={service}"),
            "-o",
            "json",
        ]))
        .ok()?;
        slices["items"].as_array()?.iter().find_map(|slice| {
            slice["endpoints"].as_array()?.iter().find_map(|endpoint| {
                (endpoint["addresses"][0] == ip.to_string())
                    .then(|| endpoint["conditions"]["ready"].as_bool().unwrap_or(false))
            })
        })
    }
}

struct RunningPod {
    net: PodNet,
    _echo: EchoServer,
    sidecar: ChildGuard,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `command` followed by `args`.
fn container_command(container: &Value) -> Vec<String> {
    let mut command = strings(&container["command"]);
    command.extend(strings(&container["args"]));
    assert!(!command.is_empty(), "no command in {container}");
    command
}

/// The container's environment as the kubelet gives it: downward API fields resolved,
/// `$(VAR)` expanded from the variables before it.
fn container_env(container: &Value, pod: &Value, ip: Ipv4Addr) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().expect("env name").to_string();
        let value = if let Some(value) = variable["value"].as_str() {
            let mut expanded = value.to_string();
            for (known, known_value) in &env {
                expanded = expanded.replace(&format!("$({known})"), known_value);
            }
            expanded
        } else {
            match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => {
                    pod["metadata"]["name"].as_str().unwrap_or_default().into()
                }
                Some("metadata.namespace") => pod["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                Some("status.podIP") => ip.to_string(),
                Some("spec.serviceAccountName") => pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .into(),
                other => panic!("env {name}: unsupported valueFrom {other:?}"),
            }
        };
        env.push((name, value));
    }
    env
}

/// The exec command of the container's startup probe (else its readiness probe).
fn container_probe(container: &Value) -> Vec<String> {
    let probe = if container["startupProbe"].is_object() {
        &container["startupProbe"]
    } else {
        &container["readinessProbe"]
    };
    let command = strings(&probe["exec"]["command"]);
    assert!(
        !command.is_empty(),
        "the sidecar has no exec probe: {container}"
    );
    command
}

/// Runs an exec probe inside the pod as the container's user; whether it exits 0.
fn probe_passes(pod: &PodNet, probe: &[String], user: u32) -> bool {
    let mut probe_process = spawn_in_pod("probe", pod, probe, &[], user, user);
    matches!(probe_process.wait_timeout(Duration::from_secs(10)), Some(status) if status.success())
}

/// Requests from a pod to `vip` in a loop until stopped (at most 100,000), counting
/// failures.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
    /// When the load began: failures and the test's steps are timed from here, so a failure
    /// can be placed among the steps.
    started: Instant,
}

impl Load {
    fn start(pod: &PodNet, vip: Ipv4Addr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (pod, stopped, counted) = (pod.clone(), stop.clone(), done.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            for _ in 0..100_000 {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let sent = started.elapsed();
                match request_from(&pod, SocketAddr::from((vip, 80)), "GET", "/load", &[]) {
                    Ok((200, _, _)) => {}
                    Ok((status, head, _)) => {
                        failures.push(format!("sent at {sent:.2?}: {status}: {head}"))
                    }
                    Err(error) => failures.push(format!("sent at {sent:.2?}: {error}")),
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
            failures
        });
        Load {
            stop,
            done,
            thread: Some(thread),
            started,
        }
    }

    /// Notes a step of the test with its time on the load's clock.
    fn step(&self, what: &str) {
        eprintln!("load at {:.2?}: {what}", self.started.elapsed());
    }

    fn wait_for_requests(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        wait_for("requests under load", Duration::from_secs(120), || {
            (self.done.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .thread
            .take()
            .map(|thread| thread.join().unwrap_or_default())
            .unwrap_or_default();
        (self.done.load(Ordering::Relaxed), failures)
    }
}

fn healthy_at(a: &PodNet, ip: Ipv4Addr) -> bool {
    let host = format!("{ip}:8080");
    cluster_hosts(a, B_CLUSTER)
        .iter()
        .any(|(known, flags)| *known == host && flags == "healthy")
}

#[test]
fn a_mesh_on_a_real_api_server_carries_traffic_and_follows_pods_and_policies() {
    let test = "a_mesh_on_a_real_api_server_carries_traffic_and_follows_pods_and_policies";
    if let Some(reason) =
        remora_tests::netns::missing_prerequisite(&["ip", "iptables-restore", "setpriv"])
    {
        remora_tests::skip(test, &reason);
        return;
    }
    let Some(cluster) = kube::start_or_skip(test) else {
        return;
    };
    let mesh = Mesh::install(cluster);
    mesh.cluster.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {"remora-injection": "enabled"}}})
            .to_string(),
    );
    mesh.cluster.wait_until(
        "shop's default ServiceAccount",
        Duration::from_secs(60),
        |cluster| {
            cluster
                .kubectl_try(&["get", "serviceaccount", "default", "-n", NAMESPACE])
                .ok()
        },
    );
    mesh.cluster.apply(
        &json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "b", "namespace": NAMESPACE},
            "spec": {"selector": {"app": "b"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })
        .to_string(),
    );
    let vip = mesh.cluster.cluster_ip(NAMESPACE, "b");

    // Pods through the API server: stored with the sidecar the webhook injected.
    let stored = mesh.create_pod("b-1", "b");
    let names: Vec<String> = stored["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["remora-init", "remora-proxy"], "{stored}");
    mesh.create_pod("b-2", "b");
    mesh.create_pod("a-1", "a");
    let b1 = mesh.run_pod("b-1", pod_ip(2, 1));
    let b2 = mesh.run_pod("b-2", pod_ip(2, 2));
    let a = mesh.run_pod("a-1", pod_ip(1, 1));
    wait_for(
        "both b pods ready in the EndpointSlices",
        Duration::from_secs(60),
        || {
            (mesh.endpoint_ready("b", b1.net.ip) == Some(true)
                && mesh.endpoint_ready("b", b2.net.ip) == Some(true))
            .then_some(())
        },
    );
    wait_for("A's sidecar in sync", Duration::from_secs(60), || {
        mesh.in_sync("a-1.shop").then_some(())
    });
    wait_for(
        "B's endpoints at A's sidecar",
        Duration::from_secs(60),
        || (healthy_at(&a.net, b1.net.ip) && healthy_at(&a.net, b2.net.ip)).then_some(()),
    );

    // A calls B by ClusterIP and by name: captured by A's sidecar, balanced over B's pods,
    // captured inbound by theirs.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (status, upstream) = call(&a.net, vip, "/by-ip", None);
        assert_eq!(status, 200);
        seen.insert(upstream);
    }
    assert_eq!(seen, ["b-1", "b-2"].map(String::from).into());
    for host in ["b", "b.shop", "b.shop.svc.cluster.local"] {
        assert_eq!(
            call(&a.net, vip, "/by-name", Some(host)).0,
            200,
            "Host {host}"
        );
    }
    assert!(sidecar_stat(&a.net, "http.outbound.downstream_rq_total").unwrap_or(0) >= 7);
    let inbound = sidecar_stat(&b1.net, "http.inbound.downstream_rq_total").unwrap_or(0)
        + sidecar_stat(&b2.net, "http.inbound.downstream_rq_total").unwrap_or(0);
    assert!(inbound >= 7, "B's sidecars saw {inbound} requests");
    // What escapes capture (the proxy's own uid is never captured) dies in the blackhole.
    assert!(
        !escapes_capture(&a.net, SocketAddr::from((vip, 80))),
        "a connection past capture reached something"
    );

    // Scale up under load: a new pod, listed not ready until its sidecar passes its probe.
    let load = Load::start(&a.net, vip);
    load.wait_for_requests(20);
    load.step("creating b-3");
    mesh.create_pod("b-3", "b");
    let b3 = mesh.run_pod("b-3", pod_ip(2, 3));
    let ready_at = Instant::now();
    wait_for("b-3 at A's sidecar", Duration::from_secs(60), || {
        healthy_at(&a.net, b3.net.ip).then_some(())
    });
    eprintln!(
        "b-3 Ready → healthy at A's sidecar in {:?}",
        ready_at.elapsed()
    );
    wait_for("a request answered by b-3", Duration::from_secs(60), || {
        (call(&a.net, vip, "/b3", None).1 == "b-3").then_some(())
    });

    // Scale down under load: b-1 deleted (terminating, still serving), stopped once A's
    // sidecar has stopped sending it new requests, then gone.
    load.wait_for_requests(20);
    let deleted_at = Instant::now();
    load.step("deleting b-1");
    mesh.cluster
        .kubectl_ok(&["delete", "pod", "b-1", "-n", NAMESPACE, "--wait=false"]);
    let b1_host = format!("{}:8080", b1.net.ip);
    wait_for(
        "b-1 draining at A's sidecar",
        Duration::from_secs(60),
        || {
            cluster_hosts(&a.net, B_CLUSTER)
                .iter()
                .any(|(host, flags)| *host == b1_host && flags.contains("draining"))
                .then_some(())
        },
    );
    eprintln!(
        "b-1 deletion → draining at A's sidecar in {:?}",
        deleted_at.elapsed()
    );
    load.wait_for_requests(20);
    let RunningPod {
        net: b1_net,
        _echo: b1_echo,
        sidecar: mut b1_sidecar,
    } = b1;
    load.step("stopping b-1");
    b1_sidecar.kill();
    drop(b1_echo);
    mesh.cluster.kubectl_ok(&[
        "delete",
        "pod",
        "b-1",
        "-n",
        NAMESPACE,
        "--grace-period=0",
        "--force",
    ]);
    mesh.node.remove_pod(&b1_net);
    load.step("b-1's network removed");
    wait_for("b-1 gone at A's sidecar", Duration::from_secs(60), || {
        (!cluster_hosts(&a.net, B_CLUSTER)
            .iter()
            .any(|(host, _)| *host == b1_host))
        .then_some(())
    });
    load.step("b-1 gone at A's sidecar");
    load.wait_for_requests(50);
    let (done, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {done} requests failed: {failures:?}",
        failures.len()
    );

    // The CRD, installed while the mesh runs, and a TrafficPolicy: a slow request now times
    // out at A's sidecar; the policy's status names A's sidecar among those that ACKed it.
    mesh.install_crd();
    assert_eq!(call(&a.net, vip, "/delay/1500", None).0, 200);
    mesh.cluster.apply(
        &json!({
            "apiVersion": "remora.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "b", "namespace": NAMESPACE},
            "spec": {"service": "b", "timeout": "300ms"}
        })
        .to_string(),
    );
    wait_for(
        "the timeout at A's sidecar",
        Duration::from_secs(60),
        || (call(&a.net, vip, "/delay/1500", None).0 == 504).then_some(()),
    );
    assert_eq!(call(&a.net, vip, "/delay/10", None).0, 200);
    let status =
        mesh.cluster
            .wait_until("the policy's status", Duration::from_secs(60), |cluster| {
                let policy: Value = serde_json::from_str(
                    &cluster
                        .kubectl_try(&["get", "trafficpolicy", "b", "-n", NAMESPACE, "-o", "json"])
                        .ok()?,
                )
                .ok()?;
                let status = policy["status"].clone();
                let acked = status["ackedProxies"].as_array()?;
                (acked.iter().any(|node| node == "a-1.shop")
                    && status["conditions"][0]["status"] == "True")
                    .then_some(status)
            });
    assert_eq!(status["observedGeneration"], 1, "{status}");
    // The schema refuses a bad duration before anything reaches the control plane.
    let refused = mesh.cluster.kubectl_with_input(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "remora.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "bad", "namespace": NAMESPACE},
            "spec": {"service": "b", "timeout": "soon"}
        })
        .to_string(),
    );
    assert!(refused.is_err_and(|message| message.contains("spec.timeout")));
    // Everything above ran with the control plane's own ServiceAccount; it may not do more.
    let kubeconfig = mesh
        .cluster
        .service_account_kubeconfig("remora-system", "remora-cp", None);
    for (verb, resource, subresource, allowed) in [
        ("list", "pods", "", "yes"),
        ("watch", "endpointslices.discovery.k8s.io", "", "yes"),
        ("patch", "trafficpolicies.remora.io", "status", "yes"),
        ("get", "pods", "", "no"),
        ("list", "secrets", "", "no"),
        ("update", "services", "", "no"),
        ("patch", "trafficpolicies.remora.io", "", "no"),
    ] {
        let out = Command::new(kube::kubectl_path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["auth", "can-i", verb, resource, "--all-namespaces"])
            .arg(format!("--subresource={subresource}"))
            .output()
            .expect("kubectl auth can-i");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can-i {verb} {resource} {subresource}"
        );
    }
    drop((b2, b3, a));
    let _ = mesh.control_plane.log();
}
