//! An adapter that makes any host agent answer like the original Go host
//! agent, so that the control plane can be tested against the peer it
//! really meets, not only against agents as well behaved as ours.

use async_trait::async_trait;

use super::{
    AgentCode, AgentError, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostAgent, SandboxList,
};

/// Wraps a [`HostAgent`] so that it behaves like the original Go agent:
/// `ListSandboxes` lists only running VMs (a paused VM lives on disk, not
/// in the agent's memory); every `CreateSnapshot` failure is answered as
/// Internal (transport failures stay what they are); a delete of a missing
/// key succeeds; and there is neither `ListSnapshots` nor `GetHostInfo`
/// (its mux answers an unknown route with a 404, which transports read as
/// Unimplemented), and its snapshots say nothing of what produced them.
#[derive(Debug)]
pub struct GoLikeAgent<A> {
    inner: A,
}

impl<A> GoLikeAgent<A> {
    /// Wraps `inner`.
    pub fn new(inner: A) -> Self {
        Self { inner }
    }

    /// The wrapped agent.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

#[async_trait]
impl<A: HostAgent> HostAgent for GoLikeAgent<A> {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        match self.inner.create_snapshot(req).await {
            Ok(response) => Ok(response.with_compat(None)),
            Err(AgentError::Rejected { message, .. }) => {
                Err(AgentError::rejected(AgentCode::Internal, message))
            }
            Err(other) => Err(other),
        }
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        match self.inner.delete_snapshot(req).await {
            Err(AgentError::Rejected {
                code: AgentCode::NotFound,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let mut list = self.inner.list_sandboxes().await?;
        list.sandboxes.retain(|s| s.status == "running");
        Ok(list)
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        self.inner.create_sandbox(req).await
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        self.inner.destroy_sandbox(req).await
    }
}
