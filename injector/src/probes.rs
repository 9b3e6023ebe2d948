//! Probe rewrite: the kubelet's HTTP, TCP and gRPC probes of the app's containers become
//! HTTP probes on the sidecar's probe port, and the originals travel to the proxy, which runs
//! them against the app from inside the pod (as Istio's injector does).
//!
//! Why: the kubelet probes the pod IP in plaintext and has no mesh certificate, so once the
//! app's port is captured and its inbound listener requires mTLS, a probe to it would fail.
//! The probe port is excluded from capture instead, and serves only these paths.
//!
//! Works on the pod's JSON (fields unknown to k8s-openapi survive), after an earlier
//! injection has been stripped. The originals from that earlier injection are passed in, so
//! probes it rewrote keep their original: re-injection yields the same pod.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::ports;

/// Annotation that, when `"false"`, leaves the app's probes as they are (Istio's
/// `sidecar.istio.io/rewriteAppHTTPProbers`).
pub const REWRITE_PROBES_ANNOTATION: &str = "sidecar.remora.io/rewriteAppHTTPProbers";
/// Proxy environment variable holding the original probes: a JSON object from each
/// rewritten path to `{"httpGet"|"tcpSocket"|"grpc": {...}, "timeoutSeconds": N}`, ports
/// resolved to numbers.
pub const APP_PROBES_ENV: &str = "REMORA_APP_PROBES";
/// Proxy environment variable naming the port the probe server listens on.
pub const PROBE_PORT_ENV: &str = "REMORA_PROBE_PORT";

/// The probe fields of a container and the last path segment each is rewritten to.
const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Kubernetes' default probe timeout, used when the probe gives none.
const DEFAULT_TIMEOUT_SECONDS: i64 = 1;

/// The rewritten path for one probe of one container.
pub fn probe_path(container: &str, kind_segment: &str) -> String {
    format!("/app-health/{container}/{kind_segment}")
}

/// What a rewrite did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rewritten {
    /// Original probes by rewritten path, for [`APP_PROBES_ENV`].
    pub originals: BTreeMap<String, Value>,
    /// Probes left as they were, and why (reported as admission warnings).
    pub warnings: Vec<String>,
}

/// Rewrites the probes of the app containers and of the pod's own native sidecars in
/// `pod` (JSON). `previous` holds the originals recorded by an earlier injection.
///
/// With `enabled` false, probes an earlier injection rewrote get their originals back and
/// nothing else changes.
pub fn rewrite(pod: &mut Value, previous: &BTreeMap<String, Value>, enabled: bool) -> Rewritten {
    let mut result = Rewritten::default();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return result;
    };
    for key in ["containers", "initContainers"] {
        let Some(Value::Array(containers)) = spec.get_mut(key) else {
            continue;
        };
        for container in containers.iter_mut() {
            // Plain init containers run to completion before the proxy exists and are
            // never probed; native sidecars (restartPolicy Always) are.
            let is_sidecar =
                container.get("restartPolicy").and_then(Value::as_str) == Some("Always");
            if key == "initContainers" && !is_sidecar {
                continue;
            }
            rewrite_container(container, previous, enabled, &mut result);
        }
    }
    result
}

fn rewrite_container(
    container: &mut Value,
    previous: &BTreeMap<String, Value>,
    enabled: bool,
    result: &mut Rewritten,
) {
    let Some(object) = container.as_object_mut() else {
        return;
    };
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let named_ports: BTreeMap<String, i64> = object
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_string(),
                p.get("containerPort")?.as_i64()?,
            ))
        })
        .collect();
    for (field, segment) in PROBE_KINDS {
        let Some(probe) = object.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        let path = probe_path(&name, segment);
        if is_rewritten(probe, &path) {
            // An earlier injection's rewrite: keep (or, when disabled, restore) its original.
            if let Some(original) = previous.get(&path) {
                if enabled {
                    result.originals.insert(path, original.clone());
                } else {
                    restore(probe, original);
                }
            }
            continue;
        }
        if !enabled {
            continue;
        }
        match original_of(probe, &named_ports) {
            Ok(Some(original)) => {
                result.originals.insert(path.clone(), original);
                for handler in ["httpGet", "tcpSocket", "grpc"] {
                    probe.remove(handler);
                }
                probe.insert(
                    "httpGet".to_string(),
                    json!({"path": path, "port": ports::PROBES, "scheme": "HTTP"}),
                );
            }
            Ok(None) => {}
            Err(reason) => result.warnings.push(format!(
                "{field} of container {name:?} not rewritten: {reason}"
            )),
        }
    }
}

/// Whether `probe` already is our HTTP probe for `path`.
fn is_rewritten(probe: &Map<String, Value>, path: &str) -> bool {
    probe.get("httpGet").is_some_and(|get| {
        get.get("path").and_then(Value::as_str) == Some(path)
            && get.get("port").and_then(Value::as_i64) == Some(i64::from(ports::PROBES))
    })
}

/// Puts an original probe's handler back in place of our HTTP probe.
fn restore(probe: &mut Map<String, Value>, original: &Value) {
    let Some(original) = original.as_object() else {
        return;
    };
    probe.remove("httpGet");
    for handler in ["httpGet", "tcpSocket", "grpc"] {
        if let Some(value) = original.get(handler) {
            probe.insert(handler.to_string(), value.clone());
        }
    }
}

/// The original probe as the proxy runs it: `Ok(None)` for probes that need no rewrite
/// (exec probes, probes of another host), `Err` for probes that cannot be rewritten.
fn original_of(
    probe: &Map<String, Value>,
    named_ports: &BTreeMap<String, i64>,
) -> Result<Option<Value>, String> {
    let timeout = probe
        .get("timeoutSeconds")
        .and_then(Value::as_i64)
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    let resolve = |port: Option<&Value>| -> Result<i64, String> {
        let number =
            match port {
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(name)) => match name.parse::<i64>() {
                    Ok(n) => Some(n),
                    Err(_) => Some(*named_ports.get(name).ok_or_else(|| {
                        format!("port name {name:?} is not a port of the container")
                    })?),
                },
                _ => None,
            };
        number
            .filter(|n| (1..=65535).contains(n))
            .ok_or_else(|| format!("port {} is not a port number", port.unwrap_or(&Value::Null)))
    };
    // A probe of another host does not go through the pod's network, so capture and mTLS
    // do not concern it.
    let has_host = |handler: &Value| {
        handler
            .get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
    };

    if let Some(get) = probe.get("httpGet") {
        if has_host(get) {
            return Ok(None);
        }
        let port = resolve(get.get("port"))?;
        let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
        if scheme != "HTTP" && scheme != "HTTPS" {
            return Err(format!("scheme {scheme:?} is neither HTTP nor HTTPS"));
        }
        let mut handler = json!({
            "path": get.get("path").and_then(Value::as_str).unwrap_or("/"),
            "port": port,
            "scheme": scheme,
        });
        if let Some(headers) = get
            .get("httpHeaders")
            .filter(|h| h.as_array().is_some_and(|a| !a.is_empty()))
        {
            handler["httpHeaders"] = headers.clone();
        }
        return Ok(Some(json!({"httpGet": handler, "timeoutSeconds": timeout})));
    }
    if let Some(tcp) = probe.get("tcpSocket") {
        if has_host(tcp) {
            return Ok(None);
        }
        let port = resolve(tcp.get("port"))?;
        return Ok(Some(
            json!({"tcpSocket": {"port": port}, "timeoutSeconds": timeout}),
        ));
    }
    if let Some(grpc) = probe.get("grpc") {
        let port = resolve(grpc.get("port"))?;
        let mut handler = json!({"port": port});
        if let Some(service) = grpc.get("service").and_then(Value::as_str) {
            handler["service"] = json!(service);
        }
        return Ok(Some(json!({"grpc": handler, "timeoutSeconds": timeout})));
    }
    Ok(None)
}

/// [`APP_PROBES_ENV`]'s value: the originals as JSON, every `$` doubled. Kubernetes expands
/// `$(NAME)` in an env value and turns `$$` into `$`, so a probe path or header holding
/// `$(...)` reaches the proxy as written.
pub fn env_value(originals: &BTreeMap<String, Value>) -> String {
    serde_json::to_string(originals)
        .unwrap_or_default()
        .replace('$', "$$")
}

/// The originals an earlier injection recorded in the proxy container it added.
pub fn previous_originals(pod: &Value, proxy_container: &str) -> BTreeMap<String, Value> {
    let containers = ["initContainers", "containers"]
        .into_iter()
        .filter_map(|key| {
            pod.pointer(&format!("/spec/{key}"))
                .and_then(Value::as_array)
        })
        .flatten();
    containers
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(proxy_container))
        .filter_map(|c| c.get("env").and_then(Value::as_array))
        .flatten()
        .filter(|var| var.get("name").and_then(Value::as_str) == Some(APP_PROBES_ENV))
        .filter_map(|var| var.get("value").and_then(Value::as_str))
        .filter_map(|text| {
            serde_json::from_str::<BTreeMap<String, Value>>(&text.replace("$$", "$")).ok()
        })
        .next()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": containers}})
    }

    #[test]
    fn http_tcp_and_grpc_probes_become_http_probes_on_the_probe_port() {
        let mut p = pod(json!([{
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS",
                "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "timeoutSeconds": 3, "periodSeconds": 7},
            "livenessProbe": {"tcpSocket": {"port": 9090}},
            "startupProbe": {"grpc": {"port": 9091, "service": "web"}, "failureThreshold": 30},
        }]));
        let result = rewrite(&mut p, &BTreeMap::new(), true);
        assert!(result.warnings.is_empty(), "{:?}", result.warnings);
        let web = &p["spec"]["containers"][0];
        assert_eq!(
            web["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"},
                "timeoutSeconds": 3, "periodSeconds": 7})
        );
        assert_eq!(
            web["livenessProbe"]["httpGet"]["path"],
            "/app-health/web/livez"
        );
        assert!(web["livenessProbe"].get("tcpSocket").is_none());
        assert_eq!(web["startupProbe"]["failureThreshold"], 30);
        assert!(web["startupProbe"].get("grpc").is_none());
        assert_eq!(
            result.originals["/app-health/web/readyz"],
            json!({"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS",
                "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "timeoutSeconds": 3})
        );
        assert_eq!(
            result.originals["/app-health/web/livez"],
            json!({"tcpSocket": {"port": 9090}, "timeoutSeconds": 1})
        );
        assert_eq!(
            result.originals["/app-health/web/startupz"],
            json!({"grpc": {"port": 9091, "service": "web"}, "timeoutSeconds": 1})
        );
    }

    #[test]
    fn exec_probes_probes_of_other_hosts_and_plain_init_containers_are_left_alone() {
        let mut p = json!({"spec": {
            "initContainers": [{"name": "setup", "readinessProbe": {"tcpSocket": {"port": 1}}}],
            "containers": [{
                "name": "web",
                "livenessProbe": {"exec": {"command": ["true"]}},
                "readinessProbe": {"httpGet": {"host": "10.0.0.9", "path": "/", "port": 80}},
            }],
        }});
        let before = p.clone();
        let result = rewrite(&mut p, &BTreeMap::new(), true);
        assert_eq!(p, before);
        assert!(result.originals.is_empty());
        assert!(result.warnings.is_empty());
    }

    #[test]
    fn an_unknown_port_name_leaves_the_probe_and_says_why() {
        let mut p = pod(
            json!([{"name": "web", "readinessProbe": {"httpGet": {"path": "/", "port": "nope"}}}]),
        );
        let before = p.clone();
        let result = rewrite(&mut p, &BTreeMap::new(), true);
        assert_eq!(p, before);
        assert_eq!(result.warnings.len(), 1);
        assert!(
            result.warnings[0].contains("\"nope\""),
            "{:?}",
            result.warnings
        );
        assert!(result.warnings[0].contains("readinessProbe of container \"web\""));
    }

    #[test]
    fn a_second_rewrite_keeps_the_originals_and_disabling_restores_them() {
        let original =
            pod(json!([{"name": "web", "livenessProbe": {"tcpSocket": {"port": 9090}}}]));
        let mut once = original.clone();
        let first = rewrite(&mut once, &BTreeMap::new(), true);
        let mut twice = once.clone();
        let second = rewrite(&mut twice, &first.originals, true);
        assert_eq!(twice, once);
        assert_eq!(second.originals, first.originals);

        let mut restored = once.clone();
        let off = rewrite(&mut restored, &first.originals, false);
        assert_eq!(restored, original);
        assert!(off.originals.is_empty());
    }

    #[test]
    fn dollars_in_probes_survive_kubernetes_env_expansion_and_reinjection() {
        let mut p = pod(
            json!([{"name": "web", "readinessProbe": {"httpGet": {"path": "/h?v=$(HOME)$x", "port": 80}}}]),
        );
        let result = rewrite(&mut p, &BTreeMap::new(), true);
        let value = env_value(&result.originals);
        assert!(value.contains("/h?v=$$(HOME)$$x"), "{value}");
        // What the kubelet hands the proxy: `$$` becomes `$`, and nothing is left to expand.
        let expanded = value.replace("$$", "$");
        let seen: BTreeMap<String, Value> = serde_json::from_str(&expanded).unwrap_or_default();
        assert_eq!(
            seen["/app-health/web/readyz"]["httpGet"]["path"],
            "/h?v=$(HOME)$x"
        );
        // Re-injection reads the escaped value back to the same originals.
        let injected = json!({"spec": {"initContainers": [{"name": "remora-proxy",
            "env": [{"name": APP_PROBES_ENV, "value": value}]}]}});
        assert_eq!(
            previous_originals(&injected, "remora-proxy"),
            result.originals
        );
    }

    #[test]
    fn disabled_rewrite_changes_nothing() {
        let mut p = pod(json!([{"name": "web", "livenessProbe": {"tcpSocket": {"port": 9090}}}]));
        let before = p.clone();
        assert!(
            rewrite(&mut p, &BTreeMap::new(), false)
                .originals
                .is_empty()
        );
        assert_eq!(p, before);
    }
}
