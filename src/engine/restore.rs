//! The restore state machine (SPEC §7, §4a "Restore"): choose a host that
//! holds the template, is online and compatible; journal the restore with
//! the sandbox row `starting`; `CreateSandbox`; the sandbox `running`, or
//! its row gone and — when the VM may exist — a `DestroySandbox` queued
//! and retried until the host confirms. Also the recovery of restores
//! nobody drives any more, and the destroy queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::{Engine, HostViews, Reply, WorkReport, after, backoff, lock_unpoisoned};
use crate::agent::{
    AgentCode, AgentError, AgentTransport, CreateSandboxRequest, DestroySandboxRequest, HostInfo,
    HostTarget, SnapshotKey,
};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{OperationId, SandboxId};
use crate::model::{Caller, HostStatus, Sandbox, SandboxStatus, Template, TemplateType, Timestamp};
use crate::names::TemplateName;
use crate::store::{
    DeletionResult, Destroy, RestoreCandidate, RestoreEnd, RestoreInput, RestoreOp, Store,
};

/// What a caller asked to restore, validated (the manager's
/// `RestoreRequest`).
pub(crate) struct RestoreSpec {
    pub(crate) template: TemplateName,
    pub(crate) sandbox_id: Option<SandboxId>,
    pub(crate) vcpus: Option<u32>,
    pub(crate) memory_mb: Option<u32>,
    pub(crate) timeout_sec: u32,
    pub(crate) disk_size_mb: u32,
    /// The journal entry's id.
    pub(crate) operation_id: OperationId,
    /// The request to remember with it, if any.
    pub(crate) request: Option<crate::operation::RequestRecord>,
}

/// Marks a restore as driven by a task of this process while it lives.
struct RestoreGuard<'a> {
    inner: &'a Engine,
    id: OperationId,
}

impl<'a> RestoreGuard<'a> {
    fn new(inner: &'a Engine, id: OperationId) -> Self {
        lock_unpoisoned(&inner.restores_in_flight).insert(id);
        Self { inner, id }
    }
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        lock_unpoisoned(&self.inner.restores_in_flight).remove(&self.id);
        // Deletions of the template's files on this host may wait for it.
        self.inner.wake.notify_one();
    }
}

/// Asks `host` what it runs and caches the answer (`Some(None)`: an agent
/// without `GetHostInfo`, or with an unusable answer — recorded as unknown,
/// and allowed). `None` when it cannot answer now: whatever was cached
/// stands, and it is asked again next time. Takes what it needs by value so
/// that hosts can be asked on tasks of their own.
pub(crate) async fn ask_host_info(
    store: Arc<dyn Store>,
    transport: Arc<dyn AgentTransport>,
    timeout: Duration,
    host: HostTarget,
) -> Option<Option<HostInfo>> {
    let answer = async {
        let agent = transport.agent(&host)?;
        tokio::time::timeout(timeout, agent.host_info())
            .await
            .map_err(|_| AgentError::Timeout)?
    }
    .await;
    let info = match answer {
        Ok(info) => match info.validate() {
            Ok(()) => Some(info).filter(|i| !i.is_unknown()),
            Err(why) => {
                tracing::warn!(host = %host.id, why, "the host's GetHostInfo answer is unusable; compatibility unknown");
                None
            }
        },
        Err(AgentError::Rejected {
            code: AgentCode::Unimplemented,
            ..
        }) => {
            tracing::info!(host = %host.id, "the host agent has no GetHostInfo; compatibility unknown");
            None
        }
        Err(err) => {
            tracing::warn!(host = %host.id, error = %err, "cannot ask the host what it runs; will ask again");
            return None;
        }
    };
    if let Err(err) = store
        .set_host_info(host.id, info.clone(), Timestamp::now())
        .await
    {
        tracing::warn!(host = %host.id, error = ?err, "cannot cache the host's HostInfo");
    }
    Some(info)
}

/// The host to restore `template` on (SPEC §7 "Placement"): online,
/// holding it, compatible; the least loaded wins, ties at random.
async fn choose_host(inner: &Engine, template: &Template) -> Result<RestoreCandidate> {
    if template.template_type == TemplateType::Snapshot && template.hosts == 0 {
        return Err(Error::new(
            ErrorCode::HostUnavailable,
            "no host holds the snapshot's files",
        ));
    }
    let candidates = inner.store.restore_candidates(template.id).await?;
    let mut online: Vec<RestoreCandidate> = candidates
        .into_iter()
        .filter(|c| c.host.status == HostStatus::Online && !c.host.address.is_empty())
        .collect();
    if online.is_empty() {
        return Err(Error::new(
            ErrorCode::HostUnavailable,
            "no online host holds the template",
        ));
    }
    // Hosts not asked since they came online are asked now, together.
    let mut asks = JoinSet::new();
    for (i, c) in online.iter().enumerate().filter(|(_, c)| !c.info_known) {
        let target = HostTarget {
            id: c.host.id,
            address: c.host.address.clone(),
        };
        let (store, transport) = (inner.store.clone(), inner.transport.clone());
        let timeout = inner.options.list_timeout;
        asks.spawn(async move { (i, ask_host_info(store, transport, timeout, target).await) });
    }
    while let Some(joined) = asks.join_next().await {
        if let Ok((i, Some(info))) = joined {
            online[i].info = info;
        }
    }
    let policy = &inner.options.compat_policy;
    let mut reasons = Vec::new();
    let mut fit = Vec::new();
    for c in online {
        if template.compat.is_none() || c.info.is_none() {
            tracing::debug!(template = %template.id, host = %c.host.id,
                "compatibility unknown (no HostInfo on one side); allowed");
        }
        match policy.check(template.compat.as_ref(), c.info.as_ref()) {
            Ok(()) => fit.push(c),
            Err(why) => reasons.push(format!("host {}: {why}", c.host.id)),
        }
    }
    let Some(least) = fit.iter().map(|c| c.load).min() else {
        return Err(Error::new(
            ErrorCode::Incompatible,
            format!(
                "no online host that holds the template can restore it: {}",
                reasons.join("; ")
            ),
        ));
    };
    let mut best: Vec<RestoreCandidate> = fit.into_iter().filter(|c| c.load == least).collect();
    let pick = usize::from(uuid::Uuid::new_v4().as_bytes()[0]) % best.len();
    Ok(best.swap_remove(pick))
}

/// The sizes to ask for: the template's unless given; a snapshot's memory
/// cannot change (its memory image is that size).
fn sizes(template: &Template, spec: &RestoreSpec) -> Result<(u32, u32)> {
    let vcpus = spec.vcpus.unwrap_or(template.vcpus);
    let memory_mb = match spec.memory_mb {
        Some(m)
            if template.template_type == TemplateType::Snapshot
                && template.memory_mb != 0
                && m != template.memory_mb =>
        {
            return Err(Error::invalid_request(format!(
                "memory_mb of a snapshot cannot differ from the snapshot's ({} MiB)",
                template.memory_mb
            )));
        }
        Some(m) => m,
        None => template.memory_mb,
    };
    Ok((vcpus, memory_mb))
}

pub(crate) async fn run_restore(
    inner: &Arc<Engine>,
    caller: &Caller,
    spec: RestoreSpec,
    mut reply: Reply<Sandbox>,
) {
    let team = caller.team();
    let begun = async {
        let template = inner
            .store
            .find_visible(team, spec.template.clone())
            .await?
            .ok_or_else(|| Error::not_found("template not found"))?;
        let (vcpus, memory_mb) = sizes(&template, &spec)?;
        let host = choose_host(inner, &template).await?;
        let now = Timestamp::now();
        let op = RestoreOp {
            id: spec.operation_id,
            team,
            template_id: template.id,
            template_name: spec.template.clone(),
            // A fresh `sb-…` id unless given (`Default` generates one).
            sandbox_id: spec.sandbox_id.unwrap_or_default(),
            host: HostTarget {
                id: host.host.id,
                address: host.host.address.clone(),
            },
            vcpus,
            memory_mb,
            timeout_sec: spec.timeout_sec,
            disk_size_mb: spec.disk_size_mb,
            actor: caller.actor().clone(),
            attempts: 0,
            created_at: now,
        };
        let input = RestoreInput {
            op: op.clone(),
            placed: template.hosts > 0,
            lease_until: after(now, inner.create_lease()),
            owner: inner.instance,
            request: spec.request.clone(),
        };
        inner.store.begin_restore(input, now).await?;
        Ok::<_, Error>(op)
    }
    .await;
    let op = match begun {
        Ok(op) => op,
        Err(err) => return reply.send(Err(err)),
    };
    reply.started();
    let _guard = RestoreGuard::new(inner, op.id);
    tracing::debug!(sandbox = %op.sandbox_id, host = %op.host.id, template = %op.template_id,
        "restore started");

    let mut request =
        CreateSandboxRequest::new(op.sandbox_id, SnapshotKey::for_template(op.template_id));
    request.vcpus = op.vcpus;
    request.memory_mb = op.memory_mb;
    request.timeout_sec = op.timeout_sec;
    request.disk_size_mb = op.disk_size_mb;
    request.team_id = Some(op.team);
    request.template_id = Some(op.template_id);
    let called = async {
        let agent = inner.transport.agent(&op.host)?;
        tokio::time::timeout(inner.options.create_timeout, agent.create_sandbox(request))
            .await
            .map_err(|_| AgentError::Timeout)?
    }
    .await;
    let (end, failure) = match called {
        Ok(_) => (RestoreEnd::Running, None),
        Err(err) => {
            tracing::warn!(sandbox = %op.sandbox_id, host = %op.host.id, error = %err,
                "host agent failed to restore");
            let definite = err.is_not_sent() || err.is_definite_rejection();
            if definite {
                (failed(&err, None), Some(err))
            } else {
                match host_sees(inner, &op).await {
                    // The VM runs after all: it is the caller's.
                    Some(Seen::Alive) => (RestoreEnd::Running, Some(err)),
                    // Another team's (or template's) VM holds the id: ours
                    // cannot exist beside it, and that one is not ours to
                    // hand out or destroy.
                    Some(Seen::Foreign) => {
                        let err = AgentError::rejected(
                            AgentCode::AlreadyExists,
                            "another sandbox runs under this id on the host",
                        );
                        (failed(&err, None), Some(err))
                    }
                    // It may exist, or start late: the caller is told it
                    // failed, so it must not run on.
                    Some(Seen::Gone) | None => {
                        let from = after(
                            Timestamp::now(),
                            inner
                                .options
                                .late_write_grace
                                .min(inner.options.create_timeout),
                        );
                        (failed(&err, Some(from)), Some(err))
                    }
                }
            }
        }
    };
    let recorded = inner
        .persist(
            "a restore's outcome",
            || {
                inner
                    .store
                    .end_restore(op.clone(), end.clone(), Timestamp::now())
            },
            |db| {
                reply.send(Err(Error::new(
                    ErrorCode::DbError,
                    "the restore's outcome could not be recorded yet; the outcome is unknown \
                     until the store recovers",
                )
                .with_source(db.to_string())));
            },
        )
        .await;
    inner.wake.notify_one();
    let running = matches!(end, RestoreEnd::Running);
    match (recorded, failure) {
        (None, _) => reply.send(Err(Error::new(
            ErrorCode::DbError,
            "the snapshot manager shut down before the restore's outcome was recorded",
        ))),
        (Some(Some(sandbox)), _) if running => {
            tracing::info!(sandbox = %sandbox.id, host = %op.host.id, "sandbox restored");
            reply.send(Ok(sandbox));
        }
        (Some(Some(_)), Some(err)) => reply.send(Err(Error::from_restore_failure(err))),
        (Some(_), failure) => {
            // Closed by someone else first (a recovery pass of another
            // replica after this one stalled, or an earlier try of ours
            // whose commit was not acknowledged): report what it became.
            let current = inner.store.get_sandbox(op.sandbox_id).await;
            let rolled_back = matches!(&current, Ok(s) if !s.as_ref().is_some_and(|s| {
                s.team == op.team && s.status == SandboxStatus::Running
            }));
            if running && rolled_back {
                // Rolled back, yet this task saw the VM live (the host
                // started it after the other's look, or after that one's
                // destroy found nothing): the caller is told it failed,
                // so it must not run on. Destroyed from now on.
                let queued = inner
                    .persist(
                        "the destroy of a rolled-back restore's VM",
                        || {
                            let now = Timestamp::now();
                            inner.store.requeue_destroy(op.clone(), now, now)
                        },
                        |db| {
                            reply.send(Err(Error::new(
                                ErrorCode::DbError,
                                "the restore was rolled back meanwhile, and the destroy of its \
                                 VM could not be recorded yet",
                            )
                            .with_source(db.to_string())));
                        },
                    )
                    .await;
                let Some(queued) = queued else {
                    return reply.send(Err(Error::new(
                        ErrorCode::DbError,
                        "the snapshot manager shut down before the restore's outcome was recorded",
                    )));
                };
                if queued {
                    tracing::info!(sandbox = %op.sandbox_id, host = %op.host.id,
                        "a restore rolled back meanwhile started its VM after all: queued for destruction");
                    inner.wake.notify_one();
                }
            }
            reply.send(match current {
                Ok(Some(s)) if s.status == SandboxStatus::Running && s.team == op.team => Ok(s),
                Ok(_) => Err(failure.map_or_else(
                    || Error::conflict("the restore was rolled back meanwhile"),
                    Error::from_restore_failure,
                )),
                Err(err) => Err(err),
            });
        }
    }
}

fn failed(err: &AgentError, destroy_from: Option<Timestamp>) -> RestoreEnd {
    let told = Error::from_restore_failure(err.clone());
    RestoreEnd::Failed {
        error_code: told.code().as_str(),
        message: told.message().to_owned(),
        destroy_from,
    }
}

/// What a host's list shows of a restored sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Ours, and a VM that lives (running, still starting, or paused):
    /// the caller's sandbox.
    Alive,
    /// A VM under the id that the host says is another team's, or from
    /// another template: not ours (ours cannot exist beside it).
    Foreign,
    /// Not listed, or listed in another status (`error`, `stopped`, …):
    /// not one the caller can use; destroyed like one not listed.
    Gone,
}

fn seen(list: &crate::agent::SandboxList, op: &RestoreOp) -> Seen {
    let wanted = op.sandbox_id.to_string();
    let Some(s) = list.sandboxes.iter().find(|s| s.sandbox_id == wanted) else {
        return Seen::Gone;
    };
    // Agents that say whose a VM is (upstream's later fields) are believed;
    // one that does not say is taken to list ours.
    let differs = |said: &str, ours: String| !said.is_empty() && said != ours;
    if differs(&s.team_id, op.team.to_string())
        || differs(&s.template_id, op.template_id.to_string())
    {
        return Seen::Foreign;
    }
    match s.status.parse::<SandboxStatus>() {
        Ok(SandboxStatus::Running | SandboxStatus::Starting | SandboxStatus::Paused) => Seen::Alive,
        _ => Seen::Gone,
    }
}

/// What the host lists of the sandbox (`None`: it cannot say).
async fn host_sees(inner: &Engine, op: &RestoreOp) -> Option<Seen> {
    match inner.list_sandboxes(&op.host).await {
        Ok(list) => Some(seen(&list, op)),
        Err(err) => {
            tracing::warn!(host = %op.host.id, error = %err, "cannot ask the host whether the sandbox runs");
            None
        }
    }
}

/// A restore that nobody drives any more (its process crashed, or its
/// replica's lease ended): the host may or may not have started the VM.
/// Listed → `running`; not listed, or the host offline → the row goes and
/// a destroy is queued; the host unable to say → retried with backoff,
/// until `resolve_deadline` (then rolled back with a destroy queued).
pub(crate) async fn resolve_interrupted_restore(
    inner: &Arc<Engine>,
    op: &RestoreOp,
    views: &HostViews,
    report: &mut WorkReport,
) -> Result<()> {
    let grace = after(
        Timestamp::now(),
        inner
            .options
            .late_write_grace
            .min(inner.options.create_timeout),
    );
    let interrupted = |from| RestoreEnd::Failed {
        error_code: "interrupted",
        message: crate::operation::INTERRUPTED_MESSAGE.to_owned(),
        destroy_from: Some(from),
    };
    // Every destroy queued here waits out the grace first (a destroy
    // answered NotFound while a late CreateSandbox still boots the VM
    // would leave it running); a host coming back online skips backoff,
    // never that grace.
    let end = if views.offline(inner, op.host.id).await? {
        interrupted(grace)
    } else {
        match &*views.sandboxes(inner, &op.host).await {
            Ok(list) => match seen(list, op) {
                Seen::Alive => RestoreEnd::Running,
                // Not ours: nothing of ours to destroy under that id.
                Seen::Foreign => RestoreEnd::Failed {
                    error_code: "interrupted",
                    message: crate::operation::INTERRUPTED_MESSAGE.to_owned(),
                    destroy_from: None,
                },
                Seen::Gone => interrupted(grace),
            },
            Err(err) => {
                if after(op.created_at, inner.options.resolve_deadline) <= Timestamp::now() {
                    interrupted(grace)
                } else {
                    let why = format!("cannot list the host's sandboxes: {err}");
                    let at = after(Timestamp::now(), backoff(&inner.options, op.attempts));
                    inner
                        .store
                        .postpone_restore(op.id, why, at, Timestamp::now())
                        .await?;
                    report.postponed += 1;
                    return Ok(());
                }
            }
        }
    };
    let running = matches!(end, RestoreEnd::Running);
    if inner
        .store
        .end_restore(op.clone(), end, Timestamp::now())
        .await?
        .is_some()
    {
        if running {
            tracing::info!(sandbox = %op.sandbox_id, "an interrupted restore is running: kept");
            report.restores_kept += 1;
        } else {
            tracing::info!(sandbox = %op.sandbox_id, "rolled back an interrupted restore; its VM is queued for destruction");
            report.restores_rolled_back += 1;
        }
        inner.wake.notify_one();
    }
    Ok(())
}

/// Destroys sandboxes on their hosts in parallel and records each answer;
/// NotFound counts as done. Returns (confirmed, failed) counts.
pub(crate) async fn destroy_sandboxes(
    inner: &Arc<Engine>,
    targets: Vec<Destroy>,
) -> (usize, usize) {
    let mut calls = JoinSet::new();
    for target in targets {
        let inner = inner.clone();
        calls.spawn(async move {
            let result = async {
                let agent = inner.transport.agent(&target.host)?;
                let request = DestroySandboxRequest::new(target.sandbox_id);
                match tokio::time::timeout(inner.options.delete_timeout, agent.destroy_sandbox(request))
                    .await
                    .map_err(|_| AgentError::Timeout)?
                {
                    Err(AgentError::Rejected {
                        code: AgentCode::NotFound,
                        ..
                    }) => Ok(()),
                    other => other,
                }
            }
            .await;
            let now = Timestamp::now();
            let answer = match &result {
                Ok(()) => DeletionResult::Confirmed,
                Err(err) => {
                    tracing::warn!(sandbox = %target.sandbox_id, host = %target.host.id, error = %err,
                        "destroying a sandbox failed; queued for retry");
                    DeletionResult::Failed {
                        error: err.to_string(),
                        retry_at: after(now, backoff(&inner.options, target.attempts)),
                    }
                }
            };
            if let Err(db) = inner.store.record_destroy(target, answer, now).await {
                tracing::error!(error = ?db, "recording a destroy result failed; it will be retried");
            }
            result.is_ok()
        });
    }
    let (mut confirmed, mut failed) = (0, 0);
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok(true) => confirmed += 1,
            _ => failed += 1,
        }
    }
    if failed > 0 {
        inner.wake.notify_one();
    }
    (confirmed, failed)
}
