//! The delete state machine (SPEC §4a "Delete"): the files of a deleted
//! (or replaced) template are deleted on every host that holds them, each
//! answer recorded as it arrives; what does not confirm stays queued for
//! the worker, which comes back here.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::{Engine, after, backoff};

/// What the hosts said within a delete: those that confirmed and those
/// left to the worker.
pub(crate) type DeleteOutcome = (Vec<HostId>, Vec<HostId>);

/// A delete: one transaction makes the template invisible and frees its
/// name (answered on `committed` with the hosts to delete from), then the
/// files go from every host in parallel (answered on `done`). Runs to the
/// end even if the caller stops listening.
pub(crate) async fn run_delete(
    inner: &Arc<Engine>,
    caller: &Caller,
    name: TemplateName,
    committed: oneshot::Sender<Result<(Template, Vec<HostId>)>>,
    done: oneshot::Sender<DeleteOutcome>,
) {
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
            let _ = committed.send(Err(err));
            return;
        }
    };
    let hosts: Vec<HostId> = targets.iter().map(|d| d.host.id).collect();
    let _ = committed.send(Ok((template, hosts)));
    let outcome = delete_files(inner, targets).await;
    let _ = done.send(outcome);
}
use crate::agent::{AgentCode, AgentError, DeleteSnapshotRequest, SnapshotKey};
use crate::error::Result;
use crate::ids::HostId;
use crate::model::{Caller, Template, Timestamp};
use crate::names::TemplateName;
use crate::store::{Deletion, DeletionResult};

/// Deletes files on their hosts in parallel and records each answer.
/// Returns the hosts that confirmed and those left to the worker.
pub(crate) async fn delete_files(
    inner: &Arc<Engine>,
    targets: Vec<Deletion>,
) -> (Vec<HostId>, Vec<HostId>) {
    let mut calls = JoinSet::new();
    let mut pending = Vec::new();
    for target in targets {
        if target.claim.is_none() {
            // Unclaimed: a restore in flight starts from these files; the
            // worker deletes them once it is over.
            pending.push(target.host.id);
            continue;
        }
        let inner = inner.clone();
        calls.spawn(async move {
            let answer = ask_one(&inner, &target).await;
            // Each answer is recorded as soon as it arrives, so a slow host
            // does not hold back the others; answers arriving together
            // share a commit through the writer's group commit.
            let recorded = inner
                .store
                .record_deletions(vec![(target.clone(), answer.clone())], Timestamp::now())
                .await;
            if let Err(db) = recorded {
                tracing::error!(error = ?db, "recording a deletion result failed; it will be retried");
            }
            (target.host.id, answer)
        });
    }
    let mut confirmed = Vec::new();
    while let Some(joined) = calls.join_next().await {
        // A call that panicked keeps its lease and is retried after it.
        match joined {
            Ok((host, DeletionResult::Confirmed)) => confirmed.push(host),
            Ok((host, DeletionResult::Failed { .. })) => pending.push(host),
            Err(_) => {}
        }
    }
    if !pending.is_empty() {
        // The worker may be asleep past the retry time it must now keep.
        inner.wake.notify_one();
    }
    (confirmed, pending)
}

/// A host's answers to `targets`, asked in parallel and not yet recorded
/// (a drain records them with [`record_answers`] while the host works on
/// its next batch). An unclaimed target (see [`delete_files`]) is not
/// asked and has no answer: it stays queued for the worker.
pub(crate) async fn ask_host(
    inner: &Arc<Engine>,
    targets: Vec<Deletion>,
) -> Vec<(Deletion, DeletionResult)> {
    let mut calls = JoinSet::new();
    for target in targets.into_iter().filter(|t| t.claim.is_some()) {
        let inner = inner.clone();
        calls.spawn(async move {
            let answer = ask_one(&inner, &target).await;
            (target, answer)
        });
    }
    let mut answers = Vec::with_capacity(calls.len());
    while let Some(joined) = calls.join_next().await {
        // A call that panicked keeps its lease and is retried after it.
        if let Ok(answer) = joined {
            answers.push(answer);
        }
    }
    answers
}

/// Asks `target`'s host to delete its files: the answer to record (a
/// failure is retried after a backoff by its attempts).
async fn ask_one(inner: &Engine, target: &Deletion) -> DeletionResult {
    match delete_on_host(inner, target).await {
        Ok(()) => DeletionResult::Confirmed,
        Err(err) => {
            tracing::warn!(host = %target.host.id, template = %target.template_id, error = %err,
                "deleting snapshot files failed; queued for retry");
            DeletionResult::Failed {
                error: err.to_string(),
                retry_at: after(Timestamp::now(), backoff(&inner.options, target.attempts)),
            }
        }
    }
}

/// Records `answers` in one transaction; false if the store refused (the
/// leases run out and the deletions are tried again: a host that deleted
/// already answers NotFound, which counts as confirmed).
pub(crate) async fn record_answers(
    inner: &Engine,
    answers: Vec<(Deletion, DeletionResult)>,
) -> bool {
    if answers.is_empty() {
        return true;
    }
    let failed = answers
        .iter()
        .any(|(_, answer)| matches!(answer, DeletionResult::Failed { .. }));
    let recorded = inner
        .store
        .record_deletions(answers, Timestamp::now())
        .await;
    if failed {
        // The worker may be asleep past the retry time it must now keep.
        inner.wake.notify_one();
    }
    match recorded {
        Ok(()) => true,
        Err(db) => {
            tracing::error!(error = ?db, "recording deletion results failed; they will be retried");
            false
        }
    }
}

/// One `DeleteSnapshot` call; NotFound counts as done.
async fn delete_on_host(inner: &Engine, target: &Deletion) -> Result<(), AgentError> {
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
