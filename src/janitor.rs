//! The background worker: retries queued file deletions with backoff,
//! resolves operations whose sandbox status is still unknown, and, at
//! start-up, finishes or rolls back operations a crashed process left open.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::agent::{AgentCode, AgentError};
use crate::error::Result;
use crate::manager::{Inner, after, backoff, delete_files};
use crate::model::Timestamp;
use crate::store::sql::{self, CreateOp, SandboxOutcome};

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
    /// Journal entries closed (finished or rolled back).
    pub resolved: usize,
    /// Journal entries that could not be resolved yet (host unreachable).
    pub postponed: usize,
}

/// Starts the worker. It holds only a weak reference, so dropping every
/// manager handle stops it.
pub(crate) fn spawn(inner: Weak<Inner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if strong.shutdown.is_cancelled() {
                return;
            }
            if let Err(err) = tick(&strong).await {
                tracing::warn!(error = ?err, "background work failed; will retry");
            }
            let sleep = next_sleep(&strong).await;
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

/// One pass over everything due now.
pub(crate) async fn tick(inner: &Arc<Inner>) -> Result<WorkReport> {
    let mut report = WorkReport::default();
    let now = Timestamp::now();

    // Creates whose driving task is gone (a failed final write).
    let started = inner
        .store
        .read(move |c| sql::open_operations(c, "started", Some(now)))
        .await?;
    for op in started {
        if inner.is_in_flight(op.template_id) {
            continue;
        }
        resolve_interrupted(inner, &op, &mut report).await?;
    }

    // Failed creates whose sandbox status is still to be asked.
    let resolving = inner
        .store
        .read(move |c| sql::open_operations(c, "resolving", Some(now)))
        .await?;
    for op in resolving {
        resolve_status(inner, &op, &mut report).await?;
    }

    loop {
        let now = Timestamp::now();
        let lease = after(now, inner.options.delete_timeout * 2);
        let due = inner
            .store
            .write(move |c| sql::claim_due_deletions(c, now, lease, BATCH))
            .await?;
        if due.is_empty() {
            break;
        }
        let claimed = due.len();
        let (confirmed, failed) = delete_files(inner, due).await;
        report.deletions_confirmed += confirmed.len();
        report.deletions_failed += failed.len();
        if claimed < BATCH as usize {
            break;
        }
    }
    Ok(report)
}

/// Finishes or rolls back every operation left open by a previous process.
pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<WorkReport> {
    let mut report = WorkReport::default();
    let started = inner
        .store
        .read(|c| sql::open_operations(c, "started", None))
        .await?;
    for op in started {
        resolve_interrupted(inner, &op, &mut report).await?;
    }
    let resolving = inner
        .store
        .read(|c| sql::open_operations(c, "resolving", None))
        .await?;
    for op in resolving {
        resolve_status(inner, &op, &mut report).await?;
    }
    Ok(report)
}

fn postpone_at(inner: &Inner, op: &CreateOp) -> Timestamp {
    after(Timestamp::now(), backoff(&inner.options, op.attempts))
}

/// A create that nobody is driving any more: the agent may or may not have
/// written the snapshot. If the host holds the key, roll forward (the
/// caller never got an answer, so either outcome is allowed, and keeping
/// the work is kinder); otherwise roll back. An agent without
/// `ListSnapshots` gets the conservative path: roll back and delete the key.
async fn resolve_interrupted(
    inner: &Arc<Inner>,
    op: &CreateOp,
    report: &mut WorkReport,
) -> Result<()> {
    let key = op.template_id.to_string();
    let listed = async {
        let agent = inner.transport.agent(&op.host)?;
        tokio::time::timeout(inner.options.list_timeout, agent.list_snapshots())
            .await
            .map_err(|_| AgentError::Timeout)?
    }
    .await;
    let held = match listed {
        Ok(snapshots) => snapshots.into_iter().find(|s| s.key == key),
        Err(AgentError::Rejected {
            code: AgentCode::Unimplemented,
            ..
        }) => None,
        Err(err) => {
            tracing::warn!(template = %op.template_id, error = %err,
                "cannot ask the host about an interrupted snapshot; will retry");
            let (id, text, at, now) = (
                op.template_id,
                err.to_string(),
                postpone_at(inner, op),
                Timestamp::now(),
            );
            inner
                .store
                .write(move |c| sql::postpone_operation(c, id, &text, at, now))
                .await?;
            report.postponed += 1;
            return Ok(());
        }
    };
    if let Some(snapshot) = held {
        let now = Timestamp::now();
        let lease = after(now, inner.options.delete_timeout * 2);
        let op2 = op.clone();
        let done = inner
            .store
            .write(move |c| sql::finish_create(c, &op2, snapshot.size_bytes, lease, now))
            .await;
        match done {
            Ok(done) => {
                tracing::info!(template = %op.template_id, "rolled an interrupted snapshot forward");
                report.resolved += 1;
                if !done.replaced.is_empty() {
                    delete_files(inner, done.replaced).await;
                }
                return Ok(());
            }
            Err(err) if err.code() == crate::error::ErrorCode::Conflict => {
                // The name went to another template meanwhile: roll back.
            }
            Err(err) => return Err(err),
        }
    }
    // Roll back: the key (if any) is queued for deletion; the sandbox gets
    // whatever status its host reports.
    let outcome = match inner.ask_sandbox_status(op).await {
        Ok(status) => SandboxOutcome::Known(status),
        Err(_) => SandboxOutcome::Unknown {
            retry_at: postpone_at(inner, op),
        },
    };
    let op2 = op.clone();
    let now = Timestamp::now();
    inner
        .store
        .write(move |c| {
            sql::fail_create(
                c,
                &op2,
                outcome,
                "interrupted",
                "interrupted before completion",
                now,
            )
        })
        .await?;
    tracing::info!(template = %op.template_id, "rolled back an interrupted snapshot");
    if matches!(outcome, SandboxOutcome::Known(_)) {
        report.resolved += 1;
    } else {
        report.postponed += 1;
    }
    inner.wake.notify_one();
    Ok(())
}

/// A rolled-back create whose sandbox status was unknown: ask again.
async fn resolve_status(inner: &Arc<Inner>, op: &CreateOp, report: &mut WorkReport) -> Result<()> {
    match inner.ask_sandbox_status(op).await {
        Ok(status) => {
            let op2 = op.clone();
            let now = Timestamp::now();
            inner
                .store
                .write(move |c| sql::resolve_operation(c, &op2, status, now))
                .await?;
            tracing::info!(sandbox = %op.sandbox_id, %status, "sandbox status resolved from its host");
            report.resolved += 1;
        }
        Err(err) => {
            let (id, text, at, now) = (
                op.template_id,
                err.to_string(),
                postpone_at(inner, op),
                Timestamp::now(),
            );
            inner
                .store
                .write(move |c| sql::postpone_operation(c, id, &text, at, now))
                .await?;
            report.postponed += 1;
        }
    }
    Ok(())
}
