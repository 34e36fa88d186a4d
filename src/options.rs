//! [`ManagerOptions`] and [`SweepOptions`]: the tuning every layer reads.

use std::time::Duration;

use crate::store::StoreOptions;

/// Tuning for [`Manager`](crate::Manager).
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
    /// entries of an instance whose lease ended. Default 30 s. Leases are
    /// compared across processes: replicas' clocks must agree to well
    /// within it (NTP does).
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
    /// How often the background worker applies the teams' retention
    /// policies and TTLs (SPEC §8): what they select is deleted at most
    /// this long after it is due. Default 60 s.
    pub retention_interval: Duration,
    /// The background orphan sweep; off (`None`) by default.
    pub orphan_sweep: Option<SweepOptions>,
    /// Which hosts may restore which snapshots. Default
    /// [`DefaultCompatPolicy`](crate::DefaultCompatPolicy): the same vmm,
    /// snapshot format, architecture and CPU model.
    pub compat_policy: std::sync::Arc<dyn crate::CompatPolicy>,
    /// How long a create or restore with an idempotency key, or started
    /// asynchronously, is remembered (its key replayed, its operation
    /// shown), counted from its start and moved on by its duration once it
    /// ends (SPEC §8). Default 24 h.
    pub request_retention: Duration,
}

/// Settings of the opt-in orphan sweep (see
/// [`Manager::sweep_orphans`](crate::Manager::sweep_orphans)).
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
            retention_interval: Duration::from_secs(60),
            orphan_sweep: None,
            compat_policy: std::sync::Arc::new(crate::DefaultCompatPolicy),
            request_retention: Duration::from_secs(24 * 60 * 60),
        }
    }
}
