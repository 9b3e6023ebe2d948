//! Sidecars as the injector is to run them on Kubernetes, against a real API server
//! (`remora_tests::kube`, the test acting as the kubelet): `remora-cp --kubernetes --xds-auth
//! kubernetes --xds-tls`, and two `remora-proxy` sidecars that verify the xDS server with the
//! bundle from ConfigMap `remora-ca-root-cert` (what the injector mounts), authenticate with a
//! projected ServiceAccount token for audience `remora` bound to their pod (minted through the
//! TokenRequest API, as the kubelet does), and make their own keys (`--csr-secret`).
//!
//! A calls service B by its ClusterIP through both sidecars over mTLS (`Strict`); each sidecar
//! serves the certificate signed for its pod's service account, and its stream is in its
//! pod's group (the `app` label), whatever else its node could have claimed.
//!
//! Needs root, iproute2, iptables, util-linux and the Kubernetes binaries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use remora_tests::echo::EchoServer;
use remora_tests::kube::{self, KubeCluster, NODE_NAME};
use remora_tests::mesh::{ControlPlane, SidecarSpec, pod_ip, start_sidecar};
use remora_tests::netns::listen_in;
use remora_tests::pods::{Node, PodNet, call, sidecar_admin, sidecar_stat};
use remora_tests::{wait_for, workspace_binary};
use serde_json::{Value, json};

const NAMESPACE: &str = "shop";
const CP_IDENTITY: &str = "spiffe://cluster.local/ns/remora-system/sa/remora-cp";

fn apply(cluster: &KubeCluster, object: Value) {
    cluster.apply(&object.to_string());
}

/// Writes `text` to `dir/name`, readable by the sidecar's user.
fn readable_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// The sidecar of `pod` as the injector is to start it: TLS to the control plane checked
/// against `bundle`, the pod's projected token, its own key.
fn sidecar(pod: &str, account: &str, group: &str, bundle: &Path, token: &Path) -> SidecarSpec {
    let mut spec = SidecarSpec::injected(pod, NAMESPACE, group);
    for (key, value) in [
        ("SERVICE_ACCOUNT", account.to_string()),
        ("REMORA_XDS_CA", bundle.display().to_string()),
        ("REMORA_XDS_SAN", CP_IDENTITY.to_string()),
        ("REMORA_XDS_TOKEN_FILE", token.display().to_string()),
        ("REMORA_CSR_SECRET", "remora-workload-cert".to_string()),
    ] {
        spec.proxy_env.retain(|(name, _)| name != key);
        spec.proxy_env.push((key.to_string(), value));
    }
    spec
}

fn certs_name(pod: &PodNet, identity: &str) -> bool {
    sidecar_admin(pod, "/certs").is_some_and(|certs| certs.contains(identity))
}

#[test]
fn kubernetes_sidecars_with_projected_tokens_and_their_own_keys_talk_mtls() {
    let test = "kubernetes_sidecars_with_projected_tokens_and_their_own_keys_talk_mtls";
    if let Some(reason) = remora_tests::netns::missing_prerequisite(&[
        "ip",
        "iptables-restore",
        "iptables-save",
        "setpriv",
    ]) {
        remora_tests::skip(test, &reason);
        return;
    }
    let Some(cluster) = kube::start_or_skip(test) else {
        return;
    };
    cluster.add_node(NODE_NAME, Some("z1"));
    let crd = Command::new(workspace_binary("remora-cp"))
        .arg("manifests")
        .output()
        .expect("remora-cp manifests");
    cluster.apply(&String::from_utf8(crd.stdout).expect("UTF-8"));
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": {"remora-injection": "enabled"}}}),
    );
    for account in ["buyer", "seller"] {
        apply(
            &cluster,
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": account, "namespace": NAMESPACE}}),
        );
    }
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "b", "namespace": NAMESPACE},
               "spec": {"selector": {"app": "b"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    );
    let policy = json!({"apiVersion": "remora.io/v1alpha1", "kind": "TrafficPolicy",
                        "metadata": {"name": "b", "namespace": NAMESPACE},
                        "spec": {"service": "b", "mtls": {"mode": "Strict"}}});
    cluster.wait_until(
        "the TrafficPolicy CRD",
        Duration::from_secs(30),
        |cluster| {
            cluster
                .kubectl_with_input(&["apply", "-f", "-"], &policy.to_string())
                .ok()
        },
    );
    let vip = cluster.cluster_ip(NAMESPACE, "b");

    let node = Node::attach(cluster.netns(), &format!("kc{}", std::process::id()));
    let kubeconfig = cluster.admin_kubeconfig().display().to_string();
    let cp = ControlPlane::start(
        cluster.netns(),
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--xds-auth",
            "kubernetes",
            "--xds-tls",
            "--xds-tls-dns-name",
            "remora-cp.remora-system.svc",
        ],
        &[],
    );
    // What the injector mounts: the bundle the control plane published, and per pod a
    // projected token for audience remora bound to the pod.
    let bundle = cluster.wait_until(
        "the trust bundle ConfigMap",
        Duration::from_secs(30),
        |cluster| {
            cluster
                .kubectl_try(&[
                    "get",
                    "configmap",
                    "remora-ca-root-cert",
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.data.root-cert\\.pem}",
                ])
                .ok()
                .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
        },
    );
    let files = tempfile::tempdir().expect("dir");
    let bundle = readable_file(files.path(), "root-cert.pem", &bundle);
    let token = |pod: &str, account: &str| {
        let token = cluster.kubectl_ok(&[
            "create",
            "token",
            account,
            "-n",
            NAMESPACE,
            "--audience",
            "remora",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
            "--duration",
            "1h",
        ]);
        readable_file(files.path(), &format!("{pod}.token"), token.trim())
    };

    cluster.run_pod(NAMESPACE, "b-1", "b", "seller", pod_ip(2, 1));
    let b = node.add_pod("b-1", pod_ip(2, 1));
    let _echo = EchoServer::start_on("b-1", listen_in(&b.netns, "0.0.0.0:8080".parse().unwrap()));
    cluster.run_pod(NAMESPACE, "a-1", "web", "buyer", pod_ip(1, 1));
    let a = node.add_pod("a-1", pod_ip(1, 1));
    // B's sidecar names a group of its own choosing in its node: the pod's ("b") is what
    // counts, and naming another is refused, so it names none.
    let _b_sidecar = start_sidecar(
        &b,
        &sidecar("b-1", "seller", "", &bundle, &token("b-1", "seller")),
    );
    let _a_sidecar = start_sidecar(
        &a,
        &sidecar("a-1", "buyer", "web", &bundle, &token("a-1", "buyer")),
    );

    let upstream = wait_for(
        "A → B by ClusterIP over mTLS",
        Duration::from_secs(60),
        || {
            let (status, upstream) = call(&a, vip, "/", Some("b.shop"));
            (status == 200).then_some(upstream)
        },
    );
    assert_eq!(upstream, "b-1");
    // Over mTLS: B's inbound listener took a handshake with A's certificate.
    assert!(
        sidecar_stat(&b, "listener.0.0.0.0_15006.ssl.handshake").unwrap_or(0) >= 1,
        "B's sidecar took no TLS handshake"
    );
    assert_eq!(
        sidecar_stat(&b, "listener.0.0.0.0_15006.ssl.no_certificate").unwrap_or(0),
        0,
        "A's sidecar presented its certificate"
    );
    let proxies = cp.proxies();
    for (pod, node_id, group, identity) in [
        (
            &a,
            "a-1.shop",
            "web",
            "spiffe://cluster.local/ns/shop/sa/buyer",
        ),
        (
            &b,
            "b-1.shop",
            "b",
            "spiffe://cluster.local/ns/shop/sa/seller",
        ),
    ] {
        let entry = proxies
            .iter()
            .find(|proxy| proxy["node_id"] == node_id)
            .unwrap_or_else(|| panic!("{node_id} listed: {proxies:?}"));
        assert_eq!(entry["group"], group, "{entry}");
        assert_eq!(
            entry["signed_certificate"]["spiffe_id"], identity,
            "{entry}"
        );
        assert!(certs_name(pod, identity), "{node_id} serves {identity}");
    }
}
