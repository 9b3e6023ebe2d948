//! Shared pieces of the control-plane end-to-end tests: a `remora-cp` process, its API, an
//! Envoy bootstrapped with ADS at it, and the resources the tests push.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use remora_tests::process::ChildGuard;
use remora_tests::{free_port, http_request, wait_for};
use serde_json::Value;

pub const TOKEN: &str = "test-token";

/// A running `remora-cp`.
pub struct ControlPlane {
    pub process: ChildGuard,
    pub xds: SocketAddr,
    pub api: SocketAddr,
}

impl ControlPlane {
    /// Starts remora-cp on free ports with the embedded store in `data_dir`.
    pub fn start(data_dir: &Path) -> ControlPlane {
        Self::start_with(
            free_port(),
            free_port(),
            &["--data-dir", &data_dir.display().to_string()],
        )
    }

    /// Starts remora-cp on the given ports with extra arguments.
    pub fn start_with(xds_port: u16, api_port: u16, args: &[&str]) -> ControlPlane {
        let xds: SocketAddr = ([127, 0, 0, 1], xds_port).into();
        let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
        let mut command = Command::new(env!("CARGO_BIN_EXE_remora-cp"));
        command
            .args([
                "--xds-addr",
                &xds.to_string(),
                "--api-addr",
                &api.to_string(),
            ])
            .args(args)
            .env("REMORA_CP_TOKEN", TOKEN)
            .env("RUST_LOG", "info,remora_control_plane=debug");
        let process = ChildGuard::spawn("remora-cp", command);
        wait_for("remora-cp /healthz", Duration::from_secs(20), || {
            remora_tests::http_get(api, "/healthz")
                .ok()
                .filter(|(status, _, _)| *status == 200)
        });
        ControlPlane { process, xds, api }
    }

    /// An authenticated API call; returns (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        let (status, _, text) = http_request(
            self.api,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/yaml"),
            ],
            body,
        )
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /v1/apply` that must succeed; returns the new version.
    pub fn apply(&self, yaml: &str) -> u64 {
        let (status, body) = self.call("POST", "/v1/apply", yaml);
        assert_eq!(status, 200, "apply failed: {body}");
        body["version"].as_u64().expect("version in apply answer")
    }

    /// `PUT /v1/{kind}/{name}` that must succeed; returns the new version.
    pub fn put(&self, kind: &str, name: &str, yaml: &str) -> u64 {
        let (status, body) = self.call("PUT", &format!("/v1/{kind}/{name}"), yaml);
        assert_eq!(status, 200, "put failed: {body}");
        body["version"].as_u64().expect("version in put answer")
    }

    /// The proxies table entry of `node_id`, if connected.
    pub fn proxy(&self, node_id: &str) -> Option<Value> {
        let (status, body) = self.call("GET", "/v1/proxies", "");
        assert_eq!(status, 200, "proxies: {body}");
        body["proxies"]
            .as_array()?
            .iter()
            .find(|proxy| proxy["node_id"] == node_id)
            .cloned()
    }

    /// Waits until `node_id` has ACKed version `version` (or later) of xDS type `xds` (LDS, RDS...).
    pub fn wait_for_ack(&self, node_id: &str, xds: &str, version: u64) -> Value {
        wait_for(
            &format!("{node_id} to ACK {xds} version {version}"),
            Duration::from_secs(30),
            || {
                let proxy = self.proxy(node_id)?;
                let acked: u64 = proxy["types"][xds]["acked_version"]
                    .as_str()?
                    .parse()
                    .ok()?;
                (acked >= version).then_some(proxy)
            },
        )
    }
}

/// Envoy's bootstrap with ADS at `xds` (`GRPC` or `DELTA_GRPC`), admin on `admin`. It leaves
/// `set_node_on_first_message_only` at Envoy's default, so every request carries the node and
/// the control plane must skip all but the first.
pub fn envoy_bootstrap(
    dir: &Path,
    node_id: &str,
    group: &str,
    xds: SocketAddr,
    admin: SocketAddr,
    api_type: &str,
) -> std::path::PathBuf {
    let yaml = format!(
        r#"
node: {{id: {node_id}, cluster: {group}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds_cluster}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds_cluster
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: xds_cluster
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
"#,
        admin_port = admin.port(),
        xds_port = xds.port(),
    );
    let path = dir.join(format!("{node_id}.yaml"));
    std::fs::write(&path, yaml).expect("write bootstrap");
    path
}

pub fn eds_cluster(name: &str) -> String {
    format!(
        r#"
"@type": Cluster
name: {name}
connect_timeout: 1s
type: EDS
eds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}}}
"#
    )
}

pub fn endpoints(name: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
"@type": ClusterLoadAssignment
cluster_name: {name}
endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}}}}}]}}]
"#,
        ip = upstream.ip(),
        port = upstream.port()
    )
}

pub fn route(name: &str, cluster: &str) -> String {
    format!(
        r#"
"@type": RouteConfiguration
name: {name}
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: {{prefix: "/"}}
    route: {{cluster: {cluster}}}
"#
    )
}

pub fn listener(name: &str, port: u16, route_name: &str) -> String {
    format!(
        r#"
"@type": Listener
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      rds: {{route_config_name: {route_name}, config_source: {{ads: {{}}, resource_api_version: V3}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

/// Joins documents into one multi-document YAML.
pub fn documents(parts: &[String]) -> String {
    parts.join("\n---\n")
}

/// The name of the echo upstream that answered `GET /` through `addr`, if any answered.
pub fn upstream_behind(addr: SocketAddr) -> Option<String> {
    let (status, _, body) = remora_tests::http_get(addr, "/").ok()?;
    if status != 200 {
        return None;
    }
    let value: Value = serde_json::from_str(&body).ok()?;
    value["upstream"].as_str().map(str::to_string)
}

/// Waits until traffic through `addr` reaches the upstream called `expected`.
pub fn wait_for_upstream(addr: SocketAddr, expected: &str) {
    wait_for(
        &format!("traffic through {addr} to reach {expected}"),
        Duration::from_secs(30),
        || (upstream_behind(addr).as_deref() == Some(expected)).then_some(()),
    );
}

/// Skips (with a printed reason) when Envoy is not installed.
pub fn envoy_or_skip() -> bool {
    remora_tests::envoy::available_or_skip("this test")
}

/// A single-member etcd on free loopback ports with a temporary data dir.
pub struct Etcd {
    pub process: ChildGuard,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd, or returns None (after printing why) when the binary is absent.
    pub fn start() -> Option<Etcd> {
        if !remora_tests::on_path("etcd") {
            remora_tests::skip(
                "this test",
                "etcd is not on PATH (apt-get install etcd-server)",
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("etcd data dir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "remora-test", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("remora-test={peer_url}")])
            .args(["--max-txn-ops", "10000"]);
        let process = ChildGuard::spawn("etcd", command);
        let address: SocketAddr = ([127, 0, 0, 1], client).into();
        wait_for("etcd health", Duration::from_secs(30), || {
            remora_tests::http_get(address, "/health")
                .ok()
                .filter(|(status, _, body)| *status == 200 && body.contains("true"))
        });
        Some(Etcd {
            process,
            endpoint,
            _dir: dir,
        })
    }
}
