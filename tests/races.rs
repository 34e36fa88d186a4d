//! Races and late answers: resolvers running concurrently, agents that keep
//! writing after the caller gave up, deletes during a pending overwrite,
//! hosts that cannot answer — on each store (SQLite and PostgreSQL, see
//! [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    concurrent_resolvers_never_undo_a_finished_snapshot,
    a_late_write_after_a_timeout_is_still_deleted,
    deleting_the_old_template_hands_its_name_to_a_pending_overwrite,
    a_pending_platform_overwrite_keeps_the_name_reserved,
    a_host_marked_offline_settles_an_unknown_sandbox_as_missing,
    a_host_still_snapshotting_is_asked_again_later,
    the_worker_survives_an_agent_that_panics,
);

/// A sandbox whose snapshot failed while its host was unreachable: it
/// stays `snapshotting` until the host can say what became of the VM.
async fn stuck_snapshotting(env: &Env, team: TeamId) -> SandboxId {
    let sb = env.sandbox(team).await;
    env.agent.set_unavailable(true);
    env.create(team, sb, "x").await.unwrap_err();
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    sb
}

async fn concurrent_resolvers_never_undo_a_finished_snapshot(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let mut sandboxes = Vec::new();
    for _ in 0..8 {
        sandboxes.push(env.sandbox(team).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut resolvers = Vec::new();
    for _ in 0..3 {
        let (m, stop) = (env.manager.clone(), stop.clone());
        resolvers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                m.run_pending_work().await.unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut creates = Vec::new();
    for (i, sb) in sandboxes.iter().enumerate() {
        let (m, sb) = (env.manager.clone(), *sb);
        creates.push(tokio::spawn(async move {
            for round in 0..10 {
                let name = TemplateName::parse(&format!("s{i}-{round}")).unwrap();
                m.create(
                    &caller(team),
                    NewSnapshot::new(sb, Some(name)).overwrite(true),
                )
                .await
                .unwrap();
            }
        }));
    }
    for c in creates {
        c.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in resolvers {
        r.await.unwrap();
    }
    assert_eq!(env.names(team).await.len(), 80);
    assert_invariants(&env, &[team]).await;
    let audit = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap();
    assert!(
        audit
            .items
            .iter()
            .all(|e| e.outcome == AuditOutcome::Success)
    );
    assert_eq!(audit.items.len(), 80);
}

async fn a_late_write_after_a_timeout_is_still_deleted(backend: Backend) {
    let mut options = fast_options();
    options.create_timeout = Duration::from_millis(200);
    options.late_write_grace = Duration::from_millis(800);
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let late = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Detached(late.clone()), 1);

    let err = env.create(team, sb, "late").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::AgentError);
    // The key is queued, but not before the grace period...
    let pending = env.manager.pending_deletions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].next_attempt > Timestamp::now(), "{pending:?}");
    // ... during which the agent, which ignored its deadline, writes it.
    late.release();
    eventually("the late write lands", || async {
        env.agent.snapshot_keys().len() == 1
    })
    .await;
    assert_eq!(
        env.manager.pending_deletions().await.unwrap().len(),
        1,
        "still queued"
    );
    eventually("the late key is deleted after the grace period", || async {
        env.agent.snapshot_keys().is_empty()
            && env.manager.pending_deletions().await.unwrap().is_empty()
    })
    .await;
    assert_invariants(&env, &[team]).await;
}

async fn deleting_the_old_template_hands_its_name_to_a_pending_overwrite(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let (sb1, sb2) = (env.sandbox(team).await, env.sandbox(team).await);
    let old = env.create(team, sb1, "n").await.unwrap();
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let overwrite = env.spawn_create(team, NewSnapshot::new(sb1, Some(name("n"))).overwrite(true));
    hold.arrived(1).await;
    env.manager.delete(&caller(team), &name("n")).await.unwrap();
    assert!(env.names(team).await.is_empty());
    // The name is held by the overwrite in flight: a plain create is refused
    // up front instead of succeeding and being replaced later.
    let err = env.create(team, sb2, "n").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::AlreadyExists);
    hold.release();
    let new = overwrite.await.unwrap().unwrap();
    assert_ne!(new.id, old.id);
    assert_eq!(env.names(team).await, vec!["n"]);
    assert_eq!(
        env.manager.get(&caller(team), &name("n")).await.unwrap().id,
        new.id
    );
    assert_eq!(env.sandbox_status(sb2).await, SandboxStatus::Running);
    assert_invariants(&env, &[team]).await;
}

async fn a_pending_platform_overwrite_keeps_the_name_reserved(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let psb = env.sandbox(TeamId::PLATFORM).await;
    let tsb = env.sandbox(team).await;
    env.manager
        .create(&platform_admin(), NewSnapshot::new(psb, Some(name("base"))))
        .await
        .unwrap();
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let overwrite = {
        let m = env.manager.clone();
        tokio::spawn(async move {
            m.create(
                &platform_admin(),
                NewSnapshot::new(psb, Some(name("base"))).overwrite(true),
            )
            .await
        })
    };
    hold.arrived(1).await;
    env.manager
        .delete(&platform_admin(), &name("base"))
        .await
        .unwrap();
    let err = env.create(team, tsb, "base").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NameReserved);
    hold.release();
    overwrite.await.unwrap().unwrap();
    assert_eq!(
        env.names(team).await,
        vec!["base"],
        "one visible template per name"
    );
}

async fn a_host_marked_offline_settles_an_unknown_sandbox_as_missing(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = stuck_snapshotting(&env, team).await;
    // The operator takes the host out of service for good.
    env.host_status(HostStatus::Offline).await;
    eventually("the sandbox is released as missing", || async {
        env.sandbox_status(sb).await == SandboxStatus::Missing
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
    // The half-written key stays queued for when the host returns.
    assert_eq!(env.manager.pending_deletions().await.unwrap().len(), 1);
}

async fn a_host_still_snapshotting_is_asked_again_later(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::Internal, "flatten failed")),
        1,
    );
    // The host says it is still working on the sandbox.
    env.agent.set_sandbox_status(sb, "snapshotting");
    env.create(team, sb, "x").await.unwrap_err();
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    let report = env.manager.run_pending_work().await.unwrap();
    assert_eq!(report.statuses_resolved, 0);
    env.agent.set_sandbox_status(sb, "paused");
    eventually("resolved once the host is done", || async {
        env.sandbox_status(sb).await == SandboxStatus::Paused
    })
    .await;
}

/// An in-process agent that panics costs the background worker one pass,
/// not its life.
async fn the_worker_survives_an_agent_that_panics(backend: Backend) {
    struct Panicky;
    #[async_trait::async_trait]
    impl HostAgent for Panicky {
        async fn create_snapshot(
            &self,
            _: sandbox_snapshots::agent::CreateSnapshotRequest,
        ) -> Result<sandbox_snapshots::agent::CreateSnapshotResponse, AgentError> {
            panic!("agent bug")
        }
        async fn delete_snapshot(
            &self,
            _: sandbox_snapshots::agent::DeleteSnapshotRequest,
        ) -> Result<(), AgentError> {
            panic!("agent bug")
        }
        async fn list_sandboxes(
            &self,
        ) -> Result<sandbox_snapshots::agent::SandboxList, AgentError> {
            panic!("agent bug")
        }
    }
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = stuck_snapshotting(&env, team).await;
    // The worker now asks a host whose agent panics, over and over.
    env.transport
        .add_host(env.host, std::sync::Arc::new(Panicky));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back to a working agent: the same worker resolves the sandbox.
    env.agent.set_unavailable(false);
    env.transport.add_host(env.host, env.agent.clone());
    eventually(
        "the worker is still alive and resolves the sandbox",
        || async { env.sandbox_status(sb).await == SandboxStatus::Running },
    )
    .await;
}

// SQLite-only: another connection holds SQLite's write lock (BEGIN IMMEDIATE) past busy_timeout.
/// The host holds the snapshot but the store is locked by another process
/// when the create tries to record it: the create keeps trying and succeeds
/// once the lock is gone, instead of telling the caller it failed and then
/// letting the worker roll it forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_locked_while_recording_a_finished_snapshot_is_waited_out() {
    let mut options = fast_options();
    options.store.busy_timeout = Duration::from_millis(50);
    let env = Env::with_options(options).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let create = env.spawn_create(team, NewSnapshot::new(sb, Some(name("w"))));
    hold.arrived(1).await;
    let blocker = rusqlite::Connection::open(&env.db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    hold.release();
    // Longer than the few retries the create used to make before giving up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !create.is_finished(),
        "still trying while the store is locked"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    let t = create.await.unwrap().unwrap();
    assert_eq!(env.manager.get(&caller(team), &name("w")).await.unwrap(), t);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}
