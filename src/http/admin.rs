//! Admin endpoints (admin API keys only): teams and keys, the host and
//! sandbox registry, platform templates, pending work.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use serde::{Deserialize, Serialize};

use super::{ApiResult, ApiState, PathParam, TemplateBody, json_body, parse_name};
use crate::error::Error;
use crate::ids::{HostId, OperationId, SandboxId, TeamId};
use crate::manager::{NewSnapshot, SnapshotManager};
use crate::model::{Caller, Host, HostStatus, Sandbox, SandboxStatus};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/admin/teams", post(create_team))
        .route("/v1/admin/teams/{team_id}/keys", post(create_key))
        .route("/v1/admin/teams/{team_id}/limits", put(set_limits))
        .route("/v1/admin/teams/{team_id}/retention", put(set_retention))
        .route("/v1/admin/hosts", get(list_hosts).post(register_host))
        .route("/v1/admin/hosts/{host_id}", patch(update_host))
        .route("/v1/admin/sandboxes", post(register_sandbox))
        .route(
            "/v1/admin/sandboxes/{sandbox_id}",
            get(get_sandbox).patch(update_sandbox),
        )
        .route("/v1/admin/templates", post(create_platform_template))
        .route(
            "/v1/admin/templates/{name}",
            delete(delete_platform_template),
        )
        .route("/v1/admin/pending", get(pending))
        .route("/v1/admin/operations", get(list_operations))
        .route(
            "/v1/admin/operations/{operation_id}/resolve",
            post(resolve_operation),
        )
}

fn parse_id<T>(
    raw: &str,
    field: &str,
    parse: impl Fn(&str) -> Result<T, crate::ids::IdError>,
) -> ApiResult<T> {
    if raw.is_empty() {
        return Err(Error::invalid_request(format!("{field} is required")).into());
    }
    parse(raw).map_err(|_| Error::invalid_request(format!("invalid {field}")).into())
}

/// The platform team's admin, acting for the key that called.
fn platform_caller(caller: &Caller) -> Caller {
    Caller::admin(TeamId::PLATFORM, caller.actor().clone())
}

#[derive(Deserialize)]
struct TeamBody {
    #[serde(default)]
    name: String,
}

#[derive(Serialize)]
struct KeyBody {
    team_id: String,
    key_id: String,
    /// Shown once.
    api_key: String,
}

async fn create_team(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body: TeamBody = json_body(body)?;
    let team = state.keys.create_team(&body.name).await?;
    let key = state.keys.create_key(team, "default", false).await?;
    let out = KeyBody {
        team_id: team.to_string(),
        key_id: key.id.to_string(),
        api_key: key.reveal().to_owned(),
    };
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

#[derive(Deserialize)]
struct NewKeyBody {
    #[serde(default)]
    name: String,
}

async fn create_key(
    State(state): State<ApiState>,
    PathParam(team_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let team = parse_id(&team_id, "team_id", TeamId::parse)?;
    let body: NewKeyBody = json_body(body)?;
    let key = state.keys.create_key(team, &body.name, false).await?;
    let out = KeyBody {
        team_id: team.to_string(),
        key_id: key.id.to_string(),
        api_key: key.reveal().to_owned(),
    };
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

#[derive(Serialize)]
struct HostOut {
    id: String,
    address: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_heartbeat: Option<String>,
}

impl From<&Host> for HostOut {
    fn from(h: &Host) -> Self {
        Self {
            id: h.id.to_string(),
            address: h.address.clone(),
            status: h.status.as_str(),
            last_heartbeat: h.last_heartbeat.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Deserialize)]
struct HostIn {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    status: Option<String>,
}

async fn list_hosts(State(state): State<ApiState>) -> ApiResult<Response> {
    let hosts = state.manager.registry().hosts().await?;
    let out: Vec<HostOut> = hosts.iter().map(HostOut::from).collect();
    Ok(axum::Json(out).into_response())
}

async fn register_host(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body: HostIn = json_body(body)?;
    let id = match body.id.as_deref() {
        None | Some("") => HostId::new(),
        Some(raw) => parse_id(raw, "id", HostId::parse)?,
    };
    let status = match body.status.as_deref() {
        None | Some("") => HostStatus::Online,
        Some(raw) => raw.parse::<HostStatus>()?,
    };
    let host = state
        .manager
        .registry()
        .register_host(id, body.address, status)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(HostOut::from(&host))).into_response())
}

#[derive(Deserialize)]
struct HostPatch {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

async fn update_host(
    State(state): State<ApiState>,
    PathParam(host_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&host_id, "host_id", HostId::parse)?;
    let body: HostPatch = json_body(body)?;
    let registry = state.manager.registry();
    if let Some(status) = body.status.as_deref() {
        registry
            .set_host_status(id, status.parse::<HostStatus>()?)
            .await?;
    }
    if let Some(address) = body.address {
        registry.set_host_address(id, address).await?;
    }
    let host = registry
        .host(id)
        .await?
        .ok_or_else(|| Error::not_found("host not found"))?;
    Ok(axum::Json(HostOut::from(&host)).into_response())
}

#[derive(Serialize)]
struct SandboxOut {
    id: String,
    team_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_id: Option<String>,
    status: &'static str,
    vcpus: u32,
    memory_mb: u32,
}

impl From<&Sandbox> for SandboxOut {
    fn from(s: &Sandbox) -> Self {
        Self {
            id: s.id.to_string(),
            team_id: s.team.to_string(),
            host_id: s.host.map(|h| h.to_string()),
            status: s.status.as_str(),
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
        }
    }
}

#[derive(Deserialize)]
struct SandboxIn {
    #[serde(default)]
    id: String,
    #[serde(default)]
    team_id: String,
    #[serde(default)]
    host_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    vcpus: u32,
    #[serde(default)]
    memory_mb: u32,
}

async fn register_sandbox(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body: SandboxIn = json_body(body)?;
    let id = parse_id(&body.id, "id", SandboxId::parse)?;
    let team = parse_id(&body.team_id, "team_id", TeamId::parse)?;
    let host = match body.host_id.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(parse_id(raw, "host_id", HostId::parse)?),
    };
    let status = match body.status.as_deref() {
        None | Some("") => SandboxStatus::Running,
        Some(raw) => raw.parse::<SandboxStatus>()?,
    };
    let sandbox = Sandbox::new(id, team, host, status, body.vcpus, body.memory_mb);
    state
        .manager
        .registry()
        .register_sandbox(sandbox.clone())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(SandboxOut::from(&sandbox))).into_response())
}

async fn get_sandbox(
    State(state): State<ApiState>,
    PathParam(sandbox_id): PathParam,
) -> ApiResult<Response> {
    let id = parse_id(&sandbox_id, "sandbox_id", SandboxId::parse)?;
    let sandbox = state
        .manager
        .registry()
        .sandbox(id)
        .await?
        .ok_or_else(|| Error::not_found("sandbox not found"))?;
    Ok(axum::Json(SandboxOut::from(&sandbox)).into_response())
}

#[derive(Deserialize)]
struct SandboxPatch {
    #[serde(default)]
    status: String,
}

async fn update_sandbox(
    State(state): State<ApiState>,
    PathParam(sandbox_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&sandbox_id, "sandbox_id", SandboxId::parse)?;
    let body: SandboxPatch = json_body(body)?;
    let status = body.status.parse::<SandboxStatus>()?;
    let sandbox = state
        .manager
        .registry()
        .set_sandbox_status(id, status)
        .await?;
    Ok(axum::Json(SandboxOut::from(&sandbox)).into_response())
}

#[derive(Deserialize)]
struct PlatformTemplateIn {
    #[serde(default)]
    sandbox_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    overwrite: bool,
}

async fn create_platform_template(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body: PlatformTemplateIn = json_body(body)?;
    let request = NewSnapshot::parse(&body.sandbox_id, &body.name)?.overwrite(body.overwrite);
    let template = state
        .manager
        .create(&platform_caller(&caller), request)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TemplateBody::from(&template)),
    )
        .into_response())
}

async fn delete_platform_template(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(name): PathParam,
) -> ApiResult<StatusCode> {
    let name = parse_name(&name)?;
    state
        .manager
        .delete(&platform_caller(&caller), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct PendingOut {
    deletions: Vec<serde_json::Value>,
    operations: Vec<serde_json::Value>,
    destroys: Vec<serde_json::Value>,
}

async fn pending(State(state): State<ApiState>) -> ApiResult<Response> {
    let deletions = state.manager.pending_deletions().await?;
    let operations = state.manager.open_operations().await?;
    let destroys = state.manager.pending_destroys().await?;
    let out = PendingOut {
        deletions: deletions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "template_id": d.template_id.to_string(),
                    "host_id": d.host.to_string(),
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "next_attempt": d.next_attempt.to_rfc3339(),
                })
            })
            .collect(),
        operations: operations.iter().map(operation_json).collect(),
        destroys: destroys
            .iter()
            .map(|d| {
                serde_json::json!({
                    "sandbox_id": d.sandbox.to_string(),
                    "team_id": d.team.to_string(),
                    "host_id": d.host.to_string(),
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "next_attempt": d.next_attempt.to_rfc3339(),
                })
            })
            .collect(),
    };
    Ok(axum::Json(out).into_response())
}

fn operation_json(o: &crate::store::OpenOperation) -> serde_json::Value {
    serde_json::json!({
        "id": o.id.to_string(),
        "template_id": o.template_id.to_string(),
        "team_id": o.team.to_string(),
        "name": o.name.as_str(),
        "sandbox_id": o.sandbox.to_string(),
        "host_id": o.host.to_string(),
        "phase": o.phase,
        "attempts": o.attempts,
        "last_error": o.last_error,
        "started_at": o.started_at.to_rfc3339(),
        "owner": o.owner.map(|i| i.to_string()),
    })
}

async fn list_operations(State(state): State<ApiState>) -> ApiResult<Response> {
    let operations = state.manager.open_operations().await?;
    let out: Vec<serde_json::Value> = operations.iter().map(operation_json).collect();
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
struct ResolveIn {
    #[serde(default)]
    sandbox_status: String,
}

async fn resolve_operation(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(operation_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&operation_id, "operation_id", OperationId::parse)?;
    let body: ResolveIn = json_body(body)?;
    if body.sandbox_status.is_empty() {
        return Err(Error::invalid_request("sandbox_status is required").into());
    }
    let status = body.sandbox_status.parse::<SandboxStatus>()?;
    let resolved = state.manager.resolve_operation(&caller, id, status).await?;
    Ok(axum::Json(serde_json::json!({
        "id": resolved.id.to_string(),
        "template_id": resolved.template_id.to_string(),
        "team_id": resolved.team.to_string(),
        "sandbox_id": resolved.sandbox.to_string(),
        "sandbox_status": resolved.sandbox_status.as_str(),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct LimitsBody {
    max_snapshots: Option<u64>,
    max_bytes: Option<u64>,
}

/// `PUT /v1/admin/teams/{team_id}/limits`: null or absent is no limit.
/// Answers the team's usage with the new limits.
async fn set_limits(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(team_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let team = parse_id(&team_id, "team_id", TeamId::parse)?;
    let body: LimitsBody = json_body(body)?;
    let limits = crate::model::TeamLimits::new(body.max_snapshots, body.max_bytes);
    let usage = state
        .manager
        .set_team_limits(&platform_caller(&caller), team, limits)
        .await?;
    Ok(axum::Json(super::usage_json(&usage)).into_response())
}

#[derive(Deserialize)]
struct RetentionBody {
    /// Any JSON value each, checked for a clear 400.
    default_ttl_seconds: Option<serde_json::Value>,
    delete_unused_after: Option<serde_json::Value>,
    keep_last_per_sandbox: Option<serde_json::Value>,
}

/// A team's retention policy as the API shows it (null: off).
pub(super) fn retention_json(p: &crate::model::RetentionPolicy) -> serde_json::Value {
    serde_json::json!({
        "default_ttl_seconds": p.default_ttl.map(|d| d.as_secs()),
        "delete_unused_after": p.delete_unused_after.map(|d| d.as_secs()),
        "keep_last_per_sandbox": p.keep_last_per_sandbox,
    })
}

/// `PUT /v1/admin/teams/{team_id}/retention`: null or absent is off.
/// Answers the policy as stored.
async fn set_retention(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    PathParam(team_id): PathParam,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let team = parse_id(&team_id, "team_id", TeamId::parse)?;
    let body: RetentionBody = json_body(body)?;
    let mut policy = crate::model::RetentionPolicy::new();
    policy.default_ttl =
        super::retention_seconds("default_ttl_seconds", body.default_ttl_seconds.as_ref())?;
    policy.delete_unused_after =
        super::retention_seconds("delete_unused_after", body.delete_unused_after.as_ref())?;
    if let Some(keep) = &body.keep_last_per_sandbox {
        let n = keep
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                Error::invalid_request(format!(
                    "keep_last_per_sandbox must be a whole number from 1 to {}",
                    u32::MAX
                ))
            })?;
        policy.keep_last_per_sandbox = Some(n);
    }
    let policy = state
        .manager
        .set_team_retention(&platform_caller(&caller), team, policy)
        .await?;
    Ok(axum::Json(retention_json(&policy)).into_response())
}
