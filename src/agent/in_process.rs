//! A transport that calls host-agent implementations in the same process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{AgentError, AgentTransport, HostAgent, HostTarget};
use crate::ids::HostId;

/// Routes calls for each host to an agent object in this process: the
/// single-node deployment, and tests.
#[derive(Default, Clone)]
pub struct InProcessTransport {
    agents: Arc<RwLock<HashMap<HostId, Arc<dyn HostAgent>>>>,
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
        self.agents
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&host.id)
            .cloned()
            .ok_or_else(|| AgentError::unavailable(format!("no in-process agent for {}", host.id)))
    }
}
