//! The background worker: the scheduling half of the engine (`engine/`
//! holds the state machines it drives). It finishes or rolls back creates
//! nobody is driving any more (after a crash: its first pass is the
//! start-up recovery; on PostgreSQL, also those of replicas whose lease
//! ended), resolves sandboxes whose status after a failure is still
//! unknown (or, past `resolve_deadline`, without their host), retries
//! queued file deletions with backoff, and renews this process's instance
//! lease.
//!
//! Each pass only reads what is due and hands each host's share to a task
//! of its own, so a slow or hanging host delays only its own work. The
//! worker never spins: a pass that finds work due but can start none of it
//! backs off in memory, as does an operation the store refuses to settle.
//!
//! Every step is safe to run twice or concurrently: each transaction
//! applies only while the journal entry is still in the phase it read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::agent::{HostTarget, SnapshotKey};
use crate::engine::create::{resolve_interrupted, resolve_status};
use crate::engine::delete::{ask_host, delete_files, record_answers};
use crate::engine::restore::{destroy_sandboxes, resolve_interrupted_restore};
use crate::engine::{Engine, HostViews, WorkReport, after, backoff, lock_unpoisoned};
use crate::error::Result;
use crate::ids::{HostId, OperationId};
use crate::model::{HostStatus, Timestamp};
use crate::options::ManagerOptions;
use crate::store::{
    CreateOp, DELETIONS_PER_HOST, Deletion, DeletionResult, Destroy, InHand, Phase, RestoreOp,
};

/// Most deletions claimed per round.
const BATCH: u32 = 64;

/// Most templates one retention batch (one store transaction) deletes.
const RETENTION_BATCH: u32 = 100;

/// Most retention batches per pass; past them, the next pass goes on at
/// once (and claims the files of what this one deleted meanwhile).
const RETENTION_BATCHES: u32 = 10;

/// Size of the in-memory backoff table at which lapsed entries are dropped.
const HELD_BACK_PRUNE: usize = 1024;

/// What the background worker has done (see
/// [`crate::Manager::worker_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Passes over the due work, the worker's and `run_pending_work`'s.
    pub passes: u64,
    /// Times the worker went to sleep after a pass.
    pub sleeps: u64,
    /// How long it chose to sleep the last time (it wakes earlier when new
    /// work arrives).
    pub last_sleep: Duration,
}

impl crate::engine::WorkerState {
    pub(crate) fn stats(&self) -> WorkerStats {
        WorkerStats {
            passes: self.passes.load(Ordering::SeqCst),
            sleeps: self.sleeps.load(Ordering::SeqCst),
            last_sleep: Duration::from_millis(self.last_sleep_ms.load(Ordering::SeqCst)),
        }
    }

    fn record_sleep(&self, sleep: Duration) {
        let ms = u64::try_from(sleep.as_millis()).unwrap_or(u64::MAX);
        self.last_sleep_ms.store(ms, Ordering::SeqCst);
        self.sleeps.fetch_add(1, Ordering::SeqCst);
    }

    /// Operations held back now, and when the first of them is due again.
    fn held_back_now(&self) -> (Vec<OperationId>, Option<Instant>) {
        let now = Instant::now();
        let held = lock_unpoisoned(&self.held_back);
        let waiting: Vec<(OperationId, Instant)> = held
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(id, (_, until))| (*id, *until))
            .collect();
        let first = waiting.iter().map(|(_, until)| *until).min();
        (waiting.into_iter().map(|(id, _)| id).collect(), first)
    }

    fn held_back(&self, id: OperationId) -> bool {
        lock_unpoisoned(&self.held_back)
            .get(&id)
            .is_some_and(|(_, until)| Instant::now() < *until)
    }

    /// The store refused to record what happened to `id`: try it again
    /// only after a backoff, kept here since the store cannot keep it.
    fn hold_back(&self, options: &ManagerOptions, id: OperationId) {
        let mut held = lock_unpoisoned(&self.held_back);
        if held.len() >= HELD_BACK_PRUNE {
            // Entries of operations settled elsewhere (an operator, a
            // deadline) are never cleared one by one: drop the lapsed ones.
            let now = Instant::now();
            held.retain(|_, (_, until)| *until > now);
        }
        let entry = held.entry(id).or_insert((0, Instant::now()));
        entry.1 = Instant::now() + backoff(options, entry.0);
        entry.0 = entry.0.saturating_add(1);
    }

    fn settled(&self, id: OperationId) {
        lock_unpoisoned(&self.held_back).remove(&id);
    }
}

/// Marks a host busy while its task runs; unmarks it however the task ends.
struct BusyHost {
    inner: Arc<Engine>,
    host: HostId,
}

impl BusyHost {
    fn take(inner: &Arc<Engine>, host: HostId) -> Option<Self> {
        lock_unpoisoned(&inner.worker.busy_hosts)
            .insert(host)
            .then(|| Self {
                inner: inner.clone(),
                host,
            })
    }
}

impl Drop for BusyHost {
    fn drop(&mut self) {
        lock_unpoisoned(&self.inner.worker.busy_hosts).remove(&self.host);
    }
}

/// Renews this process's instance lease every third of it, so that other
/// replicas leave its journal entries alone while it lives. A renewal the
/// store refuses is retried with backoff (each wait at most a third of the
/// lease); the loop ends when the manager shuts down or is dropped. It
/// runs on the manager's task tracker, so that `shutdown` waits for it:
/// a renewal in hand when the manager goes keeps the engine (and the
/// SQLite file's lock) alive, and a reopening right after a shutdown must
/// not find it still held.
pub(crate) fn spawn_heartbeat(engine: &Arc<Engine>) {
    let inner = Arc::downgrade(engine);
    engine.tasks.spawn(async move {
        let mut failures = 0u32;
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let period = strong.options.instance_lease / 3;
            let wait = if failures == 0 {
                period
            } else {
                backoff(&strong.options, failures - 1).min(period)
            };
            let shutdown = strong.shutdown.clone();
            drop(strong);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let lease_until = after(Timestamp::now(), strong.options.instance_lease);
            match strong.store.heartbeat(strong.instance, lease_until).await {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = ?err, attempt = failures,
                        "cannot renew this instance's lease; retrying");
                }
            }
        }
    });
}

/// Starts the worker. It holds only a weak reference, so dropping every
/// manager handle stops it. Its first pass runs at once: that is the
/// start-up recovery.
pub(crate) fn spawn(inner: Weak<Engine>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Consecutive passes that found work due but could start none of
        // it (it is in hand, held back, or the store fails): they back off.
        let mut idle = 0u32;
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if strong.shutdown.is_cancelled() {
                return;
            }
            // On a task of its own: an agent that panics (in-process agents
            // are user code) costs one pass, not the worker.
            let pass = {
                let strong = strong.clone();
                tokio::spawn(async move { dispatch(&strong, false).await })
            };
            let started = match pass.await {
                Ok(Ok(started)) => started.hosts,
                Ok(Err(err)) => {
                    tracing::warn!(error = ?err, "background work failed; will retry");
                    0
                }
                Err(join) => {
                    tracing::error!(error = %join, "background work panicked; will retry");
                    0
                }
            };
            let mut sleep = match next_sleep(&strong).await {
                // Due now, yet nothing could start (a race with the work in
                // hand): back off rather than spin.
                Some(wait) if wait.is_zero() && started > 0 => {
                    idle = 0;
                    wait
                }
                Some(wait) if wait.is_zero() => {
                    idle = idle.saturating_add(1);
                    idle_backoff(&strong.options, idle)
                }
                Some(wait) => {
                    idle = 0;
                    wait
                }
                None => {
                    idle = idle.saturating_add(1);
                    idle_backoff(&strong.options, idle)
                }
            };
            // The pass ran the retention sweep if it was due: it is due
            // again after the interval (or a backoff).
            sleep = sleep.min(strong.retention_wait());
            if let Some(options) = strong.options.orphan_sweep.clone() {
                match strong.sweep_due(options.interval) {
                    Some(wait) => sleep = sleep.min(wait),
                    None => {
                        spawn_sweep(&strong, options.grace);
                        sleep = sleep.min(options.interval);
                    }
                }
            }
            // Expired requests go at most once per interval, on whichever
            // pass comes next (never a wake-up of its own: nothing waits
            // for them).
            if strong.purge_due(strong.options.janitor_interval).is_none() {
                purge_requests(&strong).await;
            }
            strong.worker.record_sleep(sleep);
            let wake = strong.wake.clone();
            let shutdown = strong.shutdown.clone();
            drop(strong);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    })
}

/// Most expired requests purged per transaction, and transactions per
/// purge: a backlog beyond that waits for the next interval.
const PURGE_BATCH: u32 = 1000;
const PURGE_ROUNDS: usize = 10;

/// Purges remembered requests past their retention, in bounded batches. A
/// failing store is retried at the next interval (its backoff).
async fn purge_requests(inner: &Engine) {
    for _ in 0..PURGE_ROUNDS {
        match inner
            .store
            .purge_requests(Timestamp::now(), PURGE_BATCH)
            .await
        {
            Ok(purged) if purged < u64::from(PURGE_BATCH) => return,
            Ok(_) => tokio::task::yield_now().await,
            Err(err) => {
                tracing::warn!(error = ?err, "cannot purge expired requests; will retry");
                return;
            }
        }
    }
}

/// The sweep runs on a task of its own (one at a time): it asks every host
/// in turn, and a hanging one must not hold up the worker.
fn spawn_sweep(inner: &Arc<Engine>, grace: Duration) {
    if inner.worker.sweeping.swap(true, Ordering::SeqCst) {
        return;
    }
    /// Clears the flag however the sweep ends (a panicking agent included).
    struct Sweeping(Arc<Engine>);
    impl Drop for Sweeping {
        fn drop(&mut self) {
            self.0.worker.sweeping.store(false, Ordering::SeqCst);
        }
    }
    let guard = Sweeping(inner.clone());
    inner.tasks_spawn(async move {
        match sweep(&guard.0, grace).await {
            Ok(report) => tracing::debug!(?report, "orphan sweep done"),
            Err(err) => tracing::warn!(error = ?err, "orphan sweep failed"),
        }
        drop(guard);
    });
}

fn idle_backoff(options: &ManagerOptions, idle: u32) -> Duration {
    backoff(options, idle.saturating_sub(1)).min(options.janitor_interval)
}

/// How long until queued work is due (zero: due now), at most the
/// janitor interval; `None` when the store cannot say. Work in hand (a
/// busy host's, a create in flight) is left out: it wakes the worker when
/// it is done. Work held back in memory counts from when it may go again.
async fn next_sleep(inner: &Engine) -> Option<Duration> {
    let mut max = inner.options.janitor_interval;
    if inner.store.shared() {
        // Another replica's lapsed work becomes ours without anyone telling
        // us: look again at least once per heartbeat.
        max = max.min(inner.options.instance_lease / 3);
    }
    let (operations, first_held) = inner.worker.held_back_now();
    let in_hand = InHand {
        hosts: lock_unpoisoned(&inner.worker.busy_hosts)
            .iter()
            .copied()
            .collect(),
        creates: inner.in_flight(),
        operations,
        restores: inner.restores_in_flight(),
    };
    let held = first_held.map_or(max, |at| at.saturating_duration_since(Instant::now()));
    match inner.store.next_due(inner.instance, in_hand).await {
        Ok(Some(at)) => {
            let wait = at
                .unix_millis()
                .saturating_sub(Timestamp::now().unix_millis());
            let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
            Some(wait.min(held).min(max))
        }
        Ok(None) => Some(held.min(max)),
        Err(err) => {
            tracing::warn!(error = ?err, "cannot read the work queue");
            None
        }
    }
}

/// One host's share of a pass.
#[derive(Default)]
struct HostWork {
    started: Vec<CreateOp>,
    resolving: Vec<CreateOp>,
    deletions: Vec<Deletion>,
    restores: Vec<RestoreOp>,
    destroys: Vec<Destroy>,
}

/// What a pass started.
pub(crate) struct Dispatched {
    /// Hosts whose work was started.
    hosts: usize,
    /// What that work did (when the pass waited for it).
    report: WorkReport,
}

/// How often at most the backlog gauges are read: counting a long queue
/// costs a scan of it, and a pass may follow another at once.
const BACKLOGS_EVERY: Duration = Duration::from_secs(1);

/// Sets the backlog gauges, at most once per [`BACKLOGS_EVERY`]. A store
/// that cannot answer leaves them as they were (the pass's own reads
/// report the failure).
async fn report_backlogs(inner: &Arc<Engine>, now: Timestamp) {
    if inner.backlogs_due(BACKLOGS_EVERY).is_some() {
        return;
    }
    match inner.store.backlogs().await {
        Ok(((deletions, oldest_deletion), (operations, oldest_operation))) => {
            let age = |oldest: Option<i64>| {
                oldest.map_or(Duration::ZERO, |ms| {
                    Duration::from_millis(
                        u64::try_from(now.unix_millis().saturating_sub(ms)).unwrap_or(0),
                    )
                })
            };
            crate::metrics::backlogs(
                crate::metrics::Backlog {
                    count: deletions,
                    oldest_age: age(oldest_deletion),
                },
                crate::metrics::Backlog {
                    count: operations,
                    oldest_age: age(oldest_operation),
                },
            );
        }
        Err(err) => tracing::debug!(error = ?err, "cannot read the backlogs for metrics"),
    }
}

/// One pass: reads what is due, and starts each host's share on a task of
/// its own — unless that host's earlier work is still in hand. With
/// `wait`, waits for the tasks and reports what they did.
async fn dispatch(inner: &Arc<Engine>, wait: bool) -> Result<Dispatched> {
    inner.worker.passes.fetch_add(1, Ordering::Relaxed);
    crate::metrics::janitor_pass();
    let now = Timestamp::now();
    report_backlogs(inner, now).await;
    // Entries whose owner's lease ended (a replica that died) become ours.
    match inner.store.adopt_operations(inner.instance, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            adopted = n,
            "adopted the open operations of a lapsed instance"
        ),
        Err(err) => tracing::warn!(error = ?err, "cannot adopt lapsed instances' operations"),
    }
    // Before anything that can fail the pass: a sweep that is due and
    // never runs would keep the worker awake.
    apply_retention(inner, now, wait).await;
    // Hosts whose work is in hand now: what this pass reads of their
    // operations may be resolved by that work meanwhile, so their
    // operations wait for the next pass (which the work's end wakes)
    // rather than being resolved twice, with their hosts asked twice.
    let in_hand: HashSet<HostId> = lock_unpoisoned(&inner.worker.busy_hosts).clone();
    let me = inner.instance;
    let started = inner
        .store
        .open_operations(me, Phase::Started, Some(now))
        .await?;
    let resolving = inner
        .store
        .open_operations(me, Phase::Resolving, Some(now))
        .await?;
    // Read before anything is claimed: a failing read must not strand a
    // claimed batch until its lease ends.
    let restores = inner.store.open_restores(me, Some(now)).await?;
    let busy: Vec<HostId> = lock_unpoisoned(&inner.worker.busy_hosts)
        .iter()
        .copied()
        .collect();
    let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
    let claimed = inner
        .store
        .claim_due_deletions(now, lease, BATCH, busy)
        .await;
    let deletions = match claimed {
        Ok(due) => due,
        Err(err) => {
            // The store may still let operations settle; deletions wait.
            tracing::warn!(error = ?err, "cannot claim due deletions");
            Vec::new()
        }
    };
    let busy: Vec<HostId> = lock_unpoisoned(&inner.worker.busy_hosts)
        .iter()
        .copied()
        .collect();
    let destroys = match inner
        .store
        .claim_due_destroys(now, lease, BATCH, busy)
        .await
    {
        Ok(due) => due,
        Err(err) => {
            tracing::warn!(error = ?err, "cannot claim due destroys");
            Vec::new()
        }
    };
    if deletions.len() == BATCH as usize || destroys.len() == BATCH as usize {
        // More is due: the next pass follows at once.
        inner.wake.notify_one();
    }

    let mut hosts: HashMap<HostId, HostWork> = HashMap::new();
    fn work(hosts: &mut HashMap<HostId, HostWork>, host: HostId) -> &mut HostWork {
        hosts.entry(host).or_default()
    }
    let wanted = |op: &CreateOp| {
        // A create driven by a task of this process is not interrupted.
        !inner.is_in_flight(op.template_id) && !inner.worker.held_back(op.id)
    };
    for op in started.into_iter().filter(wanted) {
        work(&mut hosts, op.host.id).started.push(op);
    }
    for op in resolving.into_iter().filter(wanted) {
        work(&mut hosts, op.host.id).resolving.push(op);
    }
    for d in deletions {
        work(&mut hosts, d.host.id).deletions.push(d);
    }
    let in_flight = inner.restores_in_flight();
    for op in restores
        .into_iter()
        .filter(|op| !in_flight.contains(&op.id) && !inner.worker.held_back(op.id))
    {
        work(&mut hosts, op.host.id).restores.push(op);
    }
    for d in destroys {
        work(&mut hosts, d.host.id).destroys.push(d);
    }

    let mut tasks = JoinSet::new();
    let mut count = 0;
    for (host, mut work) in hosts {
        if in_hand.contains(&host) {
            work.started.clear();
            work.resolving.clear();
            work.restores.clear();
            if work.deletions.is_empty() && work.destroys.is_empty() {
                continue;
            }
        }
        let Some(busy) = BusyHost::take(inner, host) else {
            // Its earlier work is in hand; deletions and destroys claimed
            // anyway (in a race with that task) are leased, so run them
            // beside it.
            if !work.deletions.is_empty() || !work.destroys.is_empty() {
                let inner = inner.clone();
                inner.clone().tasks_spawn(async move {
                    delete_files(&inner, work.deletions).await;
                    destroy_sandboxes(&inner, work.destroys).await;
                });
            }
            continue;
        };
        count += 1;
        let inner2 = inner.clone();
        let task = async move {
            let report = host_work(&inner2, host, work).await;
            drop(busy);
            // The worker left this host's work out of its sleep while it
            // was in hand: what is left of it may be due now.
            inner2.wake.notify_one();
            report
        };
        if wait {
            tasks.spawn(task);
        } else {
            inner.tasks_spawn(async move {
                let report = task.await;
                if report != WorkReport::default() {
                    tracing::debug!(?report, "background work done");
                }
            });
        }
    }
    let mut report = WorkReport::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => report.add(&r),
            Err(join) => tracing::error!(error = %join, "background work panicked; will retry"),
        }
    }
    Ok(Dispatched {
        hosts: count,
        report,
    })
}

/// The retention sweep (SPEC §8), when it is due or `force`d (an explicit
/// pass): batches of at most [`RETENTION_BATCH`] templates, one store
/// transaction each, until one comes back short, yielding between them,
/// at most [`RETENTION_BATCHES`] per pass. What it deletes is queued like
/// any delete, due at `now`, so this very pass claims the files. A failing
/// store backs the sweep off (never past its interval); it never spins.
async fn apply_retention(inner: &Arc<Engine>, now: Timestamp, force: bool) {
    if !force && !inner.retention_wait().is_zero() {
        return;
    }
    let mut deleted = 0u32;
    let mut outcome = Ok(true);
    for round in 0..RETENTION_BATCHES {
        if round > 0 {
            tokio::task::yield_now().await;
        }
        match inner.store.sweep_retention(now, RETENTION_BATCH).await {
            Ok(n) => {
                deleted = deleted.saturating_add(n);
                if n < RETENTION_BATCH {
                    outcome = Ok(false);
                    break;
                }
            }
            Err(err) => {
                tracing::warn!(error = ?err, "retention sweep failed; will retry");
                outcome = Err(err);
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "retention: snapshots deleted");
    }
    let more = matches!(outcome, Ok(true));
    inner.retention_ran(outcome);
    if more {
        inner.wake.notify_one();
    }
}

/// Runs the background work that is due now, once, and waits for it.
pub(crate) async fn tick(inner: &Arc<Engine>) -> Result<WorkReport> {
    dispatch(inner, true).await.map(|d| d.report)
}

/// Most of one host's interrupted creates (or statuses) resolved at a
/// time. Their agent questions are asked once and shared (see
/// [`HostViews`]); what is left per entry is its own store transaction,
/// and running them together lets the writer commit them together.
const RESOLVE_CONCURRENCY: usize = 64;

/// Most batches of one host's deletions a task drains before it hands the
/// host back to a whole pass (which also looks at the host's other work).
const DRAIN_ROUNDS: u32 = 64;

/// Deletes `batch` on `host`; while batches come back full (a long queue,
/// as a host back from an outage has), claims the host's next batch while
/// the current one runs, and records a batch's answers (one transaction)
/// while the host works on the next, so the host's deletes follow each
/// other without a pass or a commit between them: a claim reads the front
/// of the host's queue only. At most one batch is being asked, one claimed
/// and one recorded at a time. A claim or a record the store refuses ends
/// the drain, and so does a batch the host did not wholly confirm (what
/// was claimed meanwhile still runs, and every answer is recorded: nothing
/// is left leased but what the store refused); the next pass tries again.
async fn drain_deletions(
    inner: &Arc<Engine>,
    host: HostId,
    mut batch: Vec<Deletion>,
    report: &mut WorkReport,
) {
    let per_host = DELETIONS_PER_HOST as usize;
    let mut failing = false;
    let mut answered = Vec::new();
    for round in 0..DRAIN_ROUNDS {
        let more = batch.len() >= per_host
            && !failing
            && round + 1 < DRAIN_ROUNDS
            && !inner.shutdown.is_cancelled();
        let claim_next = async {
            if more {
                claim_host_deletions(inner, host, per_host).await
            } else {
                Vec::new()
            }
        };
        let asked = batch.len();
        let previous = std::mem::take(&mut answered);
        let (answers, next, recorded) = tokio::join!(
            ask_host(inner, batch),
            claim_next,
            record_answers(inner, previous)
        );
        let confirmed = answers
            .iter()
            .filter(|(_, a)| matches!(a, DeletionResult::Confirmed))
            .count();
        report.deletions_confirmed += confirmed;
        report.deletions_failed += asked - confirmed;
        failing |= confirmed < asked || !recorded;
        answered = answers;
        if next.is_empty() {
            break;
        }
        batch = next;
    }
    record_answers(inner, answered).await;
}

/// The next `limit` due deletions of `host`; none if the store refuses.
async fn claim_host_deletions(inner: &Engine, host: HostId, limit: usize) -> Vec<Deletion> {
    let now = Timestamp::now();
    let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
    let limit = u32::try_from(limit).unwrap_or(DELETIONS_PER_HOST);
    match inner
        .store
        .claim_host_deletions(host, now, lease, limit)
        .await
    {
        Ok(next) => next,
        Err(err) => {
            tracing::warn!(%host, error = ?err, "cannot claim a host's next deletions");
            Vec::new()
        }
    }
}

/// One host's operations and deletions, each bounded by its own timeouts.
async fn host_work(inner: &Arc<Engine>, host: HostId, work: HostWork) -> WorkReport {
    let mut report = WorkReport::default();
    let views = &HostViews::default();
    let reports: Vec<WorkReport> = stream::iter(work.started)
        .map(|op| async move {
            let mut report = WorkReport::default();
            let result = resolve_interrupted(inner, &op, views, &mut report).await;
            settle(
                inner,
                &op,
                result,
                "cannot resolve an interrupted snapshot yet",
            );
            report
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    let resolved: Vec<WorkReport> = stream::iter(work.resolving)
        .map(|op| async move {
            let mut report = WorkReport::default();
            let result = resolve_status(inner, &op, views, &mut report).await;
            settle(inner, &op, result, "cannot resolve a sandbox status yet");
            report
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    for r in reports.iter().chain(&resolved) {
        report.add(r);
    }
    for op in &work.restores {
        let result = resolve_interrupted_restore(inner, op, views, &mut report).await;
        settle_id(
            inner,
            op.id,
            result,
            "cannot resolve an interrupted restore yet",
        );
    }
    if !work.deletions.is_empty() {
        drain_deletions(inner, host, work.deletions, &mut report).await;
    }
    if !work.destroys.is_empty() {
        let (confirmed, failed) = destroy_sandboxes(inner, work.destroys).await;
        report.destroys_confirmed += confirmed;
        report.destroys_failed += failed;
    }
    report
}

fn settle(inner: &Engine, op: &CreateOp, result: Result<()>, what: &str) {
    let _span = tracing::info_span!("create", template = %op.template_id).entered();
    settle_id(inner, op.id, result, what);
}

fn settle_id(inner: &Engine, id: OperationId, result: Result<()>, what: &str) {
    match result {
        Ok(()) => inner.worker.settled(id),
        Err(err) => {
            tracing::warn!(operation = %id, error = ?err, "{what}");
            inner.worker.hold_back(&inner.options, id);
        }
    }
}

/// What an orphan sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Hosts whose snapshots were compared with the store.
    pub hosts_swept: usize,
    /// Hosts not asked: not online or draining.
    pub hosts_skipped: usize,
    /// Hosts that could not answer (down, or without `ListSnapshots`).
    pub hosts_failed: usize,
    /// Keys queued for deletion: ours, owned by nothing, older than the grace.
    pub orphans_queued: usize,
    /// Keys in our format owned by nothing but younger than the grace (or of
    /// unknown age): left alone for now.
    pub orphans_too_young: usize,
    /// Keys not in our key format: never touched.
    pub foreign_keys: usize,
}

/// Compares each reachable host's `ListSnapshots` with the store and
/// queues for deletion the keys in our format (`tpl-…`) that no placement
/// or open operation owns and that are older than `grace`. Keys that are
/// not ours are never touched; each queued key is logged and audited as a
/// system action.
pub(crate) async fn sweep(inner: &Arc<Engine>, grace: Duration) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let hosts = inner.store.list_hosts().await?;
    let cutoff = Timestamp::from_unix_millis(
        Timestamp::now()
            .unix_millis()
            .saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)),
    );
    let views = HostViews::default();
    for host in hosts {
        if !matches!(host.status, HostStatus::Online | HostStatus::Draining) {
            report.hosts_skipped += 1;
            continue;
        }
        let target = HostTarget {
            id: host.id,
            address: host.address.clone(),
        };
        let snapshots = match &*views.snapshots(inner, &target).await {
            Ok(list) => list.clone(),
            Err(err) => {
                tracing::info!(host = %host.id, error = %err, "orphan sweep: cannot list the host's snapshots");
                report.hosts_failed += 1;
                continue;
            }
        };
        report.hosts_swept += 1;
        for snapshot in snapshots {
            let Some(template) = SnapshotKey::parse(&snapshot.key)
                .ok()
                .and_then(|k| k.template_id())
            else {
                report.foreign_keys += 1;
                continue;
            };
            let (host_id, size, now) = (host.id, snapshot.size_bytes, Timestamp::now());
            if inner.store.key_is_owned(template).await? {
                continue;
            }
            if snapshot.created_at.is_none_or(|at| at > cutoff) {
                report.orphans_too_young += 1;
                continue;
            }
            let queued = inner
                .store
                .queue_orphan(template, host_id, size, now)
                .await?;
            if queued {
                tracing::warn!(host = %host.id, key = %snapshot.key, size_bytes = size,
                    "orphan sweep: queued an unowned snapshot for deletion");
                report.orphans_queued += 1;
            }
        }
    }
    if report.orphans_queued > 0 {
        inner.wake.notify_one();
    }
    Ok(report)
}
