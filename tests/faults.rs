//! The fault matrix of issue 4: every way a host agent can fail (each
//! agent error code, unavailable — possibly delivered, or provably not
//! sent — a timeout — injected and real — and an undecodable answer), answered before doing anything (`Fault::Fail`) or
//! after doing the work (`Fault::FailAfter`), at each agent call of create,
//! overwrite and delete. For every case the caller gets the documented
//! error code (SPEC §3), and once the background worker has drained, the
//! invariants of SPEC §4a hold together with the end state the step
//! promises: no template and no key left by a failed create, the sandbox
//! status its host reports (or the previous one after a definite
//! rejection), an intact old template after a failed overwrite, and no
//! files left by a delete.
//!
//! Every case runs against two agents: ours, and one that behaves like the
//! original Go agent (lists only running VMs, reports every snapshot
//! failure as Internal, deletes a missing key successfully), and on each
//! store (SQLite and PostgreSQL, see [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::failure::{Failure, When};
use common::*;
use sandbox_snapshots::agent::AgentOp;
use sandbox_snapshots::*;

conformance!(
    create_snapshot_failures,
    list_sandboxes_failures_after_an_ambiguous_create,
    delete_failures_of_a_half_written_key,
    overwrite_failures_keep_the_old_template,
    failures_deleting_the_replaced_files,
    delete_snapshot_failures,
);

/// The create, list and delete timeouts of these tests.
const TIMEOUT: Duration = Duration::from_millis(300);

fn options() -> ManagerOptions {
    let mut o = fast_options();
    o.create_timeout = TIMEOUT;
    o.list_timeout = TIMEOUT;
    o.delete_timeout = TIMEOUT;
    o
}

/// What each failure means for a create and a delete ([`Failure`] and
/// [`When`] are shared with the restore matrix, in `common`).
impl Failure {
    /// What the caller of a create sees when `CreateSnapshot` fails so
    /// (SPEC §3): code and HTTP status. The Go agent answers every failure
    /// with Internal.
    fn create_error(self, mode: Mode) -> (ErrorCode, u16) {
        match self {
            Failure::NotSent => (ErrorCode::HostUnavailable, 503),
            Failure::Code(_) if mode == Mode::GoLike => (ErrorCode::AgentError, 502),
            Failure::Code(AgentCode::NotFound) => (ErrorCode::NotFound, 404),
            Failure::Code(AgentCode::InvalidArgument) => (ErrorCode::InvalidRequest, 400),
            Failure::Code(AgentCode::FailedPrecondition) => (ErrorCode::Conflict, 409),
            _ => (ErrorCode::AgentError, 502),
        }
    }

    /// Whether the manager may take the failure as definite: a rejection
    /// it can trust (the Go agent's codes all read as Internal), or a
    /// request that was never sent.
    fn definite_for(self, mode: Mode) -> bool {
        self == Failure::NotSent || (mode == Mode::Ours && self.definite())
    }

    /// The sandbox status after a create whose `CreateSnapshot` failed so,
    /// on a sandbox that was running: the previous status after a definite
    /// failure; otherwise what the memory agent reports — it pauses the
    /// VM before writing (so after the work, or during a call cut off by
    /// the timeout, it is paused) and does nothing on `Fail`. (The Go
    /// agent does not list the paused VM: it is taken to be paused.)
    fn status_after_create(self, when: When, mode: Mode) -> SandboxStatus {
        if self.definite_for(mode) {
            SandboxStatus::Running
        } else if when == When::After || self == Failure::Slow {
            SandboxStatus::Paused
        } else {
            SandboxStatus::Running
        }
    }

    /// What becomes of a deletion while every `DeleteSnapshot` call fails
    /// so.
    fn delete_outcome(self, when: When) -> DeleteOutcome {
        match (self, when) {
            // NotFound counts as deleted (SPEC §3).
            (Failure::Code(AgentCode::NotFound), When::Before) => DeleteOutcome::ConfirmedKeyLeft,
            (Failure::Code(AgentCode::NotFound), When::After) => DeleteOutcome::Confirmed,
            (_, When::Before) => DeleteOutcome::Retried,
            (_, When::After) => DeleteOutcome::DeletedThenConfirmed,
        }
    }
}

/// What becomes of a queued deletion while the agent's `DeleteSnapshot`
/// keeps failing one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeleteOutcome {
    /// The agent deleted the files and answered NotFound: confirmed.
    Confirmed,
    /// The agent answered NotFound without deleting: the manager takes the
    /// host's word (the files are gone as far as it can know) and never
    /// asks again; the key stays on this lying agent.
    ConfirmedKeyLeft,
    /// Every attempt fails and the key stays; the deletion stays queued
    /// and is retried until the host answers.
    Retried,
    /// The first attempt deletes the key and fails; a retry hears NotFound
    /// and confirms, even while the fault lasts.
    DeletedThenConfirmed,
}

impl DeleteOutcome {
    fn confirmed_at_once(self) -> bool {
        matches!(self, Self::Confirmed | Self::ConfirmedKeyLeft)
    }
}

fn keys(env: &Env) -> BTreeSet<String> {
    env.agent.snapshot_keys().into_iter().collect()
}

fn set<const N: usize>(items: [&TemplateId; N]) -> BTreeSet<String> {
    items.iter().map(ToString::to_string).collect()
}

async fn audit(env: &Env, team: TeamId) -> Vec<AuditEntry> {
    env.manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap()
        .items
}

async fn get(env: &Env, team: TeamId, n: &str) -> Result<Template> {
    env.manager.get(&caller(team), &name(n)).await
}

/// Checks the error of a failed create: code, status, and no agent text.
fn check_create_error(case: &str, err: &Error, failure: Failure, mode: Mode) {
    assert_eq!(
        (err.code(), err.http_status()),
        failure.create_error(mode),
        "{case}: {err:?}"
    );
    assert!(
        !err.message().contains("injected"),
        "{case}: the agent's text leaked: {err:?}"
    );
}

/// Checks the audit entry of a failed create and returns the template id
/// it names (the key the agent was asked to write).
fn check_failure_entry(case: &str, entry: &AuditEntry, err: &Error, n: &str) -> String {
    assert_eq!(entry.action, actions::SNAPSHOT_CREATE, "{case}: {entry:?}");
    assert_eq!(entry.outcome, AuditOutcome::Failure, "{case}: {entry:?}");
    assert_eq!(
        entry.error_code.as_deref(),
        Some(err.code().as_str()),
        "{case}: {entry:?}"
    );
    assert_eq!(entry.metadata["name"], n, "{case}: {entry:?}");
    assert!(
        TemplateId::parse(&entry.resource_id).is_ok(),
        "{case}: keyed by template id: {entry:?}"
    );
    entry.resource_id.clone()
}

/// A manager on `backend` with a `mode` agent, a team with two running
/// sandboxes, and a template "snap" made from the first.
async fn with_snap(
    backend: &Backend,
    mode: Mode,
    case: &str,
) -> (Env, TeamId, (SandboxId, SandboxId), Template) {
    let env = Env::on(backend, options(), mode).await;
    let team = TeamId::new();
    let (first, second) = (env.sandbox(team).await, env.sandbox(team).await);
    let snap = env.create(team, first, "snap").await.expect(case);
    (env, team, (first, second), snap)
}

/// After the drain, the host holds `kept`'s key alone and the invariants
/// hold — except after an agent that answered NotFound without deleting,
/// where `deleted`'s key is left beside it.
async fn check_keys_after_drain(
    env: &Env,
    team: TeamId,
    case: &str,
    outcome: DeleteOutcome,
    kept: &Template,
    deleted: &Template,
) {
    if outcome == DeleteOutcome::ConfirmedKeyLeft {
        assert_eq!(keys(env), set([&kept.id, &deleted.id]), "{case}");
    } else {
        assert_invariants(env, &[team]).await;
        assert_eq!(keys(env), set([&kept.id]), "{case}");
    }
}

/// Waits until a queued deletion has failed at least once (the injected
/// fault was hit), driving the worker meanwhile.
async fn deletion_attempted(env: &Env, case: &str) {
    eventually(case, || async {
        let _ = env.manager.run_pending_work().await;
        env.manager
            .pending_deletions()
            .await
            .unwrap()
            .iter()
            .any(|d| d.attempts >= 1 && d.last_error.is_some())
    })
    .await;
}

#[test]
fn definite_rejections_are_the_documented_ones() {
    for code in CODES {
        let failure = Failure::Code(code);
        assert_eq!(
            AgentError::rejected(code, "x").is_definite_rejection(),
            failure.definite(),
            "{code:?}"
        );
    }
    for err in [
        AgentError::unavailable("x"),
        AgentError::Timeout,
        AgentError::Protocol {
            message: "x".into(),
        },
    ] {
        assert!(!err.is_definite_rejection(), "{err:?}");
    }
}

/// Step: the `CreateSnapshot` call of a plain create.
async fn create_snapshot_failures(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: CreateSnapshot {failure:?} {when:?}");
        let env = Env::on(&backend, options(), mode).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        env.agent
            .inject_times(AgentOp::CreateSnapshot, failure.fault(when), 1);

        let err = env.create(team, sb, "snap").await.expect_err(&case);
        check_create_error(&case, &err, failure, mode);
        assert!(env.names(team).await.is_empty(), "{case}");
        assert_eq!(
            get(&env, team, "snap").await.unwrap_err().code(),
            ErrorCode::NotFound,
            "{case}"
        );
        let entries = audit(&env, team).await;
        assert_eq!(entries.len(), 1, "{case}: {entries:?}");
        let key = check_failure_entry(&case, &entries[0], &err, "snap");
        // The key may have been written (FailAfter): while it is on the
        // host it is queued for deletion (read in this order, the worker
        // deleting it meanwhile cannot make this fail).
        let queued = env
            .manager
            .pending_deletions()
            .await
            .unwrap()
            .iter()
            .any(|d| d.template_id.to_string() == key);
        let present = env.agent.has_snapshot(&key);
        assert!(queued || !present, "{case}: half-written key not queued");
        if failure == Failure::NotSent {
            // Nothing reached the host: the sandbox is released at once,
            // nothing is queued, nobody asks the host anything.
            assert!(!queued, "{case}");
            assert_eq!(
                env.sandbox_status(sb).await,
                SandboxStatus::Running,
                "{case}"
            );
            assert_eq!(env.agent.calls(AgentOp::ListSandboxes), 0, "{case}");
            assert_eq!(
                env.count("SELECT count(*) FROM operations").await,
                0,
                "{case}"
            );
        }
        if when == When::After {
            // The audit names the key the agent wrote: it is still there,
            // or the worker already deleted it.
            assert!(
                present || env.agent.calls(AgentOp::DeleteSnapshot) >= 1,
                "{case}: audited {key}, host has {:?}",
                keys(&env)
            );
        }

        drain(&env).await;
        assert_invariants(&env, &[team]).await;
        assert!(env.names(team).await.is_empty(), "{case}");
        assert!(keys(&env).is_empty(), "{case}: key left: {:?}", keys(&env));
        let expected = failure.status_after_create(when, mode);
        assert_eq!(env.sandbox_status(sb).await, expected, "{case}");
        if !failure.definite_for(mode) {
            assert_eq!(
                env.agent.sandbox_status(sb).as_deref(),
                Some(expected.as_str()),
                "{case}: the status the host reports"
            );
        }
        assert_eq!(audit(&env, team).await.len(), 1, "{case}");
        // The sandbox is usable again.
        env.create(team, sb, "again").await.expect(&case);
    }
}

/// Step: the `ListSandboxes` call the manager makes after an ambiguous
/// `CreateSnapshot` failure (the agent paused the VM, wrote the key and
/// answered Internal).
async fn list_sandboxes_failures_after_an_ambiguous_create(backend: Backend) {
    let cases = Mode::ALL
        .iter()
        .flat_map(|mode| Failure::all().into_iter().map(move |f| (*mode, f)));
    for (mode, failure) in cases {
        let case = format!("{mode:?}: ListSandboxes {failure:?}");
        let env = Env::on(&backend, options(), mode).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        env.agent.inject_times(
            AgentOp::CreateSnapshot,
            Failure::Code(AgentCode::Internal).fault(When::After),
            1,
        );
        env.agent
            .inject(AgentOp::ListSandboxes, failure.fault(When::Before));

        let err = env.create(team, sb, "snap").await.expect_err(&case);
        check_create_error(&case, &err, Failure::Code(AgentCode::Internal), mode);
        assert!(env.agent.calls(AgentOp::ListSandboxes) >= 1, "{case}");
        // The host cannot say, so the sandbox stays owned by the operation
        // and out of new ones; the template is gone and the failure audited.
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Snapshotting,
            "{case}"
        );
        assert_eq!(
            env.count("SELECT count(*) FROM operations").await,
            1,
            "{case}: the operation stays open"
        );
        let refused = env.create(team, sb, "other").await.expect_err(&case);
        assert_eq!(refused.code(), ErrorCode::InvalidState, "{case}");
        assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 1, "{case}");
        assert!(env.names(team).await.is_empty(), "{case}");
        let entries = audit(&env, team).await;
        assert_eq!(entries.len(), 1, "{case}: {entries:?}");
        check_failure_entry(&case, &entries[0], &err, "snap");
        assert_invariants(&env, &[team]).await;

        drain(&env).await;
        assert_invariants(&env, &[team]).await;
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Paused,
            "{case}"
        );
        assert_eq!(
            env.count("SELECT count(*) FROM operations").await,
            0,
            "{case}"
        );
        assert!(keys(&env).is_empty(), "{case}: key left: {:?}", keys(&env));
        assert!(env.names(team).await.is_empty(), "{case}");
        assert_eq!(audit(&env, team).await.len(), 1, "{case}");
    }
}

/// Step: the `DeleteSnapshot` of the key a failed create half wrote.
async fn delete_failures_of_a_half_written_key(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: DeleteSnapshot of a half-written key: {failure:?} {when:?}");
        let outcome = failure.delete_outcome(when);
        let env = Env::on(&backend, options(), mode).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        env.agent.inject_times(
            AgentOp::CreateSnapshot,
            Failure::Code(AgentCode::Internal).fault(When::After),
            1,
        );
        env.agent
            .inject(AgentOp::DeleteSnapshot, failure.fault(when));

        let err = env.create(team, sb, "snap").await.expect_err(&case);
        check_create_error(&case, &err, Failure::Code(AgentCode::Internal), mode);
        let key = check_failure_entry(&case, &audit(&env, team).await[0], &err, "snap");
        assert!(
            env.agent.has_snapshot(&key) || env.agent.calls(AgentOp::DeleteSnapshot) >= 1,
            "{case}: the half-written key is {key}"
        );

        if outcome == DeleteOutcome::Retried {
            // Each attempt fails; the key stays queued with the error.
            deletion_attempted(&env, &case).await;
            let pending = env.manager.pending_deletions().await.unwrap();
            assert_eq!(pending.len(), 1, "{case}: {pending:?}");
            assert_eq!(pending[0].template_id.to_string(), key, "{case}");
            assert_eq!(pending[0].host, env.host, "{case}");
            assert!(env.agent.has_snapshot(&key), "{case}");
        } else {
            // Confirmed, at once or on a retry, while the fault lasts.
            eventually(&case, || async {
                let _ = env.manager.run_pending_work().await;
                env.manager.pending_deletions().await.unwrap().is_empty()
            })
            .await;
            let expected = if outcome == DeleteOutcome::DeletedThenConfirmed {
                2
            } else {
                1
            };
            assert!(
                env.agent.calls(AgentOp::DeleteSnapshot) >= expected,
                "{case}"
            );
            assert_eq!(
                env.agent.has_snapshot(&key),
                outcome == DeleteOutcome::ConfirmedKeyLeft,
                "{case}"
            );
        }

        drain(&env).await;
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Paused,
            "{case}"
        );
        assert!(env.names(team).await.is_empty(), "{case}");
        if outcome == DeleteOutcome::ConfirmedKeyLeft {
            // The manager does not keep asking a host that said NotFound.
            let calls = env.agent.calls(AgentOp::DeleteSnapshot);
            env.manager.run_pending_work().await.unwrap();
            assert_eq!(env.agent.calls(AgentOp::DeleteSnapshot), calls, "{case}");
        } else {
            assert_invariants(&env, &[team]).await;
            assert!(keys(&env).is_empty(), "{case}: key left: {:?}", keys(&env));
        }
    }
}

/// Step: the `CreateSnapshot` call of an overwrite. The old template must
/// stay intact: listed, gettable, its files on the host.
async fn overwrite_failures_keep_the_old_template(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: overwrite, CreateSnapshot {failure:?} {when:?}");
        let (env, team, (sb_old, sb), old) = with_snap(&backend, mode, &case).await;
        env.agent
            .inject_times(AgentOp::CreateSnapshot, failure.fault(when), 1);

        let err = env.overwrite(team, sb, "snap").await.expect_err(&case);
        check_create_error(&case, &err, failure, mode);
        assert_eq!(get(&env, team, "snap").await.expect(&case), old, "{case}");
        let entries = audit(&env, team).await;
        assert_eq!(entries.len(), 2, "{case}: {entries:?}");
        let key = check_failure_entry(&case, &entries[0], &err, "snap");
        assert_ne!(key, old.id.to_string(), "{case}");
        assert_eq!(entries[1].outcome, AuditOutcome::Success, "{case}");

        drain(&env).await;
        assert_invariants(&env, &[team]).await;
        assert_eq!(env.names(team).await, vec!["snap"], "{case}");
        assert_eq!(get(&env, team, "snap").await.expect(&case), old, "{case}");
        assert_eq!(keys(&env), set([&old.id]), "{case}");
        let placements = env
            .manager
            .placements(&caller(team), &name("snap"))
            .await
            .unwrap();
        assert_eq!(placements.len(), 1, "{case}: {placements:?}");
        assert_eq!(
            (placements[0].host, placements[0].state.as_str()),
            (env.host, "present"),
            "{case}"
        );
        assert_eq!(
            env.sandbox_status(sb).await,
            failure.status_after_create(when, mode),
            "{case}"
        );
        assert_eq!(
            env.sandbox_status(sb_old).await,
            SandboxStatus::Paused,
            "{case}"
        );
        assert_eq!(audit(&env, team).await.len(), 2, "{case}");
        // The old template can still be overwritten.
        let new = env.overwrite(team, sb, "snap").await.expect(&case);
        drain(&env).await;
        assert_eq!(keys(&env), set([&new.id]), "{case}");
    }
}

/// Step: the `DeleteSnapshot` of the old files after a successful
/// overwrite. The caller gets the new template; the old files go when the
/// host confirms.
async fn failures_deleting_the_replaced_files(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: DeleteSnapshot of replaced files: {failure:?} {when:?}");
        let outcome = failure.delete_outcome(when);
        let (env, team, (_, sb), old) = with_snap(&backend, mode, &case).await;
        env.agent
            .inject(AgentOp::DeleteSnapshot, failure.fault(when));

        let new = env.overwrite(team, sb, "snap").await.expect(&case);
        assert_ne!(new.id, old.id, "{case}");
        assert!(env.agent.calls(AgentOp::DeleteSnapshot) >= 1, "{case}");
        assert_eq!(env.names(team).await, vec!["snap"], "{case}");
        assert_eq!(get(&env, team, "snap").await.expect(&case), new, "{case}");
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Paused,
            "{case}"
        );
        let pending = env.manager.pending_deletions().await.unwrap();
        match outcome {
            DeleteOutcome::Retried => {
                assert_eq!(pending.len(), 1, "{case}: {pending:?}");
                assert_eq!(pending[0].template_id, old.id, "{case}");
                assert!(env.agent.has_snapshot(&old.id.to_string()), "{case}");
            }
            DeleteOutcome::Confirmed | DeleteOutcome::ConfirmedKeyLeft => {
                assert!(pending.is_empty(), "{case}: {pending:?}");
            }
            DeleteOutcome::DeletedThenConfirmed => {}
        }
        let entries = audit(&env, team).await;
        assert_eq!(entries.len(), 2, "{case}: {entries:?}");
        assert_eq!(entries[0].outcome, AuditOutcome::Success, "{case}");
        assert_eq!(entries[0].resource_id, new.id.to_string(), "{case}");
        assert_eq!(
            entries[0].metadata["replaced"],
            old.id.to_string(),
            "{case}"
        );

        drain(&env).await;
        assert_eq!(env.names(team).await, vec!["snap"], "{case}");
        assert_eq!(get(&env, team, "snap").await.expect(&case), new, "{case}");
        check_keys_after_drain(&env, team, &case, outcome, &new, &old).await;
    }
}

/// Step: the `DeleteSnapshot` call of a delete. The delete succeeds at
/// once (the template leaves get/list and frees its name); the files go
/// when the host confirms.
async fn delete_snapshot_failures(backend: Backend) {
    for (mode, failure, when) in Failure::matrix() {
        let case = format!("{mode:?}: delete, DeleteSnapshot {failure:?} {when:?}");
        let outcome = failure.delete_outcome(when);
        let (env, team, (_, sb2), t) = with_snap(&backend, mode, &case).await;
        env.agent
            .inject(AgentOp::DeleteSnapshot, failure.fault(when));

        let deleted = env
            .manager
            .delete(&caller(team), &name("snap"))
            .await
            .expect(&case);
        assert_eq!(deleted.template, t, "{case}");
        if outcome.confirmed_at_once() {
            assert_eq!(deleted.hosts_confirmed, vec![env.host], "{case}");
            assert!(deleted.hosts_pending.is_empty(), "{case}");
            let pending = env.manager.pending_deletions().await.unwrap();
            assert!(pending.is_empty(), "{case}: {pending:?}");
        } else {
            assert_eq!(deleted.hosts_pending, vec![env.host], "{case}");
            assert!(deleted.hosts_confirmed.is_empty(), "{case}");
        }
        if outcome == DeleteOutcome::Retried {
            let pending = env.manager.pending_deletions().await.unwrap();
            assert_eq!(pending.len(), 1, "{case}: {pending:?}");
            assert_eq!(pending[0].template_id, t.id, "{case}");
            assert!(pending[0].attempts >= 1, "{case}: {pending:?}");
            assert!(env.agent.has_snapshot(&t.id.to_string()), "{case}");
        }
        assert!(env.names(team).await.is_empty(), "{case}");
        assert_eq!(
            get(&env, team, "snap").await.unwrap_err().code(),
            ErrorCode::NotFound,
            "{case}"
        );
        let entries = audit(&env, team).await;
        assert_eq!(entries.len(), 2, "{case}: {entries:?}");
        assert_eq!(entries[0].action, actions::SNAPSHOT_DELETE, "{case}");
        assert_eq!(entries[0].outcome, AuditOutcome::Success, "{case}");
        assert_eq!(entries[0].resource_id, t.id.to_string(), "{case}");
        assert_eq!(entries[0].metadata["name"], "snap", "{case}");
        // The name is free at once.
        let again = env.create(team, sb2, "snap").await.expect(&case);

        drain(&env).await;
        assert!(
            env.manager.pending_deletions().await.unwrap().is_empty(),
            "{case}"
        );
        assert_eq!(env.names(team).await, vec!["snap"], "{case}");
        check_keys_after_drain(&env, team, &case, outcome, &again, &t).await;
    }
}
