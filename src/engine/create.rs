//! The create state machine (SPEC §4a "Create"): the foreground steps a
//! caller waits for (`run_create`: journal, agent call, finish or roll
//! back) and the recovery steps the worker takes for entries nobody drives
//! any more (`resolve_interrupted`, `resolve_status`, the deadline).

use std::sync::Arc;

use tracing::Instrument;

use super::delete::delete_files;
use super::{Engine, HostViews, InFlightGuard, WorkReport, after, backoff};
use crate::agent::{AgentCode, AgentError, CreateSnapshotRequest, HostInfo};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{OperationId, SandboxId, TemplateId};
use crate::model::{Actor, Caller, SandboxStatus, Template, Timestamp};
use crate::names::TemplateName;
use crate::operation::RequestRecord;
use crate::store::{CreateInput, CreateOp, Failure, Finish, ResolveReason, SandboxOutcome};

pub(crate) use super::Reply;

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

/// What a caller asked to snapshot, validated (the manager's
/// `NewSnapshot`).
pub(crate) struct CreateRequest {
    pub(crate) sandbox_id: SandboxId,
    pub(crate) name: TemplateName,
    pub(crate) overwrite: bool,
    /// The journal entry's id.
    pub(crate) operation_id: OperationId,
    /// The request to remember with it, if any.
    pub(crate) request: Option<RequestRecord>,
    /// The create's own TTL (validated); `None`: the team's default.
    pub(crate) ttl: Option<std::time::Duration>,
}

pub(crate) async fn run_create(
    inner: &Arc<Engine>,
    caller: &Caller,
    snapshot: CreateRequest,
    mut reply: Reply<Template>,
) {
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
        operation_id: snapshot.operation_id,
        owner: inner.instance,
        lease_until: after(now, inner.create_lease()),
        request: snapshot.request,
        expires_at: snapshot.ttl.map(|ttl| after(now, ttl)),
    };
    let op = match inner.store.begin_create(input, now).await {
        Ok((op, _sandbox)) => op,
        Err(err) => return reply.send(Err(err)),
    };
    reply.started();
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
        Ok(response) => {
            let compat = response
                .compat
                .filter(|c| c.validate().is_ok() && !c.is_unknown());
            finish_success(inner, &op, response.size_bytes, compat, &mut reply).await;
        }
        Err(err) => finish_failure(inner, &op, err, &mut reply).await,
    }
    // Only a shutdown gets here without an answer: the entry stays open and
    // the next start resolves it.
    reply.send(Err(Error::new(
        ErrorCode::DbError,
        "the snapshot manager shut down before the snapshot's outcome was recorded",
    )));
}

async fn finish_success(
    inner: &Arc<Engine>,
    op: &CreateOp,
    size_bytes: u64,
    compat: Option<HostInfo>,
    reply: &mut Reply<Template>,
) {
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
                let (op, compat) = (op.clone(), compat.clone());
                inner
                    .store
                    .finish_create(op, size_bytes, compat, lease, now)
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
async fn finish_failure(
    inner: &Arc<Engine>,
    op: &CreateOp,
    err: AgentError,
    reply: &mut Reply<Template>,
) {
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
    let failure = Failure {
        code: user_error.code().as_str(),
        message: user_error.message().to_owned(),
        detail: err.to_string(),
    };
    let recorded = inner
        .persist(
            "a failed snapshot",
            || {
                let (op, failure) = (op.clone(), failure.clone());
                let now = Timestamp::now();
                inner
                    .store
                    .fail_create(op, outcome, failure, first_attempt, now)
            },
            |db| reply.send(Err(unrecorded("the snapshot failed", db))),
        )
        .await;
    match recorded {
        None => {}
        Some(true) => {
            inner.wake.notify_one();
            reply.send(Err(user_error));
        }
        Some(false) => {
            // Someone else closed the entry first: an operator, or another
            // replica that adopted it while this one stalled and may have
            // rolled it forward. Report what it became.
            let result = inner
                .store
                .get_ready_template(op.template_id)
                .await
                .and_then(|t| t.ok_or(user_error));
            reply.send(result);
        }
    }
}

/// Whether `op` has been open longer than `resolve_deadline`.
fn past_deadline(inner: &Engine, op: &CreateOp) -> bool {
    after(op.created_at, inner.options.resolve_deadline) <= Timestamp::now()
}

/// Resolves `op` without its host's answer: the sandbox becomes `error`,
/// a create not yet rolled back is, its key stays queued (tried after the
/// late-write grace: an agent that cannot be asked may still be writing).
async fn resolve_by_deadline(inner: &Engine, op: &CreateOp, report: &mut WorkReport) -> Result<()> {
    let (id, now) = (op.id, Timestamp::now());
    let first_attempt = after(now, inner.options.late_write_grace);
    let resolved = inner
        .store
        .resolve_open_operation(
            id,
            SandboxStatus::Error,
            Actor::System,
            ResolveReason::Deadline,
            first_attempt,
            now,
        )
        .await?;
    if resolved.is_some() {
        tracing::warn!(operation = %op.id, sandbox = %op.sandbox_id,
            "the host did not answer before resolve_deadline; sandbox set to error");
        report.resolved_by_deadline += 1;
        inner.wake.notify_one();
    }
    Ok(())
}

async fn postpone(
    inner: &Engine,
    op: &CreateOp,
    why: String,
    report: &mut WorkReport,
) -> Result<()> {
    if past_deadline(inner, op) {
        return resolve_by_deadline(inner, op, report).await;
    }
    let (id, at, now) = (
        op.template_id,
        after(Timestamp::now(), backoff(&inner.options, op.attempts)),
        Timestamp::now(),
    );
    inner.store.postpone_operation(id, why, at, now).await?;
    report.postponed += 1;
    Ok(())
}

/// A create that nobody is driving any more: the agent may or may not have
/// written the snapshot. If the host lists the key (agents list only
/// complete snapshots), roll forward: the caller never got an answer, so
/// either outcome is allowed, and keeping the work is kinder. Otherwise
/// roll back. An agent without `ListSnapshots` gets the conservative path:
/// roll back and delete the key. A host marked offline cannot be asked:
/// roll back, and the sandbox is `missing` (an operator said the host is
/// gone). A host that cannot answer before `resolve_deadline` leaves the
/// sandbox `error`.
pub(crate) async fn resolve_interrupted(
    inner: &Arc<Engine>,
    op: &CreateOp,
    views: &HostViews,
    report: &mut WorkReport,
) -> Result<()> {
    let outcome = if views.offline(inner, op.host.id).await? {
        SandboxOutcome::Known(SandboxStatus::Missing)
    } else {
        let key = op.template_id.to_string();
        let held = match &*views.snapshots(inner, &op.host).await {
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
                .finish_create(op2, size_bytes, None, lease, now)
                .await?;
            match finished {
                Finish::Done(done) => {
                    tracing::info!(template = %op.template_id, "rolled an interrupted snapshot forward");
                    report.rolled_forward += 1;
                    if !done.replaced.is_empty() {
                        // The replaced files may be on other hosts: their
                        // deletions must not hold up this host's work.
                        let inner2 = inner.clone();
                        inner.tasks_spawn(async move {
                            delete_files(&inner2, done.replaced).await;
                        });
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
    if matches!(outcome, SandboxOutcome::Unknown { .. }) && past_deadline(inner, op) {
        return resolve_by_deadline(inner, op, report).await;
    }
    let applied = inner
        .roll_back(
            op,
            outcome,
            "interrupted",
            crate::operation::INTERRUPTED_MESSAGE.into(),
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
pub(crate) async fn resolve_status(
    inner: &Arc<Engine>,
    op: &CreateOp,
    views: &HostViews,
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
            let closed = inner.store.resolve_operation(op2, status, now).await?;
            if closed {
                tracing::info!(sandbox = %op.sandbox_id, %status, "sandbox status resolved from its host");
                report.statuses_resolved += 1;
                // Its half-written key may be deleted now.
                inner.wake.notify_one();
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
