//! The operations engine: the create and delete state machines (`create`,
//! `delete`) and what they share — the [`Engine`] (store, transport,
//! options, tasks, the creates this process drives), retry timing, and how
//! a host's answers are read. The foreground calls of the manager and the
//! background worker (`janitor`) both drive operations through here, so
//! each state machine is written once.

pub(crate) mod create;
pub(crate) mod delete;
pub(crate) mod restore;

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::{AgentError, AgentTransport, HostTarget, SandboxList, SnapshotInfo};
use crate::error::{Error, Result};
use crate::ids::{HostId, InstanceId, OperationId, SandboxId, TemplateId};
use crate::model::{HostStatus, SandboxStatus, Timestamp};
use crate::options::ManagerOptions;
use crate::store::sqlite::lock::DbLock;
use crate::store::{CreateOp, SandboxOutcome, Store};

pub(crate) struct Engine {
    pub(crate) store: Arc<dyn Store>,
    /// This process's instance: the owner of the journal entries it writes.
    pub(crate) instance: InstanceId,
    pub(crate) transport: Arc<dyn AgentTransport>,
    pub(crate) options: ManagerOptions,
    /// Detached operation tasks, awaited by `shutdown`.
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) wake: Arc<Notify>,
    /// Templates whose create is being driven by a task of this process;
    /// recovery leaves them alone.
    pub(crate) in_flight: Mutex<HashSet<TemplateId>>,
    /// Restores driven by a task of this process; recovery leaves them
    /// alone.
    pub(crate) restores_in_flight: Mutex<HashSet<OperationId>>,
    pub(crate) janitor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(crate) last_sweep: Mutex<Option<tokio::time::Instant>>,
    /// When remembered requests were last purged.
    pub(crate) last_purge: Mutex<Option<tokio::time::Instant>>,
    /// When the backlog gauges were last read.
    pub(crate) last_backlogs: Mutex<Option<tokio::time::Instant>>,
    /// When the retention sweep is due next.
    pub(crate) retention: Mutex<RetentionClock>,
    /// What the background worker keeps in memory between passes.
    pub(crate) worker: WorkerState,
    /// SQLite's one-process lock (none on PostgreSQL).
    pub(crate) _lock: Option<DbLock>,
}

/// When the retention sweep is due next (`None`: now), and how many of
/// its runs in a row failed (it then backs off).
#[derive(Debug, Default)]
pub(crate) struct RetentionClock {
    pub(crate) next: Option<tokio::time::Instant>,
    pub(crate) failures: u32,
}

pub(crate) fn lock_unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

pub(crate) struct InFlightGuard<'a> {
    inner: &'a Engine,
    id: TemplateId,
}

impl<'a> InFlightGuard<'a> {
    fn new(inner: &'a Engine, id: TemplateId) -> Self {
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

impl Engine {
    /// `None` when an orphan sweep is due now (and records it as started),
    /// else how long until it is.
    pub(crate) fn sweep_due(&self, interval: Duration) -> Option<Duration> {
        due(&self.last_sweep, interval)
    }

    /// Like [`Engine::sweep_due`], for the purge of expired requests.
    pub(crate) fn purge_due(&self, interval: Duration) -> Option<Duration> {
        due(&self.last_purge, interval)
    }

    /// Like [`Engine::sweep_due`], for the backlog gauges.
    pub(crate) fn backlogs_due(&self, interval: Duration) -> Option<Duration> {
        due(&self.last_backlogs, interval)
    }
}

/// How long until `interval` has passed since `last`, or `None` (and
/// `last` set to now) when it has.
fn due(last: &Mutex<Option<tokio::time::Instant>>, interval: Duration) -> Option<Duration> {
    let mut last = lock_unpoisoned(last);
    let now = tokio::time::Instant::now();
    match *last {
        Some(at) if now < at + interval => Some(at + interval - now),
        _ => {
            *last = Some(now);
            None
        }
    }
}

impl Engine {
    /// How long until the retention sweep is due (zero: now).
    pub(crate) fn retention_wait(&self) -> Duration {
        let clock = lock_unpoisoned(&self.retention);
        clock.next.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(tokio::time::Instant::now())
        })
    }

    /// Makes the retention sweep due at once (a policy changed) and wakes
    /// the worker.
    pub(crate) fn wake_retention(&self) {
        lock_unpoisoned(&self.retention).next = None;
        self.wake.notify_one();
    }

    /// Records how a retention sweep ended: done (next after the
    /// interval), more due (at once), or failed (after a backoff).
    pub(crate) fn retention_ran(&self, outcome: Result<bool>) {
        let mut clock = lock_unpoisoned(&self.retention);
        let interval = self.options.retention_interval.max(MIN_RETRY);
        let wait = match outcome {
            Ok(more) => {
                clock.failures = 0;
                if more { Duration::ZERO } else { interval }
            }
            Err(_) => {
                clock.failures = clock.failures.saturating_add(1);
                backoff(&self.options, clock.failures - 1).min(interval)
            }
        };
        clock.next = Some(tokio::time::Instant::now() + wait);
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

    /// The restores driven by tasks of this process.
    pub(crate) fn restores_in_flight(&self) -> Vec<OperationId> {
        lock_unpoisoned(&self.restores_in_flight)
            .iter()
            .copied()
            .collect()
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
            .fail_create(
                op,
                outcome,
                crate::store::Failure::new(code, detail),
                Some(first_attempt),
                now,
            )
            .await?;
        self.wake.notify_one();
        Ok(applied)
    }

    /// How long a create's own task holds its journal entry: the worker
    /// leaves the entry alone until then (after a restart, at once).
    pub(crate) fn create_lease(&self) -> Duration {
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
    pub(crate) async fn persist<T, F, Fut>(
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

/// What one run of the worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkReport {
    /// Deletions a host confirmed.
    pub deletions_confirmed: usize,
    /// Deletions that failed and were rescheduled.
    pub deletions_failed: usize,
    /// Interrupted creates rolled forward (the host had the snapshot).
    pub rolled_forward: usize,
    /// Interrupted creates rolled back.
    pub rolled_back: usize,
    /// Sandboxes whose status was settled from their host.
    pub statuses_resolved: usize,
    /// Operations resolved without their host's answer because
    /// `resolve_deadline` passed (the sandbox became `error`).
    pub resolved_by_deadline: usize,
    /// Journal entries that could not be settled yet (host unreachable).
    pub postponed: usize,
    /// Interrupted restores whose sandbox the host runs: kept, `running`.
    pub restores_kept: usize,
    /// Interrupted restores rolled back (a destroy queued).
    pub restores_rolled_back: usize,
    /// Sandboxes a host confirmed destroyed.
    pub destroys_confirmed: usize,
    /// Destroys that failed and were rescheduled.
    pub destroys_failed: usize,
}

impl WorkReport {
    pub(crate) fn add(&mut self, other: &WorkReport) {
        self.deletions_confirmed += other.deletions_confirmed;
        self.deletions_failed += other.deletions_failed;
        self.rolled_forward += other.rolled_forward;
        self.rolled_back += other.rolled_back;
        self.statuses_resolved += other.statuses_resolved;
        self.resolved_by_deadline += other.resolved_by_deadline;
        self.postponed += other.postponed;
        self.restores_kept += other.restores_kept;
        self.restores_rolled_back += other.restores_rolled_back;
        self.destroys_confirmed += other.destroys_confirmed;
        self.destroys_failed += other.destroys_failed;
    }
}

/// What hosts said during one pass, so that each host is asked at most once
/// per pass however many entries it has. Shared by the entries of one host
/// resolved concurrently: each answer is a cell that the first entry to
/// need it fills (the others wait on that cell, not on a lock) and the rest
/// reuse. The map itself is only ever locked for a lookup.
#[derive(Default)]
pub(crate) struct HostViews(Mutex<Views>);

type Cell<T> = Arc<tokio::sync::OnceCell<Arc<T>>>;

/// The answers a [`HostViews`] holds, one cell per host and question.
#[derive(Default)]
struct Views {
    status: HashMap<HostId, Cell<Option<HostStatus>>>,
    sandboxes: HashMap<HostId, Cell<Result<SandboxList, AgentError>>>,
    snapshots: HashMap<HostId, Cell<Result<Vec<SnapshotInfo>, AgentError>>>,
}

impl HostViews {
    /// The cell of `host` in the map `pick` chooses (created empty).
    fn cell<T>(
        &self,
        host: HostId,
        pick: impl FnOnce(&mut Views) -> &mut HashMap<HostId, Cell<T>>,
    ) -> Cell<T> {
        let mut views = lock_unpoisoned(&self.0);
        pick(&mut views).entry(host).or_default().clone()
    }

    pub(crate) async fn offline(&self, inner: &Engine, host: HostId) -> Result<bool> {
        let cell = self.cell(host, |v| &mut v.status);
        // A store error is not kept: the next entry asks again.
        let status = cell
            .get_or_try_init(|| async {
                let host = inner.store.get_host(host).await?;
                Ok::<_, Error>(Arc::new(host.map(|h| h.status)))
            })
            .await?;
        Ok(**status == Some(HostStatus::Offline))
    }

    pub(crate) async fn sandboxes(
        &self,
        inner: &Engine,
        host: &HostTarget,
    ) -> Arc<Result<SandboxList, AgentError>> {
        let cell = self.cell(host.id, |v| &mut v.sandboxes);
        cell.get_or_init(|| async { Arc::new(inner.list_sandboxes(host).await) })
            .await
            .clone()
    }

    pub(crate) async fn snapshots(
        &self,
        inner: &Engine,
        host: &HostTarget,
    ) -> Arc<Result<Vec<SnapshotInfo>, AgentError>> {
        let cell = self.cell(host.id, |v| &mut v.snapshots);
        cell.get_or_init(|| async {
            let answer = async {
                let agent = inner.transport.agent(host)?;
                tokio::time::timeout(inner.options.list_timeout, agent.list_snapshots())
                    .await
                    .map_err(|_| AgentError::Timeout)?
            }
            .await;
            Arc::new(answer)
        })
        .await
        .clone()
    }

    /// The sandbox's status per its host, or `Unknown` if it cannot say yet.
    pub(crate) async fn outcome(&self, inner: &Engine, op: &CreateOp) -> SandboxOutcome {
        let retry_at = after(Timestamp::now(), backoff(&inner.options, op.attempts));
        match &*self.sandboxes(inner, &op.host).await {
            Ok(list) => reported_status(list, op.sandbox_id)
                .map_or(SandboxOutcome::Unknown { retry_at }, SandboxOutcome::Known),
            Err(_) => SandboxOutcome::Unknown { retry_at },
        }
    }
}

/// What the background worker (`janitor`, which holds the logic) keeps
/// in memory: which hosts have work in hand (each
/// host's work runs on a task of its own, so that a slow host delays only
/// itself), backoff for operations the store would not let it settle, and
/// counters.
#[derive(Default)]
pub(crate) struct WorkerState {
    pub(crate) busy_hosts: Mutex<HashSet<HostId>>,
    /// Per operation: failed tries, and not before when to try again.
    pub(crate) held_back: Mutex<HashMap<OperationId, (u32, tokio::time::Instant)>>,
    pub(crate) passes: AtomicU64,
    pub(crate) sleeps: AtomicU64,
    pub(crate) last_sleep_ms: AtomicU64,
    pub(crate) sweeping: AtomicBool,
}

/// The answers to a create's or restore's caller, each sent at most
/// once: `started` once the journal entry is durable (an asynchronous
/// start's 202) or with why it could not be opened, `done` with the
/// outcome (a synchronous caller).
///
/// The first outcome sent is also counted in the operation metrics (for
/// both kinds of caller), with the time since the request began.
pub(crate) struct Reply<T> {
    done: Option<tokio::sync::oneshot::Sender<Result<T>>>,
    started: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    metric: Option<(&'static str, std::time::Instant)>,
}

impl<T> Reply<T> {
    /// A synchronous caller's: told the outcome.
    pub(crate) fn done(kind: &'static str, tx: tokio::sync::oneshot::Sender<Result<T>>) -> Self {
        Self {
            done: Some(tx),
            started: None,
            metric: Some((kind, std::time::Instant::now())),
        }
    }

    /// An asynchronous caller's: told once the operation is under way.
    pub(crate) fn asynchronous(
        kind: &'static str,
        tx: tokio::sync::oneshot::Sender<Result<()>>,
    ) -> Self {
        Self {
            done: None,
            started: Some(tx),
            metric: Some((kind, std::time::Instant::now())),
        }
    }

    /// The journal entry is durable.
    pub(crate) fn started(&mut self) {
        if let Some(tx) = self.started.take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// The outcome (or, before `started`, why the operation never opened).
    pub(crate) fn send(&mut self, result: Result<T>) {
        if let Some((kind, began)) = self.metric.take() {
            crate::metrics::operation(kind, began, &result);
        }
        if let Some(tx) = self.started.take() {
            let _ = tx.send(result.map(|_| ()));
        } else if let Some(tx) = self.done.take() {
            let _ = tx.send(result);
        }
    }
}
