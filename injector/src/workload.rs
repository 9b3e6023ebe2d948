//! Manual injection (`remora-injector inject`): inject Pods and the pod templates of
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs in a
//! multi-document YAML stream; other documents pass through unchanged.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::InjectConfig;
use crate::inject::{self, InjectError, Outcome};

/// A document that could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index} ({kind} {name}): {source}")]
    Inject {
        index: usize,
        kind: String,
        name: String,
        source: Box<InjectError>,
    },
}

/// Where the pod template sits in an object of a given kind, if it has one.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects one object (as JSON). Objects without a pod inside are returned as they are.
pub fn inject_object(object: &Value, config: &InjectConfig) -> Result<Value, InjectError> {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    if kind == "Pod" {
        return Ok(
            match inject::inject_pod(object, namespace.as_deref(), config)? {
                Outcome::Injected { pod, warnings } => {
                    log_warnings(object, &warnings);
                    pod
                }
                Outcome::Skipped(_) => object.clone(),
            },
        );
    }
    let Some(pointer) = template_pointer(kind) else {
        return Ok(object.clone());
    };
    let Some(template) = object.pointer(pointer) else {
        return Ok(object.clone());
    };
    // A template is a pod without apiVersion/kind; wrap it so it injects like one.
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    let injected = match inject::inject_pod(&pod, namespace.as_deref(), config)? {
        Outcome::Injected { pod, warnings } => {
            log_warnings(object, &warnings);
            pod
        }
        Outcome::Skipped(_) => return Ok(object.clone()),
    };
    let mut out = object.clone();
    if let Some(slot) = out.pointer_mut(pointer).and_then(Value::as_object_mut) {
        for key in ["metadata", "spec"] {
            if let Some(v) = injected.get(key) {
                slot.insert(key.to_string(), v.clone());
            }
        }
    }
    Ok(out)
}

/// Injects every document of a YAML stream and renders the result as YAML documents
/// separated by `---`.
pub fn inject_yaml(input: &str, config: &InjectConfig) -> Result<String, WorkloadError> {
    let mut rendered = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value =
            Value::deserialize(document).map_err(|source| WorkloadError::Yaml { index, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. a leading or trailing `---`
        }
        let injected = inject_object(&value, config).map_err(|source| WorkloadError::Inject {
            index,
            kind: value
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            name: value
                .pointer("/metadata/name")
                .or_else(|| value.pointer("/metadata/generateName"))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            source: Box::new(source),
        })?;
        let text = serde_yaml::to_string(&injected)
            .map_err(|source| WorkloadError::Yaml { index, source })?;
        rendered.push(text);
    }
    Ok(rendered.join("---\n"))
}

/// Manual injection has no admission warnings to return; it says them on stderr, naming
/// the object.
fn log_warnings(object: &Value, warnings: &[String]) {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    for warning in warnings {
        tracing::warn!("{kind} {name}: {warning}");
    }
}
