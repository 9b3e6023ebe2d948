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

/// The pod a response's patch makes of `original`.
fn patched(original: &Value, response: &Value) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap_or(""))
        .unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut pod = original.clone();
    json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("{e}"));
    pod
}

fn proxy_of(pod: &Value) -> Value {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "remora-proxy")
        .cloned()
        .unwrap_or_else(|| panic!("no remora-proxy in {pod}"))
}

fn env_of(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["value"].as_str().map(str::to_string))
}

#[test]
fn a_probe_that_cannot_be_rewritten_is_injected_with_a_warning_naming_it() {
    let mut original = pod(json!({}));
    original["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/ready", "port": "web"}});
    original["spec"]["containers"][0]["livenessProbe"] = json!({"tcpSocket": {"port": 8080}});
    let response = respond(
        &review_of(original.clone(), "CREATE"),
        &WebhookConfig::default(),
    );
    assert_eq!(response["allowed"], true);
    let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = warnings[0].as_str().unwrap_or("");
    assert!(
        warning.contains("readinessProbe of container \"app\"") && warning.contains("\"web\""),
        "{warning}"
    );
    // The pod is injected all the same; the other probe is rewritten, this one kept.
    let injected = patched(&original, &response);
    let app = &injected["spec"]["containers"][0];
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], "web");
    assert_eq!(app["livenessProbe"]["httpGet"]["port"], 15021);
    let probes = env_of(&proxy_of(&injected), "REMORA_APP_PROBES").unwrap_or_default();
    assert!(probes.contains("/app-health/app/livez"), "{probes}");
    assert!(!probes.contains("readyz"), "{probes}");
}

#[test]
fn xds_auth_and_tls_flags_mount_the_token_and_bundle_and_annotations_override_them() {
    let config = WebhookConfig {
        inject: InjectConfig {
            xds_auth: true,
            xds_tls: true,
            xds_san: Some("spiffe://cluster.local/ns/remora-system/sa/remora-cp".to_string()),
            xds_token_expiration_s: 7200,
            ..InjectConfig::default()
        },
        ..WebhookConfig::default()
    };
    let original = pod(json!({}));
    let injected = patched(
        &original,
        &respond(&review_of(original.clone(), "CREATE"), &config),
    );
    let proxy = proxy_of(&injected);
    assert_eq!(
        env_of(&proxy, "REMORA_XDS_TOKEN_FILE").as_deref(),
        Some("/var/run/secrets/remora/tokens/xds-token")
    );
    assert_eq!(
        env_of(&proxy, "REMORA_CSR_SECRET").as_deref(),
        Some("remora-workload-cert")
    );
    assert_eq!(
        env_of(&proxy, "REMORA_XDS_CA").as_deref(),
        Some("/var/run/secrets/remora/ca/root-cert.pem")
    );
    assert_eq!(
        env_of(&proxy, "REMORA_XDS_SAN").as_deref(),
        Some("spiffe://cluster.local/ns/remora-system/sa/remora-cp")
    );
    let token = &injected["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "remora");
    assert_eq!(token["expirationSeconds"], 7200);
    assert_eq!(token["path"], "xds-token");
    let bundle = &injected["spec"]["volumes"][1]["configMap"];
    assert_eq!(bundle["name"], "remora-ca-root-cert");
    assert_eq!(bundle["optional"], false);

    // Per pod, the annotations turn each off again: the pod is as without the flags.
    let opted_out =
        pod(json!({"sidecar.remora.io/xdsAuth": "false", "sidecar.remora.io/xdsTLS": "false"}));
    let injected = patched(
        &opted_out,
        &respond(&review_of(opted_out.clone(), "CREATE"), &config),
    );
    let proxy = proxy_of(&injected);
    assert!(injected["spec"].get("volumes").is_none(), "{injected}");
    assert!(proxy.get("volumeMounts").is_none());
    for name in [
        "REMORA_XDS_TOKEN_FILE",
        "REMORA_CSR_SECRET",
        "REMORA_XDS_CA",
        "REMORA_XDS_SAN",
    ] {
        assert_eq!(env_of(&proxy, name), None, "{name}");
    }

    // Re-injecting that pod with the flags' settings adds them, and re-injecting an
    // injected pod without them removes them: the status annotation names our volumes.
    let secured = patched(
        &original,
        &respond(&review_of(original.clone(), "CREATE"), &config),
    );
    let plain = patched(
        &secured,
        &respond(
            &review_of(secured.clone(), "CREATE"),
            &WebhookConfig::default(),
        ),
    );
    assert!(plain["spec"].get("volumes").is_none(), "{plain}");
    assert_eq!(env_of(&proxy_of(&plain), "REMORA_XDS_CA"), None);
}

#[test]
fn bad_boolean_annotations_and_volumes_named_like_ours_are_refused() {
    for key in [
        "sidecar.remora.io/xdsAuth",
        "sidecar.remora.io/xdsTLS",
        "sidecar.remora.io/rewriteAppHTTPProbers",
    ] {
        let response = respond(
            &review_of(pod(json!({key: "yes"})), "CREATE"),
            &WebhookConfig::default(),
        );
        assert!(response.get("patch").is_none(), "{key}");
        let warning = response["warnings"][0].as_str().unwrap_or("");
        assert!(
            warning.contains(key) && warning.contains("\"yes\""),
            "{warning}"
        );
    }
    let mut clash = pod(json!({"sidecar.remora.io/xdsTLS": "true"}));
    clash["spec"]["volumes"] = json!([{"name": "remora-ca-root-cert", "emptyDir": {}}]);
    let response = respond(&review_of(clash, "CREATE"), &WebhookConfig::default());
    assert!(response.get("patch").is_none());
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("volume named \"remora-ca-root-cert\""),
        "{response}"
    );
}

#[test]
fn turning_the_rewrite_off_on_an_injected_pod_restores_its_probes() {
    let mut original = pod(json!({}));
    original["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": 8080}]);
    original["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 4});
    let injected = patched(
        &original,
        &respond(
            &review_of(original.clone(), "CREATE"),
            &WebhookConfig::default(),
        ),
    );
    assert_eq!(
        injected["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        15021
    );

    let mut opted_out = injected.clone();
    opted_out["metadata"]["annotations"] = json!({
        "sidecar.remora.io/rewriteAppHTTPProbers": "false",
        "sidecar.remora.io/status": injected["metadata"]["annotations"]["sidecar.remora.io/status"],
    });
    let again = patched(
        &opted_out,
        &respond(
            &review_of(opted_out.clone(), "CREATE"),
            &WebhookConfig::default(),
        ),
    );
    let probe = &again["spec"]["containers"][0]["readinessProbe"];
    // The named port comes back resolved, which probes the same port.
    assert_eq!(probe["httpGet"]["port"], 8080, "{probe}");
    assert_eq!(probe["httpGet"]["path"], "/ready");
    assert_eq!(probe["periodSeconds"], 4);
    assert_eq!(env_of(&proxy_of(&again), "REMORA_APP_PROBES"), None);
    let init_args = again["spec"]["initContainers"][0]["args"].to_string();
    assert!(
        init_args.contains("\"8080\""),
        "the probed port is excluded again: {init_args}"
    );
}
