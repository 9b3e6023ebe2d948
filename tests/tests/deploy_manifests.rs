//! The install manifests in `deploy/` start our real binaries with arguments they accept: the
//! control plane's Deployment command line is run as written, inside a private network
//! namespace (it binds all interfaces there), and must serve xDS on the port its Service targets.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use remora_tests::netns::{NamespacePair, in_namespace, missing_prerequisite};
use remora_tests::process::ChildGuard;
use remora_tests::{wait_for, workspace_binary};

fn control_plane_container() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/remora.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/remora.yaml");
    let documents = xds_api::json::parse_yaml_documents(&text).expect("manifests are YAML");
    documents
        .into_iter()
        .find(|doc| doc["kind"] == "Deployment" && doc["metadata"]["name"] == "remora-cp")
        .map(|doc| doc["spec"]["template"]["spec"]["containers"][0].clone())
        .expect("a remora-cp Deployment")
}

#[test]
fn control_plane_deployment_command_line_serves_xds_on_its_container_port() {
    if let Some(reason) = missing_prerequisite(&["ip"]) {
        remora_tests::skip(
            "control_plane_deployment_command_line_serves_xds_on_its_container_port",
            &reason,
        );
        return;
    }
    let container = control_plane_container();
    assert_eq!(container["command"][0], "remora-cp", "{container}");
    let port = container["ports"][0]["containerPort"]
        .as_u64()
        .expect("containerPort") as u16;
    let data = tempfile::tempdir().unwrap();
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("string arg").to_string())
        // The data directory is a volume in the pod; here, a temporary directory.
        .map(|arg| {
            if arg.starts_with("/var/lib/") {
                data.path().display().to_string()
            } else {
                arg
            }
        })
        .collect();

    let namespaces = NamespacePair::create(
        &format!("remora-dep-{}", std::process::id()),
        "198.18.9.1/24",
        "198.18.9.2/24",
    );
    let pod = namespaces.left.clone();
    // `--kubernetes` uses the pod's ServiceAccount in a cluster; here, a kubeconfig for an API
    // server that is not there: xDS is served while the Kubernetes source keeps retrying.
    let kubeconfig = data.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: none, user: {token: none}}]\n\
         contexts: [{name: none, context: {cluster: none, user: none}}]\ncurrent-context: none\n",
    )
    .unwrap();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &pod])
        .arg(workspace_binary("remora-cp"))
        .args(&args)
        .env("KUBECONFIG", &kubeconfig);
    let mut control_plane = ChildGuard::spawn("remora-cp", command);
    // Reachable on the pod's own address, as the Service would reach it.
    let pod_addr: SocketAddr = format!("198.18.9.1:{port}").parse().unwrap();
    wait_for(
        "remora-cp serving xDS on the pod address",
        Duration::from_secs(20),
        || {
            assert!(
                control_plane.try_wait().is_none(),
                "remora-cp rejected the manifest's arguments {args:?}:\n{}",
                control_plane.log()
            );
            let pod = pod.clone();
            in_namespace(&pod, move || {
                TcpStream::connect_timeout(&pod_addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ())
            })
        },
    );
}
