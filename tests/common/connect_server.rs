//! A minimal Connect-protocol server (unary calls, `application/proto`, over
//! HTTP/1.1) in front of any `HostAgent`: what an existing connect-go host
//! agent looks like on the wire. Test support only.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prost::Message;
use sandbox_snapshots::agent::{CreateSnapshotRequest, DeleteSnapshotRequest, SnapshotKey};
use sandbox_snapshots::{AgentCode, AgentError, HostAgent, SandboxId, TeamId, TemplateId};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::wire;

const PREFIX: &str = "/hostagent.v1.HostAgentService/";

pub struct ConnectServer {
    pub addr: SocketAddr,
    /// The raw body of the last CreateSnapshot request received.
    pub last_create_body: Arc<Mutex<Option<Bytes>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectServer {
    pub async fn start(agent: Arc<dyn HostAgent>, token: Option<&str>) -> ConnectServer {
        Self::start_on(agent, token, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(
        agent: Arc<dyn HostAgent>,
        token: Option<&str>,
        addr: SocketAddr,
    ) -> ConnectServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = token.map(|t| format!("Bearer {t}"));
        let last_create_body = Arc::new(Mutex::new(None));
        let seen = last_create_body.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) closes every
            // connection: the server is really gone.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let agent = agent.clone();
                let token = token.clone();
                let seen = seen.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(agent.clone(), token.clone(), seen.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ConnectServer {
            addr,
            last_create_body,
            task,
        }
    }

    /// Closes the listener and every open connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn http_status(code: &str) -> StatusCode {
    match code {
        "canceled" => StatusCode::from_u16(499).unwrap(),
        "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists" | "aborted" => StatusCode::CONFLICT,
        "permission_denied" => StatusCode::FORBIDDEN,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    Response::builder()
        .status(http_status(code))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn agent_error(err: AgentError) -> Response<Full<Bytes>> {
    match err {
        AgentError::Unavailable { message, .. } => error("unavailable", &message),
        AgentError::Timeout => error("deadline_exceeded", "timed out"),
        AgentError::Rejected { code, message } => error(code.as_str(), &message),
        AgentError::Protocol { message } => error("internal", &message),
        _ => error("unknown", "unknown"),
    }
}

fn ok(message: impl Message) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/proto")
        .body(Full::new(Bytes::from(message.encode_to_vec())))
        .unwrap()
}

fn invalid(what: &str) -> AgentError {
    AgentError::rejected(AgentCode::InvalidArgument, format!("invalid {what}"))
}

fn opt<T>(
    text: &str,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Option<T>, AgentError> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse(text).map(Some).ok_or_else(|| invalid(what))
    }
}

async fn handle(
    agent: Arc<dyn HostAgent>,
    token: Option<String>,
    seen: Arc<Mutex<Option<Bytes>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::POST {
        return Ok(error("unimplemented", "POST only"));
    }
    if req.headers().get("content-type").map(|v| v.as_bytes()) != Some(b"application/proto") {
        return Ok(Response::builder()
            .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if let Some(token) = &token {
        let given = req.headers().get("authorization").map(|v| v.as_bytes());
        if given != Some(token.as_bytes()) {
            return Ok(error("unauthenticated", "bad token"));
        }
    }
    let deadline = req
        .headers()
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(3600));
    let Some(method) = req.uri().path().strip_prefix(PREFIX).map(str::to_owned) else {
        return Ok(error("unimplemented", "unknown service"));
    };
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(error("internal", "body"));
    };
    let call = async {
        match method.as_str() {
            "CreateSnapshot" => {
                *seen.lock().unwrap() = Some(body.clone());
                let m =
                    wire::CreateSnapshotRequest::decode(body).map_err(|_| invalid("message"))?;
                let mut r = CreateSnapshotRequest::new(
                    SandboxId::parse(&m.sandbox_id).map_err(|_| invalid("sandbox_id"))?,
                    SnapshotKey::parse(&m.name).map_err(|_| invalid("name"))?,
                );
                r.team_id = opt(&m.team_id, |t| TeamId::parse(t).ok(), "team_id")?;
                r.template_id = opt(&m.template_id, |t| TemplateId::parse(t).ok(), "template_id")?;
                let resp = agent.create_snapshot(r).await?;
                Ok(ok(wire::CreateSnapshotResponse {
                    name: resp.key,
                    size_bytes: resp.size_bytes as i64,
                }))
            }
            "DeleteSnapshot" => {
                let m =
                    wire::DeleteSnapshotRequest::decode(body).map_err(|_| invalid("message"))?;
                let r = DeleteSnapshotRequest::new(
                    SnapshotKey::parse(&m.name).map_err(|_| invalid("name"))?,
                );
                agent.delete_snapshot(r).await?;
                Ok(ok(wire::Empty {}))
            }
            "ListSandboxes" => {
                let list = agent.list_sandboxes().await?;
                Ok(ok(wire::ListSandboxesResponse {
                    sandboxes: list
                        .sandboxes
                        .into_iter()
                        .map(|s| wire::SandboxInfo {
                            sandbox_id: s.sandbox_id,
                            status: s.status,
                            template: s.template,
                            vcpus: s.vcpus as i32,
                            memory_mb: s.memory_mb as i32,
                            host_ip: s.host_ip,
                            created_at_unix: s.created_at_unix,
                            last_active_at_unix: s.last_active_at_unix,
                            timeout_sec: s.timeout_sec,
                        })
                        .collect(),
                    auto_paused_sandbox_ids: list.auto_paused_sandbox_ids,
                }))
            }
            "ListSnapshots" => {
                let list = agent.list_snapshots().await?;
                Ok(ok(wire::ListSnapshotsResponse {
                    snapshots: list
                        .into_iter()
                        .map(|s| wire::SnapshotInfo {
                            name: s.key,
                            size_bytes: s.size_bytes as i64,
                            created_at_unix: s.created_at.map_or(0, |t| t.unix_millis() / 1000),
                        })
                        .collect(),
                }))
            }
            _ => Err(AgentError::rejected(
                AgentCode::Unimplemented,
                "unknown method",
            )),
        }
    };
    let response = match tokio::time::timeout(deadline, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => agent_error(err),
        Err(_) => error("deadline_exceeded", "deadline exceeded"),
    };
    Ok(response)
}
