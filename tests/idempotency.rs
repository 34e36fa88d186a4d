//! Idempotency keys and asynchronous operations (SPEC §8) through the
//! library, on each store (see [`conformance!`]): a retry with the same key
//! and request returns the first outcome (a failure included) without
//! calling the host again; while the first runs it is 409; another request
//! under the key is 422; keys are per team and expire; an asynchronous
//! start answers at once and is polled to `succeeded` or `failed`; and on
//! PostgreSQL two replicas given the same key at once call the host once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    a_retry_with_the_same_key_returns_the_first_outcome,
    a_key_is_in_progress_while_its_first_request_runs,
    asynchronous_creates_and_restores_are_polled_to_their_end,
    remembered_requests_expire_and_are_purged,
    a_lost_answer_is_replayed_as_what_the_journal_decided,
);

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).unwrap()
}

fn snapshot(sandbox: SandboxId, name: &str, k: &str) -> NewSnapshot {
    NewSnapshot::parse(&sandbox.to_string(), name)
        .unwrap()
        .idempotency_key(key(k))
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T>, code: ErrorCode) -> Error {
    let err = result.expect_err("an error");
    assert_eq!(err.code(), code, "{err:?}");
    err
}

async fn a_retry_with_the_same_key_returns_the_first_outcome(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let (team, other) = (TeamId::new(), TeamId::new());
    let me = caller(team);
    let sandbox = env.sandbox(team).await;
    let calls = || env.agent.calls(AgentOp::CreateSnapshot);

    let first = env
        .manager
        .create(&me, snapshot(sandbox, "keyed", "k-1"))
        .await
        .unwrap();
    assert_eq!(calls(), 1);
    let again = env
        .manager
        .create(&me, snapshot(sandbox, "keyed", "k-1"))
        .await
        .unwrap();
    assert_eq!(again, first, "the first answer, replayed");
    assert_eq!(calls(), 1, "the host is not asked again");

    // The first answer even once the template is gone.
    env.manager.delete(&me, &name("keyed")).await.unwrap();
    let after_delete = env
        .manager
        .create(&me, snapshot(sandbox, "keyed", "k-1"))
        .await
        .unwrap();
    assert_eq!(after_delete, first);
    assert_eq!(calls(), 1);

    // Another request under the key: 422, and nothing done.
    let reused = env
        .manager
        .create(&me, snapshot(sandbox, "other-name", "k-1"))
        .await;
    assert_code(reused, ErrorCode::IdempotencyKeyReused);
    let overwrite = env
        .manager
        .create(&me, snapshot(sandbox, "keyed", "k-1").overwrite(true))
        .await;
    assert_code(overwrite, ErrorCode::IdempotencyKeyReused);
    assert_eq!(calls(), 1);

    // Keys are per team: another team's same key is its own request.
    let theirs = env.sandbox(other).await;
    let t = env
        .manager
        .create(&caller(other), snapshot(theirs, "keyed", "k-1"))
        .await
        .unwrap();
    assert_eq!((t.team, calls()), (other, 2));

    // A generated name is generated once: the retry is the same request.
    let generated = || NewSnapshot::new(sandbox, None).idempotency_key(key("k-generated"));
    let g1 = env.manager.create(&me, generated()).await.unwrap();
    let g2 = env.manager.create(&me, generated()).await.unwrap();
    assert_eq!((g1.id, &g1.name), (g2.id, &g2.name));
    assert_eq!(calls(), 3);

    // A failure is an answer too: replayed, not retried on the host.
    env.agent.inject(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "disk on fire")),
    );
    let failed = env
        .manager
        .create(&me, snapshot(sandbox, "fails", "k-fail"))
        .await;
    let failed = assert_code(failed, ErrorCode::AgentError);
    env.agent.clear_faults();
    let replayed = env
        .manager
        .create(&me, snapshot(sandbox, "fails", "k-fail"))
        .await;
    let replayed = assert_code(replayed, ErrorCode::AgentError);
    assert_eq!(replayed.message(), failed.message());
    assert_eq!(calls(), 4, "the failed call, once");
    assert!(env.manager.get(&me, &name("fails")).await.is_err());

    // A refusal that opened no operation is not remembered: fixed, the
    // retry runs.
    let missing = SandboxId::new();
    let refused = env
        .manager
        .create(&me, snapshot(missing, "later", "k-refused"))
        .await;
    assert_code(refused, ErrorCode::NotFound);
    assert_eq!(calls(), 4);

    // Restores the same way.
    let restore = || RestoreRequest::new(name("keyed")).idempotency_key(key("r-1"));
    env.manager
        .create(
            &me,
            NewSnapshot::parse(&sandbox.to_string(), "keyed").unwrap(),
        )
        .await
        .unwrap();
    let s1 = env.manager.restore(&me, restore()).await.unwrap();
    let s2 = env.manager.restore(&me, restore()).await.unwrap();
    assert_eq!(s1, s2);
    assert_eq!(env.agent.calls(AgentOp::CreateSandbox), 1);
    let other_size = env.manager.restore(&me, restore().vcpus(1)).await;
    assert_code(other_size, ErrorCode::IdempotencyKeyReused);
    // A create's key and a restore's are one namespace per team.
    let crossed = env
        .manager
        .create(&me, snapshot(sandbox, "keyed", "r-1"))
        .await;
    assert_code(crossed, ErrorCode::IdempotencyKeyReused);
    assert_eq!(env.agent.calls(AgentOp::CreateSandbox), 1);
}

async fn a_key_is_in_progress_while_its_first_request_runs(backend: Backend) {
    let env = Env::new_on(&backend).await;
    // On PostgreSQL the retries go through a second replica too.
    let second = match &backend {
        Backend::Postgres(_) => Some(
            env.store
                .open(env.transport.clone(), env.options.clone())
                .await
                .unwrap(),
        ),
        Backend::Sqlite => None,
    };
    let team = TeamId::new();
    let sandbox = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let first = env.spawn_create(team, snapshot(sandbox, "slow", "k-slow"));
    hold.arrived(1).await;
    for manager in std::iter::once(&env.manager).chain(second.as_ref()) {
        let busy = manager
            .create(&caller(team), snapshot(sandbox, "slow", "k-slow"))
            .await;
        assert_code(busy, ErrorCode::IdempotencyInProgress);
    }
    hold.release();
    let template = first.await.unwrap().unwrap();
    for manager in std::iter::once(&env.manager).chain(second.as_ref()) {
        let replay = manager
            .create(&caller(team), snapshot(sandbox, "slow", "k-slow"))
            .await
            .unwrap();
        assert_eq!(replay.id, template.id);
    }
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 1);

    // Two managers given one key at the same moment: the host is asked
    // once, and each caller gets the outcome or 409.
    if let Some(second) = &second {
        for round in 0..5 {
            let sandbox = env.sandbox(team).await;
            let k = format!("k-race-{round}");
            let before = env.agent.calls(AgentOp::CreateSnapshot);
            let name = format!("race-{round}");
            let (me_a, me_b) = (caller(team), caller(team));
            let (a, b) = tokio::join!(
                env.manager.create(&me_a, snapshot(sandbox, &name, &k)),
                second.create(&me_b, snapshot(sandbox, &name, &k)),
            );
            assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), before + 1);
            let oks: Vec<_> = [&a, &b].into_iter().filter(|r| r.is_ok()).collect();
            assert!(!oks.is_empty(), "{a:?} {b:?}");
            for r in [&a, &b] {
                if let Err(err) = r {
                    assert_eq!(err.code(), ErrorCode::IdempotencyInProgress, "{err:?}");
                }
            }
        }
        second.shutdown().await;
    }
}

async fn poll(env: &Env, team: TeamId, id: OperationId) -> Operation {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let op = env.manager.operation(&caller(team), id).await.unwrap();
        if op.state != OperationState::Running {
            return op;
        }
        assert!(tokio::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn asynchronous_creates_and_restores_are_polled_to_their_end(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let (team, other) = (TeamId::new(), TeamId::new());
    let me = caller(team);
    let sandbox = env.sandbox(team).await;

    // A slow agent: the start answers while the host still works.
    let hold = Hold::new();
    env.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let started = env
        .manager
        .start_create(
            &me,
            NewSnapshot::parse(&sandbox.to_string(), "async").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (started.kind, started.state),
        (OperationKind::SnapshotCreate, OperationState::Running)
    );
    hold.arrived(1).await;
    let running = env.manager.operation(&me, started.id).await.unwrap();
    assert_eq!(running.state, OperationState::Running);
    assert!(running.template.is_none() && running.error.is_none());
    let foreign = env.manager.operation(&caller(other), started.id).await;
    assert_code(foreign, ErrorCode::NotFound);
    let unknown = env.manager.operation(&me, OperationId::new()).await;
    assert_code(unknown, ErrorCode::NotFound);
    hold.release();
    let done = poll(&env, team, started.id).await;
    assert_eq!(done.state, OperationState::Succeeded);
    let template = done.template.expect("the template");
    assert_eq!(
        template,
        env.manager.get(&me, &name("async")).await.unwrap()
    );
    assert!(done.finished_at.is_some() && done.error.is_none());

    // A failing agent: `failed` with the error the caller would have got.
    env.agent.clear_faults();
    env.agent.inject(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::FailedPrecondition, "busy")),
    );
    let started = env
        .manager
        .start_create(
            &me,
            NewSnapshot::parse(&sandbox.to_string(), "async-fails").unwrap(),
        )
        .await
        .unwrap();
    let failed = poll(&env, team, started.id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let err = failed.error.expect("the error");
    assert_eq!(err.code(), ErrorCode::Conflict, "{err:?}");
    assert!(failed.template.is_none());

    // What is wrong before it starts is answered at once.
    let missing = env
        .manager
        .start_create(
            &me,
            NewSnapshot::parse(&SandboxId::new().to_string(), "nope").unwrap(),
        )
        .await;
    assert_code(missing, ErrorCode::NotFound);
    let taken = env
        .manager
        .start_create(
            &me,
            NewSnapshot::parse(&sandbox.to_string(), "async").unwrap(),
        )
        .await;
    assert_code(taken, ErrorCode::AlreadyExists);

    // A restore, started and polled; with a key, a retry is the same
    // operation.
    env.agent.clear_faults();
    let restore = || RestoreRequest::new(name("async")).idempotency_key(key("r-async"));
    let started = env.manager.start_restore(&me, restore()).await.unwrap();
    assert_eq!(started.kind, OperationKind::SandboxRestore);
    let done = poll(&env, team, started.id).await;
    let sandbox = done.sandbox.expect("the sandbox");
    assert_eq!(sandbox.status, SandboxStatus::Running);
    assert_eq!(
        env.manager.sandbox(&me, sandbox.id).await.unwrap().status,
        SandboxStatus::Running
    );
    let again = env.manager.start_restore(&me, restore()).await.unwrap();
    assert_eq!(
        (again.id, again.state),
        (started.id, OperationState::Succeeded)
    );
    // The synchronous call with the same key gets the outcome.
    assert_eq!(env.manager.restore(&me, restore()).await.unwrap(), sandbox);
    assert_eq!(env.agent.calls(AgentOp::CreateSandbox), 1);
}

async fn remembered_requests_expire_and_are_purged(backend: Backend) {
    let mut options = fast_options();
    options.request_retention = Duration::from_millis(400);
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let me = caller(team);
    let sandbox = env.sandbox(team).await;
    let keyed = || snapshot(sandbox, "expiring", "k-exp").overwrite(true);
    let first = env.manager.create(&me, keyed()).await.unwrap();
    let op = env
        .manager
        .start_create(&me, snapshot(sandbox, "polled", "k-op"))
        .await
        .unwrap();
    poll(&env, team, op.id).await;
    assert_eq!(env.manager.create(&me, keyed()).await.unwrap().id, first.id);
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Forgotten: the same key is a new request, and the operation is gone.
    let second = env.manager.create(&me, keyed()).await.unwrap();
    assert_ne!(second.id, first.id);
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 3);
    let gone = env.manager.operation(&me, op.id).await;
    assert_code(gone, ErrorCode::NotFound);
    // The worker purges what expired (the new request's row expires too).
    eventually("expired requests purged", || async {
        env.count("SELECT count(*) FROM requests").await == 0
    })
    .await;
}

/// Against both kinds of agent, a create whose answer was lost (the work
/// done, the reply gone): the caller is told what the journal decided (a
/// failure, rolled back with its key queued for deletion: an ambiguous
/// failure, once reported, never takes effect), and a retry with the key
/// gets exactly that again, without a second snapshot; an asynchronous
/// start ends the same way, and what it shows is what happened.
async fn a_lost_answer_is_replayed_as_what_the_journal_decided(backend: Backend) {
    for mode in Mode::ALL {
        let env = Env::on(&backend, fast_options(), mode).await;
        let team = TeamId::new();
        let me = caller(team);
        let sandbox = env.sandbox(team).await;
        let lost = AgentError::unavailable("connection reset by peer");
        env.agent
            .inject_times(AgentOp::CreateSnapshot, Fault::FailAfter(lost.clone()), 2);
        let first = env
            .manager
            .create(&me, snapshot(sandbox, "lost", "k-lost"))
            .await;
        let again = env
            .manager
            .create(&me, snapshot(sandbox, "lost", "k-lost"))
            .await;
        match (&first, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{mode:?}"),
            (Err(a), Err(b)) => {
                assert_eq!((a.code(), a.message()), (b.code(), b.message()), "{mode:?}")
            }
            _ => panic!("{mode:?}: {first:?} then {again:?}"),
        }
        assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 1, "{mode:?}");
        assert_eq!(
            env.manager.get(&me, &name("lost")).await.is_ok(),
            first.is_ok(),
            "{mode:?}: what the caller was told is what happened"
        );

        let started = env
            .manager
            .start_create(&me, snapshot(sandbox, "lost-async", "k-lost-async"))
            .await
            .unwrap();
        let done = poll(&env, team, started.id).await;
        let visible = env.manager.get(&me, &name("lost-async")).await.is_ok();
        assert_eq!(
            (
                done.state == OperationState::Succeeded,
                done.template.is_some()
            ),
            (visible, visible),
            "{mode:?}: {done:?}"
        );
        assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 2, "{mode:?}");
        drain(&env).await;
        assert_invariants(&env, &[team]).await;
    }
}
