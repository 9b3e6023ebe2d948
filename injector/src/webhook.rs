//! AdmissionReview handling for `POST /inject`: parse the review, inject the Pod, answer
//! with a JSONPatch (the diff between the Pod received and the Pod injected).
//!
//! Transport-free, so tests call it directly and [`crate::server`] only moves bytes.

use base64::Engine;
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{self, Outcome};

/// Webhook settings.
#[derive(Clone, Debug, Default)]
pub struct WebhookConfig {
    pub inject: InjectConfig,
    /// Deny pods that cannot be injected instead of admitting them without a sidecar.
    pub fail_closed: bool,
}

/// A body that is not an AdmissionReview we can answer; the server replies HTTP 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Answers one AdmissionReview body with the JSON of the response review.
pub fn review(body: &[u8], config: &WebhookConfig) -> Result<Vec<u8>, BadRequest> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| BadRequest(format!("body is not an AdmissionReview: {e}")))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(BadRequest(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {:?}, {:?}",
            review.types.api_version, review.types.kind
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| BadRequest("AdmissionReview has no request".to_string()))?;
    if request.uid.is_empty() {
        return Err(BadRequest("AdmissionReview request has no uid".to_string()));
    }

    let response = respond(&request, config);
    encode(response)
}

fn respond(request: &AdmissionRequest<DynamicObject>, config: &WebhookConfig) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    if request.operation != Operation::Create {
        return allowed;
    }
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.sub_resource.is_some() {
        return cannot_handle(
            allowed,
            config,
            format!(
                "only v1 Pod creation is injected, got {}/{} {}",
                request.kind.group,
                request.kind.kind,
                request.sub_resource.as_deref().unwrap_or("")
            ),
        );
    }
    let Some(object) = request.object.as_ref() else {
        return cannot_handle(allowed, config, "request has no object".to_string());
    };
    let original = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return cannot_handle(allowed, config, format!("object: {e}")),
    };
    let name = object
        .metadata
        .name
        .clone()
        .or_else(|| object.metadata.generate_name.clone())
        .unwrap_or_default();
    match inject::inject_pod(&original, request.namespace.as_deref(), &config.inject) {
        Ok(Outcome::Injected {
            pod: mutated,
            warnings,
        }) => {
            let patch = json_patch::diff(&original, &mutated);
            tracing::info!(uid = %request.uid, pod = %name, ops = patch.0.len(), "injected");
            let mut response = match allowed.clone().with_patch(patch) {
                Ok(r) => r,
                Err(e) => return cannot_handle(allowed, config, format!("encoding patch: {e}")),
            };
            // A probe left unrewritten still works unless its port requires mTLS; the
            // user hears why from kubectl rather than from a failing probe.
            if !warnings.is_empty() {
                for warning in &warnings {
                    tracing::warn!(uid = %request.uid, pod = %name, %warning);
                }
                response.warnings = Some(
                    warnings
                        .into_iter()
                        .map(|w| format!("remora: {w}"))
                        .collect(),
                );
            }
            response
        }
        Ok(Outcome::Skipped(reason)) => {
            tracing::debug!(uid = %request.uid, pod = %name, %reason, "not injected");
            allowed
        }
        Err(e) => cannot_handle(allowed, config, e.to_string()),
    }
}

/// An object we cannot inject: admitted with a warning, or denied when failing closed.
fn cannot_handle(
    response: AdmissionResponse,
    config: &WebhookConfig,
    reason: String,
) -> AdmissionResponse {
    let message = format!("remora sidecar not injected: {reason}");
    tracing::warn!(uid = %response.uid, %message);
    if config.fail_closed {
        response.deny(message)
    } else {
        let mut response = response;
        response.warnings = Some(vec![message]);
        response
    }
}

/// Serialises the response review. Kubernetes reads `patch` as Go `[]byte`, i.e. a base64
/// string, while kube-core keeps it as raw bytes, so that one field is re-encoded here.
fn encode(response: AdmissionResponse) -> Result<Vec<u8>, BadRequest> {
    let mut value = serde_json::to_value(response.into_review())
        .map_err(|e| BadRequest(format!("encoding response: {e}")))?;
    if let Some(patch) = value.pointer_mut("/response/patch")
        && let Value::Array(items) = patch
    {
        let bytes: Vec<u8> = items
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    serde_json::to_vec(&value).map_err(|e| BadRequest(format!("encoding response: {e}")))
}
