//! Generated sidecar config is valid Envoy config, and what the control plane generates by
//! default is also accepted by today's Remora proxy.
//!
//! Every golden file of `control-plane/tests/golden/mesh/` (the resources one sidecar gets) is
//! put into a bootstrap — its clusters and listeners as static resources, each route
//! configuration inlined into a listener of its own (so Envoy also checks that the clusters it
//! names exist), ADS pointing nowhere for what they reference — and checked with
//! `envoy --mode validate`. The files generated with default settings also go through
//! `remora-proxy --mode validate`. Files of opt-in settings (policies, mesh defaults, the
//! port-listener layout) use fields the Remora proxy does not honour yet (retries, outlier
//! detection, hash policies, SDS, `bind_to_port`), so only Envoy judges them.

use std::path::{Path, PathBuf};
use std::process::Command;

use remora_tests::workspace_binary;
use serde_json::{Value, json};

fn golden_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../control-plane/tests/golden/mesh");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "golden files missing: {files:?}");
    files
}

/// A bootstrap holding every resource of one golden file.
fn bootstrap(golden: &Path) -> Value {
    let text = std::fs::read_to_string(golden).expect("golden file");
    let mut clusters = vec![json!({
        "name": "xds",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}
    })];
    let mut listeners = Vec::new();
    for document in text.split("---\n").filter(|doc| !doc.trim().is_empty()) {
        let mut value: Value = serde_yaml::from_str(document).expect("a YAML document");
        let type_url = value["@type"].as_str().unwrap_or_default().to_string();
        value.as_object_mut().expect("an object").remove("@type");
        match type_url.rsplit('.').next().unwrap_or_default() {
            "Cluster" => clusters.push(value),
            "Listener" => listeners.push(value),
            "RouteConfiguration" => {
                let port = 20_000 + listeners.len();
                listeners.push(json!({
                    "name": format!("routes-{}", value["name"].as_str().unwrap_or_default()),
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "routes",
                            "route_config": value,
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                        }
                    }]}]
                }));
            }
            // Assignments come over EDS; their shape is checked by the proxies' EDS path in
            // the end-to-end tests.
            _ => {}
        }
    }
    json!({
        "node": {"id": "validate.shop", "cluster": "validate"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": clusters, "listeners": listeners}
    })
}

fn write_bootstrap(dir: &Path, golden: &Path) -> PathBuf {
    let path = dir.join(
        golden
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .replace(".yaml", ".json"),
    );
    std::fs::write(&path, bootstrap(golden).to_string()).expect("write bootstrap");
    path
}

#[test]
fn every_generated_config_is_valid_envoy_config() {
    if !remora_tests::envoy::available_or_skip("every_generated_config_is_valid_envoy_config") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for golden in golden_files() {
        let path = write_bootstrap(dir.path(), &golden);
        if let Err(output) = remora_tests::envoy::validate(&path) {
            panic!("envoy rejects {}:\n{output}", golden.display());
        }
    }
}

#[test]
fn default_generated_config_is_accepted_by_the_remora_proxy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let defaults: Vec<PathBuf> = golden_files()
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".default.yaml"))
        .collect();
    assert!(defaults.len() >= 2, "{defaults:?}");
    for golden in defaults {
        let path = write_bootstrap(dir.path(), &golden);
        let output = Command::new(workspace_binary("remora-proxy"))
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .output()
            .expect("run remora-proxy");
        assert!(
            output.status.success(),
            "remora-proxy rejects {}:\n{}{}",
            golden.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn a_broken_config_is_rejected_by_both() {
    // The checks above can fail: two service ports with the same VIP:port (two chains with
    // one match) are refused by both proxies.
    let dir = tempfile::tempdir().expect("temp dir");
    let golden = golden_files()
        .into_iter()
        .find(|path| path.to_string_lossy().ends_with("web-a-1.default.yaml"))
        .expect("the default golden file");
    let mut config = bootstrap(&golden);
    let listeners = config["static_resources"]["listeners"]
        .as_array_mut()
        .expect("listeners");
    let outbound = listeners
        .iter_mut()
        .find(|listener| listener["name"] == "outbound")
        .expect("the outbound listener");
    let chains = outbound["filter_chains"].as_array_mut().expect("chains");
    let mut twin = chains[0].clone();
    twin["name"] = json!("twin");
    chains.push(twin);
    let path = dir.path().join("broken.json");
    std::fs::write(&path, config.to_string()).expect("write");
    let remora = Command::new(workspace_binary("remora-proxy"))
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .expect("run remora-proxy");
    assert!(
        !remora.status.success(),
        "remora-proxy accepted two chains with one match"
    );
    if remora_tests::envoy::available_or_skip("a_broken_config_is_rejected_by_both (envoy half)") {
        assert!(remora_tests::envoy::validate(&path).is_err());
    }
}
