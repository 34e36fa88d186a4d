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
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::{
    AgentCode, AgentError, AgentTransport, CreateSnapshotRequest, DeleteSnapshotRequest,
    HostTarget, SandboxList, SnapshotKey,
};
use crate::audit::{AuditEntry, AuditQuery, audit_cursor};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{HostId, InstanceId, OperationId, SandboxId, TemplateId};
use crate::janitor::SweepReport;
use crate::model::{Caller, SandboxStatus, Template, TemplateType, Timestamp};
use crate::names::TemplateName;
use crate::registry::Registry;
use crate::store::sqlite::lock::DbLock;
use crate::store::{
    CreateInput, CreateOp, Deletion, DeletionResult, Finish, ListPosition, OpenOperation,
    PendingDeletion, ResolveReason, SandboxOutcome, SqliteStore, Store, StoreOptions,
};

/// Largest page a list may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// What to snapshot and under which name, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    sandbox_id: SandboxId,
    name: TemplateName,
    overwrite: bool,
}

impl NewSnapshot {
    /// A snapshot of `sandbox_id` named `name` (a generated
    /// `template-xxxxxxxx` name when `None`).
    pub fn new(sandbox_id: SandboxId, name: Option<TemplateName>) -> Self {
        Self {
            sandbox_id,
            name: name.unwrap_or_else(TemplateName::generate),
            overwrite: false,
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

    /// The sandbox to snapshot.
    pub fn sandbox_id(&self) -> SandboxId {
        self.sandbox_id
    }

    /// The template name.
    pub fn name(&self) -> &TemplateName {
        &self.name
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
}

/// Tuning for [`Manager`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ManagerOptions {
    /// How the SQLite file is opened.
    pub store: StoreOptions,
    /// How the PostgreSQL pool is set up (feature `postgres`).
    #[cfg(feature = "postgres")]
    pub postgres: crate::store::postgres::PostgresOptions,
    /// How long this process's instance lease lasts without a heartbeat
    /// (renewed every third of it). Another replica adopts the journal
    /// entries of an instance whose lease ended. Default 30 s.
    pub instance_lease: Duration,
    /// Longest a host agent may take to create a snapshot. Default 5 min.
    pub create_timeout: Duration,
    /// Longest a `DeleteSnapshot` call may take. Default 30 s.
    pub delete_timeout: Duration,
    /// Longest `delete` (and an overwriting `create`) waits for the hosts
    /// to delete files before returning; the deletion goes on in the
    /// background either way. Default 10 s.
    pub delete_wait: Duration,
    /// Longest a `ListSandboxes` call may take. Default 10 s.
    pub list_timeout: Duration,
    /// After an ambiguous create failure (a timeout, a lost reply, a crash),
    /// how long the possibly half-written key is left alone before it is
    /// deleted, so that the deletion does not race an agent still writing
    /// it. Default 5 min (the default create timeout, which agents receive
    /// as their deadline).
    pub late_write_grace: Duration,
    /// An operation whose outcome needs its host's answer (the host could
    /// not be asked, or still reports the sandbox `snapshotting`) resolves
    /// without it this long after it began: the sandbox becomes `error` and
    /// a possibly half-written key stays queued for deletion. Default 15 min.
    pub resolve_deadline: Duration,
    /// How long a create whose agent has answered keeps trying to record
    /// the answer in a failing store (a lock held by another process, a
    /// full disk) before it answers `db_error`, outcome unknown. It goes on
    /// trying in the background after that, until the answer is recorded
    /// or the manager shuts down. Default 30 s.
    pub record_patience: Duration,
    /// First retry delay of queued work; doubles per attempt. Default 1 s.
    pub retry_base: Duration,
    /// Longest retry delay. Default 5 min.
    pub retry_max: Duration,
    /// Longest the background worker sleeps between scans. Default 30 s.
    pub janitor_interval: Duration,
    /// Whether to run the background worker. Default true.
    pub run_janitor: bool,
    /// The background orphan sweep; off (`None`) by default.
    pub orphan_sweep: Option<SweepOptions>,
}

/// Settings of the opt-in orphan sweep (see
/// [`Manager::sweep_orphans`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepOptions {
    /// Keys younger than this are never swept: they may belong to a create
    /// in flight elsewhere or to an agent that missed its deadline. Should
    /// exceed the create timeout by a margin. Default 1 h.
    pub grace: Duration,
    /// How often the background worker sweeps. Default 1 h.
    pub interval: Duration,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            interval: Duration::from_secs(3600),
        }
    }
}

impl SweepOptions {
    /// A sweep every `interval` of keys older than `grace`.
    pub fn new(grace: Duration, interval: Duration) -> Self {
        Self { grace, interval }
    }
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            #[cfg(feature = "postgres")]
            postgres: crate::store::postgres::PostgresOptions::default(),
            instance_lease: Duration::from_secs(30),
            create_timeout: Duration::from_secs(300),
            delete_timeout: Duration::from_secs(30),
            delete_wait: Duration::from_secs(10),
            list_timeout: Duration::from_secs(10),
            late_write_grace: Duration::from_secs(300),
            resolve_deadline: Duration::from_secs(15 * 60),
            record_patience: Duration::from_secs(30),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            janitor_interval: Duration::from_secs(30),
            run_janitor: true,
            orphan_sweep: None,
        }
    }
}

/// The default [`SnapshotManager`]: templates in an SQLite file, host
/// agents through an [`AgentTransport`], a background worker that finishes
/// deletions. Cheap to clone.
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
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    /// This process's instance: the owner of the journal entries it writes.
    pub(crate) instance: InstanceId,
    pub(crate) transport: Arc<dyn AgentTransport>,
    pub(crate) options: ManagerOptions,
    /// Detached operation tasks, awaited by `shutdown`.
    tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) wake: Arc<Notify>,
    /// Templates whose create is being driven by a task of this process;
    /// recovery leaves them alone.
    in_flight: Mutex<HashSet<TemplateId>>,
    janitor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_sweep: Mutex<Option<tokio::time::Instant>>,
    /// What the background worker keeps in memory between passes.
    pub(crate) worker: crate::janitor::WorkerState,
    /// SQLite's one-process lock (none on PostgreSQL).
    _lock: Option<DbLock>,
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
            inner: Arc::new(Inner {
                store,
                instance,
                transport: crate::metrics::MeteredTransport::wrap(transport),
                options,
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                wake: Arc::new(Notify::new()),
                in_flight: Mutex::new(HashSet::new()),
                janitor: Mutex::new(None),
                last_sweep: Mutex::new(None),
                worker: crate::janitor::WorkerState::default(),
                _lock: lock,
            }),
        };
        crate::janitor::spawn_heartbeat(Arc::downgrade(&manager.inner));
        // The worker's first pass, at once, is the start-up recovery.
        if manager.inner.options.run_janitor {
            let handle = crate::janitor::spawn(Arc::downgrade(&manager.inner));
            *lock_unpoisoned(&manager.inner.janitor) = Some(handle);
        }
        Ok(manager)
    }

    /// The host and sandbox registry the embedding application feeds.
    pub fn registry(&self) -> Registry {
        Registry::new(self.inner.store.clone(), self.inner.wake.clone())
    }

    /// The store underneath.
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
    pub async fn run_pending_work(&self) -> Result<crate::janitor::WorkReport> {
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

pub(crate) fn lock_unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let started = std::time::Instant::now();
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
            // The whole operation runs on its own task: a caller that goes
            // away does not abort it, and its result is still recorded.
            let (tx, rx) = oneshot::channel();
            let inner = self.inner.clone();
            let caller = caller.clone();
            self.inner.tasks.spawn(
                async move {
                    run_create(&inner, &caller, snapshot, Reply(Some(tx))).await;
                }
                .in_current_span(),
            );
            rx.await.unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorCode::DbError,
                    "the snapshot task stopped unexpectedly",
                ))
            })
        }
        .instrument(span.clone())
        .await;
        if let Err(err) = &result {
            span.in_scope(|| log_failure("create", err));
        }
        crate::metrics::operation("create", started, &result);
        result
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
}

impl Manager {
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
                async move {
                    let now = Timestamp::now();
                    let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
                    let actor = caller.actor().clone();
                    let (team, admin) = (caller.team(), caller.is_admin());
                    let begun = inner
                        .store
                        .begin_delete(actor, team, admin, name, lease, now)
                        .await;
                    let (template, targets) = match begun {
                        Ok(v) => v,
                        Err(err) => {
                            let _ = committed_tx.send(Err(err));
                            return;
                        }
                    };
                    let hosts: Vec<HostId> = targets.iter().map(|d| d.host.id).collect();
                    let _ = committed_tx.send(Ok((template, hosts)));
                    let outcome = delete_files(&inner, targets).await;
                    let _ = done_tx.send(outcome);
                }
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

/// The shortest retry delay, whatever the options say.
const MIN_RETRY: Duration = Duration::from_millis(10);

pub(crate) fn after(now: Timestamp, d: Duration) -> Timestamp {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Timestamp::from_unix_millis(now.unix_millis().saturating_add(ms))
}

/// The delay before attempt `attempts + 1`: exponential from `retry_base`,
/// capped at `retry_max`, with up to 20% jitter so hosts that come back
/// together are not hit at once.
pub(crate) fn backoff(options: &ManagerOptions, attempts: u32) -> Duration {
    // Never zero, whatever the options say: a zero delay would spin.
    let exp = options
        .retry_base
        .max(MIN_RETRY)
        .saturating_mul(1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX));
    let capped = exp.min(options.retry_max.max(MIN_RETRY));
    let jitter_pct = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 21);
    capped + capped.mul_f64(jitter_pct as f64 / 100.0)
}

struct InFlightGuard<'a> {
    inner: &'a Inner,
    id: TemplateId,
}

impl<'a> InFlightGuard<'a> {
    fn new(inner: &'a Inner, id: TemplateId) -> Self {
        lock_unpoisoned(&inner.in_flight).insert(id);
        Self { inner, id }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        lock_unpoisoned(&self.inner.in_flight).remove(&self.id);
    }
}

/// The status a host reports for `sandbox` after a snapshot attempt:
/// `None` while the host still reports it `snapshotting` (it is still
/// working on it), `error` for a status we do not know. A sandbox the host
/// does not list is `paused`: real agents list only running VMs, and a
/// snapshot attempt leaves the VM paused (SPEC §4a "What a host's answer
/// means"); `missing` needs the host to say so.
pub(crate) fn reported_status(list: &SandboxList, sandbox: SandboxId) -> Option<SandboxStatus> {
    let wanted = sandbox.to_string();
    match list.sandboxes.iter().find(|s| s.sandbox_id == wanted) {
        None => Some(SandboxStatus::Paused),
        Some(info) => match info.status.parse::<SandboxStatus>() {
            Ok(SandboxStatus::Snapshotting) => None,
            Ok(status) => Some(status),
            Err(_) => Some(SandboxStatus::Error),
        },
    }
}

impl Inner {
    /// `None` when an orphan sweep is due now (and records it as started),
    /// else how long until it is.
    pub(crate) fn sweep_due(&self, interval: Duration) -> Option<Duration> {
        let mut last = lock_unpoisoned(&self.last_sweep);
        let now = tokio::time::Instant::now();
        match *last {
            Some(at) if now < at + interval => Some(at + interval - now),
            _ => {
                *last = Some(now);
                None
            }
        }
    }

    /// Runs `work` on a task that `shutdown` waits for.
    pub(crate) fn tasks_spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work.in_current_span());
    }

    pub(crate) fn is_in_flight(&self, id: TemplateId) -> bool {
        lock_unpoisoned(&self.in_flight).contains(&id)
    }

    /// The creates driven by tasks of this process.
    pub(crate) fn in_flight(&self) -> Vec<TemplateId> {
        lock_unpoisoned(&self.in_flight).iter().copied().collect()
    }

    /// `ListSandboxes` on a host, within the list timeout.
    pub(crate) async fn list_sandboxes(
        &self,
        host: &HostTarget,
    ) -> Result<SandboxList, AgentError> {
        let agent = self.transport.agent(host)?;
        tokio::time::timeout(self.options.list_timeout, agent.list_sandboxes())
            .await
            .map_err(|_| AgentError::Timeout)?
    }

    /// What to do with the sandbox after an ambiguous failure: the status
    /// its host reports, or wait until the host can say.
    async fn sandbox_outcome(&self, op: &CreateOp) -> SandboxOutcome {
        let retry_at = after(Timestamp::now(), backoff(&self.options, 0));
        match self.list_sandboxes(&op.host).await {
            Ok(list) => match reported_status(&list, op.sandbox_id) {
                Some(status) => SandboxOutcome::Known(status),
                None => SandboxOutcome::Unknown { retry_at },
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot ask the host for the sandbox's status; will retry");
                SandboxOutcome::Unknown { retry_at }
            }
        }
    }

    /// Rolls a create back (see `Store::fail_create`). After an ambiguous
    /// failure the key is deleted only after `late_write_grace`, so the
    /// deletion does not race an agent still writing it.
    pub(crate) async fn roll_back(
        &self,
        op: &CreateOp,
        outcome: SandboxOutcome,
        code: &'static str,
        detail: String,
        definite: bool,
    ) -> Result<bool> {
        let now = Timestamp::now();
        let first_attempt = if definite {
            now
        } else {
            after(now, self.options.late_write_grace)
        };
        let op = op.clone();
        let applied = self
            .store
            .fail_create(op, outcome, code, detail, Some(first_attempt), now)
            .await?;
        self.wake.notify_one();
        Ok(applied)
    }

    /// How long a create's own task holds its journal entry: the worker
    /// leaves the entry alone until then (after a restart, at once).
    fn create_lease(&self) -> Duration {
        self.options
            .create_timeout
            .saturating_add(self.options.list_timeout)
            .saturating_add(self.options.record_patience)
    }

    /// Runs `attempt` until the store takes it, backing off between tries.
    /// Once `record_patience` has passed, `impatient` is called (once) with
    /// the last error so that the caller can be answered; the tries go on
    /// in the background until the store takes it. `None` when the manager
    /// shuts down first: the journal entry stays open for the next start.
    async fn persist<T, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
        impatient: impl FnOnce(&Error),
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = tokio::time::Instant::now();
        let mut impatient = Some(impatient);
        let mut tries = 0u32;
        loop {
            let err = match attempt().await {
                Ok(value) => return Some(value),
                Err(err) => err,
            };
            tries += 1;
            if started.elapsed() >= self.options.record_patience
                && let Some(answer) = impatient.take()
            {
                answer(&err);
            }
            tracing::warn!(attempt = tries, error = ?err, "recording {what} failed; retrying");
            let delay = Duration::from_millis(50u64 << tries.min(6));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return None,
            }
        }
    }
}

/// The answer to a create's caller, sent at most once.
struct Reply(Option<oneshot::Sender<Result<Template>>>);

impl Reply {
    fn send(&mut self, result: Result<Template>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(result);
        }
    }
}

/// What a caller hears when the store cannot record what the host did:
/// the outcome is unknown (a crash before the store recovers may still
/// decide it either way).
fn unrecorded(what: &str, cause: &Error) -> Error {
    Error::new(
        ErrorCode::DbError,
        format!(
            "{what}, but the store could not record it yet; the outcome is unknown until \
             the store recovers"
        ),
    )
    .with_source(cause.to_string())
}

async fn run_create(inner: &Arc<Inner>, caller: &Caller, snapshot: NewSnapshot, mut reply: Reply) {
    let template_id = TemplateId::new();
    let _guard = InFlightGuard::new(inner, template_id);
    let now = Timestamp::now();
    let input = CreateInput {
        actor: caller.actor().clone(),
        team: caller.team(),
        sandbox_id: snapshot.sandbox_id,
        name: snapshot.name,
        overwrite: snapshot.overwrite,
        template_id,
        operation_id: OperationId::new(),
        owner: inner.instance,
        lease_until: after(now, inner.create_lease()),
    };
    let op = match inner.store.begin_create(input, now).await {
        Ok((op, _sandbox)) => op,
        Err(err) => return reply.send(Err(err)),
    };
    tracing::debug!(template = %template_id, host = %op.host.id, "snapshot started");

    let request = CreateSnapshotRequest::for_template(op.sandbox_id, op.team, template_id);
    let called = async {
        let agent = inner.transport.agent(&op.host)?;
        tokio::time::timeout(inner.options.create_timeout, agent.create_snapshot(request))
            .await
            .map_err(|_| AgentError::Timeout)?
    }
    .await;
    match called {
        Ok(response) => finish_success(inner, &op, response.size_bytes, &mut reply).await,
        Err(err) => finish_failure(inner, &op, err, &mut reply).await,
    }
    // Only a shutdown gets here without an answer: the entry stays open and
    // the next start resolves it.
    reply.send(Err(Error::new(
        ErrorCode::DbError,
        "the snapshot manager shut down before the snapshot's outcome was recorded",
    )));
}

async fn finish_success(inner: &Arc<Inner>, op: &CreateOp, size_bytes: u64, reply: &mut Reply) {
    // The host holds the snapshot: giving up would tell the caller it
    // failed and then let recovery roll it forward (or, without
    // `ListSnapshots`, back). Keep what this process knows and retry until
    // the store takes it.
    let finished = inner
        .persist(
            "a finished snapshot",
            || {
                let now = Timestamp::now();
                let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
                let op = op.clone();
                inner.store.finish_create(op, size_bytes, lease, now)
            },
            |err| reply.send(Err(unrecorded("the snapshot was taken", err))),
        )
        .await;
    let done = match finished {
        None => return,
        Some(Finish::Done(done)) => done,
        Some(Finish::NameTaken) => {
            // Lost the name to another template meanwhile: undo ours. The
            // agent answered, so the VM is paused and the key whole.
            let err = Error::conflict(
                "another snapshot took this name while the snapshot was being created",
            );
            let outcome = SandboxOutcome::Known(SandboxStatus::Paused);
            let code = err.code().as_str();
            let recorded = inner
                .persist(
                    "a conflicting snapshot's rollback",
                    || inner.roll_back(op, outcome, code, err.message().to_owned(), true),
                    |db| reply.send(Err(unrecorded("the snapshot lost its name", db))),
                )
                .await;
            if recorded.is_some() {
                reply.send(Err(err));
            }
            return;
        }
        Some(Finish::AlreadyResolved) => {
            // Someone else closed the entry (an operator); report what it
            // became.
            let id = op.template_id;
            let result = inner.store.get_ready_template(id).await.and_then(|t| {
                t.ok_or_else(|| {
                    Error::conflict("the snapshot was rolled back while it was being recorded")
                })
            });
            return reply.send(result);
        }
    };
    tracing::info!(template = %done.template.id, size_bytes, "snapshot ready");
    if !done.replaced.is_empty() {
        // Delete the replaced files now, waiting a bounded time so that an
        // overwrite usually returns with the old files gone; a slow or
        // unreachable host is left to the worker.
        let targets = done.replaced;
        let inner2 = inner.clone();
        let deleting = inner.tasks.spawn(
            async move {
                delete_files(&inner2, targets).await;
            }
            .in_current_span(),
        );
        let _ = tokio::time::timeout(inner.options.delete_wait, deleting).await;
    }
    reply.send(Ok(done.template));
}

/// Records a failed create, then tells the caller. A failure the store
/// cannot record within `record_patience` is answered `db_error` (outcome
/// unknown), and recording it goes on in the background, so that what the
/// caller was told (and what this process knows) is what happens.
async fn finish_failure(inner: &Arc<Inner>, op: &CreateOp, err: AgentError, reply: &mut Reply) {
    tracing::warn!(template = %op.template_id, error = %err, "host agent failed to snapshot");
    let user_error = Error::from_create_failure(err.clone());
    let not_sent = err.is_not_sent();
    let definite = not_sent || err.is_definite_rejection();
    let outcome = if definite {
        SandboxOutcome::Known(op.prev_status)
    } else {
        inner.sandbox_outcome(op).await
    };
    let now = Timestamp::now();
    // A request that never reached the agent left nothing to delete; after
    // a rejection the agent wrote nothing either, but a delete is cheap and
    // an agent's word is not proof.
    let first_attempt = if not_sent {
        None
    } else if definite {
        Some(now)
    } else {
        Some(after(now, inner.options.late_write_grace))
    };
    let code = user_error.code().as_str();
    let detail = err.to_string();
    let recorded = inner
        .persist(
            "a failed snapshot",
            || {
                let (op, detail) = (op.clone(), detail.clone());
                let now = Timestamp::now();
                inner
                    .store
                    .fail_create(op, outcome, code, detail, first_attempt, now)
            },
            |db| reply.send(Err(unrecorded("the snapshot failed", db))),
        )
        .await;
    if recorded.is_some() {
        inner.wake.notify_one();
        reply.send(Err(user_error));
    }
}

/// Deletes files on their hosts in parallel and records each answer.
/// Returns the hosts that confirmed and those left to the worker.
pub(crate) async fn delete_files(
    inner: &Arc<Inner>,
    targets: Vec<Deletion>,
) -> (Vec<HostId>, Vec<HostId>) {
    let mut calls = JoinSet::new();
    for target in targets {
        let inner = inner.clone();
        calls.spawn(async move {
            let result = delete_on_host(&inner, &target).await;
            // Each answer is recorded as soon as it arrives, so a slow host
            // does not hold back the others; answers arriving together
            // share a commit through the writer's group commit.
            let now = Timestamp::now();
            let answer = match &result {
                Ok(()) => DeletionResult::Confirmed,
                Err(err) => DeletionResult::Failed {
                    error: err.to_string(),
                    retry_at: after(now, backoff(&inner.options, target.attempts)),
                },
            };
            let recorded = inner
                .store
                .record_deletion(target.clone(), answer, now)
                .await;
            if let Err(db) = recorded {
                tracing::error!(error = ?db, "recording a deletion result failed; it will be retried");
            }
            (target, result)
        });
    }
    let mut confirmed = Vec::new();
    let mut pending = Vec::new();
    while let Some(joined) = calls.join_next().await {
        // A call that panicked keeps its lease and is retried after it.
        let Ok((target, result)) = joined else {
            continue;
        };
        match result {
            Ok(()) => confirmed.push(target.host.id),
            Err(err) => {
                tracing::warn!(host = %target.host.id, template = %target.template_id, error = %err,
                    "deleting snapshot files failed; queued for retry");
                pending.push(target.host.id);
            }
        }
    }
    if !pending.is_empty() {
        // The worker may be asleep past the retry time it must now keep.
        inner.wake.notify_one();
    }
    (confirmed, pending)
}

/// One `DeleteSnapshot` call; NotFound counts as done.
async fn delete_on_host(inner: &Inner, target: &Deletion) -> Result<(), AgentError> {
    let mut request = DeleteSnapshotRequest::new(SnapshotKey::for_template(target.template_id));
    request.team_id = Some(target.team);
    request.template_id = Some(target.template_id);
    let agent = inner.transport.agent(&target.host)?;
    let result = tokio::time::timeout(inner.options.delete_timeout, agent.delete_snapshot(request))
        .await
        .map_err(|_| AgentError::Timeout)?;
    match result {
        Err(AgentError::Rejected {
            code: AgentCode::NotFound,
            ..
        }) => Ok(()),
        other => other,
    }
}
