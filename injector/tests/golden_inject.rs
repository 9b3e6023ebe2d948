//! Golden tests for injection: every input in `tests/golden/inject/*.yaml` is injected by
//! `remora-injector inject` logic and compared with `*.injected.yaml`; then each pod (and
//! each workload's pod template) goes through the webhook as an AdmissionReview, and the
//! returned JSONPatch applied to the input must give the same object; a second injection
//! must change nothing; every output must pass strict schema validation.

mod common;

use std::path::PathBuf;

use base64::Engine;
use remora_injector::config::InjectConfig;
use remora_injector::webhook::{self, WebhookConfig};
use remora_injector::workload;
use serde_json::{Value, json};

fn cases() -> Vec<PathBuf> {
    let dir = common::golden_dir().join("inject");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && !p.to_string_lossy().ends_with(".injected.yaml")
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "golden inputs missing: {cases:?}");
    cases
}

fn expected_path(input: &std::path::Path) -> PathBuf {
    input.with_extension("injected.yaml")
}

/// An AdmissionReview as the API server sends it for a pod CREATE: `name` is empty when
/// only generateName is set, and the namespace comes from the request.
fn admission_review(uid: &str, pod: &Value, namespace: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or(""),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Sends `pod` through the webhook and applies the returned patch to it.
fn webhook_result(pod: &Value, namespace: &str) -> Value {
    let uid = "7f0b2a4e-1c63-4f6e-9d2a-3b8f4f1b9c01";
    let body = serde_json::to_vec(&admission_review(uid, pod, namespace)).unwrap_or_default();
    let answer = webhook::review(&body, &WebhookConfig::default())
        .unwrap_or_else(|e| panic!("webhook rejected a valid review: {e}"));
    let answer: Value = serde_json::from_slice(&answer).unwrap_or_default();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], uid, "uid must be echoed");
    assert_eq!(response["allowed"], true);
    assert!(
        response.get("warnings").is_none(),
        "unexpected warnings: {response}"
    );
    let mut patched = pod.clone();
    if let Some(patch) = response.get("patch") {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(
                patch
                    .as_str()
                    .unwrap_or_else(|| panic!("patch is not base64 text: {patch}")),
            )
            .unwrap_or_else(|e| panic!("patch is not base64: {e}"));
        let patch: json_patch::Patch = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("patch is not a JSONPatch: {e}"));
        json_patch::patch(&mut patched, &patch)
            .unwrap_or_else(|e| panic!("patch does not apply: {e}"));
    }
    patched
}

/// The pod the webhook would see for an object: the object itself for a Pod, a pod built
/// from the template (as a controller creates it) for a workload.
fn pod_of(object: &Value) -> Option<(Value, String, Option<&'static str>)> {
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let pointer = match kind {
        "Pod" => return Some((object.clone(), namespace, None)),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => return None,
    };
    let template = object.pointer(pointer)?;
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(m) = metadata.as_object_mut() {
        m.insert(
            "generateName".into(),
            json!(format!(
                "{}-",
                object["metadata"]["name"].as_str().unwrap_or("x")
            )),
        );
        m.insert("namespace".into(), json!(namespace));
    }
    let pod =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]});
    Some((pod, namespace, Some(pointer)))
}

#[test]
fn manual_injection_matches_golden_files() {
    for input in cases() {
        let text = std::fs::read_to_string(&input).unwrap_or_default();
        let output = workload::inject_yaml(&text, &InjectConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        common::check_golden(&expected_path(&input), &output);
    }
}

#[test]
fn injected_output_is_valid_kubernetes() {
    for input in cases() {
        let expected = std::fs::read_to_string(expected_path(&input)).unwrap_or_default();
        for doc in common::yaml_documents(&expected) {
            if let Err(e) = common::validate_strict(&doc) {
                panic!(
                    "{}: {} is invalid: {e}",
                    input.display(),
                    doc["metadata"]["name"]
                );
            }
        }
    }
}

#[test]
fn second_injection_is_a_no_op() {
    for input in cases() {
        let once = std::fs::read_to_string(expected_path(&input)).unwrap_or_default();
        let twice = workload::inject_yaml(&once, &InjectConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        assert_eq!(
            once,
            twice,
            "{}: re-injection changed the output",
            input.display()
        );

        // Through the webhook too: an injected pod gets an empty patch (reinvocation).
        for doc in common::yaml_documents(&once) {
            if let Some((pod, namespace, _)) = pod_of(&doc) {
                assert_eq!(
                    webhook_result(&pod, &namespace),
                    pod,
                    "{}: webhook re-injection changed {}",
                    input.display(),
                    doc["metadata"]["name"]
                );
            }
        }
    }
}

#[test]
fn webhook_patch_gives_the_manual_result() {
    let mut pods_checked = 0;
    for input in cases() {
        let text = std::fs::read_to_string(&input).unwrap_or_default();
        let inputs = common::yaml_documents(&text);
        let outputs = common::yaml_documents(
            &workload::inject_yaml(&text, &InjectConfig::default()).unwrap_or_default(),
        );
        assert_eq!(inputs.len(), outputs.len());
        for (before, after) in inputs.iter().zip(&outputs) {
            let Some((pod, namespace, pointer)) = pod_of(before) else {
                assert_eq!(before, after, "{}: non-workload changed", input.display());
                continue;
            };
            let patched = webhook_result(&pod, &namespace);
            let expected = match pointer {
                None => after.clone(),
                Some(_) => pod_of(after).map(|(p, _, _)| p).unwrap_or_default(),
            };
            assert_eq!(
                patched,
                expected,
                "{}: webhook and manual injection differ for {}",
                input.display(),
                before["metadata"]
            );
            pods_checked += 1;
        }
    }
    assert!(
        pods_checked >= 15,
        "only {pods_checked} pods went through the webhook"
    );
}

#[test]
fn strict_validation_rejects_unknown_and_mistyped_fields() {
    let unknown = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "imagePullPolcy": "Always"}]}});
    assert!(common::validate_strict(&unknown).is_err());
    let wrong_version = json!({"apiVersion": "v2", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a"}]}});
    assert!(common::validate_strict(&wrong_version).is_err());
    let mistyped = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": "80"}]}]}});
    assert!(common::validate_strict(&mistyped).is_err());
    let fine = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}});
    assert_eq!(common::validate_strict(&fine), Ok(()));
}
