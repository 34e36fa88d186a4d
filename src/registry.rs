//! The host and sandbox registry: what the embedding application tells the
//! library about its fleet, because snapshot flows read and change it.

use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use crate::agent::{HostInfo, HostTarget};
use crate::engine::Engine;
use crate::engine::restore::ask_host_info;

use crate::error::Result;
use crate::ids::{HostId, SandboxId, TeamId, TemplateId};
use crate::model::{Host, HostStatus, Sandbox, SandboxStatus, Template, TemplateType, Timestamp};
use crate::names::TemplateName;
use crate::store::{HostChange, Store};

/// A template whose files already exist on hosts (a base image, or files
/// copied by other means), for [`Registry::register_template`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NewTemplate {
    /// Owner; [`TeamId::PLATFORM`] for a platform template.
    pub team: TeamId,
    /// Its name.
    pub name: TemplateName,
    /// Base or snapshot.
    pub template_type: TemplateType,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Hosts that hold its files under its id as key.
    pub hosts: Vec<HostId>,
    /// What produced it (`None`: unknown; any host may restore it).
    pub compat: Option<HostInfo>,
}

impl NewTemplate {
    /// A template named `name` of `team`; other fields zero.
    pub fn new(team: TeamId, name: TemplateName, template_type: TemplateType) -> Self {
        Self {
            team,
            name,
            template_type,
            vcpus: 0,
            memory_mb: 0,
            size_bytes: 0,
            hosts: Vec::new(),
            compat: None,
        }
    }

    /// Sets the machine shape.
    pub fn shape(mut self, vcpus: u32, memory_mb: u32) -> Self {
        self.vcpus = vcpus;
        self.memory_mb = memory_mb;
        self
    }

    /// Sets the size on disk.
    pub fn size_bytes(mut self, size_bytes: u64) -> Self {
        self.size_bytes = size_bytes;
        self
    }

    /// Says what produced the template's files.
    pub fn compat(mut self, compat: HostInfo) -> Self {
        self.compat = Some(compat);
        self
    }

    /// Sets the hosts that hold the files.
    pub fn on_hosts(mut self, hosts: impl IntoIterator<Item = HostId>) -> Self {
        self.hosts = hosts.into_iter().collect();
        self
    }
}

/// Registers and updates hosts and sandboxes. Obtained from
/// [`crate::Manager::registry`]; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    engine: Weak<Engine>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(engine: &Arc<Engine>) -> Self {
        Self {
            store: engine.store.clone(),
            wake: engine.wake.clone(),
            engine: Arc::downgrade(engine),
        }
    }

    /// A host came online: its queued work is due, and what it runs is
    /// asked (in the background; a restore asks itself if it is first).
    fn came_online(&self, id: HostId) {
        self.wake.notify_one();
        let Some(engine) = self.engine.upgrade() else {
            return;
        };
        let (store, transport) = (engine.store.clone(), engine.transport.clone());
        let timeout = engine.options.list_timeout;
        engine.tasks_spawn(async move {
            let host = match store.get_host(id).await {
                Ok(Some(host)) if !host.address.is_empty() => host,
                _ => return,
            };
            let target = HostTarget {
                id,
                address: host.address,
            };
            ask_host_info(store, transport, timeout, target).await;
        });
    }

    /// Registers a host, or updates its address and status. A host that
    /// comes (back) online has its queued work retried at once.
    pub async fn register_host(
        &self,
        id: HostId,
        address: impl Into<String>,
        status: HostStatus,
    ) -> Result<Host> {
        let address = address.into();
        let (host, came_online) = self
            .store
            .upsert_host(id, address, status, Timestamp::now())
            .await?;
        if came_online {
            self.came_online(id);
        }
        Ok(host)
    }

    /// Changes a host's status. A host that comes back online has its
    /// queued work retried at once.
    pub async fn set_host_status(&self, id: HostId, status: HostStatus) -> Result<()> {
        self.update_host(
            id,
            HostChange {
                status: Some(status),
                ..HostChange::default()
            },
        )
        .await
    }

    /// Changes a host's agent address.
    pub async fn set_host_address(&self, id: HostId, address: impl Into<String>) -> Result<()> {
        self.update_host(
            id,
            HostChange {
                address: Some(address.into()),
                ..HostChange::default()
            },
        )
        .await
    }

    /// Records a heartbeat. A `pending` or `unreachable` host becomes
    /// online; a `draining` or `offline` one keeps its status.
    pub async fn heartbeat(&self, id: HostId) -> Result<()> {
        self.update_host(
            id,
            HostChange {
                heartbeat: true,
                ..HostChange::default()
            },
        )
        .await
    }

    async fn update_host(&self, id: HostId, change: HostChange) -> Result<()> {
        let came_online = self.store.update_host(id, change, Timestamp::now()).await?;
        if came_online {
            self.came_online(id);
        }
        Ok(())
    }

    /// A host by id.
    pub async fn host(&self, id: HostId) -> Result<Option<Host>> {
        self.store.get_host(id).await
    }

    /// Every host.
    pub async fn hosts(&self) -> Result<Vec<Host>> {
        self.store.list_hosts().await
    }

    /// Registers a sandbox or replaces its record. Refused with 409 while a
    /// snapshot owns the sandbox.
    pub async fn register_sandbox(&self, sandbox: Sandbox) -> Result<()> {
        self.store.upsert_sandbox(sandbox, Timestamp::now()).await
    }

    /// A sandbox by id (any team: this is the application's view).
    pub async fn sandbox(&self, id: SandboxId) -> Result<Option<Sandbox>> {
        self.store.get_sandbox(id).await
    }

    /// Sets a sandbox's status. While a snapshot owns the sandbox
    /// (`snapshotting`) this answers 409 `conflict`: a pause or stop must
    /// not race a snapshot.
    pub async fn set_sandbox_status(
        &self,
        id: SandboxId,
        status: SandboxStatus,
    ) -> Result<Sandbox> {
        self.store
            .set_sandbox_status(id, None, status, Timestamp::now())
            .await
    }

    /// Sets a sandbox's status only if it is `expected` now (409
    /// `invalid_state` otherwise).
    pub async fn compare_and_set_sandbox_status(
        &self,
        id: SandboxId,
        expected: SandboxStatus,
        status: SandboxStatus,
    ) -> Result<Sandbox> {
        self.store
            .set_sandbox_status(id, Some(expected), status, Timestamp::now())
            .await
    }

    /// Forgets a sandbox. Refused with 409 while a snapshot owns it.
    pub async fn remove_sandbox(&self, id: SandboxId) -> Result<()> {
        self.store.remove_sandbox(id).await
    }

    /// Records a ready template whose files already exist on its hosts.
    /// The name rules of creates apply (409 when taken or reserved).
    pub async fn register_template(&self, template: NewTemplate) -> Result<Template> {
        let now = Timestamp::now();
        let record = Template {
            id: TemplateId::new(),
            team: template.team,
            name: template.name,
            template_type: template.template_type,
            vcpus: template.vcpus,
            memory_mb: template.memory_mb,
            size_bytes: template.size_bytes,
            created_at: now,
            source_sandbox: None,
            state: crate::model::TemplateState::Ready,
            hosts: u32::try_from(template.hosts.len()).unwrap_or(u32::MAX),
            compat: template.compat,
            last_used_at: None,
            expires_at: None,
        };
        let hosts = template.hosts;
        self.store
            .insert_ready_template(record.clone(), hosts, now)
            .await?;
        Ok(record)
    }
}
