//! The HTTP API for self-hosters and non-Rust clients (feature `server`):
//! the REST endpoints of SPEC §3 over a [`Manager`], API-key
//! authentication, admin endpoints for the registry, and the OpenAPI
//! document.
//!
//! Every error is `{"error":{"code":"…","message":"…"}}` with the status of
//! its [`ErrorCode`]; unknown routes and wrong methods too.

mod admin;
mod auth;

use std::collections::HashMap;
use std::future::Future;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use auth::{ApiKeys, NewApiKey};
pub use metrics_exporter_prometheus::PrometheusHandle;

use crate::audit::{AuditEntry, AuditQuery};
use crate::error::{Error, ErrorCode};
use crate::ids::{OperationId, SandboxId};
use crate::manager::{
    ListQuery, Manager, NewSnapshot, RestoreRequest, SnapshotManager, Submission, Submitted,
};
use crate::model::{Caller, Sandbox, Template, TemplateType, Timestamp};
use crate::names::TemplateName;
use crate::operation::{IdempotencyKey, Operation, OperationKind, OperationState};

/// The header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The response header that carries the next page's cursor.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";
/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The OpenAPI 3 document of every endpoint, as served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    manager: Manager,
    keys: ApiKeys,
    metrics: Option<PrometheusHandle>,
}

impl ApiState {
    /// Serves `manager`, with keys in the manager's store. `GET /metrics`
    /// renders the recorder of [`install_prometheus`], once it is installed,
    /// unless [`ApiState::with_metrics`] names another.
    pub fn new(manager: Manager) -> Self {
        let keys = ApiKeys::for_manager(&manager);
        Self {
            manager,
            keys,
            metrics: None,
        }
    }

    /// Serves `handle` at `GET /metrics` (a Prometheus recorder the
    /// application installed itself).
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The API keys.
    pub fn keys(&self) -> &ApiKeys {
        &self.keys
    }
}

/// An [`Error`] as an HTTP response.
pub(crate) struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Not logged here: the manager logs each failed operation once, and
        // the request log line carries the status.
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.0.code().as_str(),
                message: self.0.message(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The template object of SPEC §3.
#[derive(Serialize)]
pub(crate) struct TemplateBody {
    name: String,
    #[serde(rename = "type")]
    template_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u32>,
    size_bytes: u64,
    created_at: String,
    platform: bool,
    state: &'static str,
    hosts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    compat: Option<crate::agent::HostInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

impl From<&Template> for TemplateBody {
    fn from(t: &Template) -> Self {
        Self {
            name: t.name.to_string(),
            template_type: t.template_type.as_str(),
            vcpus: (t.vcpus != 0).then_some(t.vcpus),
            memory_mb: (t.memory_mb != 0).then_some(t.memory_mb),
            size_bytes: t.size_bytes,
            created_at: t.created_at.to_rfc3339(),
            platform: t.is_platform(),
            state: t.state.as_str(),
            hosts: t.hosts,
            compat: t.compat.clone(),
            last_used_at: t.last_used_at.map(Timestamp::to_rfc3339),
            expires_at: t.expires_at.map(Timestamp::to_rfc3339),
        }
    }
}

/// The sandbox object of SPEC §7.
#[derive(Serialize)]
pub(crate) struct SandboxBody {
    sandbox_id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
    vcpus: u32,
    memory_mb: u32,
    created_at: String,
}

impl From<&Sandbox> for SandboxBody {
    fn from(s: &Sandbox) -> Self {
        Self {
            sandbox_id: s.id.to_string(),
            status: s.status.as_str(),
            host_id: s.host.map(|h| h.to_string()),
            template: s.template.as_ref().map(ToString::to_string),
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
            created_at: s.created_at.to_rfc3339(),
        }
    }
}

/// An audit entry over HTTP: our fields, plus the reference's names for
/// the same facts (SPEC §4 item 8), so that its clients read it unchanged.
#[derive(Serialize)]
struct AuditBody {
    id: String,
    action: String,
    resource_type: String,
    resource_id: String,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    actor: ActorBody,
    metadata: serde_json::Value,
    created_at: String,
    /// The reference's outcome: `success` or `error`.
    status: &'static str,
    /// The reference's scope: `team`, or `platform` for the platform
    /// team's log.
    scope: &'static str,
    actor_type: &'static str,
    actor_id: Option<String>,
    actor_name: Option<String>,
}

#[derive(Serialize)]
struct ActorBody {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl From<&AuditEntry> for AuditBody {
    fn from(e: &AuditEntry) -> Self {
        let actor = match &e.actor {
            crate::model::Actor::User { id, name } => ActorBody {
                kind: "user",
                id: Some(id.clone()),
                name: Some(name.clone()),
            },
            crate::model::Actor::ApiKey { id, name } => ActorBody {
                kind: "api_key",
                id: Some(id.to_string()),
                name: Some(name.clone()),
            },
            crate::model::Actor::System => ActorBody {
                kind: "system",
                id: None,
                name: None,
            },
        };
        Self {
            id: e.id.to_string(),
            action: e.action.clone(),
            resource_type: e.resource_type.clone(),
            resource_id: e.resource_id.clone(),
            outcome: e.outcome.as_str(),
            error_code: e.error_code.clone(),
            status: match e.outcome {
                crate::audit::AuditOutcome::Success => "success",
                crate::audit::AuditOutcome::Failure => "error",
            },
            scope: if e.team.is_platform() {
                "platform"
            } else {
                "team"
            },
            actor_type: actor.kind,
            actor_id: actor.id.clone(),
            actor_name: actor.name.clone(),
            actor,
            metadata: e.metadata.clone(),
            created_at: e.created_at.to_rfc3339(),
        }
    }
}

/// Parses a JSON body the way SPEC §3 wants: anything unreadable is
/// "invalid JSON body".
pub(crate) fn json_body<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<T> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::new(
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            Error::invalid_request("invalid JSON body")
        }
    })?;
    // Bodies are JSON objects; an array or a scalar is not a request. As
    // in the reference (Go's decoder), `null` and null members are empty.
    let mut value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| Error::invalid_request("invalid JSON body"))?;
    if value.is_null() {
        value = serde_json::Value::Object(serde_json::Map::new());
    }
    let Some(members) = value.as_object_mut() else {
        return Err(Error::invalid_request("invalid JSON body").into());
    };
    members.retain(|_, v| !v.is_null());
    serde_json::from_value(value).map_err(|_| Error::invalid_request("invalid JSON body").into())
}

/// On `/v1/snapshots` every key acts as a member of its team: platform
/// templates are created and deleted through `/v1/admin/templates` only
/// (SPEC §3: "platform templates cannot be deleted here").
fn as_member(caller: &Caller) -> Caller {
    Caller::new(caller.team(), caller.actor().clone())
}

/// A path parameter; an undecodable one (bad percent-encoding, invalid
/// UTF-8) is a JSON 400 like every other bad input.
pub(crate) struct PathParam(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(_) => Err(Error::invalid_request("invalid path parameter").into()),
        }
    }
}

pub(crate) fn parse_name(raw: &str) -> ApiResult<TemplateName> {
    Ok(TemplateName::parse(raw).map_err(Error::from)?)
}

fn parse_limit(query: &HashMap<String, String>) -> ApiResult<Option<u32>> {
    query
        .get("limit")
        .map(|l| {
            l.parse::<u32>().map_err(|_| {
                Error::invalid_request("invalid limit: expected a positive integer").into()
            })
        })
        .transpose()
}

fn with_cursor<T: Serialize>(items: T, next: Option<String>) -> ApiResult<Response> {
    let mut response = axum::Json(items).into_response();
    if let Some(next) = next {
        let value = HeaderValue::from_str(&next)
            .map_err(|_| Error::invalid_request("cursor is not a valid header value"))?;
        response.headers_mut().insert(NEXT_CURSOR_HEADER, value);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(default)]
    sandbox_id: String,
    #[serde(default)]
    name: String,
    /// Any JSON value, checked by [`retention_seconds`] for a clear 400.
    #[serde(default)]
    ttl_seconds: Option<serde_json::Value>,
}

/// A retention field of a request body (`what` names it): an integer
/// number of seconds from 1 to `MAX_TTL`; the library checks the range
/// again with the same message.
pub(crate) fn retention_seconds(
    what: &str,
    value: Option<&serde_json::Value>,
) -> ApiResult<Option<std::time::Duration>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let max = crate::manager::MAX_TTL.as_secs();
    match value.as_u64() {
        Some(secs) if (1..=max).contains(&secs) => Ok(Some(std::time::Duration::from_secs(secs))),
        _ => Err(Error::invalid_request(format!(
            "{what} must be a whole number of seconds from 1 to {max}"
        ))
        .into()),
    }
}

/// The header of SPEC §8's idempotency keys.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The response header that marks a replayed answer.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// How a `POST` that creates something is submitted: its idempotency key
/// (400 when malformed), whether it asks `Prefer: respond-async`, and its
/// fingerprint (method, path, query and the body's bytes).
fn submission(
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Result<Bytes, BytesRejection>,
) -> ApiResult<(Option<IdempotencyKey>, Submission)> {
    use sha2::Digest;
    let key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                Error::invalid_request(
                    "invalid Idempotency-Key: only printable ASCII characters are allowed",
                )
            })?;
            Some(IdempotencyKey::parse(text)?)
        }
    };
    let respond_async = headers
        .get_all(axum::http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
        });
    let fingerprint = key.as_ref().map(|_| {
        let mut hash = sha2::Sha256::new();
        for part in [method.as_str(), uri.path(), uri.query().unwrap_or("")] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        if let Ok(body) = body {
            hash.update(body);
        }
        let digest = hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("http {hex}")
    });
    Ok((
        key,
        Submission {
            fingerprint,
            respond_async,
        },
    ))
}

/// The 202 of an asynchronous start (SPEC §8), the same when replayed.
fn accepted(id: OperationId, kind: OperationKind) -> ApiResult<Response> {
    let location = format!("/v1/operations/{id}");
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(OperationBody {
            operation_id: id.to_string(),
            kind: kind.as_str(),
            state: OperationState::Running.as_str(),
            created_at: None,
            finished_at: None,
            template: None,
            sandbox: None,
            error: None,
        }),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::LOCATION,
        HeaderValue::from_str(&location)
            .map_err(|_| Error::new(ErrorCode::DbError, "invalid operation id"))?,
    );
    headers.insert(
        axum::http::header::HeaderName::from_static("preference-applied"),
        HeaderValue::from_static("respond-async"),
    );
    Ok(response)
}

/// A submitted create's or restore's answer: its outcome (201 with
/// `body`), a 202, or the first answer of a remembered request.
fn submitted<T, B: Serialize>(
    submitted: Submitted<T>,
    body: impl Fn(&T) -> B,
    replayed: impl Fn(Operation) -> Option<T>,
) -> ApiResult<Response> {
    match submitted {
        Submitted::Done(item) => Ok((StatusCode::CREATED, axum::Json(body(&item))).into_response()),
        Submitted::Started(op) => accepted(op.id, op.kind),
        Submitted::Replay(stored) => {
            let op = stored.operation();
            let mut response = if stored.respond_async {
                accepted(op.id, op.kind)?
            } else {
                let item = crate::manager::replayed(op, replayed)?;
                (StatusCode::CREATED, axum::Json(body(&item))).into_response()
            };
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
            Ok(response)
        }
    }
}

/// A replayed failure carries the replay header too.
fn replayed_error(err: ApiError, replay: bool) -> Response {
    let mut response = err.into_response();
    if replay {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

async fn create_snapshot(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (key, how) = submission(&method, &uri, &headers, &body)?;
    let body: CreateBody = json_body(body)?;
    let overwrite = query.get("overwrite").is_some_and(|v| v == "true");
    let mut request = NewSnapshot::parse(&body.sandbox_id, &body.name)?.overwrite(overwrite);
    if let Some(ttl) = retention_seconds("ttl_seconds", body.ttl_seconds.as_ref())? {
        request = request.ttl(ttl);
    }
    if let Some(key) = key {
        request = request.idempotency_key(key);
    }
    // The manager runs the snapshot on its own task: a client that goes
    // away does not abort it, and its result is recorded either way.
    if caller.team().is_platform() {
        return Err(
            Error::forbidden("platform templates are created through /v1/admin/templates").into(),
        );
    }
    let outcome = state
        .manager
        .submit_create(&as_member(&caller), request, how)
        .await?;
    let replay = matches!(outcome, Submitted::Replay(_));
    Ok(submitted(
        outcome,
        |t: &Template| TemplateBody::from(t),
        |op| op.template,
    )
    .unwrap_or_else(|err| replayed_error(err, replay)))
}

#[derive(Deserialize)]
struct RestoreBody {
    #[serde(default)]
    template: String,
    sandbox_id: Option<String>,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    timeout_sec: Option<u32>,
    disk_size_mb: Option<u32>,
}

async fn restore_sandbox(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (key, how) = submission(&method, &uri, &headers, &body)?;
    let body: RestoreBody = json_body(body)?;
    let mut request = RestoreRequest::parse(&body.template, body.sandbox_id.as_deref())?
        .timeout_sec(body.timeout_sec.unwrap_or(0))
        .disk_size_mb(body.disk_size_mb.unwrap_or(0));
    if let Some(vcpus) = body.vcpus {
        request = request.vcpus(vcpus);
    }
    if let Some(memory_mb) = body.memory_mb {
        request = request.memory_mb(memory_mb);
    }
    if let Some(key) = key {
        request = request.idempotency_key(key);
    }
    // Like a create, the restore runs on its own task: a client that goes
    // away does not abort it.
    let outcome = state
        .manager
        .submit_restore(&as_member(&caller), request, how)
        .await?;
    let replay = matches!(outcome, Submitted::Replay(_));
    Ok(
        submitted(outcome, |s: &Sandbox| SandboxBody::from(s), |op| op.sandbox)
            .unwrap_or_else(|err| replayed_error(err, replay)),
    )
}

/// An operation object (SPEC §8): its state, and its template, sandbox or
/// error once it ended.
#[derive(Serialize)]
pub(crate) struct OperationBody<'a> {
    operation_id: String,
    kind: &'static str,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<TemplateBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<SandboxBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail<'a>>,
}

impl<'a> From<&'a Operation> for OperationBody<'a> {
    fn from(op: &'a Operation) -> Self {
        Self {
            operation_id: op.id.to_string(),
            kind: op.kind.as_str(),
            state: op.state.as_str(),
            created_at: Some(op.created_at.to_rfc3339()),
            finished_at: op.finished_at.map(Timestamp::to_rfc3339),
            template: op.template.as_ref().map(TemplateBody::from),
            sandbox: op.sandbox.as_ref().map(SandboxBody::from),
            error: op.error.as_ref().map(|err| ErrorDetail {
                code: err.code().as_str(),
                message: err.message(),
            }),
        }
    }
}

async fn get_operation(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(id): PathParam,
) -> ApiResult<Response> {
    // An id that does not parse is unknown like any other.
    let id = OperationId::parse(&id).map_err(|_| Error::not_found("operation not found"))?;
    let op = state.manager.operation(&caller, id).await?;
    Ok(axum::Json(OperationBody::from(&op)).into_response())
}

async fn get_sandbox(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(id): PathParam,
) -> ApiResult<Response> {
    let id = SandboxId::parse(&id).map_err(|_| Error::invalid_request("invalid sandbox_id"))?;
    let sandbox = state.manager.sandbox(&caller, id).await?;
    Ok(axum::Json(SandboxBody::from(&sandbox)).into_response())
}

/// A team's usage against its quotas (SPEC §8); limits null when unset.
pub(crate) fn usage_json(u: &crate::model::Usage) -> serde_json::Value {
    serde_json::json!({
        "snapshots": u.snapshots,
        "bytes": u.bytes,
        "max_snapshots": u.limits.max_snapshots,
        "max_bytes": u.limits.max_bytes,
    })
}

async fn usage(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> ApiResult<Response> {
    let usage = state.manager.usage(&caller).await?;
    Ok(axum::Json(usage_json(&usage)).into_response())
}

async fn list_snapshots(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let mut list = ListQuery::new();
    if let Some(kind) = query.get("type").filter(|t| !t.is_empty()) {
        list = list.template_type(kind.parse::<TemplateType>()?);
    }
    if let Some(limit) = parse_limit(&query)? {
        list = list.limit(limit);
    }
    if let Some(cursor) = query.get("cursor").filter(|c| !c.is_empty()) {
        list = list.cursor(cursor.clone());
    }
    let page = state.manager.list(&caller, list).await?;
    let items: Vec<TemplateBody> = page.items.iter().map(TemplateBody::from).collect();
    with_cursor(items, page.next_cursor)
}

async fn get_snapshot(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(name): PathParam,
) -> ApiResult<Response> {
    let name = parse_name(&name)?;
    let template = state.manager.get(&caller, &name).await?;
    Ok(axum::Json(TemplateBody::from(&template)).into_response())
}

async fn delete_snapshot(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(name): PathParam,
) -> ApiResult<StatusCode> {
    let name = parse_name(&name)?;
    state.manager.delete(&as_member(&caller), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn audit_logs(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let mut audit = AuditQuery::new();
    if let Some(limit) = parse_limit(&query)? {
        audit = audit.limit(limit);
    }
    if let Some(cursor) = query.get("cursor").filter(|c| !c.is_empty()) {
        audit = audit.cursor(cursor.clone());
    }
    if let Some(kind) = query.get("resource_type").filter(|c| !c.is_empty()) {
        audit = audit.resource_type(kind.clone());
    }
    if let Some(action) = query.get("action").filter(|c| !c.is_empty()) {
        audit = audit.action(action.clone());
    }
    let page = state.manager.audit_log(&caller, audit).await?;
    let items: Vec<AuditBody> = page.items.iter().map(AuditBody::from).collect();
    with_cursor(items, page.next_cursor)
}

async fn healthz(State(state): State<ApiState>) -> ApiResult<Response> {
    // Proves the store answers, not just that the process is up.
    state.manager.registry().hosts().await?;
    Ok(axum::Json(serde_json::json!({ "status": "ok" })).into_response())
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
        .into_response()
}

static PROMETHEUS: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Buckets of `snapshots_operation_duration_seconds`: from a fast delete
/// (milliseconds) to a large snapshot (minutes).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Installs a Prometheus recorder as the process's global `metrics`
/// recorder, once; later calls return the same handle. The
/// `snapshots-server` binary calls it at start-up; an application with its
/// own recorder does not, and passes a handle with
/// [`ApiState::with_metrics`] if it wants `/metrics` served.
///
/// # Errors
/// Another global recorder is installed already.
pub fn install_prometheus() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // Serialised, so that two racing first calls install one recorder.
    let _installing = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                crate::metrics::OPERATION_DURATION_SECONDS.to_owned(),
            ),
            LATENCY_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    let handle = PROMETHEUS.get_or_init(|| handle);
    crate::metrics::describe();
    Ok(handle.clone())
}

fn render_metrics(handle: Option<&PrometheusHandle>) -> ApiResult<Response> {
    let handle = handle
        .or_else(|| PROMETHEUS.get())
        .ok_or_else(|| Error::not_found("metrics are not enabled on this server"))?;
    handle.run_upkeep();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

async fn metrics_page(State(state): State<ApiState>) -> ApiResult<Response> {
    render_metrics(state.metrics.as_ref())
}

/// `GET /metrics` alone, without a key: for a separate listen address
/// that only the monitoring network reaches (`--metrics-listen`).
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { render_metrics(Some(&handle)) }
            }),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
}

/// Serves [`metrics_router`] on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router(handle))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn no_route() -> ApiError {
    Error::not_found("no such route").into()
}

async fn wrong_method() -> ApiError {
    Error::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
    .into()
}

/// Resolves `X-API-Key` to a [`Caller`] for the handlers; 401 otherwise.
async fn authenticate(
    State(state): State<ApiState>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match state.keys.authenticate(presented).await {
        Ok(Some(caller)) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Ok(None) => ApiError(Error::new(
            ErrorCode::Unauthorized,
            "missing or invalid API key",
        ))
        .into_response(),
        Err(err) => ApiError(err).into_response(),
    }
}

/// Admin endpoints need an admin key: a team key gets 403.
async fn require_admin(request: Request, next: Next) -> Response {
    match request.extensions().get::<Caller>() {
        Some(caller) if caller.is_admin() => next.run(request).await,
        _ => ApiError(Error::forbidden("an admin API key is required")).into_response(),
    }
}

/// The whole API as an axum router.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/v1/snapshots/{name}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/v1/sandboxes", post(restore_sandbox))
        .route("/v1/sandboxes/{sandbox_id}", get(get_sandbox))
        .route("/v1/operations/{operation_id}", get(get_operation))
        .route("/v1/audit-logs", get(audit_logs))
        .route("/v1/usage", get(usage))
        .merge(
            admin::routes()
                .route("/metrics", get(metrics_page))
                .layer(middleware::from_fn(require_admin)),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(
            // One line per request at INFO (method, path, status, latency);
            // headers, and so API keys, are never logged.
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then lets the
/// requests in flight finish and waits for snapshots in flight to record
/// their result.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let manager = state.manager.clone();
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    manager.shutdown().await;
    Ok(())
}
