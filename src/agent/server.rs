//! Serves any [`HostAgent`] over gRPC with tonic: the adapter between the
//! generated service and the domain trait.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
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
}

impl std::fmt::Debug for HostAgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAgentServer")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl HostAgentServer {
    /// Serves `agent`, without authentication.
    pub fn new(agent: Arc<dyn HostAgent>) -> Self {
        Self { agent, token: None }
    }

    /// Requires `authorization: Bearer <token>` on every call
    /// (Unauthenticated otherwise).
    pub fn with_token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// The service as tonic routes, to mount next to other services.
    pub fn into_routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(
            wire::host_agent_service_server::HostAgentServiceServer::new(Adapter(self)),
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
        tonic::transport::Server::builder()
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
