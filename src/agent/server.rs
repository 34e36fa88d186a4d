//! Serves any [`HostAgent`] over gRPC with tonic: the adapter between the
//! generated service and the domain trait.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::pb::{self, wire};
use super::{BearerToken, HostAgent};

/// Serves a host agent over gRPC (package `hostagent.v1`, service
/// `HostAgentService`). Requests are validated (ids, keys) before they
/// reach the agent; agent errors become the matching gRPC codes.
///
/// ```no_run
/// use std::sync::Arc;
/// use sandbox_snapshots::agent::{HostAgentServer, MemoryHostAgent};
///
/// # async fn serve() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// HostAgentServer::new(Arc::new(MemoryHostAgent::new()))
///     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
///     .await
/// # }
/// ```
#[derive(Clone)]
pub struct HostAgentServer {
    agent: Arc<dyn HostAgent>,
    token: Option<BearerToken>,
    tls: Option<ServerTls>,
}

/// TLS for the host-agent server (rustls).
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerTls {
    /// PEM certificate chain of the agent.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the agent.
    pub key_pem: Vec<u8>,
    /// PEM CA that client certificates must chain to; when set, clients
    /// without a valid certificate are refused (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Serve with this certificate and key.
    pub fn new(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            client_ca_pem: None,
        }
    }

    /// Require client certificates signed by `ca_pem`.
    pub fn client_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.client_ca_pem = Some(ca_pem.into());
        self
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("key_pem", &"[redacted]")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for HostAgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgentServer")
            .field("token", &self.token)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl HostAgentServer {
    /// Serves `agent`, without authentication.
    pub fn new(agent: Arc<dyn HostAgent>) -> Self {
        Self {
            agent,
            token: None,
            tls: None,
        }
    }

    /// Serves over TLS (and mutual TLS when the config has a client CA).
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires `authorization: Bearer <token>` on every call
    /// (Unauthenticated otherwise).
    pub fn with_token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// The service as tonic routes, to mount next to other services (TLS
    /// is then the hosting server's business; the token check stays).
    pub fn into_routes(self) -> tonic::service::Routes {
        // No limit on answers: a `ListSnapshots` of a full host is several
        // MB, and clients set their own receive limit (64 MiB by default
        // for ours). tonic's default is the same; it is set here so that
        // it stays so.
        tonic::service::Routes::new(
            wire::host_agent_service_server::HostAgentServiceServer::new(Adapter(self))
                .max_encoding_message_size(usize::MAX),
        )
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// calls in progress.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config).map_err(std::io::Error::other)?;
        }
        builder
            .add_routes(self.into_routes())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(std::io::Error::other)
    }

    /// Binds `addr` (port 0 picks a free port) and serves in a background
    /// task until `shutdown` completes. Returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let task = tokio::spawn(self.serve(listener, shutdown));
        Ok((local, task))
    }

    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if token.matches(given) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

#[derive(Clone)]
struct Adapter(HostAgentServer);

/// One log line per call: the method, what it was about, how it ended.
fn logged<T>(
    method: &str,
    subject: &str,
    started: Instant,
    result: Result<T, Status>,
) -> Result<T, Status> {
    let ms = started.elapsed().as_millis();
    match &result {
        Ok(_) => tracing::info!(method, subject, ms, "ok"),
        Err(status) => {
            tracing::info!(method, subject, ms, code = ?status.code(), message = status.message(), "failed")
        }
    }
    result
}

impl Adapter {
    /// One call: the token check, the request validated into domain terms,
    /// the agent's work, the answer back in wire terms, one log line.
    async fn call<Req, D, Fut, Out, Resp>(
        &self,
        method: &str,
        subject: String,
        request: Request<Req>,
        work: impl FnOnce(Arc<dyn HostAgent>, D) -> Fut,
        answer: impl FnOnce(Out) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        D: TryFrom<Req, Error = super::AgentError>,
        Fut: Future<Output = Result<Out, super::AgentError>>,
    {
        let started = Instant::now();
        let result = async {
            self.0.check(&request)?;
            let req = D::try_from(request.into_inner()).map_err(pb::error_to_status)?;
            let out = work(self.0.agent.clone(), req)
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(answer(out)))
        }
        .await;
        logged(method, &subject, started, result)
    }
}

/// A request without fields: nothing to validate.
struct Empty;

macro_rules! empty_request {
    ($($ty:ty),+) => {$(
        impl TryFrom<$ty> for Empty {
            type Error = super::AgentError;
            fn try_from(_: $ty) -> Result<Self, Self::Error> {
                Ok(Empty)
            }
        }
    )+};
}
empty_request!(
    wire::ListSandboxesRequest,
    wire::ListSnapshotsRequest,
    wire::GetHostInfoRequest
);

#[tonic::async_trait]
impl wire::host_agent_service_server::HostAgentService for Adapter {
    async fn create_snapshot(
        &self,
        request: Request<wire::CreateSnapshotRequest>,
    ) -> Result<Response<wire::CreateSnapshotResponse>, Status> {
        let r = request.get_ref();
        let subject = format!("{} -> {}", r.sandbox_id, r.name);
        self.call(
            "CreateSnapshot",
            subject,
            request,
            |agent, req| async move { agent.create_snapshot(req).await },
            Into::into,
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<wire::DeleteSnapshotRequest>,
    ) -> Result<Response<wire::DeleteSnapshotResponse>, Status> {
        let subject = request.get_ref().name.clone();
        self.call(
            "DeleteSnapshot",
            subject,
            request,
            |agent, req| async move { agent.delete_snapshot(req).await },
            |()| wire::DeleteSnapshotResponse {},
        )
        .await
    }

    async fn list_sandboxes(
        &self,
        request: Request<wire::ListSandboxesRequest>,
    ) -> Result<Response<wire::ListSandboxesResponse>, Status> {
        self.call(
            "ListSandboxes",
            String::new(),
            request,
            |agent, Empty| async move { agent.list_sandboxes().await },
            Into::into,
        )
        .await
    }

    async fn create_sandbox(
        &self,
        request: Request<wire::CreateSandboxRequest>,
    ) -> Result<Response<wire::CreateSandboxResponse>, Status> {
        let r = request.get_ref();
        let subject = format!("{} -> {}", r.template, r.sandbox_id);
        self.call(
            "CreateSandbox",
            subject,
            request,
            |agent, req| async move { agent.create_sandbox(req).await },
            Into::into,
        )
        .await
    }

    async fn destroy_sandbox(
        &self,
        request: Request<wire::DestroySandboxRequest>,
    ) -> Result<Response<wire::DestroySandboxResponse>, Status> {
        let subject = request.get_ref().sandbox_id.clone();
        self.call(
            "DestroySandbox",
            subject,
            request,
            |agent, req| async move { agent.destroy_sandbox(req).await },
            |()| wire::DestroySandboxResponse {},
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<wire::ListSnapshotsRequest>,
    ) -> Result<Response<wire::ListSnapshotsResponse>, Status> {
        self.call(
            "ListSnapshots",
            String::new(),
            request,
            |agent, Empty| async move { agent.list_snapshots().await },
            pb::snapshots_to_wire,
        )
        .await
    }

    async fn get_host_info(
        &self,
        request: Request<wire::GetHostInfoRequest>,
    ) -> Result<Response<wire::HostInfo>, Status> {
        self.call(
            "GetHostInfo",
            String::new(),
            request,
            |agent, Empty| async move {
                let info = agent.host_info().await?;
                // An agent's own answer is checked like one from the wire.
                info.validate().map_err(|e| {
                    super::AgentError::rejected(
                        super::AgentCode::Internal,
                        format!("bad host info: {e}"),
                    )
                })?;
                Ok(info)
            },
            Into::into,
        )
        .await
    }
}
