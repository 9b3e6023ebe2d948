//! The Kubernetes fixture (`remora_tests::kube`) is a working cluster: the API server built
//! from the pinned release answers through the forwarded port with TLS and client
//! certificates, accepts the shipped manifests, enforces their RBAC for a ServiceAccount
//! token, and the controller manager turns a ready pod into an EndpointSlice endpoint.

use std::time::Duration;

use ::kube::api::{Api, ListParams};
use k8s_openapi::api::core::v1::Namespace;
use remora_tests::kube::{self, KubeCluster, NODE_NAME};

fn deploy_manifests() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/remora.yaml");
    std::fs::read_to_string(path).expect("deploy/remora.yaml")
}

#[test]
fn api_server_serves_the_pinned_release_to_kubectl_and_kube_rs() {
    let Some(cluster) =
        kube::start_or_skip("api_server_serves_the_pinned_release_to_kubectl_and_kube_rs")
    else {
        return;
    };
    let version: serde_json::Value =
        serde_json::from_str(&cluster.kubectl_ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], kube::version());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let names = runtime.block_on(async {
        let namespaces: Api<Namespace> = Api::all(cluster.client().await);
        namespaces
            .list(&ListParams::default())
            .await
            .expect("list namespaces as admin")
            .items
            .into_iter()
            .filter_map(|namespace| namespace.metadata.name)
            .collect::<Vec<_>>()
    });
    for expected in ["default", "kube-system", "kube-public"] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
}

#[test]
fn shipped_manifests_apply_and_their_rbac_binds_the_control_plane_token() {
    let Some(cluster) =
        kube::start_or_skip("shipped_manifests_apply_and_their_rbac_binds_the_control_plane_token")
    else {
        return;
    };
    cluster.apply(&deploy_manifests());
    let kubeconfig = cluster.service_account_kubeconfig("remora-system", "remora-cp", None);
    let as_control_plane = |args: &[&str]| {
        let out = std::process::Command::new(kube::kubectl_path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for resource in [
        "services",
        "pods",
        "namespaces",
        "endpointslices.discovery.k8s.io",
    ] {
        let (ok, stderr) = as_control_plane(&["get", resource, "--all-namespaces"]);
        assert!(ok, "remora-cp may not list {resource}: {stderr}");
    }
    let (ok, stderr) = as_control_plane(&["get", "secrets", "--all-namespaces"]);
    assert!(!ok, "remora-cp could list secrets");
    assert!(stderr.contains("Forbidden"), "{stderr}");
    // Authorization comes before the lookup: the pod need not exist to be refused.
    let (ok, stderr) = as_control_plane(&["delete", "pod", "any", "-n", "default"]);
    assert!(!ok && stderr.contains("Forbidden"), "{stderr}");
}

#[test]
fn controller_manager_publishes_a_ready_pod_in_an_endpointslice() {
    let Some(cluster) =
        kube::start_or_skip("controller_manager_publishes_a_ready_pod_in_an_endpointslice")
    else {
        return;
    };
    cluster.add_node(NODE_NAME, Some("zone-a"));
    cluster.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec:
  nodeName: remora-node
  containers: [{name: web, image: example.invalid/web, ports: [{containerPort: 8080}]}]
"#,
    );
    // Acting as the kubelet: the pod runs at 198.18.1.10 and is ready.
    cluster.kubectl_ok(&[
        "patch",
        "pod",
        "web-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"198.18.1.10","podIPs":[{"ip":"198.18.1.10"}],
            "conditions":[{"type":"Ready","status":"True"},{"type":"ContainersReady","status":"True"}]}}"#,
    ]);
    let endpoint = slice_endpoint(&cluster, "web");
    assert_eq!(endpoint["addresses"][0], "198.18.1.10", "{endpoint}");
    assert_eq!(endpoint["conditions"]["ready"], true, "{endpoint}");
    assert_eq!(endpoint["zone"], "zone-a", "{endpoint}");
    assert_eq!(endpoint["targetRef"]["name"], "web-1", "{endpoint}");
}

/// The first endpoint of Service `default/service`'s EndpointSlice, once there is one.
fn slice_endpoint(cluster: &KubeCluster, service: &str) -> serde_json::Value {
    let selector = format!("kubernetes.io/service-name={service}");
    cluster.wait_until(
        "the EndpointSlice controller to publish the pod",
        Duration::from_secs(60),
        |cluster| {
            let list: serde_json::Value = serde_json::from_str(&cluster.kubectl_ok(&[
                "get",
                "endpointslices",
                "-n",
                "default",
                "-l",
                &selector,
                "-o",
                "json",
            ]))
            .ok()?;
            let endpoint = list["items"][0]["endpoints"][0].clone();
            (!endpoint.is_null()).then_some(endpoint)
        },
    )
}

#[test]
fn dropping_the_cluster_stops_it_and_deletes_its_namespace() {
    let Some(cluster) =
        kube::start_or_skip("dropping_the_cluster_stops_it_and_deletes_its_namespace")
    else {
        return;
    };
    let netns = cluster.netns().to_string();
    let api = cluster.api_url();
    drop(cluster);
    let namespaces = remora_tests::netns::run(&["ip", "netns", "list"]);
    assert!(
        !namespaces.contains(&netns),
        "{netns} left behind: {namespaces}"
    );
    let address: std::net::SocketAddr = api.trim_start_matches("https://").parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err(),
        "the forwarded port still accepts"
    );
}
