//! The Connect protocol's unary calls over HTTP/1.1: how the library talks
//! to existing connect-go host agents, which serve plain HTTP/1.1 and cannot
//! be reached by a gRPC client.
//!
//! A call is `POST <base>/hostagent.v1.HostAgentService/<Method>` with an
//! `application/proto` body. Success is HTTP 200 with an `application/proto`
//! body; failure is a JSON body `{"code": "...", "message": "..."}` whose
//! code is a Connect code, or, failing that (a response that is not a
//! Connect answer), a classification by the HTTP status shared with the
//! gRPC transport.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use super::pb::{self, wire};
use super::{
    AgentError, AgentTransport, BearerToken, CreateSandboxRequest, CreateSandboxResponse,
    CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest,
    HostAgent, HostInfo, HostTarget, SandboxList, SnapshotInfo,
};

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
    /// Largest response body accepted; larger ones are an
    /// [`AgentError::Protocol`]. Default 64 MiB (a `ListSnapshots` of a
    /// host with 56k keys is about 4.3 MB).
    pub max_response_bytes: usize,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            token: None,
            max_response_bytes: super::grpc::DEFAULT_MAX_RESPONSE_BYTES,
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

    /// Accepts response bodies of up to `n` bytes.
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.max_response_bytes = n;
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

/// `e` and the errors under it, for logs (hyper's errors name only their
/// kind).
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
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
                let why = with_sources(&e);
                if e.is_connect() {
                    // Refused, unresolvable, timed out: never sent.
                    AgentError::not_sent(format!("cannot connect to {}: {why}", self.base))
                } else {
                    // Sent, or maybe sent, and the connection failed.
                    AgentError::unavailable(format!("connection to {} failed: {why}", self.base))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.config.max_response_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        AgentError::Protocol {
                            message: format!(
                                "the answer is over the {} byte limit",
                                self.config.max_response_bytes
                            ),
                        }
                    } else {
                        // The connection was lost while the answer arrived.
                        AgentError::unavailable(format!("reading the answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok::<_, AgentError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::Timeout)??;
        // We send no `accept-encoding`: a compressed answer was not asked
        // for.
        if let Some(encoding) = parts.headers.get(http::header::CONTENT_ENCODING)
            && encoding.as_bytes() != b"identity"
        {
            return Err(AgentError::Protocol {
                message: format!(
                    "the answer is compressed with {:?}, which was not asked for",
                    String::from_utf8_lossy(encoding.as_bytes())
                ),
            });
        }
        if parts.status == http::StatusCode::OK {
            return Resp::decode(body).map_err(|e| AgentError::Protocol {
                message: format!("undecodable {method} response: {e}"),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => Err(pb::connect_code_to_error(&err.code, err.message)),
            // Not a Connect error (a proxy's page, the Go agent's mux
            // answering an unknown route with a plain-text 404).
            Err(_) => Err(pb::http_status_to_error(parts.status)),
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

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let resp: wire::CreateSandboxResponse = self
            .call(
                "CreateSandbox",
                wire::CreateSandboxRequest::from(req),
                self.config.create_timeout,
            )
            .await?;
        Ok(resp.into())
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let _: wire::DestroySandboxResponse = self
            .call(
                "DestroySandbox",
                wire::DestroySandboxRequest::from(req),
                self.config.call_timeout,
            )
            .await?;
        Ok(())
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        let resp: wire::HostInfo = self
            .call(
                "GetHostInfo",
                wire::GetHostInfoRequest {},
                self.config.call_timeout,
            )
            .await?;
        Ok(pb::host_info_from_wire(Some(resp))?.unwrap_or_default())
    }
}
