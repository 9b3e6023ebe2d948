//! What the control plane ships for Kubernetes stays true to the code: `deploy/trafficpolicy-crd.yaml`
//! is exactly `remora-cp manifests`, and the ClusterRole in `deploy/remora.yaml` grants exactly
//! the permissions it declares it uses with `--kubernetes` (the `ACCESS` lists of the Kubernetes
//! source, of `--xds-auth kubernetes` and of the trust bundle ConfigMaps) — no
//! fewer, so it works (the mesh end-to-end test runs it with that role), and no more.

use std::collections::BTreeSet;
use std::path::PathBuf;

use remora_control_plane::mesh::kubernetes::ACCESS;
use serde::Deserialize;
use serde_json::Value;

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn the_shipped_crd_is_what_remora_cp_manifests_prints() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_remora-cp"))
        .arg("manifests")
        .output()
        .expect("run remora-cp manifests");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).expect("UTF-8");
    assert_eq!(
        printed,
        deploy("trafficpolicy-crd.yaml"),
        "deploy/trafficpolicy-crd.yaml is stale: remora-cp manifests > deploy/trafficpolicy-crd.yaml"
    );
    let crd: Value = serde_yaml::from_str(&printed).expect("YAML");
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(crd["spec"]["group"], "remora.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["service"]));
    assert!(
        spec["properties"]["timeout"]["pattern"].is_string(),
        "durations are checked by the schema"
    );
}

#[test]
fn the_cluster_role_grants_exactly_what_the_kubernetes_source_uses() {
    let text = deploy("remora.yaml");
    let role = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("a YAML document"))
        .find(|object| object["kind"] == "ClusterRole" && object["metadata"]["name"] == "remora-cp")
        .expect("the remora-cp ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().expect("apiGroups") {
            for resource in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    granted.insert((
                        group.as_str().unwrap_or_default().to_string(),
                        resource.as_str().unwrap_or_default().to_string(),
                        verb.as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = ACCESS
        .iter()
        .chain(remora_control_plane::xds::kube_auth::ACCESS)
        .chain(remora_control_plane::mesh::trust_bundle::ACCESS)
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    assert_eq!(granted, used);
}
