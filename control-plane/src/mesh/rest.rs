//! The mesh through the REST API, for users without Kubernetes (and for inspection):
//!
//! - `PUT|GET|DELETE /v1/mesh/services/{namespace}/{name}`: `{vip, ports: [{name, port,
//!   protocol}]}`
//! - `PUT|GET|DELETE /v1/mesh/endpoints/{namespace}/{service}`: `{ports: {name: number},
//!   endpoints: [{address, zone, ready, serving, terminating, workload}]}` (an EndpointSlice's
//!   shape; `workload` names the sidecar's pod, `name` of `name.namespace`)
//! - `PUT|GET|DELETE /v1/mesh/trafficpolicies/{namespace}/{name}`: the TrafficPolicy object
//!   (`spec` as in the CRD); GET adds its `status`
//! - `PUT|GET|DELETE /v1/mesh/namespaces/{name}`: `{reach: [namespaces]}`
//! - `GET /v1/mesh/{collection}`: every object of a kind
//! - `GET /v1/mesh/sidecars/{namespace}/{pod}`: the resources that sidecar gets (`?group=`,
//!   `?inbound_port=`, `?outbound_port=`, default 15006 and 15001)
//!
//! Objects are stored (redb or etcd) like raw resources, in the form [`crate::mesh::stored`]
//! defines, and reach the generator with the next commit; the generated config is the same as
//! for Kubernetes objects.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{ConfigService, WriteError};
use crate::mesh::hub::MeshHub;
use crate::mesh::model::ObjectKey;
use crate::mesh::policy::TrafficPolicySpec;
use crate::mesh::sidecar::Sidecar;
use crate::mesh::stored::{EndpointsBody, NamespaceBody, ServiceBody, StoredPolicy};
use crate::registry::ProxyRegistry;
use crate::resource::{Kind, stored_to_json};
use crate::store::{Change, MeshKey, MeshKind};

/// What the mesh endpoints need; the config API builds it from its own state.
#[derive(Clone)]
pub struct MeshApiState {
    pub config: Arc<ConfigService>,
    /// Mesh generation, when on; every endpoint answers 404 without it.
    pub mesh: Option<Arc<MeshHub>>,
    /// The connected proxies, for a policy's ACK/NACK status.
    pub registry: Arc<ProxyRegistry>,
}

/// An error answer.
struct MeshError(StatusCode, Value);

impl IntoResponse for MeshError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> MeshError {
    MeshError(status, json!({"error": message.into()}))
}

fn invalid(object: &str, problems: Vec<String>) -> MeshError {
    MeshError(
        StatusCode::BAD_REQUEST,
        json!({"error": "validation failed", "problems": problems
            .into_iter()
            .map(|reason| json!({"resource": object, "reason": reason}))
            .collect::<Vec<_>>()}),
    )
}

impl From<WriteError> for MeshError {
    fn from(write: WriteError) -> MeshError {
        match write {
            WriteError::NotFound(what) => {
                error(StatusCode::NOT_FOUND, format!("{what} does not exist"))
            }
            WriteError::Invalid(findings) => MeshError(
                StatusCode::BAD_REQUEST,
                json!({"error": "validation failed", "problems": findings.errors}),
            ),
            WriteError::Store(problem) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store error: {problem:#}"),
            ),
        }
    }
}

fn mesh_hub(state: &MeshApiState) -> Result<&Arc<MeshHub>, MeshError> {
    state.mesh.as_ref().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "mesh generation is off; start remora-cp with --mesh or --kubernetes",
        )
    })
}

fn kind_of(collection: &str) -> Result<MeshKind, MeshError> {
    MeshKind::from_collection(collection).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("unknown mesh kind {collection:?}; expected services, endpoints, trafficpolicies or namespaces"),
        )
    })
}

/// A DNS label, as Kubernetes names namespaces and services.
fn check_name(what: &str, name: &str) -> Result<(), MeshError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            format!("{what} {name:?} is not a DNS label (lowercase letters, digits, '-')"),
        ))
    }
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, MeshError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "the body is not UTF-8"))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("json"));
    let parsed = if is_json {
        xds_api::json::parse_json(text)
    } else {
        xds_api::json::parse_yaml(text)
    };
    parsed.map_err(|problem| error(StatusCode::BAD_REQUEST, problem.to_string()))
}

/// Checks a body and gives the JSON to store.
fn stored_form(
    kind: MeshKind,
    key: &MeshKey,
    body: Value,
    generation: i64,
) -> Result<Vec<u8>, MeshError> {
    let label = key.label();
    let typed = |problem: serde_json::Error| invalid(&label, vec![problem.to_string()]);
    let value = match kind {
        MeshKind::Namespace => {
            serde_json::to_value(serde_json::from_value::<NamespaceBody>(body).map_err(typed)?)
        }
        MeshKind::Service => {
            let service: ServiceBody = serde_json::from_value(body).map_err(typed)?;
            let mut problems = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for (index, port) in service.ports.iter().enumerate() {
                if port.port == 0 {
                    problems.push(format!("ports[{index}].port: must be between 1 and 65535"));
                }
                if !seen.insert(port.port) {
                    problems.push(format!("ports[{index}].port: {} appears twice", port.port));
                }
            }
            if service.ports.len() > 1 && service.ports.iter().any(|port| port.name.is_empty()) {
                problems.push("ports: a service with several ports must name each".to_string());
            }
            if !problems.is_empty() {
                return Err(invalid(&label, problems));
            }
            serde_json::to_value(service)
        }
        MeshKind::Endpoints => {
            let endpoints: EndpointsBody = serde_json::from_value(body).map_err(typed)?;
            if let Some((name, _)) = endpoints.ports.iter().find(|(_, port)| **port == 0) {
                return Err(invalid(
                    &label,
                    vec![format!("ports.{name}: must be between 1 and 65535")],
                ));
            }
            serde_json::to_value(endpoints)
        }
        MeshKind::TrafficPolicy => {
            let mut body = body;
            if let Some(metadata) = body.get("metadata") {
                for (field, expected) in [("name", &key.name), ("namespace", &key.namespace)] {
                    if let Some(given) = metadata.get(field).and_then(Value::as_str)
                        && given != expected
                    {
                        return Err(invalid(
                            &label,
                            vec![format!(
                                "metadata.{field}: {given:?} does not match {expected:?} in the path"
                            )],
                        ));
                    }
                }
            }
            let spec = body
                .get_mut("spec")
                .map(Value::take)
                .ok_or_else(|| invalid(&label, vec!["spec: required".to_string()]))?;
            let spec: TrafficPolicySpec = serde_json::from_value(spec)
                .map_err(|problem| invalid(&label, vec![format!("spec: {problem}")]))?;
            let problems = spec.problems();
            if !problems.is_empty() {
                return Err(invalid(&label, problems));
            }
            serde_json::to_value(StoredPolicy { generation, spec })
        }
    };
    value
        .map(|value| value.to_string().into_bytes())
        .map_err(|problem| error(StatusCode::INTERNAL_SERVER_ERROR, problem.to_string()))
}

/// The object as the API shows it.
fn shown(state: &MeshApiState, key: &MeshKey, bytes: &[u8]) -> Value {
    let stored: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    if key.kind != MeshKind::TrafficPolicy {
        return stored;
    }
    let object = ObjectKey::new(&key.namespace, &key.name);
    let status = state
        .mesh
        .as_ref()
        .and_then(|hub| hub.policy_status(&object, &state.registry));
    json!({
        "apiVersion": "remora.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": key.name, "namespace": key.namespace, "generation": stored["generation"]},
        "spec": stored["spec"],
        "status": status,
    })
}

/// The `/v1/mesh/...` routes, their state given, to merge into the config API's router.
pub fn router<S: Clone + Send + Sync + 'static>(state: MeshApiState) -> Router<S> {
    Router::new()
        .route("/v1/mesh/sidecars/{namespace}/{name}", get(sidecar_config))
        .route(
            "/v1/mesh/namespaces/{name}",
            get(get_namespace)
                .put(put_namespace)
                .delete(delete_namespace),
        )
        .route("/v1/mesh/{kind}", get(list))
        .route(
            "/v1/mesh/{kind}/{namespace}/{name}",
            get(get_object).put(put_object).delete(delete_object),
        )
        .with_state(state)
}

async fn list(
    State(state): State<MeshApiState>,
    Path(kind): Path<String>,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    let kind = kind_of(&kind)?;
    let current = state.config.current();
    let items: Vec<Value> = current
        .mesh
        .iter()
        .filter(|(key, _)| key.kind == kind)
        .map(|(key, bytes)| {
            json!({"namespace": key.namespace, "name": key.name, "object": shown(&state, key, bytes)})
        })
        .collect();
    Ok(axum::Json(json!({"version": current.version, "items": items})).into_response())
}

async fn get_object(
    State(state): State<MeshApiState>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    let key = MeshKey::new(kind_of(&kind)?, &namespace, &name);
    read(&state, &key)
}

fn read(state: &MeshApiState, key: &MeshKey) -> Result<Response, MeshError> {
    let current = state.config.current();
    let bytes = current.mesh.get(key).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("{} does not exist", key.label()),
        )
    })?;
    Ok(axum::Json(shown(state, key, bytes)).into_response())
}

async fn put_object(
    State(state): State<MeshApiState>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    let kind = kind_of(&kind)?;
    check_name("namespace", &namespace)?;
    check_name("name", &name)?;
    write(
        &state,
        MeshKey::new(kind, &namespace, &name),
        &headers,
        &body,
    )
    .await
}

async fn write(
    state: &MeshApiState,
    key: MeshKey,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, MeshError> {
    let value = parse_body(headers, body)?;
    let generation = state
        .config
        .current()
        .mesh
        .get(&key)
        .and_then(|bytes| serde_json::from_slice::<Value>(bytes).ok())
        .and_then(|stored| stored["generation"].as_i64())
        .unwrap_or(0)
        + 1;
    let stored = stored_form(key.kind, &key, value, generation)?;
    let label = key.label();
    let outcome = state
        .config
        .write(vec![Change::PutMesh(key, stored.into())])
        .await?;
    Ok(axum::Json(json!({"version": outcome.version, "applied": [label]})).into_response())
}

async fn delete_object(
    State(state): State<MeshApiState>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    let key = MeshKey::new(kind_of(&kind)?, &namespace, &name);
    remove(&state, key).await
}

async fn remove(state: &MeshApiState, key: MeshKey) -> Result<Response, MeshError> {
    let label = key.label();
    let outcome = state.config.write(vec![Change::DeleteMesh(key)]).await?;
    Ok(axum::Json(json!({"version": outcome.version, "applied": [label]})).into_response())
}

async fn get_namespace(
    State(state): State<MeshApiState>,
    Path(name): Path<String>,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    read(&state, &MeshKey::new(MeshKind::Namespace, "", &name))
}

async fn put_namespace(
    State(state): State<MeshApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    check_name("namespace", &name)?;
    write(
        &state,
        MeshKey::new(MeshKind::Namespace, "", &name),
        &headers,
        &body,
    )
    .await
}

async fn delete_namespace(
    State(state): State<MeshApiState>,
    Path(name): Path<String>,
) -> Result<Response, MeshError> {
    mesh_hub(&state)?;
    remove(&state, MeshKey::new(MeshKind::Namespace, "", &name)).await
}

#[derive(Deserialize)]
struct SidecarQuery {
    group: Option<String>,
    inbound_port: Option<u16>,
    outbound_port: Option<u16>,
}

async fn sidecar_config(
    State(state): State<MeshApiState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<SidecarQuery>,
) -> Result<Response, MeshError> {
    let hub = mesh_hub(&state)?.clone();
    let sidecar = Sidecar {
        node_id: format!("{name}.{namespace}"),
        group: query.group.unwrap_or_default(),
        workload: ObjectKey::new(&namespace, &name),
        inbound_port: Some(query.inbound_port.unwrap_or(15006)),
        outbound_port: Some(query.outbound_port.unwrap_or(15001)),
        service_account: None,
    };
    let types = tokio::task::spawn_blocking(move || hub.sidecar_config(&sidecar))
        .await
        .map_err(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "building the config failed",
            )
        })?;
    let mut body = serde_json::Map::new();
    for kind in Kind::ALL {
        let items: Vec<Value> = types[kind.index()]
            .values()
            .map(|resource| {
                stored_to_json(kind, &resource.body.value)
                    .unwrap_or_else(|problem| json!({"error": problem}))
            })
            .collect();
        body.insert(kind.collection().to_string(), Value::Array(items));
    }
    Ok(axum::Json(Value::Object(body)).into_response())
}
