//! A transport that calls host-agent implementations in the same process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use super::{
    AgentError, AgentTransport, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostAgent, HostInfo,
    HostTarget, SandboxList, SnapshotInfo,
};
use crate::ids::HostId;

type Agents = Arc<RwLock<HashMap<HostId, Arc<dyn HostAgent>>>>;

/// Routes calls for each host to an agent object in this process: the
/// single-node deployment, and tests. A host removed with
/// [`InProcessTransport::remove_host`] is unavailable from then on, also to
/// clients handed out before.
#[derive(Default, Clone)]
pub struct InProcessTransport {
    agents: Agents,
}

impl InProcessTransport {
    /// An empty transport: every host is unavailable until added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `host` with `agent` (replacing any previous one).
    pub fn add_host(&self, host: HostId, agent: Arc<dyn HostAgent>) {
        self.agents
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(host, agent);
    }

    /// Stops serving `host`: calls to it fail as unavailable.
    pub fn remove_host(&self, host: HostId) {
        self.agents
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&host);
    }
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<HostId> = self
            .agents
            .read()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        f.debug_struct("InProcessTransport")
            .field("hosts", &hosts)
            .finish()
    }
}

impl AgentTransport for InProcessTransport {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        let client = Routed {
            agents: self.agents.clone(),
            host: host.id,
        };
        client.current()?;
        Ok(Arc::new(client))
    }
}

/// A client that looks its host's agent up on every call.
struct Routed {
    agents: Agents,
    host: HostId,
}

impl Routed {
    fn current(&self) -> Result<Arc<dyn HostAgent>, AgentError> {
        self.agents
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&self.host)
            .cloned()
            .ok_or_else(|| AgentError::not_sent(format!("no in-process agent for {}", self.host)))
    }
}

#[async_trait]
impl HostAgent for Routed {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        self.current()?.create_snapshot(req).await
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        self.current()?.delete_snapshot(req).await
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        self.current()?.list_sandboxes().await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.current()?.list_snapshots().await
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        self.current()?.create_sandbox(req).await
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        self.current()?.destroy_sandbox(req).await
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.current()?.host_info().await
    }
}
