//! The Connect protocol's unary calls over HTTP/1.1: how the library talks
//! to existing connect-go host agents, which serve plain HTTP/1.1 and cannot
//! be reached by a gRPC client.
//!
//! A call is `POST <base>/hostagent.v1.HostAgentService/<Method>` with an
//! `application/proto` body. Success is HTTP 200 with an `application/proto`
//! body; failure is a JSON body `{"code": "...", "message": "..."}` whose
//! code is a Connect code, or, failing that, a code derived from the HTTP
//! status as the Connect specification says.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use super::pb::{self, wire};
use super::{
    AgentCode, AgentError, AgentTransport, BearerToken, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, HostAgent, HostTarget, SandboxList,
    SnapshotInfo,
};

/// Largest response body accepted (a `ListSnapshots` of a very full host
/// fits easily).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Settings of the Connect transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectConfig {
    /// Longest a TCP connect may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Deadline of a `CreateSnapshot` call, also sent to the agent as
    /// `connect-timeout-ms`. Default 5 min.
    pub create_timeout: Duration,
    /// Deadline of every other call. Default 30 s.
    pub call_timeout: Duration,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<BearerToken>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            token: None,
        }
    }
}

impl ConnectConfig {
    /// Sends `token` on every call.
    pub fn token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the per-call deadlines.
    pub fn timeouts(mut self, connect: Duration, create: Duration, call: Duration) -> Self {
        self.connect_timeout = connect;
        self.create_timeout = create;
        self.call_timeout = call;
        self
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Reaches host agents with the Connect protocol over HTTP/1.1. Addresses
/// are `host:port` or `http://host:port[/prefix]`. Connections are pooled
/// per host and reused.
#[derive(Clone)]
pub struct ConnectTransport {
    config: Arc<ConnectConfig>,
    client: HttpClient,
}

impl std::fmt::Debug for ConnectTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConnectTransport {
    /// A transport with `config`.
    pub fn new(config: ConnectConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            config: Arc::new(config),
            client,
        }
    }
}

impl AgentTransport for ConnectTransport {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        if host.address.is_empty() {
            return Err(AgentError::not_sent(format!(
                "host {} has no address",
                host.id
            )));
        }
        let base = if host.address.contains("://") {
            host.address.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", host.address)
        };
        if !base.starts_with("http://") {
            return Err(AgentError::not_sent(format!(
                "host {}: the Connect transport speaks plain http only",
                host.id
            )));
        }
        Ok(Arc::new(ConnectAgent {
            base,
            config: self.config.clone(),
            client: self.client.clone(),
        }))
    }
}

struct ConnectAgent {
    base: String,
    config: Arc<ConnectConfig>,
    client: HttpClient,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

/// The Connect specification's mapping for error responses without a
/// usable JSON body.
fn error_from_http_status(status: http::StatusCode) -> AgentError {
    let message = format!("HTTP {status}");
    match status.as_u16() {
        400 => AgentError::rejected(AgentCode::Internal, message),
        401 => AgentError::rejected(AgentCode::Unauthenticated, message),
        403 => AgentError::rejected(AgentCode::PermissionDenied, message),
        404 => AgentError::rejected(AgentCode::Unimplemented, message),
        429 | 502 | 503 | 504 => AgentError::unavailable(message),
        _ => AgentError::rejected(AgentCode::Unknown, message),
    }
}

impl ConnectAgent {
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        message: Req,
        timeout: Duration,
    ) -> Result<Resp, AgentError> {
        let uri = format!("{}/{}/{method}", self.base, pb::SERVICE);
        let mut builder = http::Request::post(&uri)
            .header(http::header::CONTENT_TYPE, "application/proto")
            .header("connect-protocol-version", "1")
            .header("connect-timeout-ms", timeout.as_millis().to_string());
        if let Some(token) = &self.config.token {
            builder = builder.header(http::header::AUTHORIZATION, token.header_value());
        }
        let request = builder
            .body(Full::new(Bytes::from(message.encode_to_vec())))
            .map_err(|e| AgentError::not_sent(format!("bad agent address {uri}: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    AgentError::not_sent(format!("cannot connect to {}: {e}", self.base))
                } else {
                    AgentError::unavailable(format!("connection to {} failed: {e}", self.base))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| AgentError::Protocol {
                    message: format!("reading the response body: {e}"),
                })?
                .to_bytes();
            Ok::<_, AgentError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout)??;
        if parts.status == http::StatusCode::OK {
            return Resp::decode(body).map_err(|e| AgentError::Protocol {
                message: format!("undecodable {method} response: {e}"),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => Err(pb::connect_code_to_error(&err.code, err.message)),
            Err(_) => Err(error_from_http_status(parts.status)),
        }
    }
}

#[async_trait]
impl HostAgent for ConnectAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let resp: wire::CreateSnapshotResponse = self
            .call(
                "CreateSnapshot",
                wire::CreateSnapshotRequest::from(req),
                self.config.create_timeout,
            )
            .await?;
        resp.try_into()
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let _: wire::DeleteSnapshotResponse = self
            .call(
                "DeleteSnapshot",
                wire::DeleteSnapshotRequest::from(req),
                self.config.call_timeout,
            )
            .await?;
        Ok(())
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let resp: wire::ListSandboxesResponse = self
            .call(
                "ListSandboxes",
                wire::ListSandboxesRequest {},
                self.config.call_timeout,
            )
            .await?;
        resp.try_into()
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let resp: wire::ListSnapshotsResponse = self
            .call(
                "ListSnapshots",
                wire::ListSnapshotsRequest {},
                self.config.call_timeout,
            )
            .await?;
        pb::snapshots_from_wire(resp)
    }
}
