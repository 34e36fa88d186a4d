//! The [`SnapshotManager`] trait and its implementation, [`Manager`],
//! written once against the [`Store`](crate::store::Store) trait: on the
//! embedded SQLite file or (feature `postgres`) on a PostgreSQL database
//! shared by several replicas.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::AgentTransport;
use crate::audit::{AuditEntry, AuditQuery, audit_cursor};
use crate::engine::Reply;
use crate::engine::create::{CreateRequest, run_create};
use crate::engine::delete::run_delete;
use crate::engine::restore::{RestoreSpec, run_restore};
use crate::engine::{Engine, after, lock_unpoisoned};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{HostId, InstanceId, OperationId, SandboxId, TemplateId};
use crate::janitor::SweepReport;
use crate::model::{Caller, Sandbox, SandboxStatus, Template, TemplateType, Timestamp};
use crate::names::TemplateName;
use crate::operation::{
    IdempotencyKey, Operation, OperationKind, OperationState, RequestRecord, StoredRequest,
};
pub use crate::options::{ManagerOptions, SweepOptions};
use crate::registry::Registry;
use crate::store::sqlite::lock::DbLock;
use crate::store::{
    ListPosition, OpenOperation, PendingDeletion, ResolveReason, SqliteStore, Store,
};

/// Largest page a list may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// What to snapshot and under which name, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    sandbox_id: SandboxId,
    name: TemplateName,
    /// Whether the name was generated (then a retry with the same key is
    /// the same request whatever name it would generate).
    generated_name: bool,
    overwrite: bool,
    idempotency_key: Option<IdempotencyKey>,
    ttl: Option<Duration>,
}

impl NewSnapshot {
    /// A snapshot of `sandbox_id` named `name` (a generated
    /// `template-xxxxxxxx` name when `None`).
    pub fn new(sandbox_id: SandboxId, name: Option<TemplateName>) -> Self {
        Self {
            sandbox_id,
            generated_name: name.is_none(),
            name: name.unwrap_or_else(TemplateName::generate),
            overwrite: false,
            idempotency_key: None,
            ttl: None,
        }
    }

    /// Validates raw input as an API receives it (SPEC §3): an empty
    /// `sandbox_id` is "sandbox_id is required", one that does not parse is
    /// "invalid sandbox_id", a bad name is "invalid snapshot name: …", an
    /// empty name is replaced by a generated one.
    pub fn parse(sandbox_id: &str, name: &str) -> Result<Self> {
        if sandbox_id.is_empty() {
            return Err(Error::invalid_request("sandbox_id is required"));
        }
        let sandbox_id = SandboxId::parse(sandbox_id)
            .map_err(|_| Error::invalid_request("invalid sandbox_id"))?;
        let name = if name.is_empty() {
            None
        } else {
            Some(TemplateName::parse(name)?)
        };
        Ok(Self::new(sandbox_id, name))
    }

    /// Replace a template of the same name if one exists.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Makes the create safe to retry (SPEC §8): a create with the same
    /// key and the same request returns the first one's outcome (even
    /// after a restart) instead of snapshotting again; while the first is
    /// still running, 409 `idempotency_in_progress`; the same key with a
    /// different request, 422 `idempotency_key_reused`. Keys are scoped to
    /// the team and remembered [`ManagerOptions::request_retention`].
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// What makes two creates the same request.
    fn fingerprint(&self) -> String {
        let name = if self.generated_name {
            "*"
        } else {
            self.name.as_str()
        };
        format!(
            "lib {} {} {name} overwrite={} ttl={:?}",
            OperationKind::SnapshotCreate.as_str(),
            self.sandbox_id,
            self.overwrite,
            self.ttl.map(|t| t.as_millis())
        )
    }

    /// Delete the snapshot `ttl` after the create begins (SPEC §8
    /// "Retention"): the template's `expires_at`, after which the
    /// background worker deletes it. Whole seconds, from 1 s to
    /// [`MAX_TTL`]; the create fails with `invalid_request` otherwise.
    /// Without it the team's default TTL applies, if it has one.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The sandbox to snapshot.
    pub fn sandbox_id(&self) -> SandboxId {
        self.sandbox_id
    }

    /// The template name.
    pub fn name(&self) -> &TemplateName {
        &self.name
    }
}

/// Longest TTL, default TTL or `delete_unused_after` (10 years).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Checks a retention duration (`what` names it in the message): whole
/// seconds from 1 s to [`MAX_TTL`].
pub(crate) fn check_retention_duration(what: &str, d: Duration) -> Result<()> {
    if d.subsec_nanos() != 0 || d.as_secs() < 1 || d > MAX_TTL {
        return Err(Error::invalid_request(format!(
            "{what} must be a whole number of seconds from 1 to {}",
            MAX_TTL.as_secs()
        )));
    }
    Ok(())
}

/// Most vCPUs a restore may ask for.
pub const MAX_VCPUS: u32 = 1024;
/// Most memory a restore may ask for, in MiB (16 TiB).
pub const MAX_MEMORY_MB: u32 = 16 * 1024 * 1024;

/// What to restore into a new sandbox (SPEC §7), validated: the template
/// by name (the caller's own or a platform template), and optionally the
/// new sandbox's id and sizes (the template's by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    template: TemplateName,
    sandbox_id: Option<SandboxId>,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    timeout_sec: u32,
    disk_size_mb: u32,
    idempotency_key: Option<IdempotencyKey>,
}

impl RestoreRequest {
    /// A restore of `template` into a sandbox with a generated id and the
    /// template's sizes.
    pub fn new(template: TemplateName) -> Self {
        Self {
            template,
            sandbox_id: None,
            vcpus: None,
            memory_mb: None,
            timeout_sec: 0,
            disk_size_mb: 0,
            idempotency_key: None,
        }
    }

    /// Validates raw input as an API receives it: an empty `template` is
    /// "template is required", a bad one "invalid template name: …", a
    /// `sandbox_id` that does not parse "invalid sandbox_id".
    pub fn parse(template: &str, sandbox_id: Option<&str>) -> Result<Self> {
        if template.is_empty() {
            return Err(Error::invalid_request("template is required"));
        }
        let template = TemplateName::parse(template).map_err(|e| {
            Error::invalid_request(format!(
                "invalid template name: {}",
                Error::from(e).message()
            ))
        })?;
        let mut request = Self::new(template);
        if let Some(id) = sandbox_id {
            let id =
                SandboxId::parse(id).map_err(|_| Error::invalid_request("invalid sandbox_id"))?;
            request.sandbox_id = Some(id);
        }
        Ok(request)
    }

    /// The new sandbox's id (generated when not set).
    pub fn sandbox_id(mut self, id: SandboxId) -> Self {
        self.sandbox_id = Some(id);
        self
    }

    /// Virtual CPUs (1..=[`MAX_VCPUS`]).
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = Some(vcpus);
        self
    }

    /// Memory in MiB (1..=[`MAX_MEMORY_MB`]); a snapshot's cannot differ
    /// from the snapshot's own.
    pub fn memory_mb(mut self, memory_mb: u32) -> Self {
        self.memory_mb = Some(memory_mb);
        self
    }

    /// Idle timeout in seconds (0: the agent's default).
    pub fn timeout_sec(mut self, timeout_sec: u32) -> Self {
        self.timeout_sec = timeout_sec;
        self
    }

    /// Disk size in MiB (0: the template's).
    pub fn disk_size_mb(mut self, disk_size_mb: u32) -> Self {
        self.disk_size_mb = disk_size_mb;
        self
    }

    /// Makes the restore safe to retry, as
    /// [`NewSnapshot::idempotency_key`] does a create.
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// The template's name.
    pub fn template(&self) -> &TemplateName {
        &self.template
    }

    /// What makes two restores the same request.
    fn fingerprint(&self) -> String {
        let id = self
            .sandbox_id
            .map_or_else(|| "*".to_owned(), |id| id.to_string());
        format!(
            "lib {} {} {id} vcpus={:?} memory_mb={:?} timeout_sec={} disk_size_mb={}",
            OperationKind::SandboxRestore.as_str(),
            self.template,
            self.vcpus,
            self.memory_mb,
            self.timeout_sec,
            self.disk_size_mb
        )
    }

    fn check(&self) -> Result<()> {
        match self.vcpus {
            Some(0) => return Err(Error::invalid_request("vcpus must be at least 1")),
            Some(n) if n > MAX_VCPUS => {
                return Err(Error::invalid_request(format!(
                    "vcpus must be at most {MAX_VCPUS}"
                )));
            }
            _ => {}
        }
        match self.memory_mb {
            Some(0) => Err(Error::invalid_request("memory_mb must be at least 1")),
            Some(n) if n > MAX_MEMORY_MB => Err(Error::invalid_request(format!(
                "memory_mb must be at most {MAX_MEMORY_MB}"
            ))),
            _ => Ok(()),
        }
    }
}

/// Filters and paging for [`SnapshotManager::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListQuery {
    /// Only templates of this type.
    pub template_type: Option<TemplateType>,
    /// Most templates per page (1..=[`MAX_PAGE_SIZE`]); `None` returns all.
    pub limit: Option<u32>,
    /// Continue after this cursor from a previous page.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// Everything visible, newest first.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only templates of `template_type`.
    pub fn template_type(mut self, template_type: TemplateType) -> Self {
        self.template_type = Some(template_type);
        self
    }

    /// At most `limit` per page.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Continue from `cursor`.
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items, in order.
    pub items: Vec<T>,
    /// Pass this as the cursor to get the next page; `None` on the last.
    pub next_cursor: Option<String>,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deleted {
    /// The template as it was.
    pub template: Template,
    /// Hosts that confirmed its files are gone.
    pub hosts_confirmed: Vec<HostId>,
    /// Hosts still to confirm; the background worker retries them.
    pub hosts_pending: Vec<HostId>,
}

/// An operation resolved by [`Manager::resolve_operation`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedOperation {
    /// The operation.
    pub id: OperationId,
    /// The template it was creating.
    pub template_id: TemplateId,
    /// Its team.
    pub team: crate::ids::TeamId,
    /// Its sandbox.
    pub sandbox: SandboxId,
    /// The status the sandbox was given.
    pub sandbox_status: SandboxStatus,
}

/// Where a template's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Placement {
    /// The host.
    pub host: HostId,
    /// `present`, or `deleting` while a deletion is queued.
    pub state: String,
}

/// Snapshot management for one control plane (SPEC §3, §4).
///
/// # Contract
/// - Every call is scoped to the caller's team: a team sees, overwrites and
///   deletes only its own templates, sees platform templates, and cannot
///   take a platform template's name.
/// - `create` runs to completion even if its future is dropped; its result
///   is recorded either way. On success the template is visible, the
///   sandbox is `paused`, and an overwritten template is gone; on failure
///   nothing is visible, the previous template (if any) is intact, and no
///   files are left on a host beyond the deletion queue.
/// - `delete` makes the template invisible and its name free atomically;
///   its files are removed from every host that holds them, now or later.
/// - Errors carry the stable codes of [`ErrorCode`].
#[async_trait]
pub trait SnapshotManager: Send + Sync {
    /// Snapshots a sandbox into a template.
    async fn create(&self, caller: &Caller, snapshot: NewSnapshot) -> Result<Template>;

    /// The template the caller sees under `name`.
    async fn get(&self, caller: &Caller, name: &TemplateName) -> Result<Template>;

    /// The caller's templates and platform templates, newest first.
    async fn list(&self, caller: &Caller, query: ListQuery) -> Result<Page<Template>>;

    /// Deletes the caller's template `name` and its files.
    async fn delete(&self, caller: &Caller, name: &TemplateName) -> Result<Deleted>;

    /// Restores a template the caller sees into a new running sandbox of
    /// the caller's team, on a host that holds it, is online and can run
    /// it (SPEC §7). Runs to completion even if its future is dropped: on
    /// success the sandbox is registered `running`; on failure it is not
    /// registered, and a VM the host may have started is destroyed.
    async fn restore(&self, caller: &Caller, request: RestoreRequest) -> Result<Sandbox>;

    /// A sandbox of the caller's team.
    async fn sandbox(&self, caller: &Caller, id: SandboxId) -> Result<Sandbox>;
}

/// The default [`SnapshotManager`]: templates in an SQLite file
/// ([`Manager::open`]) or in a PostgreSQL database that several manager
/// processes share as replicas (`Manager::open_postgres`, feature
/// `postgres`), host agents through an [`AgentTransport`], a background
/// worker that finishes deletions and recovers interrupted operations.
/// Cheap to clone.
///
/// ```no_run
/// use std::sync::Arc;
/// use sandbox_snapshots::{
///     Actor, Caller, InProcessTransport, ManagerOptions, NewSnapshot, SnapshotManager,
///     Manager, TeamId,
/// };
///
/// # async fn demo() -> Result<(), sandbox_snapshots::Error> {
/// let transport = Arc::new(InProcessTransport::new());
/// let manager =
///     Manager::open("data/snapshots.db", transport, ManagerOptions::default())
///         .await?;
/// let caller = Caller::new(TeamId::new(), Actor::System);
/// let request = NewSnapshot::parse("sb-0000000000000000000000001", "my-snapshot")?;
/// let template = manager.create(&caller, request).await?;
/// println!("{} is {} bytes", template.name, template.size_bytes);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Engine>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Opens the store at `path` (creating it if needed) and starts the
    /// background worker, whose first pass finishes or rolls back the
    /// operations a previous process left open (without
    /// [`ManagerOptions::run_janitor`], call
    /// [`Manager::run_pending_work`] for that). One manager
    /// may use a store file at a time.
    pub async fn open(
        path: impl AsRef<Path>,
        transport: Arc<dyn AgentTransport>,
        options: ManagerOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::new(
                    ErrorCode::DbError,
                    format!("cannot create {}", parent.display()),
                )
                .with_source(e)
            })?;
        }
        let lock = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || DbLock::acquire(&path))
                .await
                .map_err(|e| Error::new(ErrorCode::DbError, format!("lock task failed: {e}")))??
        };
        let store = SqliteStore::open(path, options.store.clone()).await?;
        Self::start(Arc::new(store), Some(lock), transport, options).await
    }

    /// Opens the PostgreSQL database at `url` (`postgres://…`), migrating
    /// its schema, and starts this process as one replica of the control
    /// plane: any number of managers may share the database.
    #[cfg(feature = "postgres")]
    pub async fn open_postgres(
        url: &str,
        transport: Arc<dyn AgentTransport>,
        options: ManagerOptions,
    ) -> Result<Self> {
        let store =
            crate::store::postgres::PostgresStore::open(url, options.postgres.clone()).await?;
        Self::start(Arc::new(store), None, transport, options).await
    }

    /// Opens the database `url` names: `sqlite:PATH` (or a plain path) or,
    /// with the `postgres` feature, `postgres://…`.
    pub async fn open_url(
        url: &str,
        transport: Arc<dyn AgentTransport>,
        options: ManagerOptions,
    ) -> Result<Self> {
        match crate::store::Database::parse(url)? {
            crate::store::Database::Sqlite(path) => Self::open(path, transport, options).await,
            #[cfg(feature = "postgres")]
            crate::store::Database::Postgres(url) => {
                Self::open_postgres(&url, transport, options).await
            }
        }
    }

    async fn start(
        store: Arc<dyn Store>,
        lock: Option<DbLock>,
        transport: Arc<dyn AgentTransport>,
        options: ManagerOptions,
    ) -> Result<Self> {
        let instance = InstanceId::new();
        let now = Timestamp::now();
        store
            .register_instance(instance, after(now, options.instance_lease), now)
            .await?;
        let manager = Self {
            inner: Arc::new(Engine {
                store,
                instance,
                transport: crate::metrics::MeteredTransport::wrap(transport),
                options,
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                wake: Arc::new(Notify::new()),
                in_flight: Mutex::new(HashSet::new()),
                restores_in_flight: Mutex::new(HashSet::new()),
                janitor: Mutex::new(None),
                last_sweep: Mutex::new(None),
                last_purge: Mutex::new(None),
                last_backlogs: Mutex::new(None),
                retention: Mutex::new(crate::engine::RetentionClock::default()),
                worker: crate::engine::WorkerState::default(),
                _lock: lock,
            }),
        };
        crate::janitor::spawn_heartbeat(&manager.inner);
        // The worker's first pass, at once, is the start-up recovery.
        if manager.inner.options.run_janitor {
            let handle = crate::janitor::spawn(Arc::downgrade(&manager.inner));
            *lock_unpoisoned(&manager.inner.janitor) = Some(handle);
        }
        Ok(manager)
    }

    /// The host and sandbox registry the embedding application feeds.
    pub fn registry(&self) -> Registry {
        Registry::new(&self.inner)
    }

    /// The caller's team's usage against its quotas (SPEC §8).
    pub async fn usage(&self, caller: &Caller) -> Result<crate::model::Usage> {
        self.inner.store.team_usage(caller.team()).await
    }

    /// Sets `team`'s quotas (administrators): creates of templates of type
    /// snapshot beyond `max_snapshots`, or starting at or over `max_bytes`,
    /// are refused with 403 `quota_exceeded`. `None` lifts a limit. Limits
    /// lowered below the usage refuse new creates and delete nothing.
    pub async fn set_team_limits(
        &self,
        caller: &Caller,
        team: crate::ids::TeamId,
        limits: crate::model::TeamLimits,
    ) -> Result<crate::model::Usage> {
        if !caller.is_admin() {
            return Err(Error::forbidden("only administrators may set quotas"));
        }
        self.inner
            .store
            .set_team_limits(team, limits, Timestamp::now())
            .await?;
        tracing::info!(%team, ?limits, "team quotas set");
        self.inner.store.team_usage(team).await
    }

    /// Sets `team`'s retention policy (administrators; replacing an
    /// earlier one, `RetentionPolicy::new()` turns it off): the default
    /// TTL of creates that carry none (templates created before keep
    /// theirs), and which snapshots the background worker deletes —
    /// unused for `delete_unused_after`, or beyond the newest
    /// `keep_last_per_sandbox` of one source sandbox. Durations are whole
    /// seconds from 1 s to [`MAX_TTL`], the count at least 1
    /// (`invalid_request` otherwise). Answers the policy as stored.
    /// Platform templates are never deleted by retention.
    pub async fn set_team_retention(
        &self,
        caller: &Caller,
        team: crate::ids::TeamId,
        policy: crate::model::RetentionPolicy,
    ) -> Result<crate::model::RetentionPolicy> {
        if !caller.is_admin() {
            return Err(Error::forbidden(
                "only administrators may set retention policies",
            ));
        }
        if let Some(d) = policy.default_ttl {
            check_retention_duration("default_ttl_seconds", d)?;
        }
        if let Some(d) = policy.delete_unused_after {
            check_retention_duration("delete_unused_after", d)?;
        }
        if policy.keep_last_per_sandbox == Some(0) {
            return Err(Error::invalid_request(
                "keep_last_per_sandbox must be at least 1",
            ));
        }
        self.inner
            .store
            .set_team_retention(team, policy, Timestamp::now())
            .await?;
        tracing::info!(%team, ?policy, "team retention policy set");
        // A policy may select work at once.
        self.inner.wake_retention();
        self.inner.store.team_retention(team).await
    }

    /// The caller's team's retention policy (SPEC §8).
    pub async fn retention(&self, caller: &Caller) -> Result<crate::model::RetentionPolicy> {
        self.inner.store.team_retention(caller.team()).await
    }

    /// Sandboxes queued for destruction on their hosts (restores that
    /// failed or were interrupted while the VM may exist), with attempts
    /// and last error (operators).
    pub async fn pending_destroys(&self) -> Result<Vec<crate::store::PendingDestroy>> {
        self.inner.store.pending_destroys().await
    }

    /// The store underneath (the HTTP API's key checks).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// This process's instance id (the owner named by its journal entries).
    pub fn instance(&self) -> InstanceId {
        self.inner.instance
    }

    /// The team's audit entries, newest first.
    pub async fn audit_log(&self, caller: &Caller, query: AuditQuery) -> Result<Page<AuditEntry>> {
        let before = query.cursor_seq()?;
        let limit = check_limit(query.limit)?;
        let team = caller.team();
        let rows = self
            .inner
            .store
            .list_audit(
                team,
                before,
                query.resource_type,
                query.action,
                limit.map(|l| l + 1),
            )
            .await?;
        Ok(paginate(
            rows,
            limit,
            |(seq, _)| audit_cursor(*seq),
            |(_, e)| e,
        ))
    }

    /// Where the files of the caller's template `name` are.
    pub async fn placements(&self, caller: &Caller, name: &TemplateName) -> Result<Vec<Placement>> {
        let template = self.get(caller, name).await?;
        let rows = self.inner.store.placements_of(template.id).await?;
        Ok(rows
            .into_iter()
            .map(|(host, state)| Placement { host, state })
            .collect())
    }

    /// Deletions waiting for a host to confirm, across all teams, per host
    /// with attempts and last error (operators).
    pub async fn pending_deletions(&self) -> Result<Vec<PendingDeletion>> {
        self.inner.store.pending_deletions().await
    }

    /// Operations still open in the journal: creates in flight, interrupted
    /// ones not yet resolved, and rolled-back ones waiting for their host to
    /// report the sandbox (operators).
    pub async fn open_operations(&self) -> Result<Vec<OpenOperation>> {
        self.inner.store.list_open_operations().await
    }

    /// Resolves the open operation `id` now, without waiting for its host
    /// (administrators): its sandbox gets `sandbox_status`; a create that
    /// has not finished is rolled back and its possibly half-written key
    /// queued for deletion. Audited in the operation's team's log, with the
    /// caller as the actor. A create still driven by a task of this process
    /// then reports failure to its caller.
    pub async fn resolve_operation(
        &self,
        caller: &Caller,
        id: OperationId,
        sandbox_status: SandboxStatus,
    ) -> Result<ResolvedOperation> {
        if !caller.is_admin() {
            return Err(Error::forbidden(
                "only administrators may resolve operations",
            ));
        }
        let actor = caller.actor().clone();
        let now = Timestamp::now();
        let first_attempt = after(now, self.inner.options.late_write_grace);
        let resolved = self
            .inner
            .store
            .resolve_open_operation(
                id,
                sandbox_status,
                actor,
                ResolveReason::Operator,
                first_attempt,
                now,
            )
            .await?
            .ok_or_else(|| Error::not_found("operation not found"))?;
        tracing::info!(operation = %id, sandbox = %resolved.sandbox_id, status = %sandbox_status,
            "operation resolved by an operator");
        self.inner.wake.notify_one();
        Ok(ResolvedOperation {
            id,
            template_id: resolved.template_id,
            team: resolved.team,
            sandbox: resolved.sandbox_id,
            sandbox_status,
        })
    }

    /// What the background worker has done since open: its passes (and
    /// those of [`Manager::run_pending_work`]) and how long
    /// it last chose to sleep.
    pub fn worker_stats(&self) -> crate::janitor::WorkerStats {
        self.inner.worker.stats()
    }

    /// Compares every online or draining host's snapshots with the store
    /// and queues for deletion the keys in our format that nothing owns and
    /// that are older than `grace`; the background worker deletes them.
    /// Keys that are not ours are never touched. Each queued key is logged
    /// and audited as a system action in the platform team's log. The
    /// background worker does this by itself when
    /// [`ManagerOptions::orphan_sweep`] is set.
    pub async fn sweep_orphans(&self, grace: Duration) -> Result<SweepReport> {
        crate::janitor::sweep(&self.inner, grace).await
    }

    /// Runs the background worker's work that is due now, once, and says
    /// what it did. The worker does this by itself; this is for operators
    /// and tests.
    pub async fn run_pending_work(&self) -> Result<crate::engine::WorkReport> {
        crate::janitor::tick(&self.inner).await
    }

    /// Stops the background worker, waits for operations in flight to
    /// record their result, and checkpoints the store so that the database
    /// file holds everything by itself. Everything left queued resumes on
    /// the next open.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let handle = lock_unpoisoned(&self.inner.janitor).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        // End this instance (what it left open can be adopted at once) and
        // leave the store whole on its own (SQLite: checkpoint the WAL).
        if let Err(err) = self.inner.store.close(self.inner.instance).await {
            tracing::warn!(error = %err, "cannot close the store at shutdown");
        }
    }
}

fn check_limit(limit: Option<u32>) -> Result<Option<u32>> {
    match limit {
        Some(0) => Err(Error::invalid_request("limit must be at least 1")),
        Some(n) if n > MAX_PAGE_SIZE => Err(Error::invalid_request(format!(
            "limit must be at most {MAX_PAGE_SIZE}"
        ))),
        other => Ok(other),
    }
}

/// Cuts `rows` (fetched with `limit + 1`) to a page with its next cursor.
fn paginate<R, T>(
    mut rows: Vec<R>,
    limit: Option<u32>,
    cursor_of: impl Fn(&R) -> String,
    item: impl Fn(R) -> T,
) -> Page<T> {
    let mut next_cursor = None;
    if let Some(limit) = limit.and_then(|l| usize::try_from(l).ok())
        && rows.len() > limit
    {
        rows.truncate(limit);
        next_cursor = rows.last().map(&cursor_of);
    }
    Page {
        items: rows.into_iter().map(item).collect(),
        next_cursor,
    }
}

fn parse_list_cursor(cursor: &str) -> Result<ListPosition> {
    let invalid = || Error::invalid_request("invalid cursor");
    let (ms, id) = cursor.split_once('.').ok_or_else(invalid)?;
    Ok(ListPosition {
        created_at: ms.parse().map_err(|_| invalid())?,
        id: TemplateId::parse(id).map_err(|_| invalid())?,
    })
}

fn list_cursor(t: &Template) -> String {
    format!("{}.{}", t.created_at.unix_millis(), t.id)
}

/// Logs an error once, at the boundary, with its hidden cause.
/// How a create or restore is submitted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Submission {
    /// What makes two requests the same, over HTTP (method, path, query
    /// and body); the library's own otherwise.
    pub(crate) fingerprint: Option<String>,
    /// Answer once the journal entry is durable, not with the outcome.
    pub(crate) respond_async: bool,
}

/// What a submitted create or restore answers.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned once per request and consumed at once
pub(crate) enum Submitted<T> {
    /// Its outcome (a synchronous submission).
    Done(T),
    /// Under way (an asynchronous submission).
    Started(Operation),
    /// A remembered request with the same key and the same request: its
    /// first answer, not done again.
    Replay(StoredRequest),
}

/// A remembered operation's outcome as a synchronous answer: 409
/// `idempotency_in_progress` while it runs.
pub(crate) fn replayed<T>(op: Operation, pick: impl FnOnce(Operation) -> Option<T>) -> Result<T> {
    match op.state {
        OperationState::Running => Err(crate::operation::in_progress()),
        OperationState::Failed => Err(op.error.unwrap_or_else(|| {
            Error::new(
                ErrorCode::DbError,
                "the operation failed without a recorded error",
            )
        })),
        OperationState::Succeeded => pick(op).ok_or_else(|| {
            Error::new(
                ErrorCode::DbError,
                "the operation's recorded outcome cannot be read",
            )
        }),
    }
}

/// Logs a submitted create's or restore's failure, and counts one refused
/// before its task ran (a task that ran counts its own outcome, see
/// [`Reply`]); a replay, or its 409 or 422, did no work and is not counted.
fn settle_submission<T>(
    kind: &'static str,
    span: &tracing::Span,
    began: std::time::Instant,
    launched: &std::sync::atomic::AtomicBool,
    result: &Result<T>,
) {
    let Err(err) = result else {
        return;
    };
    span.in_scope(|| log_failure(kind, err));
    let replay = matches!(
        err.code(),
        ErrorCode::IdempotencyInProgress | ErrorCode::IdempotencyKeyReused
    );
    if !launched.load(std::sync::atomic::Ordering::Relaxed) && !replay {
        crate::metrics::operation(kind, began, result);
    }
}

fn log_failure(operation: &str, err: &Error) {
    let cause = std::error::Error::source(err).map(ToString::to_string);
    if err.http_status() >= 500 {
        tracing::error!(operation, code = %err.code(), cause, "{}", err.message());
    } else {
        tracing::debug!(operation, code = %err.code(), cause, "{}", err.message());
    }
}

#[async_trait]
impl SnapshotManager for Manager {
    async fn create(&self, caller: &Caller, snapshot: NewSnapshot) -> Result<Template> {
        match self
            .submit_create(caller, snapshot, Submission::default())
            .await?
        {
            Submitted::Done(template) => Ok(template),
            Submitted::Started(op) => replayed(op, |op| op.template),
            Submitted::Replay(stored) => replayed(stored.operation(), |op| op.template),
        }
    }

    async fn get(&self, caller: &Caller, name: &TemplateName) -> Result<Template> {
        let team = caller.team();
        let name = name.clone();
        let result = self
            .inner
            .store
            .find_visible(team, name)
            .await
            .and_then(|t| t.ok_or_else(|| Error::not_found("template not found")));
        if let Err(err) = &result {
            log_failure("get", err);
        }
        result
    }

    async fn list(&self, caller: &Caller, query: ListQuery) -> Result<Page<Template>> {
        let result = self.list_page(caller, query).await;
        if let Err(err) = &result {
            log_failure("list", err);
        }
        result
    }

    async fn delete(&self, caller: &Caller, name: &TemplateName) -> Result<Deleted> {
        self.delete_template(caller, name).await
    }

    async fn restore(&self, caller: &Caller, request: RestoreRequest) -> Result<Sandbox> {
        match self
            .submit_restore(caller, request, Submission::default())
            .await?
        {
            Submitted::Done(sandbox) => Ok(sandbox),
            Submitted::Started(op) => replayed(op, |op| op.sandbox),
            Submitted::Replay(stored) => replayed(stored.operation(), |op| op.sandbox),
        }
    }

    async fn sandbox(&self, caller: &Caller, id: SandboxId) -> Result<Sandbox> {
        let result = self.inner.store.get_sandbox(id).await.and_then(|s| {
            s.filter(|s| s.team == caller.team())
                .ok_or_else(|| Error::not_found("sandbox not found"))
        });
        if let Err(err) = &result {
            log_failure("sandbox", err);
        }
        result
    }
}

impl Manager {
    /// Starts a snapshot and returns once it is under way (its journal
    /// entry durable), without waiting for the host (SPEC §8 "Asynchronous
    /// create"): follow it with [`Manager::operation`]. Errors found
    /// before it starts (validation, quota, the sandbox's state) are
    /// returned at once. With an idempotency key, a retry returns the same
    /// operation.
    pub async fn start_create(&self, caller: &Caller, snapshot: NewSnapshot) -> Result<Operation> {
        let how = Submission {
            respond_async: true,
            ..Submission::default()
        };
        match self.submit_create(caller, snapshot, how).await? {
            Submitted::Started(op) => Ok(op),
            Submitted::Replay(stored) => Ok(stored.operation()),
            Submitted::Done(_) => Err(Error::new(
                ErrorCode::DbError,
                "the snapshot finished without being started",
            )),
        }
    }

    /// Starts a restore and returns once it is under way, as
    /// [`Manager::start_create`] does a snapshot.
    pub async fn start_restore(
        &self,
        caller: &Caller,
        request: RestoreRequest,
    ) -> Result<Operation> {
        let how = Submission {
            respond_async: true,
            ..Submission::default()
        };
        match self.submit_restore(caller, request, how).await? {
            Submitted::Started(op) => Ok(op),
            Submitted::Replay(stored) => Ok(stored.operation()),
            Submitted::Done(_) => Err(Error::new(
                ErrorCode::DbError,
                "the restore finished without being started",
            )),
        }
    }

    /// A remembered create or restore of the caller's team (started
    /// asynchronously or with an idempotency key): `running`, then
    /// `succeeded` with its template or sandbox, or `failed` with its
    /// error. Kept [`ManagerOptions::request_retention`]; another team's,
    /// an expired one or an unknown id is 404.
    pub async fn operation(&self, caller: &Caller, id: OperationId) -> Result<Operation> {
        let now = Timestamp::now();
        self.inner
            .store
            .get_request(caller.team(), id, now)
            .await?
            .map(|stored| stored.operation())
            .ok_or_else(|| Error::not_found("operation not found"))
    }

    /// What a request with `key` (if any) means now: a replay of a
    /// remembered one (or its 409 / 422), or the record to write with the
    /// new operation's journal entry (none when there is nothing to
    /// remember).
    async fn remember(
        &self,
        caller: &Caller,
        key: Option<IdempotencyKey>,
        kind: OperationKind,
        fingerprint: String,
        respond_async: bool,
    ) -> Result<std::result::Result<Option<RequestRecord>, StoredRequest>> {
        let now = Timestamp::now();
        if let Some(key) = &key
            && let Some(stored) = self
                .inner
                .store
                .find_request(caller.team(), key.clone(), now)
                .await?
        {
            crate::operation::replay_check(&stored, &fingerprint)?;
            return Ok(Err(stored));
        }
        if key.is_none() && !respond_async {
            return Ok(Ok(None));
        }
        Ok(Ok(Some(RequestRecord {
            kind,
            key,
            fingerprint,
            respond_async,
            expires_at: after(now, self.inner.options.request_retention),
        })))
    }

    /// A create, synchronous or not (see [`Submission`]).
    pub(crate) async fn submit_create(
        &self,
        caller: &Caller,
        snapshot: NewSnapshot,
        how: Submission,
    ) -> Result<Submitted<Template>> {
        let began = std::time::Instant::now();
        // Whether the task ran: it counts its own outcome (see `Reply`).
        let launched = std::sync::atomic::AtomicBool::new(false);
        let span = tracing::info_span!(
            "snapshot.create",
            team = %caller.team(),
            sandbox = %snapshot.sandbox_id,
            name = %snapshot.name,
            overwrite = snapshot.overwrite,
        );
        let result = async {
            if caller.team().is_platform() && !caller.is_admin() {
                return Err(Error::forbidden(
                    "only administrators may create platform templates",
                ));
            }
            if let Some(ttl) = snapshot.ttl {
                check_retention_duration("ttl", ttl)?;
            }
            let fingerprint = how
                .fingerprint
                .clone()
                .unwrap_or_else(|| snapshot.fingerprint());
            let kind = OperationKind::SnapshotCreate;
            let key = snapshot.idempotency_key.clone();
            let request = match self
                .remember(caller, key, kind, fingerprint, how.respond_async)
                .await?
            {
                Ok(request) => request,
                Err(stored) => return Ok(Submitted::Replay(stored)),
            };
            let operation_id = OperationId::new();
            let create = CreateRequest {
                sandbox_id: snapshot.sandbox_id,
                name: snapshot.name,
                overwrite: snapshot.overwrite,
                ttl: snapshot.ttl,
                operation_id,
                request,
            };
            // The whole operation runs on its own task: a caller that goes
            // away does not abort it, and its result is still recorded.
            let inner = self.inner.clone();
            let caller = caller.clone();
            launched.store(true, std::sync::atomic::Ordering::Relaxed);
            self.launch(
                kind,
                operation_id,
                how.respond_async,
                "the snapshot task stopped unexpectedly",
                move |reply| async move { run_create(&inner, &caller, create, reply).await },
            )
            .await
        }
        .instrument(span.clone())
        .await;
        settle_submission("create", &span, began, &launched, &result);
        result
    }

    /// A restore, synchronous or not (see [`Submission`]).
    pub(crate) async fn submit_restore(
        &self,
        caller: &Caller,
        request: RestoreRequest,
        how: Submission,
    ) -> Result<Submitted<Sandbox>> {
        let began = std::time::Instant::now();
        let launched = std::sync::atomic::AtomicBool::new(false);
        let span = tracing::info_span!(
            "sandbox.restore",
            team = %caller.team(),
            template = %request.template,
            sandbox = request.sandbox_id.map(|id| id.to_string()),
        );
        let result = async {
            request.check()?;
            let fingerprint = how
                .fingerprint
                .clone()
                .unwrap_or_else(|| request.fingerprint());
            let kind = OperationKind::SandboxRestore;
            let key = request.idempotency_key.clone();
            let remembered = match self
                .remember(caller, key, kind, fingerprint, how.respond_async)
                .await?
            {
                Ok(remembered) => remembered,
                Err(stored) => return Ok(Submitted::Replay(stored)),
            };
            let operation_id = OperationId::new();
            let spec = RestoreSpec {
                template: request.template,
                sandbox_id: request.sandbox_id,
                vcpus: request.vcpus,
                memory_mb: request.memory_mb,
                timeout_sec: request.timeout_sec,
                disk_size_mb: request.disk_size_mb,
                operation_id,
                request: remembered,
            };
            // On its own task, like a create: a caller that goes away does
            // not abort it, and its outcome is still recorded.
            let inner = self.inner.clone();
            let caller = caller.clone();
            launched.store(true, std::sync::atomic::Ordering::Relaxed);
            self.launch(
                kind,
                operation_id,
                how.respond_async,
                "the restore task stopped unexpectedly",
                move |reply| async move { run_restore(&inner, &caller, spec, reply).await },
            )
            .await
        }
        .instrument(span.clone())
        .await;
        settle_submission("restore", &span, began, &launched, &result);
        result
    }

    /// Runs an operation's task and waits for its answer: the outcome, or
    /// (asynchronously) that it is under way.
    async fn launch<T, F, Fut>(
        &self,
        kind: OperationKind,
        id: OperationId,
        respond_async: bool,
        stopped: &'static str,
        run: F,
    ) -> Result<Submitted<T>>
    where
        T: Send + 'static,
        F: FnOnce(Reply<T>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let metric = match kind {
            OperationKind::SandboxRestore => "restore",
            _ => "create",
        };
        let stopped = || Error::new(ErrorCode::DbError, stopped);
        if respond_async {
            let (tx, rx) = oneshot::channel();
            let created_at = Timestamp::now();
            self.inner
                .tasks
                .spawn(run(Reply::asynchronous(metric, tx)).in_current_span());
            rx.await.unwrap_or_else(|_| Err(stopped()))?;
            Ok(Submitted::Started(Operation::running(id, kind, created_at)))
        } else {
            let (tx, rx) = oneshot::channel();
            self.inner
                .tasks
                .spawn(run(Reply::done(metric, tx)).in_current_span());
            rx.await
                .unwrap_or_else(|_| Err(stopped()))
                .map(Submitted::Done)
        }
    }

    async fn list_page(&self, caller: &Caller, query: ListQuery) -> Result<Page<Template>> {
        let limit = check_limit(query.limit)?;
        let after = query.cursor.as_deref().map(parse_list_cursor).transpose()?;
        let team = caller.team();
        let kind = query.template_type;
        let rows = self
            .inner
            .store
            .list_visible(team, kind, after, limit.map(|l| l + 1))
            .await?;
        Ok(paginate(rows, limit, list_cursor, |t| t))
    }

    async fn delete_template(&self, caller: &Caller, name: &TemplateName) -> Result<Deleted> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!("snapshot.delete", team = %caller.team(), name = %name);
        let result = async {
            let (committed_tx, committed_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let inner = self.inner.clone();
            let caller = caller.clone();
            let name = name.clone();
            self.inner.tasks.spawn(
                async move { run_delete(&inner, &caller, name, committed_tx, done_tx).await }
                    .in_current_span(),
            );
            let (template, hosts) = committed_rx.await.unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorCode::DbError,
                    "the delete task stopped unexpectedly",
                ))
            })?;
            let (hosts_confirmed, hosts_pending) =
                match tokio::time::timeout(self.inner.options.delete_wait, done_rx).await {
                    Ok(Ok(outcome)) => outcome,
                    // Still running: nothing is confirmed yet, and whatever
                    // does not confirm is retried by the worker.
                    _ => (Vec::new(), hosts),
                };
            Ok(Deleted {
                template,
                hosts_confirmed,
                hosts_pending,
            })
        }
        .instrument(span.clone())
        .await;
        if let Err(err) = &result {
            span.in_scope(|| log_failure("delete", err));
        }
        crate::metrics::operation("delete", started, &result);
        result
    }
}
