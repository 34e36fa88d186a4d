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

#[tonic::async_trait]
impl wire::host_agent_service_server::HostAgentService for Adapter {
    async fn create_snapshot(
        &self,
        request: Request<wire::CreateSnapshotRequest>,
    ) -> Result<Response<wire::CreateSnapshotResponse>, Status> {
        let started = Instant::now();
        let subject = format!(
            "{} -> {}",
            request.get_ref().sandbox_id,
            request.get_ref().name
        );
        let result = async {
            self.0.check(&request)?;
            let req = request
                .into_inner()
                .try_into()
                .map_err(pb::error_to_status)?;
            let resp = self
                .0
                .agent
                .create_snapshot(req)
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(resp.into()))
        }
        .await;
        logged("CreateSnapshot", &subject, started, result)
    }

    async fn delete_snapshot(
        &self,
        request: Request<wire::DeleteSnapshotRequest>,
    ) -> Result<Response<wire::DeleteSnapshotResponse>, Status> {
        let started = Instant::now();
        let subject = request.get_ref().name.clone();
        let result = async {
            self.0.check(&request)?;
            let req = request
                .into_inner()
                .try_into()
                .map_err(pb::error_to_status)?;
            self.0
                .agent
                .delete_snapshot(req)
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(wire::DeleteSnapshotResponse {}))
        }
        .await;
        logged("DeleteSnapshot", &subject, started, result)
    }

    async fn list_sandboxes(
        &self,
        request: Request<wire::ListSandboxesRequest>,
    ) -> Result<Response<wire::ListSandboxesResponse>, Status> {
        let started = Instant::now();
        let result = async {
            self.0.check(&request)?;
            let list = self
                .0
                .agent
                .list_sandboxes()
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(list.into()))
        }
        .await;
        logged("ListSandboxes", "", started, result)
    }

    async fn create_sandbox(
        &self,
        request: Request<wire::CreateSandboxRequest>,
    ) -> Result<Response<wire::CreateSandboxResponse>, Status> {
        let started = Instant::now();
        let result = self.0.check(&request).and_then(|()| {
            Err(Status::unimplemented(
                "CreateSandbox is not served by this agent",
            ))
        });
        logged("CreateSandbox", "", started, result)
    }

    async fn list_snapshots(
        &self,
        request: Request<wire::ListSnapshotsRequest>,
    ) -> Result<Response<wire::ListSnapshotsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            self.0.check(&request)?;
            let list = self
                .0
                .agent
                .list_snapshots()
                .await
                .map_err(pb::error_to_status)?;
            Ok(Response::new(pb::snapshots_to_wire(list)))
        }
        .await;
        logged("ListSnapshots", "", started, result)
    }
}
