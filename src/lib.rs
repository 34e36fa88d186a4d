//! Snapshot management for a microVM sandbox platform's control plane.
//!
//! A [`SnapshotManager`] records snapshot *templates* per team in SQLite
//! (or PostgreSQL, shared by several control-plane replicas),
//! asks the host agent that runs a sandbox to snapshot it, restores a
//! snapshot into a new sandbox on a host that holds it and can run it
//! ([`CompatPolicy`]), lists what a team can see, and deletes templates
//! together with their files on the hosts — without losing or leaking a
//! snapshot or a sandbox when a host, the network or the process fails on
//! the way.
//!
//! ```no_run
//! use std::sync::Arc;
//! use sandbox_snapshots::*;
//!
//! # async fn demo() -> Result<(), Error> {
//! // One host, served in-process by the in-memory agent.
//! let agent = Arc::new(MemoryHostAgent::new());
//! let transport = Arc::new(InProcessTransport::new());
//! let host = HostId::new();
//! transport.add_host(host, agent.clone());
//!
//! let manager =
//!     Manager::open("data/snapshots.db", transport, ManagerOptions::default())
//!         .await?;
//! let registry = manager.registry();
//! registry.register_host(host, "in-process", HostStatus::Online).await?;
//!
//! let team = TeamId::new();
//! let sandbox = SandboxId::new();
//! agent.add_sandbox(sandbox, "running", 2, 512);
//! registry
//!     .register_sandbox(Sandbox::new(sandbox, team, Some(host), SandboxStatus::Running, 2, 512))
//!     .await?;
//!
//! let caller = Caller::new(team, Actor::System);
//! let template = manager
//!     .create(&caller, NewSnapshot::parse(&sandbox.to_string(), "before-upgrade")?)
//!     .await?;
//! let page = manager.list(&caller, ListQuery::new()).await?;
//! assert_eq!(page.items[0].id, template.id);
//! let restored = manager
//!     .restore(&caller, RestoreRequest::new(template.name.clone()))
//!     .await?;
//! assert_eq!(restored.status, SandboxStatus::Running);
//! manager.delete(&caller, &template.name).await?;
//! # Ok(()) }
//! ```
//!
//! # Retries and long operations
//!
//! A create or restore may carry an [`IdempotencyKey`]
//! ([`NewSnapshot::idempotency_key`], [`RestoreRequest::idempotency_key`]):
//! the key is recorded in the same transaction as the operation's journal
//! entry, so a retry — after a lost answer, a timeout or a crash and
//! restart — returns the first outcome instead of snapshotting again
//! (409 `idempotency_in_progress` while the first runs; 422
//! `idempotency_key_reused` for a different request under the key).
//! [`Manager::start_create`] and [`Manager::start_restore`] return an
//! [`Operation`] as soon as the work is under way; [`Manager::operation`]
//! follows it to `succeeded` or `failed`. Both are remembered for
//! [`ManagerOptions::request_retention`] (24 h).
//!
//! ```no_run
//! # use sandbox_snapshots::*;
//! # async fn demo(manager: Manager, caller: Caller, sandbox: SandboxId) -> Result<(), Error> {
//! let key = IdempotencyKey::parse("nightly-2026-12-01")?;
//! let request = NewSnapshot::parse(&sandbox.to_string(), "nightly")?.idempotency_key(key);
//! let first = manager.create(&caller, request.clone()).await?;
//! // The same request again: the same template, and no second snapshot.
//! assert_eq!(manager.create(&caller, request).await?.id, first.id);
//!
//! let started = manager
//!     .start_create(&caller, NewSnapshot::parse(&sandbox.to_string(), "weekly")?)
//!     .await?;
//! let op = manager.operation(&caller, started.id).await?; // running, then succeeded
//! # let _ = op; Ok(()) }
//! ```
//!
//! # Layout
//! - [`ids`], [`names`]: validated identifiers and template names, parsed
//!   once at the boundary; `time`: [`Timestamp`], below every other layer.
//! - `model`: hosts, sandboxes, templates, callers.
//! - `error`: [`Error`] with a stable [`ErrorCode`] and HTTP status.
//! - `manager`: the [`SnapshotManager`] trait and [`Manager`], the public
//!   API; `options`: [`ManagerOptions`].
//! - `engine`: the create, delete and restore state machines
//!   (`engine/create.rs`, `engine/delete.rs`, `engine/restore.rs` with the
//!   destroy queue), foreground steps and recovery together, driven by the
//!   manager's calls and by the background worker alike; `compat`:
//!   [`CompatPolicy`], which hosts may restore which snapshot.
//! - `janitor`: the background worker's scheduling (what is due, per-host
//!   tasks, backoff, the instance heartbeat) and the orphan sweep.
//! - `registry`: [`Registry`] of hosts and sandboxes.
//! - `store`: the `Store` trait of domain transactions; `store/sqlite/`
//!   (writer thread with group commit, read pool, migrations, the
//!   one-process file lock, SQL by concern) and `store/postgres/` (feature
//!   `postgres`: a pooled `tokio-postgres` store shared by replicas).
//! - [`agent`]: the [`HostAgent`] service and the [`AgentTransport`] trait;
//!   transports: in-process, gRPC ([`GrpcTransport`]) and Connect over
//!   HTTP/1.1 or HTTP/2 ([`ConnectTransport`]), both set up by one
//!   [`ClientConfig`] (TLS, token, gzip, receive limit); the server
//!   ([`HostAgentServer`]: gRPC, gRPC-Web and Connect on one port,
//!   `agent/server/`); agents: in-memory (with fault injection) and the
//!   directory-backed reference agent. Protobuf types stay private in
//!   `agent::pb`, generated from `proto/` at build time.
//! - `audit`: the audit log; `operation`: remembered requests
//!   (idempotency keys, asynchronous operations).
//! - [`http`] (feature `server`): the REST API for self-hosters, API keys,
//!   admin endpoints and the OpenAPI document; `src/bin/snapshots-server.rs`
//!   runs it.

pub mod agent;
mod audit;
mod compat;
mod engine;
mod error;
#[cfg(feature = "server")]
pub mod http;
pub mod ids;
mod janitor;
mod manager;
pub mod metrics;
mod model;
pub mod names;
mod operation;
mod options;
mod registry;
mod signal;
mod store;
mod time;

pub use agent::{
    AgentCode, AgentError, AgentTransport, BearerToken, ClientConfig, ConnectConfig,
    ConnectTransport, DirHostAgent, GrpcConfig, GrpcTransport, HostAgent, HostAgentServer,
    HostInfo, HostTarget, InProcessTransport, MemoryHostAgent,
};
pub use audit::{
    AuditEntry, AuditOutcome, AuditQuery, RESOURCE_SANDBOX, RESOURCE_TEMPLATE, actions,
};
pub use compat::{CompatPolicy, DefaultCompatPolicy};
pub use engine::WorkReport;
pub use error::{Error, ErrorCode, Result};
pub use ids::{
    ApiKeyId, AuditLogId, HostId, IdError, InstanceId, OperationId, SandboxId, TeamId, TemplateId,
};
pub use janitor::{SweepReport, WorkerStats};
pub use manager::{
    Deleted, ListQuery, MAX_MEMORY_MB, MAX_PAGE_SIZE, MAX_TTL, MAX_VCPUS, Manager, ManagerOptions,
    NewSnapshot, Page, Placement, ResolvedOperation, RestoreRequest, SnapshotManager, SweepOptions,
};
pub use model::{
    Actor, Caller, Host, HostStatus, RetentionPolicy, Sandbox, SandboxStatus, TeamLimits, Template,
    TemplateState, TemplateType, Timestamp, Usage,
};
pub use names::{NameError, TemplateName};
pub use operation::{
    IdempotencyKey, MAX_IDEMPOTENCY_KEY_LEN, Operation, OperationKind, OperationState,
};
pub use registry::{NewTemplate, Registry};
pub use signal::shutdown_signal;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresOptions;
pub use store::{
    OpenOperation, PendingDeletion, PendingDestroy, SCHEMA_VERSION, StoreError, StoreErrorKind,
    StoreOptions, Synchronous,
};

/// The README's examples are compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
