//! The AdmissionReview handler on its own: malformed bodies, objects it cannot inject
//! (fail open with a warning, or closed with the reason), operations it ignores, and the
//! legacy-mode flag.

use base64::Engine;
use remora_injector::config::InjectConfig;
use remora_injector::webhook::{self, WebhookConfig};
use serde_json::{Value, json};

fn review_of(object: Value, operation: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3c1f6b1e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": object,
            "dryRun": false
        }
    }))
    .unwrap_or_default()
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}
    })
}

fn respond(body: &[u8], config: &WebhookConfig) -> Value {
    let bytes = webhook::review(body, config).unwrap_or_else(|e| panic!("400: {e}"));
    let review: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    review["response"].clone()
}

#[test]
fn malformed_bodies_are_bad_requests() {
    let config = WebhookConfig::default();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("not json", b"hello".to_vec()),
        ("truncated", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionRev"#.to_vec()),
        ("wrong kind", br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec()),
        ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec()),
        ("v1beta1", br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","userInfo":{}}}"#.to_vec()),
        ("request missing uid", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"group":"","version":"v1","kind":"Pod"}}}"#.to_vec()),
        ("binary", vec![0xff, 0x00, 0x13, 0x37]),
    ];
    for (what, body) in cases {
        let err = webhook::review(&body, &config).err();
        assert!(err.is_some(), "{what}: expected a 400");
        assert!(
            !err.map(|e| e.to_string()).unwrap_or_default().is_empty(),
            "{what}: empty message"
        );
    }
}

#[test]
fn uninjectable_pod_is_admitted_with_a_warning_by_default() {
    let body = review_of(
        pod(json!({"traffic.remora.io/excludeOutboundPorts": "5432,postgres"})),
        "CREATE",
    );
    let response = respond(&body, &WebhookConfig::default());
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().unwrap_or("");
    assert!(
        warning.contains("excludeOutboundPorts") && warning.contains("postgres"),
        "{warning}"
    );
}

#[test]
fn uninjectable_pod_is_denied_when_failing_closed() {
    let config = WebhookConfig {
        fail_closed: true,
        ..WebhookConfig::default()
    };
    let body = review_of(pod(json!({"sidecar.remora.io/proxyCPU": "lots"})), "CREATE");
    let response = respond(&body, &config);
    assert_eq!(response["allowed"], false);
    assert_eq!(response["uid"], "3c1f6b1e-0000-4000-8000-000000000001");
    let message = response["status"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("proxyCPU") && message.contains("lots"),
        "{message}"
    );
}

#[test]
fn object_that_is_not_a_pod_is_handled_not_rejected() {
    // The object parses as an AdmissionReview but not as a Pod (containers is a string).
    let broken = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": "nope"}});
    let body = review_of(broken, "CREATE");
    let open = respond(&body, &WebhookConfig::default());
    assert_eq!(open["allowed"], true);
    assert!(
        open["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("not a valid Pod")
    );
    let closed = respond(
        &body,
        &WebhookConfig {
            fail_closed: true,
            ..WebhookConfig::default()
        },
    );
    assert_eq!(closed["allowed"], false);
}

#[test]
fn user_container_named_like_ours_is_a_conflict() {
    let mut p = pod(json!({}));
    p["spec"]["containers"][0]["name"] = json!("remora-proxy");
    let response = respond(&review_of(p, "CREATE"), &WebhookConfig::default());
    assert_eq!(response["allowed"], true);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("remora-proxy")
    );
}

#[test]
fn updates_and_deletes_are_allowed_untouched() {
    for op in ["UPDATE", "DELETE", "CONNECT"] {
        let response = respond(&review_of(pod(json!({})), op), &WebhookConfig::default());
        assert_eq!(response["allowed"], true, "{op}");
        assert!(response.get("patch").is_none(), "{op} must not be patched");
    }
}

#[test]
fn legacy_flag_puts_the_proxy_first_with_a_post_start_wait() {
    let config = WebhookConfig {
        inject: InjectConfig {
            legacy_sidecar: true,
            ..InjectConfig::default()
        },
        ..WebhookConfig::default()
    };
    let original = pod(json!({}));
    let response = respond(&review_of(original.clone(), "CREATE"), &config);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap_or(""))
        .unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut patched = original;
    json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{e}"));
    let containers = &patched["spec"]["containers"];
    assert_eq!(containers[0]["name"], "remora-proxy");
    assert_eq!(containers[1]["name"], "app");
    assert!(containers[0].get("restartPolicy").is_none());
    let hook = &containers[0]["lifecycle"]["postStart"]["exec"]["command"];
    assert_eq!(hook[1], "wait-ready");
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "remora-init");

    // And the annotation turns it back to native for one pod.
    let native = pod(json!({"sidecar.remora.io/nativeSidecar": "true"}));
    let response = respond(&review_of(native.clone(), "CREATE"), &config);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap_or(""))
        .unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut patched = native;
    json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        patched["spec"]["initContainers"][1]["restartPolicy"],
        "Always"
    );
}
