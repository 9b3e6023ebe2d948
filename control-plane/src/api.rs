//! The config API over HTTP (axum): resources in Envoy's proto3 JSON shape, JSON or YAML bodies.
//!
//! - `PUT|GET|DELETE /v1/{kind}/{name}`, `GET /v1/{kind}`, `?group=NAME` scopes writes and reads
//! - `POST /v1/apply`: a multi-document YAML or a JSON array, all-or-nothing as one version
//! - `GET /v1/proxies`: connected proxies with per-type ACK / pending / NACK state
//! - `GET /v1/ca/bundle`: the mesh CA's trust bundle (PEM), what peers are verified against
//! - `POST /v1/xds-tokens` (`{group, namespace?, serviceAccount?}`): a bootstrap token for
//!   authenticated xDS, shown once; `GET /v1/xds-tokens` lists grants by id,
//!   `DELETE /v1/xds-tokens/{id}` revokes one (its open xDS streams end: [`crate::xds::auth`])
//! - `/v1/mesh/...`: services, endpoints, traffic policies and namespaces for generated
//!   config (see [`crate::mesh::rest`])
//! - `GET /healthz`, `GET /metrics` (Prometheus text)
//!
//! Validation errors are 400 with `{"error", "problems": [{resource, group, field, reason}]}`.
//! With a bearer token configured, every `/v1` request must carry it.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ca::Ca;
use crate::config::{ConfigService, WriteError};
use crate::mesh::hub::MeshHub;
use crate::mesh::rest::MeshApiState;
use crate::metrics::Metrics;
use crate::registry::ProxyRegistry;
use crate::resource::{Kind, Typed, stored_to_json};
use crate::store::{Change, ResourceKey};
use crate::validate::{Findings, Problem};
use crate::xds::auth::{Grant, TOKEN_RECORD_PREFIX, id_of, new_token, record_name};

#[derive(Clone)]
pub struct ApiState {
    pub config: Arc<ConfigService>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    pub token: Option<String>,
    /// Mesh generation, when on (`/v1/mesh/...`).
    pub mesh: Option<Arc<MeshHub>>,
    /// The mesh CA (`/v1/ca/bundle`).
    pub ca: Arc<Ca>,
}

#[derive(Deserialize, Default)]
struct Scope {
    group: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ApplyOptions {
    group: Option<String>,
    /// Validate only: report what would be refused, waiting, or refused by Remora proxies.
    #[serde(default)]
    dry_run: bool,
}

/// An error answer: status plus JSON body.
struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

impl ApiError {
    fn bad_request(problems: Vec<Problem>) -> ApiError {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({"error": "validation failed", "problems": problems}),
        )
    }

    fn simple(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, json!({"error": message.into()}))
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> ApiError {
        match error {
            WriteError::Invalid(Findings { errors, .. }) => ApiError::bad_request(errors),
            WriteError::NotFound(what) => {
                ApiError::simple(StatusCode::NOT_FOUND, format!("{what} does not exist"))
            }
            WriteError::Store(error) => ApiError::simple(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store error: {error:#}"),
            ),
        }
    }
}

pub fn router(state: ApiState) -> Router {
    let mesh = MeshApiState {
        config: state.config.clone(),
        mesh: state.mesh.clone(),
        registry: state.registry.clone(),
    };
    let v1 = Router::new()
        .merge(crate::mesh::rest::router(mesh))
        .route("/v1/proxies", get(list_proxies))
        .route("/v1/ca/bundle", get(ca_bundle))
        .route("/v1/xds-tokens", get(list_xds_tokens).post(issue_xds_token))
        .route(
            "/v1/xds-tokens/{id}",
            axum::routing::delete(revoke_xds_token),
        )
        .route("/v1/apply", post(apply))
        .route("/v1/{kind}", get(list_resources))
        .route(
            "/v1/{kind}/{name}",
            get(get_resource).put(put_resource).delete(delete_resource),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(state)
}

async fn ca_bundle(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.bundle_pem().to_string(),
    )
        .into_response()
}

async fn issue_xds_token(State(state): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let grant: Grant = serde_json::from_slice(&body).map_err(|error| {
        ApiError::simple(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"group\", \"namespace\"?, \"serviceAccount\"?}}: {error}"),
        )
    })?;
    if let Some(problem) = grant.problem() {
        return Err(ApiError::simple(StatusCode::BAD_REQUEST, problem));
    }
    let token = new_token()
        .map_err(|error| ApiError::simple(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let record = record_name(&token);
    let stored = serde_json::to_vec(&grant)
        .map_err(|error| ApiError::simple(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let outcome = state
        .config
        .write(vec![Change::PutPrivate(record.clone(), stored.into())])
        .await?;
    let id = id_of(record.trim_start_matches(TOKEN_RECORD_PREFIX));
    let mut answer = serde_json::to_value(&grant).unwrap_or_default();
    answer["id"] = json!(id);
    answer["token"] = json!(token);
    answer["version"] = json!(outcome.version);
    Ok(axum::Json(answer).into_response())
}

async fn list_xds_tokens(State(state): State<ApiState>) -> Response {
    let current = state.config.current();
    let tokens: Vec<Value> = current
        .private
        .with_prefix(TOKEN_RECORD_PREFIX)
        .map(|(hash, bytes)| {
            let mut grant = serde_json::from_slice::<Value>(bytes).unwrap_or(Value::Null);
            grant["id"] = json!(id_of(hash));
            grant
        })
        .collect();
    axum::Json(json!({"version": current.version, "tokens": tokens})).into_response()
}

async fn revoke_xds_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let current = state.config.current();
    let matching: Vec<String> = current
        .private
        .with_prefix(TOKEN_RECORD_PREFIX)
        .filter(|(hash, _)| id_of(hash) == id)
        .map(|(hash, _)| format!("{TOKEN_RECORD_PREFIX}{hash}"))
        .collect();
    let [record] = matching.as_slice() else {
        return Err(ApiError::simple(
            StatusCode::NOT_FOUND,
            format!("no xDS token with id {id:?}"),
        ));
    };
    let outcome = state
        .config
        .write(vec![Change::DeletePrivate(record.clone())])
        .await?;
    Ok(axum::Json(json!({"version": outcome.version, "revoked": id})).into_response())
}

async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if presented != Some(token.as_str()) {
            return ApiError::simple(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
                .into_response();
        }
    }
    next.run(request).await
}

fn kind_of(text: &str) -> Result<Kind, ApiError> {
    Kind::from_collection(text).ok_or_else(|| {
        ApiError::simple(
            StatusCode::NOT_FOUND,
            format!(
                "unknown kind {text:?}; expected listeners, routes, clusters, endpoints or secrets"
            ),
        )
    })
}

fn group_of(scope: &Scope) -> Result<String, ApiError> {
    let group = scope.group.clone().unwrap_or_default();
    let valid = group
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !group.starts_with(['.', '-']);
    if valid {
        Ok(group)
    } else {
        Err(ApiError::simple(
            StatusCode::BAD_REQUEST,
            format!("invalid group {group:?}: letters, digits, '.', '_', '-' only"),
        ))
    }
}

fn problem(resource: String, group: &str, field: String, reason: String) -> Problem {
    Problem {
        resource,
        group: group.to_string(),
        field,
        reason,
    }
}

/// JSON when the content type says so, else YAML (which also reads JSON). A top-level array
/// (or a YAML stream of documents) yields several resources.
fn parse_documents(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::simple(StatusCode::BAD_REQUEST, "the body is not UTF-8"))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("json"));
    let bad = |error: xds_api::json::MappingError| {
        ApiError::simple(StatusCode::BAD_REQUEST, error.to_string())
    };
    let documents = if is_json {
        vec![xds_api::json::parse_json(text).map_err(bad)?]
    } else {
        xds_api::json::parse_yaml_documents(text).map_err(bad)?
    };
    let mut values = Vec::new();
    for document in documents {
        match document {
            Value::Array(items) => values.extend(items),
            Value::Null => {}
            other => values.push(other),
        }
    }
    Ok(values)
}

fn decode_resource(kind: Kind, group: &str, label: &str, value: &Value) -> Result<Typed, ApiError> {
    if let Some(type_name) = value.get("@type").and_then(Value::as_str)
        && Kind::from_type_name(type_name) != Some(kind)
    {
        return Err(ApiError::bad_request(vec![problem(
            label.to_string(),
            group,
            "@type".into(),
            format!("{type_name:?} is not a {}", kind.type_url()),
        )]));
    }
    Typed::from_json(kind, value).map_err(|error| {
        ApiError::bad_request(vec![problem(
            label.to_string(),
            group,
            error.path,
            error.reason,
        )])
    })
}

fn written(outcome: crate::config::WriteOutcome, applied: Vec<String>) -> Response {
    axum::Json(json!({
        "version": outcome.version,
        "applied": applied,
        "waiting": outcome.waiting,
        "remora_rejects": outcome.remora,
    }))
    .into_response()
}

async fn put_resource(
    State(state): State<ApiState>,
    Path((kind, name)): Path<(String, String)>,
    Query(scope): Query<Scope>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let group = group_of(&scope)?;
    let label = format!("{kind}/{name}");
    let mut documents = parse_documents(&headers, &body)?;
    if documents.len() != 1 {
        return Err(ApiError::simple(
            StatusCode::BAD_REQUEST,
            format!(
                "expected one resource in the body, found {}",
                documents.len()
            ),
        ));
    }
    let mut typed = decode_resource(kind, &group, &label, &documents.remove(0))?;
    if typed.name().is_empty() {
        typed.set_name(&name);
    }
    let key = ResourceKey::new(kind, &group, &name);
    let outcome = state
        .config
        .write(vec![Change::Put(key, typed.encode().into())])
        .await?;
    state
        .metrics
        .writes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(written(outcome, vec![label]))
}

async fn delete_resource(
    State(state): State<ApiState>,
    Path((kind, name)): Path<(String, String)>,
    Query(scope): Query<Scope>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let group = group_of(&scope)?;
    let outcome = state
        .config
        .write(vec![Change::Delete(ResourceKey::new(kind, &group, &name))])
        .await?;
    state
        .metrics
        .writes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(written(outcome, vec![format!("{kind}/{name}")]))
}

async fn apply(
    State(state): State<ApiState>,
    Query(options): Query<ApplyOptions>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let group = group_of(&Scope {
        group: options.group,
    })?;
    let documents = parse_documents(&headers, &body)?;
    if documents.is_empty() {
        return Err(ApiError::simple(
            StatusCode::BAD_REQUEST,
            "no resources in the body",
        ));
    }
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut applied = Vec::new();
    for (index, document) in documents.iter().enumerate() {
        let label = format!("document {}", index + 1);
        let Some(type_name) = document.get("@type").and_then(Value::as_str) else {
            problems.push(problem(
                label,
                &group,
                "@type".into(),
                "every resource needs \"@type\" (e.g. Cluster or its full type URL)".into(),
            ));
            continue;
        };
        let Some(kind) = Kind::from_type_name(type_name) else {
            problems.push(problem(label, &group, "@type".into(), format!("{type_name:?} is not one of Listener, RouteConfiguration, Cluster, ClusterLoadAssignment, Secret")));
            continue;
        };
        let typed = match decode_resource(kind, &group, &label, document) {
            Ok(typed) => typed,
            Err(ApiError(_, body)) => {
                if let Ok(found) = serde_json::from_value::<Vec<Problem>>(body["problems"].clone())
                {
                    problems.extend(found);
                }
                continue;
            }
        };
        if typed.name().is_empty() {
            problems.push(problem(
                format!("{label} ({kind})"),
                &group,
                Typed::name_field(kind).into(),
                "must not be empty".into(),
            ));
            continue;
        }
        let key = ResourceKey::new(kind, &group, typed.name());
        if !seen.insert(key.clone()) {
            problems.push(problem(
                format!("{kind}/{}", key.name),
                &group,
                String::new(),
                "appears twice in this apply".into(),
            ));
            continue;
        }
        applied.push(format!("{kind}/{}", key.name));
        changes.push(Change::Put(key, typed.encode().into()));
    }
    if !problems.is_empty() {
        return Err(ApiError::bad_request(problems));
    }
    if options.dry_run {
        let outcome = state.config.check(changes).await?;
        return Ok(axum::Json(json!({
            "dry_run": true,
            "version": outcome.version,
            "would_apply": applied,
            "waiting": outcome.waiting,
            "remora_rejects": outcome.remora,
        }))
        .into_response());
    }
    let outcome = state.config.write(changes).await?;
    state
        .metrics
        .writes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(written(outcome, applied))
}

async fn list_resources(
    State(state): State<ApiState>,
    Path(kind): Path<String>,
    Query(scope): Query<Scope>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let current = state.config.current();
    let mut items = Vec::new();
    for (key, bytes) in current.resources.iter().filter(|(key, _)| key.kind == kind) {
        if scope
            .group
            .as_ref()
            .is_some_and(|group| *group != key.group)
        {
            continue;
        }
        let resource = stored_to_json(kind, bytes)
            .map_err(|error| ApiError::simple(StatusCode::INTERNAL_SERVER_ERROR, error))?;
        items.push(json!({
            "name": key.name,
            "group": key.group,
            "version": crate::snapshot::resource_version(bytes),
            "resource": resource,
        }));
    }
    Ok(axum::Json(json!({"version": current.version, "items": items})).into_response())
}

async fn get_resource(
    State(state): State<ApiState>,
    Path((kind, name)): Path<(String, String)>,
    Query(scope): Query<Scope>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let group = group_of(&scope)?;
    let current = state.config.current();
    let key = ResourceKey::new(kind, &group, &name);
    let bytes = current.resources.get(&key).ok_or_else(|| {
        ApiError::simple(
            StatusCode::NOT_FOUND,
            format!("{} does not exist", key.label()),
        )
    })?;
    let resource = stored_to_json(kind, bytes)
        .map_err(|error| ApiError::simple(StatusCode::INTERNAL_SERVER_ERROR, error))?;
    Ok(axum::Json(resource).into_response())
}

async fn list_proxies(State(state): State<ApiState>) -> Response {
    axum::Json(json!({"proxies": state.registry.list()})).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let text = state
        .metrics
        .render(state.registry.len(), state.config.current().version);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
