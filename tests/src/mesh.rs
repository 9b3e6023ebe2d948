//! Running a mesh for end-to-end tests: a `remora-cp` with mesh generation on, reached from the
//! pod network through a relay, and sidecars started in pods the way the injected pod spec
//! starts them (the capture init command as root, the proxy as uid 1337 with its environment).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::pods::{NODE_IP, PodNet, Relay, run_in_pod, sidecar_admin, spawn_in_pod};
use crate::process::ChildGuard;
use crate::{free_port, http_request, wait_for, workspace_binary};

/// The port sidecars use to reach the control plane (on the node's bridge address).
pub const XDS_PORT: u16 = 18000;
pub const PROXY_UID: u32 = 1337;

/// A running `remora-cp` and the relay that lets pods reach its xDS port.
pub struct ControlPlane {
    pub process: ChildGuard,
    pub api: SocketAddr,
    pub xds: SocketAddr,
    _relay: Relay,
    _data: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts `remora-cp` with `args` (e.g. `--mesh`) and relays `NODE_IP:18000` inside the
    /// node namespace to its xDS port.
    pub fn start(node_netns: &str, args: &[&str], env: &[(&str, &str)]) -> ControlPlane {
        let data = tempfile::tempdir().expect("data dir");
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let xds = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(workspace_binary("remora-cp"));
        command
            .args([
                "--api-addr",
                &api.to_string(),
                "--xds-addr",
                &xds.to_string(),
            ])
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,remora_control_plane=debug");
        let process = ChildGuard::spawn("remora-cp", command);
        wait_for("remora-cp's API", Duration::from_secs(30), || {
            http_request(api, "GET", "/healthz", &[], "")
                .ok()
                .map(|_| ())
        });
        let relay = Relay::start(node_netns, SocketAddr::from((NODE_IP, XDS_PORT)), xds);
        ControlPlane {
            process,
            api,
            xds,
            _relay: relay,
            _data: data,
        }
    }

    /// A request to the config API; the status and the JSON answer.
    pub fn call(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, _, text) = http_request(
            self.api,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
        )
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// PUT that must succeed.
    pub fn put(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.call("PUT", path, &body);
        assert_eq!(status, 200, "PUT {path}: {answer}");
        answer
    }

    /// The connected proxies as `GET /v1/proxies` lists them.
    pub fn proxies(&self) -> Vec<Value> {
        let (_, answer) = self.call("GET", "/v1/proxies", &Value::Null);
        answer["proxies"].as_array().cloned().unwrap_or_default()
    }

    /// Whether the proxy with `node_id` has ACKed every type it asked for and NACKed none
    /// since.
    pub fn in_sync(&self, node_id: &str) -> bool {
        self.proxies().iter().any(|proxy| {
            proxy["node_id"] == node_id
                && proxy["types"].as_object().is_some_and(|types| {
                    !types.is_empty()
                        && types.values().all(|status| {
                            status["pending_nonce"].is_null() && status["last_nack"].is_null()
                        })
                })
        })
    }
}

/// A sidecar as the injector's pod spec describes it: init command and args, proxy command,
/// args and environment (already expanded the way the kubelet expands `$(VAR)`).
#[derive(Clone, Debug)]
pub struct SidecarSpec {
    pub init_command: Vec<String>,
    pub proxy_command: Vec<String>,
    pub proxy_env: Vec<(String, String)>,
    pub proxy_uid: u32,
}

impl SidecarSpec {
    /// What `remora-injector` injects for `pod` of `namespace` with the xDS address on the node.
    pub fn injected(pod: &str, namespace: &str, group: &str) -> SidecarSpec {
        let env = [
            ("POD_NAME", pod.to_string()),
            ("POD_NAMESPACE", namespace.to_string()),
            ("SERVICE_ACCOUNT", "default".to_string()),
            ("REMORA_NODE_ID", format!("{pod}.{namespace}")),
            ("REMORA_NODE_CLUSTER", group.to_string()),
            ("REMORA_XDS_ADDRESS", format!("{NODE_IP}:{XDS_PORT}")),
            ("REMORA_ADMIN_PORT", "15000".to_string()),
            ("REMORA_INBOUND_PORT", "15006".to_string()),
            ("REMORA_OUTBOUND_PORT", "15001".to_string()),
        ];
        SidecarSpec {
            init_command: [
                "remora-init",
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001",
                "--proxy-uid",
                "1337",
                "--proxy-gid",
                "1337",
                "--no-ipv6",
            ]
            .map(String::from)
            .to_vec(),
            proxy_command: vec!["remora-proxy".into(), "--bootstrap-from-env".into()],
            proxy_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            proxy_uid: PROXY_UID,
        }
    }
}

/// Runs the init command in the pod, then starts the proxy; waits for its `/ready`.
pub fn start_sidecar(pod: &PodNet, spec: &SidecarSpec) -> ChildGuard {
    run_in_pod(pod, &spec.init_command);
    let mut proxy = spawn_in_pod(
        &format!("sidecar-{}", pod.name),
        pod,
        &spec.proxy_command,
        &spec.proxy_env,
        spec.proxy_uid,
        spec.proxy_uid,
    );
    wait_for(
        &format!("the sidecar of {} to be ready", pod.name),
        Duration::from_secs(60),
        || {
            assert!(
                proxy.try_wait().is_none(),
                "the sidecar of {} exited:\n{}",
                pod.name,
                proxy.log()
            );
            sidecar_admin(pod, "/ready")
                .filter(|body| body.contains("LIVE"))
                .map(|_| ())
        },
    );
    proxy
}

/// A real Envoy as the sidecar of `pod`, with the bootstrap `remora-proxy --bootstrap-from-env`
/// builds (same node id and metadata) but incremental (delta) ADS, as uid 1337.
pub fn start_envoy_sidecar(pod: &PodNet, namespace: &str, dir: &Path) -> ChildGuard {
    start_envoy_sidecar_with_token(pod, namespace, dir, None)
}

/// [`start_envoy_sidecar`], presenting `token` (an xDS bootstrap token) on its xDS stream.
pub fn start_envoy_sidecar_with_token(
    pod: &PodNet,
    namespace: &str,
    dir: &Path,
    token: Option<&str>,
) -> ChildGuard {
    use std::os::unix::fs::PermissionsExt;
    let spec = SidecarSpec::injected(&pod.name, namespace, &pod.name);
    run_in_pod(pod, &spec.init_command);
    let mut grpc_service = serde_json::json!({"envoy_grpc": {"cluster_name": "xds_cluster"}});
    if let Some(token) = token {
        grpc_service["initial_metadata"] =
            serde_json::json!([{"key": "authorization", "value": format!("Bearer {token}")}]);
    }
    let bootstrap = serde_json::json!({
        "node": {
            "id": format!("{}.{namespace}", pod.name),
            "cluster": pod.name,
            "metadata": {"REMORA_INBOUND_PORT": "15006", "REMORA_OUTBOUND_PORT": "15001"}
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3", "grpc_services": [grpc_service]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [{
            "name": "xds_cluster",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }},
            "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": NODE_IP.to_string(), "port_value": XDS_PORT}}}}]}]}
        }]}
    });
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = dir.join(format!("envoy-{}.json", pod.name));
    std::fs::write(&path, bootstrap.to_string()).expect("write bootstrap");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let command: Vec<String> = vec![
        crate::envoy::binary_in(dir).display().to_string(),
        "-c".into(),
        path.display().to_string(),
        "--concurrency".into(),
        "1".into(),
        "--disable-hot-restart".into(),
        "--log-level".into(),
        "info".into(),
        "--base-id".into(),
        (std::process::id() % 10_000 * 10 + 7).to_string(),
    ];
    let env = vec![("HOME".to_string(), "/tmp".to_string())];
    let mut envoy = spawn_in_pod(
        &format!("envoy-{}", pod.name),
        pod,
        &command,
        &env,
        PROXY_UID,
        PROXY_UID,
    );
    wait_for(
        &format!("Envoy in {} to be live", pod.name),
        Duration::from_secs(60),
        || {
            assert!(
                envoy.try_wait().is_none(),
                "Envoy in {} exited:\n{}",
                pod.name,
                envoy.log()
            );
            sidecar_admin(pod, "/ready")
                .filter(|body| body.contains("LIVE"))
                .map(|_| ())
        },
    );
    envoy
}

/// The endpoints (ip:port) the sidecar in `pod` holds for `cluster`, with their health flags,
/// from its admin `/clusters`.
pub fn cluster_hosts(pod: &PodNet, cluster: &str) -> Vec<(String, String)> {
    let body = sidecar_admin(pod, "/clusters").unwrap_or_default();
    let prefix = format!("{cluster}::");
    body.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (host, field) = rest.split_once("::")?;
            let flags = field.strip_prefix("health_flags::")?;
            host.parse::<SocketAddr>().ok()?;
            Some((host.to_string(), flags.to_string()))
        })
        .collect()
}

/// A pod address for tests: `198.18.<group>.<index>`.
pub fn pod_ip(group: u8, index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, group, index)
}
