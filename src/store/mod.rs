//! The store: one [`Store`] trait of domain transactions — begin a create,
//! finish it, fail it, resolve it, begin a delete, record a host's answer,
//! claim due work, list what a team sees, the registry, the audit log, API
//! keys, and the replicas' instance leases — with two implementations:
//!
//! - `sqlite/`: [`SqliteStore`], the embedded default. One writer thread
//!   with group commit, a read pool, `schema.sql` at the crate root, and a
//!   lock on the database file so that one process at a time uses it.
//! - `postgres/` (feature `postgres`): `PostgresStore`, `tokio-postgres`
//!   over a `deadpool-postgres` pool, `schema/postgres.sql`; any number of
//!   manager processes (replicas) share one database.
//!
//! The manager, the background worker and the HTTP server are written once
//! against the trait. Every invariant of SPEC §4a (name uniqueness, the
//! sandbox compare-and-swap, one operation per sandbox, claims) is enforced
//! inside these transactions, by the database, so it holds across replicas.
//! Each method is one transaction: it applies whole or not at all.

mod error;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sections;
pub(crate) mod sqlite;

use async_trait::async_trait;

use crate::agent::HostTarget;
use crate::audit::AuditEntry;
use crate::error::Result;
use crate::ids::{ApiKeyId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId};
use crate::model::{
    Actor, Host, HostStatus, RetentionPolicy, Sandbox, SandboxStatus, TeamLimits, Template,
    TemplateType, Timestamp, Usage,
};
use crate::names::TemplateName;

pub use error::{StoreError, StoreErrorKind};
pub(crate) use sqlite::SqliteStore;
pub use sqlite::{SCHEMA_VERSION, StoreOptions, Synchronous};

/// Which database a manager uses, from a URL: `sqlite:PATH` (or a plain
/// path) or `postgres://…` / `postgresql://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Database {
    Sqlite(std::path::PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl Database {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return Ok(Self::Postgres(url.to_owned()));
            #[cfg(not(feature = "postgres"))]
            return Err(crate::error::Error::invalid_request(
                "this build has no PostgreSQL support (the `postgres` feature)",
            ));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() {
            return Err(crate::error::Error::invalid_request(
                "a database URL is `sqlite:PATH` or `postgres://…`",
            ));
        }
        if path.contains("://") {
            return Err(crate::error::Error::invalid_request(format!(
                "unknown database URL scheme in {url:?}: use `sqlite:PATH` or `postgres://…`"
            )));
        }
        Ok(Self::Sqlite(path.into()))
    }
}

/// A backlog's size and its oldest start (unix millis), if any.
pub(crate) type Backlog = (u64, Option<i64>);

/// A journal entry's phase (SPEC §4a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The host may be working on it (or its driver is gone).
    Started,
    /// Rolled back; the sandbox's status is still to be read from its host.
    Resolving,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Resolving => "resolving",
        }
    }
}

impl ResolveReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Deadline => "resolve_deadline",
            Self::Operator => "operator",
        }
    }
}

/// An actor from its stored columns (`actor_type`, `actor_id`,
/// `actor_name`); anything unrecognised reads as the system.
pub(crate) fn actor_from_columns(kind: &str, id: Option<String>, name: Option<String>) -> Actor {
    match (kind, id) {
        ("user", Some(id)) => Actor::User {
            id,
            name: name.unwrap_or_default(),
        },
        ("api_key", Some(id)) => match ApiKeyId::parse(&id) {
            Ok(id) => Actor::ApiKey {
                id,
                name: name.unwrap_or_default(),
            },
            Err(_) => Actor::System,
        },
        _ => Actor::System,
    }
}

/// An API key as stored: only the SHA-256 of its secret (the HTTP API's).
#[cfg_attr(not(feature = "server"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct KeyRecord {
    pub(crate) id: ApiKeyId,
    pub(crate) team: TeamId,
    pub(crate) name: String,
    pub(crate) secret_hash: [u8; 32],
    pub(crate) admin: bool,
}

/// A host's answer to one deletion.
#[derive(Debug, Clone)]
pub(crate) enum DeletionResult {
    /// The files are gone (or were never there).
    Confirmed,
    /// It failed: try again from `retry_at`.
    Failed { error: String, retry_at: Timestamp },
}

/// A change to a registered host.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostChange {
    pub(crate) status: Option<HostStatus>,
    pub(crate) address: Option<String>,
    /// A heartbeat: records the time, and brings a `pending` or
    /// `unreachable` host online (a `draining` or `offline` one stays so).
    pub(crate) heartbeat: bool,
}

/// Position of a template in the newest-first order, used as a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListPosition {
    pub(crate) created_at: i64,
    pub(crate) id: TemplateId,
}

/// A create operation as journaled: everything needed to finish it or roll
/// it back, in this process or after a restart.
#[derive(Debug, Clone)]
pub(crate) struct CreateOp {
    pub(crate) id: OperationId,
    pub(crate) template_id: TemplateId,
    pub(crate) team: TeamId,
    pub(crate) name: TemplateName,
    pub(crate) sandbox_id: SandboxId,
    pub(crate) host: HostTarget,
    pub(crate) prev_status: SandboxStatus,
    pub(crate) replaces: Option<TemplateId>,
    pub(crate) actor: Actor,
    pub(crate) attempts: u32,
    /// When the operation began; it resolves without its host's answer
    /// once `resolve_deadline` has passed since.
    pub(crate) created_at: Timestamp,
}

/// What a create starts from, validated.
#[derive(Debug, Clone)]
pub(crate) struct CreateInput {
    pub(crate) actor: Actor,
    pub(crate) team: TeamId,
    pub(crate) sandbox_id: SandboxId,
    pub(crate) name: TemplateName,
    pub(crate) overwrite: bool,
    pub(crate) template_id: TemplateId,
    pub(crate) operation_id: OperationId,
    /// Until when the create's own task drives it: the worker treats the
    /// entry as interrupted only after this (or after a restart).
    pub(crate) lease_until: Timestamp,
    /// The manager process that drives it: the journal entry names it, and
    /// other replicas adopt the entry only once its heartbeat lease ends.
    pub(crate) owner: InstanceId,
    /// When the template expires by the create's own TTL; `None`: the
    /// team's default TTL applies (read in the same transaction), if any.
    pub(crate) expires_at: Option<Timestamp>,
    /// The request to remember with the journal entry (an idempotency key,
    /// or an asynchronous start), if any.
    pub(crate) request: Option<crate::operation::RequestRecord>,
}

/// Why a create failed, as its journal's last transaction records it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The code audited and remembered (an [`crate::ErrorCode`]'s wire
    /// form, or the journal's own `interrupted` / `unresolved`).
    pub(crate) code: &'static str,
    /// What the caller was told (remembered for a replay).
    pub(crate) message: String,
    /// What operators see while the sandbox's status is still unknown.
    pub(crate) detail: String,
}

impl Failure {
    /// An operation resolved without its host's answer.
    pub(crate) fn unresolved(reason: ResolveReason) -> Self {
        Self {
            code: "unresolved",
            message: format!(
                "the operation was resolved without its host's answer ({}) and rolled back",
                reason.as_str()
            ),
            detail: reason.as_str().to_owned(),
        }
    }

    /// A failure whose caller message and operator detail are the same.
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            code,
            detail: message.clone(),
            message,
        }
    }
}

/// Files to delete from one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deletion {
    pub(crate) template_id: TemplateId,
    pub(crate) team: TeamId,
    pub(crate) host: HostTarget,
    pub(crate) attempts: u32,
    /// The claim this attempt holds (a token written with its lease). A
    /// failure is recorded only while the claim is still this one: an
    /// attempt that outlived its lease (a stalled process) must not end the
    /// lease of whoever claimed the deletion after it.
    pub(crate) claim: Option<uuid::Uuid>,
}

/// Result of the final transaction of a successful create.
#[derive(Debug)]
pub(crate) struct CreateDone {
    pub(crate) template: Template,
    /// Files of the replaced template, to delete now.
    pub(crate) replaced: Vec<Deletion>,
}

/// What the final transaction of a successful create did.
// One is returned per create and consumed at once: boxing `Done` would buy
// nothing but an allocation.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, returned once per create
pub(crate) enum Finish {
    /// The template is ready.
    Done(CreateDone),
    /// Someone else already closed the journal entry (a recovery pass, or
    /// a second resolver): nothing was written.
    AlreadyResolved,
    /// Another template holds the name: nothing was written; the caller
    /// rolls this one back.
    NameTaken,
}

/// What became of the sandbox after a failed create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SandboxOutcome {
    /// Set this status and close the operation.
    Known(SandboxStatus),
    /// The host could not be asked: keep the sandbox `snapshotting` and the
    /// operation open (phase `resolving`) until it can.
    Unknown { retry_at: Timestamp },
}

/// Why an open operation was resolved without its host's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResolveReason {
    /// `resolve_deadline` passed while the host could not say.
    Deadline,
    /// An operator resolved it.
    Operator,
}

/// Work the worker has in hand or holds back in memory, left out of
/// [`next_due`]: it says by itself when it is due again.
#[derive(Debug, Clone, Default)]
pub(crate) struct InHand {
    /// Hosts whose work is running.
    pub(crate) hosts: Vec<HostId>,
    /// Creates driven by tasks of this process.
    pub(crate) creates: Vec<TemplateId>,
    /// Operations held back in memory.
    pub(crate) operations: Vec<OperationId>,
    /// Restores driven by tasks of this process.
    pub(crate) restores: Vec<OperationId>,
}

/// A restore as journaled: everything needed to finish it or roll it
/// back, in this process or after a restart (SPEC §4a "Restore").
#[derive(Debug, Clone)]
pub(crate) struct RestoreOp {
    pub(crate) id: OperationId,
    pub(crate) team: TeamId,
    pub(crate) template_id: TemplateId,
    /// The template's name as the caller gave it.
    pub(crate) template_name: TemplateName,
    pub(crate) sandbox_id: SandboxId,
    pub(crate) host: HostTarget,
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u32,
    pub(crate) timeout_sec: u32,
    pub(crate) disk_size_mb: u32,
    pub(crate) actor: Actor,
    pub(crate) attempts: u32,
    pub(crate) created_at: Timestamp,
}

/// What a restore starts from: the operation with its chosen host, and
/// until when its own task drives it.
#[derive(Debug, Clone)]
pub(crate) struct RestoreInput {
    pub(crate) op: RestoreOp,
    /// Whether the template has recorded placements (then the chosen host
    /// must still hold a `present` one); a base template without any is
    /// available on every online host.
    pub(crate) placed: bool,
    pub(crate) lease_until: Timestamp,
    pub(crate) owner: InstanceId,
    /// The request to remember with the journal entry, if any.
    pub(crate) request: Option<crate::operation::RequestRecord>,
}

/// A host a template could be restored on.
#[derive(Debug, Clone)]
pub(crate) struct RestoreCandidate {
    pub(crate) host: Host,
    /// Its cached `HostInfo` (`None`: unknown).
    pub(crate) info: Option<crate::agent::HostInfo>,
    /// Whether it was asked since it last came online (else ask first).
    pub(crate) info_known: bool,
    /// Its registered sandboxes that run or are starting.
    pub(crate) load: u64,
}

/// A sandbox to destroy on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Destroy {
    pub(crate) sandbox_id: SandboxId,
    pub(crate) team: TeamId,
    pub(crate) host: HostTarget,
    pub(crate) attempts: u32,
    /// The claim this attempt holds (see [`Deletion::claim`]).
    pub(crate) claim: Option<uuid::Uuid>,
}

/// How a restore ended, for its journal's last transaction.
#[derive(Debug, Clone)]
pub(crate) enum RestoreEnd {
    /// The host runs it: the sandbox is `running`.
    Running,
    /// It failed: the sandbox row goes; with `destroy_from`, a
    /// `DestroySandbox` is queued from then on (the VM may exist).
    Failed {
        error_code: &'static str,
        /// What the caller was told (remembered for a replay).
        message: String,
        destroy_from: Option<Timestamp>,
    },
}

impl RestoreOp {
    /// The audit entry of its end (`sandbox.restore`, keyed by the
    /// sandbox), the same in every store.
    pub(crate) fn audit(&self, end: &RestoreEnd) -> crate::audit::NewAuditEntry {
        use crate::audit::AuditOutcome;
        let mut metadata = serde_json::json!({
            "template": self.template_name.as_str(),
            "template_id": self.template_id.to_string(),
            "host_id": self.host.id.to_string(),
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
        });
        let (outcome, error_code) = match end {
            RestoreEnd::Running => (AuditOutcome::Success, None),
            RestoreEnd::Failed {
                error_code,
                destroy_from,
                ..
            } => {
                metadata["destroy_queued"] = serde_json::json!(destroy_from.is_some());
                (AuditOutcome::Failure, Some(*error_code))
            }
        };
        crate::audit::NewAuditEntry {
            team: self.team,
            actor: self.actor.clone(),
            action: crate::audit::actions::SANDBOX_RESTORE,
            resource_id: self.sandbox_id.to_string(),
            outcome,
            error_code,
            metadata,
        }
    }

    /// What its remembered request (if any) records of `end`: the sandbox
    /// the restore left running, or the failure its caller was told.
    pub(crate) fn request_outcome(
        &self,
        end: &RestoreEnd,
        sandbox: Option<&Sandbox>,
    ) -> (crate::operation::OperationState, String) {
        use crate::operation::{OperationState, encode_error, encode_sandbox};
        match (end, sandbox) {
            (RestoreEnd::Running, Some(sandbox)) => {
                (OperationState::Succeeded, encode_sandbox(sandbox))
            }
            (RestoreEnd::Running, None) => (
                OperationState::Failed,
                encode_error("conflict", "the restored sandbox is no longer registered"),
            ),
            (
                RestoreEnd::Failed {
                    error_code,
                    message,
                    ..
                },
                _,
            ) => (OperationState::Failed, encode_error(error_code, message)),
        }
    }

    /// The sandbox as a failed restore leaves it (its row is gone).
    pub(crate) fn failed_sandbox(&self) -> Sandbox {
        Sandbox {
            template: Some(self.template_name.clone()),
            template_id: Some(self.template_id),
            created_at: self.created_at,
            ..Sandbox::new(
                self.sandbox_id,
                self.team,
                Some(self.host.id),
                SandboxStatus::Error,
                self.vcpus,
                self.memory_mb,
            )
        }
    }
}

/// Queued deletions, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingDeletion {
    /// The template whose files are to be deleted (its row may be gone).
    pub template_id: TemplateId,
    /// The host holding them.
    pub host: HostId,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt: Timestamp,
}

/// A sandbox queued for destruction on its host, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingDestroy {
    /// The sandbox.
    pub sandbox: SandboxId,
    /// Its team.
    pub team: TeamId,
    /// Its host.
    pub host: HostId,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt: Timestamp,
}

/// An operation still open in the journal, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOperation {
    /// The operation's id (`op-…`), by which an operator resolves it.
    pub id: OperationId,
    /// The template being created.
    pub template_id: TemplateId,
    /// Its team.
    pub team: TeamId,
    /// Its name.
    pub name: TemplateName,
    /// The sandbox being snapshotted (held `snapshotting` meanwhile).
    pub sandbox: SandboxId,
    /// The sandbox's host.
    pub host: HostId,
    /// `started` (the host may be working on it, or the process that drove
    /// it is gone) or `resolving` (rolled back; the sandbox's status is
    /// still to be read from its host).
    pub phase: String,
    /// Attempts to resolve it so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it began.
    pub started_at: Timestamp,
    /// The manager process (replica) that drives it; another replica
    /// adopts it once that one's instance lease ends. `None` for entries
    /// written before owners were recorded.
    pub owner: Option<InstanceId>,
}

/// Most deletions claimed for one host at a time: the deletes the worker
/// runs on one host at once.
pub(crate) const DELETIONS_PER_HOST: u32 = 16;

/// The domain transactions the manager, the worker and the HTTP server
/// need. Every method is one transaction. `now` is passed in (never read
/// inside) so that one operation's steps agree on the time.
#[async_trait]
pub(crate) trait Store: Send + Sync + std::fmt::Debug + 'static {
    // ------------------------------------------------------- lifecycle

    /// Registers this manager process with a heartbeat lease. On SQLite,
    /// where the file lock proves no other manager runs, it also voids the
    /// leases of every earlier process (their work is retried at once). On
    /// PostgreSQL other instances are left alone (they may be alive): their
    /// entries are adopted only once their leases end.
    async fn register_instance(
        &self,
        me: InstanceId,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<()>;

    /// Extends this process's lease, writing its instance again if it was
    /// forgotten meanwhile (after a long pause). Never fails with
    /// `conflict`: entries another replica adopted while the lease was
    /// over stay that replica's (they are no longer among `me`'s).
    async fn heartbeat(&self, me: InstanceId, lease_until: Timestamp) -> Result<()>;

    /// Takes over the journal entries whose owner's lease has ended (or
    /// that name no owner, or an owner that closed), never `me`'s own; a
    /// `started` entry taken over is due at once (its driver's lease is
    /// void). Returns how many.
    async fn adopt_operations(&self, me: InstanceId, now: Timestamp) -> Result<u64>;

    /// Ends this process's instance (its remaining entries can be adopted
    /// at once) and leaves the store consistent on its own (SQLite:
    /// checkpoints the WAL).
    async fn close(&self, me: InstanceId) -> Result<()>;

    /// Whether other manager processes may share this store (PostgreSQL).
    /// Work they leave behind (a replica that died) is not announced to
    /// this process, so its worker looks at least once per heartbeat.
    fn shared(&self) -> bool {
        false
    }

    // -------------------------------------------------------- registry

    /// Registers a host or replaces its address and status. Returns the
    /// host and whether it just came online (its queued work is then due).
    async fn upsert_host(
        &self,
        id: HostId,
        address: String,
        status: HostStatus,
        now: Timestamp,
    ) -> Result<(Host, bool)>;
    /// Applies `change` to a host; returns whether it just came online.
    async fn update_host(&self, id: HostId, change: HostChange, now: Timestamp) -> Result<bool>;
    /// A host by id.
    async fn get_host(&self, id: HostId) -> Result<Option<Host>>;
    /// Every host.
    async fn list_hosts(&self) -> Result<Vec<Host>>;
    /// Registers a sandbox or replaces its record (409 while a snapshot
    /// owns it).
    async fn upsert_sandbox(&self, sandbox: Sandbox, now: Timestamp) -> Result<()>;
    /// A sandbox by id.
    async fn get_sandbox(&self, id: SandboxId) -> Result<Option<Sandbox>>;
    /// Sets a sandbox's status, only if it is `expected` when given.
    async fn set_sandbox_status(
        &self,
        id: SandboxId,
        expected: Option<SandboxStatus>,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<Sandbox>;
    /// Forgets a sandbox (409 while a snapshot owns it).
    async fn remove_sandbox(&self, id: SandboxId) -> Result<()>;
    /// Records a ready template whose files exist on `hosts`.
    async fn insert_ready_template(
        &self,
        template: Template,
        hosts: Vec<HostId>,
        now: Timestamp,
    ) -> Result<()>;

    // ------------------------------------------------------- templates

    /// The template `team` sees under `name`.
    async fn find_visible(&self, team: TeamId, name: TemplateName) -> Result<Option<Template>>;
    /// What `team` sees, newest first, after `after`, at most `limit`.
    async fn list_visible(
        &self,
        team: TeamId,
        kind: Option<TemplateType>,
        after: Option<ListPosition>,
        limit: Option<u32>,
    ) -> Result<Vec<Template>>;
    /// The hosts holding a template's files, with their placement state.
    async fn placements_of(&self, template: TemplateId) -> Result<Vec<(HostId, String)>>;
    /// A template by id, if it is ready.
    async fn get_ready_template(&self, id: TemplateId) -> Result<Option<Template>>;

    // ---------------------------------------------------------- create

    /// Step one of a create: name checks, the team-scoped sandbox, its
    /// status and host, the team's quota (403 `quota_exceeded`; an
    /// overwrite needs no count headroom), sandbox → `snapshotting` (CAS),
    /// the `creating` template and the journal entry.
    async fn begin_create(&self, input: CreateInput, now: Timestamp)
    -> Result<(CreateOp, Sandbox)>;
    /// The last step of a successful create (only while the entry is open
    /// in phase `started`).
    async fn finish_create(
        &self,
        op: CreateOp,
        size_bytes: u64,
        compat: Option<crate::agent::HostInfo>,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<Finish>;
    /// Rolls a failed create back (only while the entry is open in phase
    /// `started`); returns whether it did.
    async fn fail_create(
        &self,
        op: CreateOp,
        outcome: SandboxOutcome,
        failure: Failure,
        first_attempt: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<bool>;
    /// Closes a `resolving` entry once the host reported the sandbox.
    async fn resolve_operation(
        &self,
        op: CreateOp,
        status: SandboxStatus,
        now: Timestamp,
    ) -> Result<bool>;
    /// Resolves the open entry `id` without its host's answer.
    async fn resolve_open_operation(
        &self,
        id: OperationId,
        status: SandboxStatus,
        actor: Actor,
        reason: ResolveReason,
        first_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<Option<CreateOp>>;
    /// Backs off an entry that could not be resolved yet.
    async fn postpone_operation(
        &self,
        template: TemplateId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()>;
    /// `me`'s open entries in `phase`, only those due at `due_before` if
    /// given (all of them for SQLite's one process).
    async fn open_operations(
        &self,
        me: InstanceId,
        phase: Phase,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<CreateOp>>;
    /// Every open entry, for operators.
    async fn list_open_operations(&self) -> Result<Vec<OpenOperation>>;

    // ---------------------------------------------------------- delete

    /// A delete's one transaction: the template invisible, its name free,
    /// its placements queued (leased to the caller until `lease_until`).
    async fn begin_delete(
        &self,
        actor: Actor,
        team: TeamId,
        admin: bool,
        name: TemplateName,
        lease_until: Timestamp,
        now: Timestamp,
    ) -> Result<(Template, Vec<Deletion>)>;
    /// Records hosts' answers to deletions, all in one transaction (a
    /// drain records a batch's answers while the host works on the next).
    async fn record_deletions(
        &self,
        answers: Vec<(Deletion, DeletionResult)>,
        now: Timestamp,
    ) -> Result<()>;
    /// Claims up to `limit` due deletions (not on `skip_hosts`), at most
    /// [`DELETIONS_PER_HOST`] per host, until `lease_until`; replicas never
    /// claim one deletion twice at once. Costs the rows it claims, not the
    /// length of the queue.
    async fn claim_due_deletions(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Deletion>>;
    /// Claims the next `limit` (at most [`DELETIONS_PER_HOST`]) due
    /// deletions of `host` alone, as [`Store::claim_due_deletions`] would:
    /// a worker draining one host's long queue goes on without a pass.
    async fn claim_host_deletions(
        &self,
        host: HostId,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Deletion>>;
    /// Queued deletions, for operators.
    async fn pending_deletions(&self) -> Result<Vec<PendingDeletion>>;
    /// Whether anything accounts for the key of `template`.
    async fn key_is_owned(&self, template: TemplateId) -> Result<bool>;
    /// Queues an orphaned key for deletion (audited) unless something owns
    /// it by now; returns whether it did.
    async fn queue_orphan(
        &self,
        template: TemplateId,
        host: HostId,
        size_bytes: u64,
        now: Timestamp,
    ) -> Result<bool>;

    // --------------------------------------------------------- restore

    /// The hosts `template` can be restored on: those with a `present`
    /// placement, or every host when it has no placement at all (a base
    /// template). Any status: the engine filters.
    async fn restore_candidates(&self, template: TemplateId) -> Result<Vec<RestoreCandidate>>;
    /// Caches what `host` said of itself (`None`: unknown), at `now`.
    async fn set_host_info(
        &self,
        host: HostId,
        info: Option<crate::agent::HostInfo>,
        now: Timestamp,
    ) -> Result<()>;
    /// Step one of a restore: the template still ready and visible to the
    /// team, the host still online and holding it, the sandbox id never
    /// used (409 `already_exists`), the sandbox row `starting` and the
    /// journal entry.
    async fn begin_restore(&self, input: RestoreInput, now: Timestamp) -> Result<Sandbox>;
    /// The last step of a restore (only while its entry is open): the
    /// sandbox `running` and the template's `last_used_at`, or the sandbox
    /// gone and a destroy queued; audited. `None` when the entry was
    /// already closed.
    async fn end_restore(
        &self,
        op: RestoreOp,
        end: RestoreEnd,
        now: Timestamp,
    ) -> Result<Option<Sandbox>>;
    /// Queues a destroy of a restore's sandbox from `from` on (again, if
    /// one was already done), unless the sandbox is registered or a
    /// restore of it is open: the restore's own task saw its VM live after
    /// someone else had rolled the restore back. Returns whether it queued.
    async fn requeue_destroy(&self, op: RestoreOp, from: Timestamp, now: Timestamp)
    -> Result<bool>;
    /// Backs off an interrupted restore whose host cannot answer yet.
    async fn postpone_restore(
        &self,
        id: OperationId,
        error: String,
        next_attempt: Timestamp,
        now: Timestamp,
    ) -> Result<()>;
    /// `me`'s open restores, only those due at `due_before` if given.
    async fn open_restores(
        &self,
        me: InstanceId,
        due_before: Option<Timestamp>,
    ) -> Result<Vec<RestoreOp>>;
    /// Claims up to `limit` due destroys (not on `skip_hosts`, not on
    /// offline hosts) until `lease_until`.
    async fn claim_due_destroys(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
        skip_hosts: Vec<HostId>,
    ) -> Result<Vec<Destroy>>;
    /// Records a host's answer to a destroy.
    async fn record_destroy(
        &self,
        destroy: Destroy,
        result: DeletionResult,
        now: Timestamp,
    ) -> Result<()>;
    /// Sandboxes queued for destruction (not yet confirmed), for operators.
    async fn pending_destroys(&self) -> Result<Vec<PendingDestroy>>;

    // -------------------------------------------------------- policies

    /// Sets a team's quotas (replacing earlier ones).
    async fn set_team_limits(&self, team: TeamId, limits: TeamLimits, now: Timestamp)
    -> Result<()>;
    /// A team's usage and limits.
    async fn team_usage(&self, team: TeamId) -> Result<Usage>;
    /// Sets a team's retention policy (replacing an earlier one; all off
    /// removes it).
    async fn set_team_retention(
        &self,
        team: TeamId,
        policy: RetentionPolicy,
        now: Timestamp,
    ) -> Result<()>;
    /// A team's retention policy (all off when it has none).
    async fn team_retention(&self, team: TeamId) -> Result<RetentionPolicy>;
    /// One batch of the retention sweep, in one transaction: up to `limit`
    /// templates of type snapshot, `ready`, not the platform team's, that
    /// a policy selects at `now` — expired (`ttl`), unused for the team's
    /// `delete_unused_after`, or beyond the newest `keep_last_per_sandbox`
    /// of their source sandbox — each deleted by id as `begin_delete`
    /// does (invisible, name free, placements queued: due at `now` and
    /// unleased, for the worker to claim) and audited as `snapshot.delete`
    /// by the system with the policy in its metadata. Returns how many;
    /// fewer than `limit`: nothing more is selected. Replicas sweeping at
    /// once never select one template twice.
    async fn sweep_retention(&self, now: Timestamp, limit: u32) -> Result<u32>;

    // -------------------------------------------------------- requests

    /// `team`'s request remembered under `key`, unless it expired by `now`.
    async fn find_request(
        &self,
        team: TeamId,
        key: crate::operation::IdempotencyKey,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>>;
    /// `team`'s remembered operation `id`, unless it expired by `now`.
    async fn get_request(
        &self,
        team: TeamId,
        id: OperationId,
        now: Timestamp,
    ) -> Result<Option<crate::operation::StoredRequest>>;
    /// Purges up to `limit` requests expired by `now`; returns how many.
    async fn purge_requests(&self, now: Timestamp, limit: u32) -> Result<u64>;

    // ---------------------------------------------------------- worker

    /// The earliest time any of `me`'s queued work not in hand is due:
    /// queued deletions (any replica's to claim), `me`'s journal entries,
    /// and when another instance's entries become adoptable (the end of its
    /// lease).
    async fn next_due(&self, me: InstanceId, in_hand: InHand) -> Result<Option<Timestamp>>;
    /// Queued deletions and open operations: (count, oldest start).
    async fn backlogs(&self) -> Result<(Backlog, Backlog)>;

    // ----------------------------------------------------------- audit

    /// A team's audit entries, newest first, before `before`.
    async fn list_audit(
        &self,
        team: TeamId,
        before: Option<i64>,
        resource_type: Option<String>,
        action: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<(i64, AuditEntry)>>;

    // ------------------------------------------------------------ keys

    /// Creates a team.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    async fn create_team(&self, id: TeamId, name: String, now: Timestamp) -> Result<()>;
    /// Stores a key (404 when its team does not exist).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    async fn create_key(&self, key: KeyRecord, now: Timestamp) -> Result<()>;
    /// Revokes a key; returns whether it was live.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    async fn revoke_key(&self, id: ApiKeyId, now: Timestamp) -> Result<bool>;
    /// A live key by id.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    async fn find_key(&self, id: ApiKeyId) -> Result<Option<KeyRecord>>;
}

/// The retention policies, as audited (`policy` in the metadata).
pub(crate) mod policy {
    pub(crate) const TTL: &str = "ttl";
    pub(crate) const UNUSED: &str = "delete_unused_after";
    pub(crate) const KEEP_LAST: &str = "keep_last_per_sandbox";
}

/// The audit entry of a template retention deletes (keyed by its id).
pub(crate) fn retention_audit(
    template: TemplateId,
    team: TeamId,
    mut metadata: serde_json::Value,
    targets: &[Deletion],
) -> crate::audit::NewAuditEntry {
    let hosts: Vec<String> = targets.iter().map(|d| d.host.id.to_string()).collect();
    metadata["hosts"] = serde_json::json!(hosts);
    crate::audit::NewAuditEntry {
        team,
        actor: Actor::System,
        action: crate::audit::actions::SNAPSHOT_DELETE,
        resource_id: template.to_string(),
        outcome: crate::audit::AuditOutcome::Success,
        error_code: None,
        metadata,
    }
}

/// A retention duration as stored (whole seconds).
pub(crate) fn retention_secs(d: Option<std::time::Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A retention policy from its stored columns.
pub(crate) fn retention_from_columns(
    default_ttl: Option<i64>,
    delete_unused_after: Option<i64>,
    keep_last_per_sandbox: Option<i64>,
) -> RetentionPolicy {
    let secs = |v: Option<i64>| {
        v.and_then(|v| u64::try_from(v).ok())
            .map(std::time::Duration::from_secs)
    };
    let mut policy = RetentionPolicy::new();
    policy.default_ttl = secs(default_ttl);
    policy.delete_unused_after = secs(delete_unused_after);
    policy.keep_last_per_sandbox = keep_last_per_sandbox.and_then(|v| u32::try_from(v).ok());
    policy
}

/// The 403 of a create over a team's quota, with usage and limit.
pub(crate) fn quota_check(usage: &Usage, overwrite: bool) -> Result<()> {
    use crate::error::{Error, ErrorCode};
    if let Some(max) = usage.limits.max_snapshots
        && !overwrite
        && usage.snapshots >= max
    {
        return Err(Error::new(
            ErrorCode::QuotaExceeded,
            format!(
                "snapshot quota exceeded: the team has {} of at most {max} snapshots",
                usage.snapshots
            ),
        ));
    }
    if let Some(max) = usage.limits.max_bytes
        && usage.bytes >= max
    {
        return Err(Error::new(
            ErrorCode::QuotaExceeded,
            format!(
                "snapshot quota exceeded: the team's snapshots hold {} of at most {max} bytes",
                usage.bytes
            ),
        ));
    }
    Ok(())
}
