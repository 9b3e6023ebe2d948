//! Install manifests (`remora-injector manifests`): the namespace, the control plane, the
//! injector, their RBAC and the MutatingWebhookConfiguration, as multi-document YAML.
//! `deploy/remora.yaml` is this output with default flags; a test keeps the two equal.

use base64::Engine;
use serde_json::{Value, json};

use crate::config::{DEFAULT_INIT_IMAGE, DEFAULT_PROXY_IMAGE};
use crate::inject::{INJECT_KEY, NAMESPACE_LABEL, SYSTEM_NAMESPACES};

/// Namespace Remora's own components run in (never injected).
pub const NAMESPACE: &str = "remora-system";
/// Port the control plane serves xDS on; matches [`crate::config::DEFAULT_XDS_ADDRESS`].
pub const XDS_PORT: u16 = 18000;
/// Port the injector's HTTPS server listens on inside its pod.
pub const WEBHOOK_PORT: u16 = 9443;
/// Secret holding the webhook's serving certificate (`tls.crt`, `tls.key`).
pub const TLS_SECRET: &str = "remora-injector-tls";

/// What the webhook does when the API server cannot reach it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit the pod without a sidecar (the default; see docs/injection.md).
    Ignore,
    /// Refuse to create the pod.
    Fail,
}

/// Settings for the rendered manifests.
#[derive(clap::Args, Clone, Debug)]
pub struct ManifestConfig {
    /// Control-plane image.
    #[arg(long, default_value = "remora/control-plane:latest")]
    pub control_plane_image: String,
    /// Injector image (holds `remora-injector`).
    #[arg(long, default_value = "remora/injector:latest")]
    pub injector_image: String,
    /// Proxy image the injector injects.
    #[arg(long, default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Capture init-container image the injector injects.
    #[arg(long, default_value = DEFAULT_INIT_IMAGE)]
    pub init_image: String,
    /// failurePolicy of the webhooks.
    #[arg(long, value_enum, default_value_t = FailurePolicy::Ignore)]
    pub failure_policy: FailurePolicy,
    /// PEM file with the CA that signed the webhook's certificate; becomes the webhooks'
    /// caBundle. Without it, patch the caBundle in after install (docs/injection.md).
    #[arg(long)]
    pub ca_bundle_file: Option<std::path::PathBuf>,
}

impl Default for ManifestConfig {
    fn default() -> Self {
        Self {
            control_plane_image: "remora/control-plane:latest".to_string(),
            injector_image: "remora/injector:latest".to_string(),
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_INIT_IMAGE.to_string(),
            failure_policy: FailurePolicy::Ignore,
            ca_bundle_file: None,
        }
    }
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": "remora"})
}

fn restricted_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}
    })
}

/// Every object, in apply order.
pub fn objects(config: &ManifestConfig, ca_bundle_pem: Option<&[u8]>) -> Vec<Value> {
    let xds_address = format!("remora-cp.{NAMESPACE}.svc:{XDS_PORT}");
    let cp_labels = labels("remora-cp");
    let inj_labels = labels("remora-injector");
    let excluded_namespaces: Vec<&str> = SYSTEM_NAMESPACES
        .iter()
        .copied()
        .chain([NAMESPACE])
        .collect();
    let failure_policy = match config.failure_policy {
        FailurePolicy::Ignore => "Ignore",
        FailurePolicy::Fail => "Fail",
    };
    let mut client_config = json!({
        "service": {"name": "remora-injector", "namespace": NAMESPACE, "path": "/inject", "port": 443}
    });
    if let (Some(pem), Some(obj)) = (ca_bundle_pem, client_config.as_object_mut()) {
        obj.insert(
            "caBundle".to_string(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(pem)),
        );
    }
    let webhook = |name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": client_config,
            "rules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced"
            }],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10
        })
    };
    let not_system = json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": excluded_namespaces
    });

    vec![
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "remora"}}
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "remora-cp", "namespace": NAMESPACE, "labels": cp_labels}
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "remora-cp", "labels": cp_labels},
            // Exactly what the control plane uses with `--kubernetes` (the `ACCESS` lists of its
            // Kubernetes source, of `--xds-auth kubernetes` and of the trust bundle ConfigMaps;
            // the mesh end-to-end test runs it with this role): watchers list and watch, it
            // writes TrafficPolicy status, reviews sidecars' tokens and publishes the bundle.
            "rules": [
                {"apiGroups": [""], "resources": ["namespaces", "services", "pods"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                {"apiGroups": ["remora.io"], "resources": ["trafficpolicies"], "verbs": ["list", "watch"]},
                {"apiGroups": ["remora.io"], "resources": ["trafficpolicies/status"], "verbs": ["patch"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]}
            ]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "remora-cp", "labels": cp_labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "remora-cp"},
            "subjects": [{"kind": "ServiceAccount", "name": "remora-cp", "namespace": NAMESPACE}]
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "remora-cp", "namespace": NAMESPACE, "labels": cp_labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": cp_labels},
                "template": {
                    "metadata": {"labels": cp_labels},
                    "spec": {
                        "serviceAccountName": "remora-cp",
                        // The embedded store; a restart of the pod starts empty unless this is
                        // replaced by a PersistentVolumeClaim (or use --store etcd).
                        "volumes": [{"name": "data", "emptyDir": {}}],
                        "containers": [{
                            "name": "control-plane",
                            "image": config.control_plane_image,
                            // xDS on all interfaces so the Service reaches it; the config API
                            // stays on loopback (reach it with `kubectl port-forward`), so it
                            // needs no token. --kubernetes: sidecar config generated from the
                            // cluster, with this pod's ServiceAccount.
                            "command": ["remora-cp"],
                            "args": [
                                "--xds-addr", format!("0.0.0.0:{XDS_PORT}"),
                                "--api-addr", "127.0.0.1:19000",
                                "--data-dir", "/var/lib/remora-cp",
                                "--kubernetes"
                            ],
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/remora-cp"}],
                            "ports": [{"name": "grpc-xds", "containerPort": XDS_PORT, "protocol": "TCP"}],
                            "readinessProbe": {"tcpSocket": {"port": "grpc-xds"}, "periodSeconds": 5},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"}
                            },
                            "securityContext": restricted_security_context()
                        }]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "remora-cp", "namespace": NAMESPACE, "labels": cp_labels},
            "spec": {
                "selector": cp_labels,
                "ports": [{"name": "grpc-xds", "port": XDS_PORT, "targetPort": "grpc-xds", "protocol": "TCP", "appProtocol": "grpc"}]
            }
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "remora-injector", "namespace": NAMESPACE, "labels": inj_labels},
            "automountServiceAccountToken": false
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "remora-injector", "namespace": NAMESPACE, "labels": inj_labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": inj_labels},
                "template": {
                    "metadata": {"labels": inj_labels},
                    "spec": {
                        "serviceAccountName": "remora-injector",
                        "automountServiceAccountToken": false,
                        "containers": [{
                            "name": "injector",
                            "image": config.injector_image,
                            "args": [
                                "serve",
                                "--listen", format!("0.0.0.0:{WEBHOOK_PORT}"),
                                "--tls-cert", "/etc/remora/tls/tls.crt",
                                "--tls-key", "/etc/remora/tls/tls.key",
                                "--xds-address", xds_address,
                                "--proxy-image", config.proxy_image,
                                "--init-image", config.init_image
                            ],
                            "ports": [{"name": "https", "containerPort": WEBHOOK_PORT, "protocol": "TCP"}],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"}, "periodSeconds": 10},
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "64Mi"},
                                "limits": {"memory": "256Mi"}
                            },
                            "securityContext": restricted_security_context(),
                            "volumeMounts": [{"name": "tls", "mountPath": "/etc/remora/tls", "readOnly": true}]
                        }],
                        "volumes": [{"name": "tls", "secret": {"secretName": TLS_SECRET}}]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "remora-injector", "namespace": NAMESPACE, "labels": inj_labels},
            "spec": {
                "selector": inj_labels,
                "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
            }
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "remora-sidecar-injector", "labels": inj_labels},
            "webhooks": [
                // Namespaces labelled remora-injection=enabled: every pod unless it opts out.
                webhook(
                    "namespace.sidecar.remora.io",
                    json!({"matchExpressions": [
                        {"key": NAMESPACE_LABEL, "operator": "In", "values": ["enabled"]},
                        not_system
                    ]}),
                    json!({"matchExpressions": [
                        {"key": INJECT_KEY, "operator": "NotIn", "values": ["false"]}
                    ]}),
                ),
                // Unlabelled namespaces: only pods labelled sidecar.remora.io/inject=true.
                webhook(
                    "object.sidecar.remora.io",
                    json!({"matchExpressions": [
                        {"key": NAMESPACE_LABEL, "operator": "DoesNotExist"},
                        not_system
                    ]}),
                    json!({"matchExpressions": [
                        {"key": INJECT_KEY, "operator": "In", "values": ["true"]}
                    ]}),
                ),
            ]
        }),
    ]
}

/// The manifests as one multi-document YAML text.
pub fn render(
    config: &ManifestConfig,
    ca_bundle_pem: Option<&[u8]>,
) -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Remora install manifests, rendered by `remora-injector manifests`.\n\
         # Create the webhook's serving certificate Secret first: see docs/injection.md.\n",
    );
    let docs = objects(config, ca_bundle_pem)
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    out.push_str("---\n");
    out.push_str(&docs.join("---\n"));
    Ok(out)
}
