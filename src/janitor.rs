//! The background worker: finishes or rolls back creates nobody is driving
//! any more (after a crash: its first pass is the start-up recovery),
//! resolves sandboxes whose status after a failure is still unknown, and
//! retries queued file deletions with backoff.
//!
//! Every step is safe to run twice or concurrently: each transaction
//! applies only while the journal entry is still in the phase it read.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::agent::{AgentCode, AgentError, HostTarget, SandboxList, SnapshotInfo, SnapshotKey};
use crate::error::Result;
use crate::ids::HostId;
use crate::manager::{Inner, after, backoff, delete_files, reported_status};
use crate::model::{HostStatus, SandboxStatus, Timestamp};
use crate::store::sql::{self, CreateOp, Finish, SandboxOutcome};

/// Most deletions claimed per round.
const BATCH: u32 = 64;

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
    /// Journal entries that could not be settled yet (host unreachable).
    pub postponed: usize,
}

/// Starts the worker. It holds only a weak reference, so dropping every
/// manager handle stops it. Its first pass runs at once: that is the
/// start-up recovery.
pub(crate) fn spawn(inner: Weak<Inner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
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
                tokio::spawn(async move { tick(&strong).await })
            };
            match pass.await {
                Ok(Ok(report)) if report != WorkReport::default() => {
                    tracing::debug!(?report, "background work done");
                }
                Ok(Ok(_)) => {}
                Ok(Err(err)) => tracing::warn!(error = ?err, "background work failed; will retry"),
                Err(join) => tracing::error!(error = %join, "background work panicked; will retry"),
            }
            let mut sleep = next_sleep(&strong).await;
            if let Some(options) = strong.options.orphan_sweep.clone() {
                match strong.sweep_due(options.interval) {
                    Some(wait) => sleep = sleep.min(wait),
                    None => {
                        match sweep(&strong, options.grace).await {
                            Ok(report) => tracing::debug!(?report, "orphan sweep done"),
                            Err(err) => tracing::warn!(error = ?err, "orphan sweep failed"),
                        }
                        sleep = sleep.min(options.interval);
                    }
                }
            }
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

async fn next_sleep(inner: &Inner) -> Duration {
    let max = inner.options.janitor_interval;
    match inner.store.read(sql::next_due).await {
        Ok(Some(at)) => {
            let wait = at
                .unix_millis()
                .saturating_sub(Timestamp::now().unix_millis());
            Duration::from_millis(u64::try_from(wait).unwrap_or(0)).min(max)
        }
        Ok(None) => max,
        Err(err) => {
            tracing::warn!(error = ?err, "cannot read the work queue");
            max
        }
    }
}

/// What hosts said during one pass, so that each host is asked at most once
/// per pass however many entries it has.
#[derive(Default)]
struct HostViews {
    status: HashMap<HostId, Option<HostStatus>>,
    sandboxes: HashMap<HostId, Result<SandboxList, AgentError>>,
    snapshots: HashMap<HostId, Result<Vec<SnapshotInfo>, AgentError>>,
}

impl HostViews {
    async fn offline(&mut self, inner: &Inner, host: HostId) -> Result<bool> {
        let status = match self.status.entry(host) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let status = inner.store.read(move |c| sql::get_host(c, host)).await?;
                *e.insert(status.map(|h| h.status))
            }
        };
        Ok(status == Some(HostStatus::Offline))
    }

    async fn sandboxes(
        &mut self,
        inner: &Inner,
        host: &HostTarget,
    ) -> &Result<SandboxList, AgentError> {
        match self.sandboxes.entry(host.id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(inner.list_sandboxes(host).await),
        }
    }

    async fn snapshots(
        &mut self,
        inner: &Inner,
        host: &HostTarget,
    ) -> &Result<Vec<SnapshotInfo>, AgentError> {
        match self.snapshots.entry(host.id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let answer = async {
                    let agent = inner.transport.agent(host)?;
                    tokio::time::timeout(inner.options.list_timeout, agent.list_snapshots())
                        .await
                        .map_err(|_| AgentError::Timeout)?
                }
                .await;
                e.insert(answer)
            }
        }
    }

    /// The sandbox's status per its host, or `Unknown` if it cannot say yet.
    async fn outcome(&mut self, inner: &Inner, op: &CreateOp) -> SandboxOutcome {
        let retry_at = after(Timestamp::now(), backoff(&inner.options, op.attempts));
        match self.sandboxes(inner, &op.host).await {
            Ok(list) => reported_status(list, op.sandbox_id)
                .map_or(SandboxOutcome::Unknown { retry_at }, SandboxOutcome::Known),
            Err(_) => SandboxOutcome::Unknown { retry_at },
        }
    }
}

/// One pass over everything due now.
pub(crate) async fn tick(inner: &Arc<Inner>) -> Result<WorkReport> {
    let mut report = WorkReport::default();
    let mut views = HostViews::default();
    let now = Timestamp::now();

    let started = inner
        .store
        .read(move |c| sql::open_operations(c, "started", Some(now)))
        .await?;
    for op in started {
        // A create driven by a task of this process is not interrupted.
        if inner.is_in_flight(op.template_id) {
            continue;
        }
        if let Err(err) = resolve_interrupted(inner, &op, &mut views, &mut report).await {
            tracing::warn!(template = %op.template_id, error = ?err, "cannot resolve an interrupted snapshot yet");
        }
    }

    let resolving = inner
        .store
        .read(move |c| sql::open_operations(c, "resolving", Some(now)))
        .await?;
    for op in resolving {
        if let Err(err) = resolve_status(inner, &op, &mut views, &mut report).await {
            tracing::warn!(sandbox = %op.sandbox_id, error = ?err, "cannot resolve a sandbox status yet");
        }
    }

    // One batch of deletions per pass, so that recovery and status
    // resolution get their turn even while a large queue drains; the next
    // pass follows at once when more is due.
    let now = Timestamp::now();
    let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
    let due = inner
        .store
        .write(move |c| sql::claim_due_deletions(c, now, lease, BATCH))
        .await?;
    if !due.is_empty() {
        let full = due.len() == BATCH as usize;
        let (confirmed, failed) = delete_files(inner, due).await;
        report.deletions_confirmed += confirmed.len();
        report.deletions_failed += failed.len();
        if full {
            inner.wake.notify_one();
        }
    }
    Ok(report)
}

async fn postpone(
    inner: &Inner,
    op: &CreateOp,
    why: String,
    report: &mut WorkReport,
) -> Result<()> {
    let (id, at, now) = (
        op.template_id,
        after(Timestamp::now(), backoff(&inner.options, op.attempts)),
        Timestamp::now(),
    );
    inner
        .store
        .write(move |c| sql::postpone_operation(c, id, &why, at, now))
        .await?;
    report.postponed += 1;
    Ok(())
}

/// A create that nobody is driving any more: the agent may or may not have
/// written the snapshot. If the host lists the key (agents list only
/// complete snapshots), roll forward: the caller never got an answer, so
/// either outcome is allowed, and keeping the work is kinder. Otherwise
/// roll back. An agent without `ListSnapshots` gets the conservative path:
/// roll back and delete the key. A host marked offline cannot be asked:
/// roll back, and the sandbox is `missing`.
async fn resolve_interrupted(
    inner: &Arc<Inner>,
    op: &CreateOp,
    views: &mut HostViews,
    report: &mut WorkReport,
) -> Result<()> {
    let outcome = if views.offline(inner, op.host.id).await? {
        SandboxOutcome::Known(SandboxStatus::Missing)
    } else {
        let key = op.template_id.to_string();
        let held = match views.snapshots(inner, &op.host).await {
            Ok(list) => list.iter().find(|s| s.key == key).map(|s| s.size_bytes),
            Err(AgentError::Rejected {
                code: AgentCode::Unimplemented,
                ..
            }) => None,
            Err(err) => {
                let why = format!("cannot list the host's snapshots: {err}");
                return postpone(inner, op, why, report).await;
            }
        };
        if let Some(size_bytes) = held {
            let now = Timestamp::now();
            let lease = after(now, inner.options.delete_timeout.saturating_mul(2));
            let op2 = op.clone();
            let finished = inner
                .store
                .write(move |c| sql::finish_create(c, &op2, size_bytes, lease, now))
                .await?;
            match finished {
                Finish::Done(done) => {
                    tracing::info!(template = %op.template_id, "rolled an interrupted snapshot forward");
                    report.rolled_forward += 1;
                    if !done.replaced.is_empty() {
                        delete_files(inner, done.replaced).await;
                    }
                    return Ok(());
                }
                Finish::AlreadyResolved => return Ok(()),
                // The name went to another template meanwhile: roll back.
                Finish::NameTaken => {}
            }
        }
        views.outcome(inner, op).await
    };
    let applied = inner
        .roll_back(
            op,
            outcome,
            "interrupted",
            "interrupted before completion".into(),
            false,
        )
        .await?;
    if applied {
        tracing::info!(template = %op.template_id, "rolled back an interrupted snapshot");
        report.rolled_back += 1;
        if matches!(outcome, SandboxOutcome::Unknown { .. }) {
            report.postponed += 1;
        }
    }
    Ok(())
}

/// A rolled-back create whose sandbox status was unknown: ask again.
async fn resolve_status(
    inner: &Arc<Inner>,
    op: &CreateOp,
    views: &mut HostViews,
    report: &mut WorkReport,
) -> Result<()> {
    let outcome = if views.offline(inner, op.host.id).await? {
        SandboxOutcome::Known(SandboxStatus::Missing)
    } else {
        views.outcome(inner, op).await
    };
    match outcome {
        SandboxOutcome::Known(status) => {
            let op2 = op.clone();
            let now = Timestamp::now();
            let closed = inner
                .store
                .write(move |c| sql::resolve_operation(c, &op2, status, now))
                .await?;
            if closed {
                tracing::info!(sandbox = %op.sandbox_id, %status, "sandbox status resolved from its host");
                report.statuses_resolved += 1;
            }
            Ok(())
        }
        SandboxOutcome::Unknown { .. } => {
            postpone(
                inner,
                op,
                "the host cannot report the sandbox yet".into(),
                report,
            )
            .await
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
pub(crate) async fn sweep(inner: &Arc<Inner>, grace: Duration) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let hosts = inner.store.read(sql::list_hosts).await?;
    let cutoff = Timestamp::from_unix_millis(
        Timestamp::now()
            .unix_millis()
            .saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)),
    );
    let mut views = HostViews::default();
    for host in hosts {
        if !matches!(host.status, HostStatus::Online | HostStatus::Draining) {
            report.hosts_skipped += 1;
            continue;
        }
        let target = HostTarget {
            id: host.id,
            address: host.address.clone(),
        };
        let snapshots = match views.snapshots(inner, &target).await {
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
            if inner
                .store
                .read(move |c| sql::key_is_owned(c, template))
                .await?
            {
                continue;
            }
            if snapshot.created_at.is_none_or(|at| at > cutoff) {
                report.orphans_too_young += 1;
                continue;
            }
            let queued = inner
                .store
                .write(move |c| sql::queue_orphan(c, template, host_id, size, now))
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
