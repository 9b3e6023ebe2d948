//! The injection itself: decide whether a Pod gets the sidecar, then add the capture init
//! container and the proxy (with, when asked, the token and trust bundle it needs to talk
//! to the control plane), and rewrite the app's probes to the proxy's probe port
//! ([`crate::probes`]).
//!
//! Works on the Pod as JSON so that fields this build of k8s-openapi does not know survive
//! untouched (the webhook's patch is a diff of that JSON); the typed Pod is used to read
//! labels, probes and the like. The status annotation names what was added, so a second
//! injection strips it and adds it again, which yields the same Pod: injection is
//! idempotent and safe under `reinvocationPolicy: IfNeeded`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, ExecAction, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::capture;
use crate::config::InjectConfig;
use crate::ports;
use crate::probes;

/// Name of the injected proxy container.
pub const PROXY_CONTAINER: &str = "remora-proxy";
/// Name of the injected capture init container.
pub const INIT_CONTAINER: &str = "remora-init";

/// Namespace label that opts a namespace in (matched by the webhook's namespaceSelector).
pub const NAMESPACE_LABEL: &str = "remora-injection";
/// Pod label (opt in or out) and annotation (opt out) that control injection.
pub const INJECT_KEY: &str = "sidecar.remora.io/inject";
/// Annotation recording what was injected.
pub const STATUS_ANNOTATION: &str = "sidecar.remora.io/status";
/// Annotation choosing native (`"true"`) or legacy (`"false"`) sidecar mode.
pub const NATIVE_SIDECAR_ANNOTATION: &str = "sidecar.remora.io/nativeSidecar";
/// Annotation overriding the proxy image.
pub const PROXY_IMAGE_ANNOTATION: &str = "sidecar.remora.io/proxyImage";
/// Annotations overriding the proxy's resources.
pub const PROXY_CPU_ANNOTATION: &str = "sidecar.remora.io/proxyCPU";
pub const PROXY_MEMORY_ANNOTATION: &str = "sidecar.remora.io/proxyMemory";
pub const PROXY_CPU_LIMIT_ANNOTATION: &str = "sidecar.remora.io/proxyCPULimit";
pub const PROXY_MEMORY_LIMIT_ANNOTATION: &str = "sidecar.remora.io/proxyMemoryLimit";
/// Annotation that, when `"false"`, keeps the ports of probes that are not rewritten
/// captured (see docs/injection.md, "Probes").
pub const EXCLUDE_PROBE_PORTS_ANNOTATION: &str = "sidecar.remora.io/excludeProbePorts";
/// Annotations that, `"true"` or `"false"`, override `--xds-auth` and `--xds-tls` per pod.
pub const XDS_AUTH_ANNOTATION: &str = "sidecar.remora.io/xdsAuth";
pub const XDS_TLS_ANNOTATION: &str = "sidecar.remora.io/xdsTLS";
/// Capture annotations, passed to `remora-init` as flags.
pub const INCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.remora.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "traffic.remora.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "traffic.remora.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_RANGES_ANNOTATION: &str = "traffic.remora.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_RANGES_ANNOTATION: &str = "traffic.remora.io/excludeOutboundIPRanges";

/// The projected ServiceAccount token the proxy authenticates to the control plane with.
pub const TOKEN_VOLUME: &str = "remora-xds-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/remora/tokens";
pub const TOKEN_FILE: &str = "xds-token";
/// The trust bundle the control plane publishes into each injected namespace, and where
/// the proxy finds it.
pub const CA_VOLUME: &str = "remora-ca-root-cert";
pub const CA_CONFIG_MAP: &str = "remora-ca-root-cert";
pub const CA_DIR: &str = "/var/run/secrets/remora/ca";
pub const CA_FILE: &str = "root-cert.pem";
/// Name of the certificate secret the proxy makes itself by CSR (`--csr-secret`).
pub const CSR_SECRET: &str = "remora-workload-cert";

/// Namespaces that never get a sidecar.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Why a pod could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("object is not a valid Pod: {0}")]
    InvalidPod(String),
    #[error("annotation {key}={value:?} is invalid: {reason}")]
    InvalidAnnotation {
        key: String,
        value: String,
        reason: String,
    },
    #[error("pod already has a container named {0:?} that remora did not inject")]
    NameConflict(String),
    #[error("pod already has a volume named {0:?} that remora did not inject")]
    VolumeConflict(String),
}

/// The result of injecting one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The pod as it should be created (identical to the input if it was injected already),
    /// and what was left undone in it, and why (a probe that could not be rewritten).
    Injected { pod: Value, warnings: Vec<String> },
    /// The pod is left alone, for the given reason.
    Skipped(String),
}

/// What the status annotation records: enough to strip an earlier injection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InjectionStatus {
    init_containers: Vec<String>,
    containers: Vec<String>,
    native_sidecar: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<String>,
}

fn lookup<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.as_ref()?.get(key).map(String::as_str)
}

/// Decides whether a pod is to be injected; `Some(reason)` means skip.
///
/// Opt-in is expressed through label selectors the API server evaluates (namespace label
/// or pod label), so by the time a pod reaches us it has opted in; what remains is every
/// rule a selector cannot express.
pub fn skip_reason(pod: &Pod, namespace: Option<&str>) -> Option<String> {
    if let Some(ns) = namespace.filter(|ns| SYSTEM_NAMESPACES.contains(ns)) {
        return Some(format!("namespace {ns} is never injected"));
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some("pod uses hostNetwork".to_string());
    }
    let meta = &pod.metadata;
    for (what, map) in [("label", &meta.labels), ("annotation", &meta.annotations)] {
        if lookup(map, INJECT_KEY).map(str::trim) == Some("false") {
            return Some(format!("pod {what} {INJECT_KEY}=false"));
        }
    }
    None
}

/// Injects one pod given as JSON. `namespace` is where it is created (the admission
/// request's namespace wins over an absent `metadata.namespace`).
pub fn inject_pod(
    raw: &Value,
    namespace: Option<&str>,
    config: &InjectConfig,
) -> Result<Outcome, InjectError> {
    let pod: Pod =
        serde_json::from_value(raw.clone()).map_err(|e| InjectError::InvalidPod(e.to_string()))?;
    let namespace = namespace.or(pod.metadata.namespace.as_deref());
    if pod.spec.is_none() {
        return Err(InjectError::InvalidPod("missing spec".to_string()));
    }
    if let Some(reason) = skip_reason(&pod, namespace) {
        return Ok(Outcome::Skipped(reason));
    }

    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let previous: InjectionStatus = annotations
        .get(STATUS_ANNOTATION)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();

    let previous_probes = if previous
        .init_containers
        .iter()
        .chain(&previous.containers)
        .any(|c| c == PROXY_CONTAINER)
    {
        probes::previous_originals(raw, PROXY_CONTAINER)
    } else {
        BTreeMap::new()
    };
    let mut out = raw.clone();
    strip_previous(&mut out, &previous)?;

    let rewrite_probes = bool_annotation(
        &annotations,
        probes::REWRITE_PROBES_ANNOTATION,
        config.rewrite_app_probes,
    )?;
    let rewritten = probes::rewrite(&mut out, &previous_probes, rewrite_probes);
    let rewritten_pod: Pod =
        serde_json::from_value(out.clone()).map_err(|e| InjectError::InvalidPod(e.to_string()))?;

    let plan = Plan::from_pod(&rewritten_pod, &annotations, config, rewritten.originals)?;
    let init = plan.init_container(config);
    let proxy = plan.proxy_container(config);
    let to_json = |c: &Container| serde_json::to_value(c).unwrap_or(Value::Null);
    let to_json_volume = |v: &Volume| serde_json::to_value(v).unwrap_or(Value::Null);

    let spec = out
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| InjectError::InvalidPod("spec is not an object".to_string()))?;
    let volumes = plan.volumes(config);
    let volume_names: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    if !volumes.is_empty() {
        let mut all = take_array(spec, "volumes");
        all.extend(volumes.iter().map(to_json_volume));
        spec.insert("volumes".to_string(), Value::Array(all));
    }
    let user_inits = take_array(spec, "initContainers");
    let app_containers = take_array(spec, "containers");
    let status = if plan.native_sidecar {
        // remora-init, then the proxy, then the user's init containers: those get a
        // working network through a proxy that is already up.
        let mut inits = vec![to_json(&init), to_json(&proxy)];
        inits.extend(user_inits);
        spec.insert("initContainers".to_string(), Value::Array(inits));
        spec.insert("containers".to_string(), Value::Array(app_containers));
        InjectionStatus {
            init_containers: vec![INIT_CONTAINER.to_string(), PROXY_CONTAINER.to_string()],
            containers: vec![],
            native_sidecar: true,
            volumes: volume_names,
        }
    } else {
        // Capture goes last among init containers, so the user's run before the redirect
        // exists (no proxy is running yet to answer it); the proxy goes first among
        // containers and its postStart hook holds the others until it is ready.
        let mut inits = user_inits;
        inits.push(to_json(&init));
        let mut containers = vec![to_json(&proxy)];
        containers.extend(app_containers);
        spec.insert("initContainers".to_string(), Value::Array(inits));
        spec.insert("containers".to_string(), Value::Array(containers));
        InjectionStatus {
            init_containers: vec![INIT_CONTAINER.to_string()],
            containers: vec![PROXY_CONTAINER.to_string()],
            native_sidecar: false,
            volumes: volume_names,
        }
    };

    let status_text = serde_json::to_string(&status).unwrap_or_default();
    let metadata = out
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| InjectError::InvalidPod("metadata is not an object".to_string()))?;
    let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
    if !annotations.is_object() {
        *annotations = json!({});
    }
    if let Some(map) = annotations.as_object_mut() {
        map.insert(STATUS_ANNOTATION.to_string(), Value::String(status_text));
    }
    Ok(Outcome::Injected {
        pod: out,
        warnings: rewritten.warnings,
    })
}

/// A `"true"`/`"false"` annotation, `default` when absent.
fn bool_annotation(
    annotations: &BTreeMap<String, String>,
    key: &str,
    default: bool,
) -> Result<bool, InjectError> {
    match annotations.get(key).map(|v| v.trim()) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(invalid(key, other, "expected true or false")),
    }
}

fn take_array(spec: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match spec.remove(key) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

/// The `name` of a container or volume (JSON).
fn item_name(c: &Value) -> Option<&str> {
    c.get("name").and_then(Value::as_str)
}

/// Removes what an earlier injection added (per its status annotation), refuses pods that
/// carry our container or volume names otherwise.
fn strip_previous(out: &mut Value, previous: &InjectionStatus) -> Result<(), InjectError> {
    if let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        for (key, names) in [
            ("initContainers", &previous.init_containers),
            ("containers", &previous.containers),
        ] {
            if let Some(Value::Array(items)) = spec.get_mut(key) {
                items.retain(|c| !item_name(c).is_some_and(|n| names.iter().any(|x| x == n)));
            }
            if spec
                .get(key)
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty)
                && key == "initContainers"
            {
                spec.remove(key);
            }
        }
        if let Some(Value::Array(items)) = spec.get_mut("volumes") {
            items
                .retain(|v| !item_name(v).is_some_and(|n| previous.volumes.iter().any(|x| x == n)));
            if items.is_empty() {
                spec.remove("volumes");
            }
        }
    }
    let pod: Pod =
        serde_json::from_value(out.clone()).map_err(|e| InjectError::InvalidPod(e.to_string()))?;
    let spec = pod.spec.as_ref();
    let all = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    for c in all {
        if c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER {
            return Err(InjectError::NameConflict(c.name.clone()));
        }
    }
    for volume in spec.into_iter().flat_map(|s| s.volumes.iter().flatten()) {
        if volume.name == TOKEN_VOLUME || volume.name == CA_VOLUME {
            return Err(InjectError::VolumeConflict(volume.name.clone()));
        }
    }
    Ok(())
}

/// Everything decided about one pod before containers are built.
struct Plan {
    native_sidecar: bool,
    proxy_image: String,
    requests: BTreeMap<String, Quantity>,
    limits: BTreeMap<String, Quantity>,
    node_cluster: String,
    init_args: Vec<String>,
    xds_auth: bool,
    xds_tls: bool,
    /// The app's original probes by rewritten path; empty when none was rewritten.
    app_probes: BTreeMap<String, Value>,
}

fn invalid(key: &str, value: &str, reason: impl ToString) -> InjectError {
    InjectError::InvalidAnnotation {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Checks the shape of a Kubernetes quantity (`100m`, `1.5`, `128Mi`, `1e3`), so a typo in
/// an annotation is reported by us rather than by the API server about a container the
/// user never wrote.
fn valid_quantity(text: &str) -> bool {
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number_ok =
        !number.is_empty() && number.chars().filter(|c| *c == '.').count() <= 1 && number != ".";
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .is_some_and(|exp| !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

impl Plan {
    fn from_pod(
        pod: &Pod,
        annotations: &BTreeMap<String, String>,
        config: &InjectConfig,
        app_probes: BTreeMap<String, Value>,
    ) -> Result<Self, InjectError> {
        let get = |key: &str| annotations.get(key).map(|v| v.trim());

        let native_sidecar = bool_annotation(
            annotations,
            NATIVE_SIDECAR_ANNOTATION,
            !config.legacy_sidecar,
        )?;

        let proxy_image = match get(PROXY_IMAGE_ANNOTATION) {
            Some("") => return Err(invalid(PROXY_IMAGE_ANNOTATION, "", "empty image")),
            Some(image) => image.to_string(),
            None => config.proxy_image.clone(),
        };

        let quantity = |key: &str, default: &str| -> Result<Quantity, InjectError> {
            let value = get(key).unwrap_or(default);
            if valid_quantity(value) {
                Ok(Quantity(value.to_string()))
            } else {
                Err(invalid(key, value, "not a Kubernetes quantity"))
            }
        };
        let requests = BTreeMap::from([
            (
                "cpu".to_string(),
                quantity(PROXY_CPU_ANNOTATION, &config.proxy_cpu)?,
            ),
            (
                "memory".to_string(),
                quantity(PROXY_MEMORY_ANNOTATION, &config.proxy_memory)?,
            ),
        ]);
        let limits = BTreeMap::from([
            (
                "cpu".to_string(),
                quantity(PROXY_CPU_LIMIT_ANNOTATION, &config.proxy_cpu_limit)?,
            ),
            (
                "memory".to_string(),
                quantity(PROXY_MEMORY_LIMIT_ANNOTATION, &config.proxy_memory_limit)?,
            ),
        ]);

        let labels = pod.metadata.labels.as_ref();
        let spec = pod.spec.as_ref();
        let node_cluster = labels
            .and_then(|l| l.get("app"))
            .filter(|v| !v.is_empty())
            .or_else(|| spec.and_then(|s| s.service_account_name.as_ref()))
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| "default".to_string());

        let init_args = Self::init_args(pod, &get, !app_probes.is_empty())?;
        let xds_auth = bool_annotation(annotations, XDS_AUTH_ANNOTATION, config.xds_auth)?;
        let xds_tls = bool_annotation(annotations, XDS_TLS_ANNOTATION, config.xds_tls)?;

        Ok(Self {
            native_sidecar,
            proxy_image,
            requests,
            limits,
            node_cluster,
            init_args,
            xds_auth,
            xds_tls,
            app_probes,
        })
    }

    /// `remora-init` flags from the capture annotations, validated here so a bad value
    /// fails the injection instead of crash-looping the pod's init container. `pod` has its
    /// probes rewritten already, so the probe ports it shows are the ones still probed
    /// directly; `probes_rewritten` says the probe port must be reachable.
    fn init_args<'a>(
        pod: &Pod,
        get: &impl Fn(&str) -> Option<&'a str>,
        probes_rewritten: bool,
    ) -> Result<Vec<String>, InjectError> {
        let mut args = vec![
            "--inbound-port".to_string(),
            ports::INBOUND.to_string(),
            "--outbound-port".to_string(),
            ports::OUTBOUND.to_string(),
            "--proxy-uid".to_string(),
            ports::PROXY_UID.to_string(),
            "--proxy-gid".to_string(),
            ports::PROXY_UID.to_string(),
        ];

        if let Some(v) = get(INCLUDE_INBOUND_PORTS_ANNOTATION) {
            capture::parse_port_set(v)
                .map_err(|e| invalid(INCLUDE_INBOUND_PORTS_ANNOTATION, v, e))?;
            args.extend(["--include-inbound-ports".to_string(), v.replace(' ', "")]);
        }

        let mut excluded_inbound: BTreeSet<u16> = BTreeSet::new();
        if let Some(v) = get(EXCLUDE_INBOUND_PORTS_ANNOTATION) {
            let ports = capture::parse_ports(v)
                .map_err(|e| invalid(EXCLUDE_INBOUND_PORTS_ANNOTATION, v, e))?;
            excluded_inbound.extend(ports);
        }
        let exclude_probes = match get(EXCLUDE_PROBE_PORTS_ANNOTATION) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(invalid(
                    EXCLUDE_PROBE_PORTS_ANNOTATION,
                    other,
                    "expected true or false",
                ));
            }
        };
        if exclude_probes {
            excluded_inbound.extend(probe_ports(pod));
        }
        if probes_rewritten {
            excluded_inbound.insert(ports::PROBES);
        }
        if !excluded_inbound.is_empty() {
            let list: Vec<u16> = excluded_inbound.into_iter().collect();
            args.extend([
                "--exclude-inbound-ports".to_string(),
                capture::format_ports(&list),
            ]);
        }

        if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS_ANNOTATION) {
            let ports = capture::parse_ports(v)
                .map_err(|e| invalid(EXCLUDE_OUTBOUND_PORTS_ANNOTATION, v, e))?;
            if !ports.is_empty() {
                args.extend([
                    "--exclude-outbound-ports".to_string(),
                    capture::format_ports(&ports),
                ]);
            }
        }
        for (key, flag) in [
            (
                INCLUDE_OUTBOUND_RANGES_ANNOTATION,
                "--include-outbound-cidrs",
            ),
            (
                EXCLUDE_OUTBOUND_RANGES_ANNOTATION,
                "--exclude-outbound-cidrs",
            ),
        ] {
            if let Some(v) = get(key) {
                let text = if v == "*" {
                    "*".to_string()
                } else {
                    let cidrs = capture::parse_cidrs(v).map_err(|e| invalid(key, v, e))?;
                    cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                if key == EXCLUDE_OUTBOUND_RANGES_ANNOTATION && text == "*" {
                    return Err(invalid(key, v, "use an include list to capture nothing"));
                }
                args.extend([flag.to_string(), text]);
            }
        }
        Ok(args)
    }

    fn wait_ready_command(timeout_s: u32) -> Vec<String> {
        vec![
            "remora-proxy".to_string(),
            "wait-ready".to_string(),
            "--admin-port".to_string(),
            ports::ADMIN.to_string(),
            "--timeout-s".to_string(),
            timeout_s.to_string(),
        ]
    }

    fn proxy_container(&self, config: &InjectConfig) -> Container {
        let field_env = |name: &str, path: &str| EnvVar {
            name: name.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".to_string()),
                    field_path: path.to_string(),
                }),
                ..Default::default()
            }),
        };
        let value_env = |name: &str, value: &str| EnvVar {
            name: name.to_string(),
            value: Some(value.to_string()),
            value_from: None,
        };
        // Order matters: REMORA_NODE_ID expands $(POD_NAME) and $(POD_NAMESPACE), which
        // Kubernetes resolves only from variables defined earlier in the list.
        let mut env = vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            value_env("REMORA_NODE_ID", "$(POD_NAME).$(POD_NAMESPACE)"),
            value_env("REMORA_NODE_CLUSTER", &self.node_cluster),
            value_env("REMORA_XDS_ADDRESS", &config.xds_address),
            value_env("REMORA_ADMIN_PORT", &ports::ADMIN.to_string()),
            value_env("REMORA_INBOUND_PORT", &ports::INBOUND.to_string()),
            value_env("REMORA_OUTBOUND_PORT", &ports::OUTBOUND.to_string()),
        ];
        let mut mounts = Vec::new();
        if self.xds_auth {
            env.push(value_env(
                "REMORA_XDS_TOKEN_FILE",
                &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
            ));
            env.push(value_env("REMORA_CSR_SECRET", CSR_SECRET));
            mounts.push(VolumeMount {
                name: TOKEN_VOLUME.to_string(),
                mount_path: TOKEN_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        if self.xds_tls {
            env.push(value_env("REMORA_XDS_CA", &format!("{CA_DIR}/{CA_FILE}")));
            if let Some(san) = &config.xds_san {
                env.push(value_env("REMORA_XDS_SAN", san));
            }
            mounts.push(VolumeMount {
                name: CA_VOLUME.to_string(),
                mount_path: CA_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        if !self.app_probes.is_empty() {
            env.push(value_env(
                probes::PROBE_PORT_ENV,
                &ports::PROBES.to_string(),
            ));
            env.push(value_env(
                probes::APP_PROBES_ENV,
                &probes::env_value(&self.app_probes),
            ));
        }

        // The admin listener is on 127.0.0.1, which kubelet's httpGet cannot reach, so
        // readiness is checked from inside the container. Each probe attempt is short;
        // the startup budget comes from failureThreshold.
        let quick_check = || ExecAction {
            command: Some(Self::wait_ready_command(1)),
        };
        let startup_probe = Probe {
            exec: Some(quick_check()),
            period_seconds: Some(1),
            timeout_seconds: Some(3),
            failure_threshold: Some(config.ready_timeout_s.max(1) as i32),
            ..Default::default()
        };
        let readiness_probe = Probe {
            exec: Some(quick_check()),
            period_seconds: Some(10),
            timeout_seconds: Some(3),
            failure_threshold: Some(3),
            ..Default::default()
        };
        let uid = i64::from(ports::PROXY_UID);

        let mut container = Container {
            name: PROXY_CONTAINER.to_string(),
            image: Some(self.proxy_image.clone()),
            image_pull_policy: Some(config.image_pull_policy.clone()),
            command: Some(vec![
                "remora-proxy".to_string(),
                "--bootstrap-from-env".to_string(),
            ]),
            env: Some(env),
            volume_mounts: (!mounts.is_empty()).then_some(mounts),
            resources: Some(ResourceRequirements {
                requests: Some(self.requests.clone()),
                limits: Some(self.limits.clone()),
                ..Default::default()
            }),
            readiness_probe: Some(readiness_probe),
            security_context: Some(SecurityContext {
                run_as_user: Some(uid),
                run_as_group: Some(uid),
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    add: None,
                    drop: Some(vec!["ALL".to_string()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        if self.native_sidecar {
            container.restart_policy = Some("Always".to_string());
            container.startup_probe = Some(startup_probe);
        } else {
            container.lifecycle = Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(Self::wait_ready_command(config.ready_timeout_s)),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        container
    }

    /// The volumes the proxy mounts: the projected token (`xds_auth`) and the trust bundle
    /// (`xds_tls`).
    ///
    /// The bundle's ConfigMap is not optional, as in Istio: without it the proxy cannot
    /// verify the control plane and would only crash-loop, so the pod waits at volume setup
    /// with an event naming the missing ConfigMap, and starts by itself once the control
    /// plane has published it. The token always exists (the kubelet requests it).
    fn volumes(&self, config: &InjectConfig) -> Vec<Volume> {
        let mut volumes = Vec::new();
        if self.xds_auth {
            volumes.push(Volume {
                name: TOKEN_VOLUME.to_string(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(config.xds_token_audience.clone()),
                            expiration_seconds: Some(i64::from(config.xds_token_expiration_s)),
                            path: TOKEN_FILE.to_string(),
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if self.xds_tls {
            volumes.push(Volume {
                name: CA_VOLUME.to_string(),
                config_map: Some(ConfigMapVolumeSource {
                    name: CA_CONFIG_MAP.to_string(),
                    optional: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        volumes
    }

    fn init_container(&self, config: &InjectConfig) -> Container {
        Container {
            name: INIT_CONTAINER.to_string(),
            image: Some(config.init_image.clone()),
            image_pull_policy: Some(config.image_pull_policy.clone()),
            command: Some(vec!["remora-init".to_string()]),
            args: Some(self.init_args.clone()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("10m".to_string())),
                    ("memory".to_string(), Quantity("16Mi".to_string())),
                ])),
                limits: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("100m".to_string())),
                    ("memory".to_string(), Quantity("64Mi".to_string())),
                ])),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                run_as_user: Some(0),
                run_as_group: Some(0),
                run_as_non_root: Some(false),
                allow_privilege_escalation: Some(false),
                privileged: Some(false),
                capabilities: Some(Capabilities {
                    add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                    drop: Some(vec!["ALL".to_string()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Ports kubelet probes in the app's containers (httpGet, tcpSocket and gRPC probes, and
/// httpGet/tcpSocket lifecycle hooks), with named ports resolved; probes the injector
/// rewrote show up as the probe port. Unresolvable names are left out: there is no
/// port to exclude.
pub fn probe_ports(pod: &Pod) -> BTreeSet<u16> {
    let mut found = BTreeSet::new();
    let Some(spec) = pod.spec.as_ref() else {
        return found;
    };
    let sidecar_inits = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    for container in spec.containers.iter().chain(sidecar_inits) {
        let resolve = |port: &IntOrString| -> Option<u16> {
            match port {
                IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
        };
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        // A probe of another host never reaches this pod: nothing to exclude for it.
        let local = |host: &Option<String>| host.as_deref().is_none_or(str::is_empty);
        for probe in probes.into_iter().flatten() {
            if let Some(h) = probe.http_get.as_ref().filter(|h| local(&h.host)) {
                found.extend(resolve(&h.port));
            }
            if let Some(t) = probe.tcp_socket.as_ref().filter(|t| local(&t.host)) {
                found.extend(resolve(&t.port));
            }
            if let Some(g) = &probe.grpc {
                found.extend(u16::try_from(g.port).ok().filter(|p| *p != 0));
            }
        }
        let hooks = container
            .lifecycle
            .iter()
            .flat_map(|l| [&l.post_start, &l.pre_stop])
            .flatten();
        for hook in hooks {
            if let Some(h) = &hook.http_get {
                found.extend(resolve(&h.port));
            }
            if let Some(t) = &hook.tcp_socket {
                found.extend(resolve(&t.port));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["100m", "1", "1.5", "128Mi", "2Gi", "1e3", "500k"] {
            assert!(valid_quantity(ok), "{ok} should be valid");
        }
        for bad in ["", "abc", "1..2", "10 m", "1Xi", "-1", "m"] {
            assert!(!valid_quantity(bad), "{bad} should be invalid");
        }
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap_or_default()
    }

    #[test]
    fn skip_rules() {
        let base = |extra: Value| {
            let mut p = json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}});
            if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    p.insert(k.clone(), v.clone());
                }
            }
            pod(p)
        };
        assert_eq!(skip_reason(&base(json!({})), Some("default")), None);
        assert!(skip_reason(&base(json!({})), Some("kube-system")).is_some());
        assert!(skip_reason(&base(json!({})), Some("kube-node-lease")).is_some());
        let host = base(json!({"spec": {"hostNetwork": true, "containers": [{"name": "a"}]}}));
        assert!(skip_reason(&host, None).is_some());
        let label = base(json!({"metadata": {"labels": {INJECT_KEY: "false"}}}));
        assert!(skip_reason(&label, None).is_some());
        let ann = base(json!({"metadata": {"annotations": {INJECT_KEY: "false"}}}));
        assert!(skip_reason(&ann, None).is_some());
        let yes = base(json!({"metadata": {"labels": {INJECT_KEY: "true"}}}));
        assert_eq!(skip_reason(&yes, None), None);
    }
}
