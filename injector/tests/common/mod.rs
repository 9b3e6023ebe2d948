//! Helpers shared by the integration tests: golden-file comparison and strict validation
//! of rendered objects against the k8s-openapi types.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Directory of the golden files.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with the golden file; `REFRESH_GOLDEN=1` rewrites the file instead.
pub fn check_golden(path: &Path, actual: &str) {
    if std::env::var_os("REFRESH_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (run with REFRESH_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} is stale; rerun with REFRESH_GOLDEN=1 and review the diff.\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// Parses a multi-document YAML stream into JSON values, skipping empty documents.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn roundtrip<T>(value: &Value) -> Result<(), String>
where
    T: DeserializeOwned + Serialize + k8s_openapi::Resource,
{
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    if api_version != Some(T::API_VERSION) {
        return Err(format!(
            "apiVersion {api_version:?}, expected {}",
            T::API_VERSION
        ));
    }
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back != value {
        return Err(format!(
            "fields unknown to the Kubernetes schema or of the wrong type:\n{}",
            serde_json::to_string_pretty(&json_patch::diff(value, &back)).unwrap_or_default()
        ));
    }
    Ok(())
}

/// Strict validation: the object must deserialise into its k8s-openapi type, and
/// serialising that type back must give the same JSON, so no field was unknown, dropped or
/// coerced.
pub fn validate_strict(value: &Value) -> Result<(), String> {
    use k8s_openapi::api::{admissionregistration, apps, batch, core, rbac};
    match value.get("kind").and_then(Value::as_str).unwrap_or("") {
        "Pod" => roundtrip::<core::v1::Pod>(value),
        "Service" => roundtrip::<core::v1::Service>(value),
        "ConfigMap" => roundtrip::<core::v1::ConfigMap>(value),
        "Namespace" => roundtrip::<core::v1::Namespace>(value),
        "ServiceAccount" => roundtrip::<core::v1::ServiceAccount>(value),
        "Deployment" => roundtrip::<apps::v1::Deployment>(value),
        "StatefulSet" => roundtrip::<apps::v1::StatefulSet>(value),
        "DaemonSet" => roundtrip::<apps::v1::DaemonSet>(value),
        "ReplicaSet" => roundtrip::<apps::v1::ReplicaSet>(value),
        "Job" => roundtrip::<batch::v1::Job>(value),
        "CronJob" => roundtrip::<batch::v1::CronJob>(value),
        "ClusterRole" => roundtrip::<rbac::v1::ClusterRole>(value),
        "ClusterRoleBinding" => roundtrip::<rbac::v1::ClusterRoleBinding>(value),
        "MutatingWebhookConfiguration" => {
            roundtrip::<admissionregistration::v1::MutatingWebhookConfiguration>(value)
        }
        other => Err(format!("no strict validator for kind {other:?}")),
    }
}
