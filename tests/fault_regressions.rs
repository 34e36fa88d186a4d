//! Regressions of issue 9 ("Faults: nothing stuck, nothing applied after a
//! reported failure, a worker that never spins"), each through the public
//! API, with the fault where it really lives: a loopback port that refuses,
//! an agent that behaves like the original Go agent, a host that hangs —
//! on each store (SQLite and PostgreSQL, see [`conformance!`]), including
//! another connection holding the store's writes (SQLite's write lock, or
//! PostgreSQL's table locks past `lock_timeout`). (The full-disk and crash
//! cases are in `tests/crash.rs`, the transports' own in
//! `tests/transport_faults.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    a_host_that_refuses_connections_releases_the_sandbox_at_once,
    an_operation_waiting_for_a_silent_host_resolves_at_the_deadline,
    an_operator_resolves_open_operations_now,
    go_agent_failed_snapshots_leave_the_sandbox_usable,
    the_worker_stays_idle_while_a_create_is_in_flight,
    a_key_still_being_written_is_deleted_only_once_its_create_is_resolved,
    a_hanging_host_delays_only_its_own_work,
    a_failure_the_store_cannot_record_never_takes_effect_later,
    a_success_the_store_cannot_record_appears_once_it_recovers,
    a_restore_the_store_cannot_record_is_told_db_error_then_takes_effect,
    a_drain_whose_answers_the_store_refuses_stops_and_repeats_them_later,
);

fn internal() -> AgentError {
    AgentError::rejected(AgentCode::Internal, "injected")
}

/// The next `op` call fails: the host is briefly unavailable.
fn blip(agent: &MemoryHostAgent, op: AgentOp) {
    agent.inject_times(op, Fault::Fail(AgentError::unavailable("blip")), 1);
}

/// The next create writes its snapshot and answers Internal, and the
/// status query that follows hits a blip: the sandbox waits for the worker
/// to ask its host again.
fn ambiguous_create_then_blip(agent: &MemoryHostAgent) {
    agent.inject_times(AgentOp::CreateSnapshot, Fault::FailAfter(internal()), 1);
    blip(agent, AgentOp::ListSandboxes);
}

/// Another connection holding the store's writes until released.
enum StoreLock {
    Sqlite(WriteLock),
    Postgres(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
}

impl StoreLock {
    async fn take(env: &Env) -> StoreLock {
        match &env.store {
            Db::Sqlite(path) => StoreLock::Sqlite(WriteLock::take(path).await),
            Db::Postgres(url) => {
                let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
                let (release, released) = tokio::sync::oneshot::channel::<()>();
                let url = url.clone();
                let task = tokio::spawn(async move {
                    #[cfg(feature = "postgres")]
                    {
                        let (mut client, conn) =
                            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                                .await
                                .unwrap();
                        tokio::spawn(conn);
                        let tx = client.transaction().await.unwrap();
                        // Reads go on; every write (and every row lock)
                        // waits, like SQLite's write lock.
                        tx.batch_execute(
                            "LOCK TABLE operations, templates, sandboxes, placements, audit_log
                             IN EXCLUSIVE MODE",
                        )
                        .await
                        .unwrap();
                        locked_tx.send(()).unwrap();
                        let _ = released.await;
                        tx.rollback().await.unwrap();
                    }
                    #[cfg(not(feature = "postgres"))]
                    {
                        let _ = (url, locked_tx, released);
                        unreachable!("no postgres feature");
                    }
                });
                locked_rx.await.unwrap();
                StoreLock::Postgres(release, task)
            }
        }
    }

    async fn release(self) {
        match self {
            StoreLock::Sqlite(lock) => lock.release().await,
            StoreLock::Postgres(release, task) => {
                let _ = release.send(());
                task.await.unwrap();
            }
        }
    }
}

/// Another connection holding SQLite's write lock until released.
struct WriteLock {
    release: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl WriteLock {
    async fn take(db: &Path) -> WriteLock {
        let db = db.to_owned();
        tokio::task::spawn_blocking(move || {
            let (locked_tx, locked_rx) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let conn = rusqlite::Connection::open(&db).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
                conn.execute_batch("ROLLBACK").unwrap();
            });
            locked_rx.recv().unwrap();
            WriteLock { release, thread }
        })
        .await
        .unwrap()
    }

    async fn release(self) {
        let _ = self.release.send(());
        tokio::task::spawn_blocking(move || self.thread.join().unwrap())
            .await
            .unwrap();
    }
}

/// Starts `snapshot` on a task of its own; its `CreateSnapshot` call waits
/// on the returned hold.
fn held_create(
    env: &Env,
    team: TeamId,
    snapshot: NewSnapshot,
) -> (Hold, tokio::task::JoinHandle<Result<Template>>) {
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    (hold, env.spawn_create(team, snapshot))
}

/// Once `create` waits on `hold`, another connection takes the store's
/// writes and the agent answers: past `record_patience` the caller is told
/// `db_error`, outcome unknown. Returns the lock, still held.
async fn answered_while_locked(
    env: &Env,
    hold: &Hold,
    create: tokio::task::JoinHandle<Result<Template>>,
) -> StoreLock {
    hold.arrived(1).await;
    let lock = StoreLock::take(env).await;
    hold.release();
    let err = create.await.unwrap().unwrap_err();
    assert_eq!(
        (err.code(), err.http_status()),
        (ErrorCode::DbError, 500),
        "{err:?}"
    );
    assert!(err.message().contains("outcome is unknown"), "{err:?}");
    lock
}

/// Options for the store-failure cases: writes give up on a held lock
/// quickly, and a create records its outcome for a short while before it
/// answers.
fn impatient_options() -> ManagerOptions {
    let mut o = fast_options();
    o.store.busy_timeout = Duration::from_millis(50);
    #[cfg(feature = "postgres")]
    {
        o.postgres.lock_timeout = Duration::from_millis(50);
    }
    o.record_patience = Duration::from_millis(300);
    o
}

/// Defect 1: a host registered online at an address where nothing listens.
/// The request never reached an agent: 503, the sandbox released at once,
/// nothing queued, and the sandbox usable (a retry, an admin change).
async fn a_host_that_refuses_connections_releases_the_sandbox_at_once(backend: Backend) {
    let transports: [(&str, Arc<dyn AgentTransport>); 2] = [
        ("grpc", Arc::new(GrpcTransport::new(GrpcConfig::default()))),
        (
            "connect",
            Arc::new(ConnectTransport::new(ConnectConfig::default())),
        ),
    ];
    for (kind, transport) in transports {
        let dir = tempfile::tempdir().unwrap();
        let manager = Db::fresh(&backend, dir.path())
            .await
            .open(transport, fast_options())
            .await
            .unwrap();
        let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = refusing.local_addr().unwrap().to_string();
        drop(refusing);
        let (host, team, sb) = (HostId::new(), TeamId::new(), SandboxId::new());
        let registry = manager.registry();
        registry
            .register_host(host, &address, HostStatus::Online)
            .await
            .unwrap();
        registry
            .register_sandbox(Sandbox::new(
                sb,
                team,
                Some(host),
                SandboxStatus::Running,
                2,
                512,
            ))
            .await
            .unwrap();
        for attempt in 0..2 {
            let err = manager
                .create(&caller(team), NewSnapshot::new(sb, Some(name("snap"))))
                .await
                .unwrap_err();
            assert_eq!(
                (err.code(), err.http_status()),
                (ErrorCode::HostUnavailable, 503),
                "{kind} attempt {attempt}: {err:?}"
            );
            let sandbox = registry.sandbox(sb).await.unwrap().unwrap();
            assert_eq!(sandbox.status, SandboxStatus::Running, "{kind}");
            assert!(
                manager.open_operations().await.unwrap().is_empty(),
                "{kind}"
            );
            assert!(
                manager.pending_deletions().await.unwrap().is_empty(),
                "{kind}"
            );
        }
        // An admin may change the sandbox: no operation owns it.
        registry
            .set_sandbox_status(sb, SandboxStatus::Paused)
            .await
            .unwrap();
        assert_eq!(
            manager.run_pending_work().await.unwrap(),
            WorkReport::default(),
            "{kind}: nothing was left for the worker"
        );
        let audit = manager
            .audit_log(&caller(team), AuditQuery::new())
            .await
            .unwrap()
            .items;
        assert_eq!(audit.len(), 2, "{kind}: {audit:?}");
        for e in &audit {
            assert_eq!(e.outcome, AuditOutcome::Failure, "{kind}");
            assert_eq!(e.error_code.as_deref(), Some("host_unavailable"), "{kind}");
        }
        manager.shutdown().await;
    }
}

/// Defect 2: an operation that needs its host's answer, from a host that
/// never answers, resolves once `resolve_deadline` has passed: the sandbox
/// becomes `error`, the half-written key stays queued (and goes), audited.
async fn an_operation_waiting_for_a_silent_host_resolves_at_the_deadline(backend: Backend) {
    let mut options = fast_options();
    options.resolve_deadline = Duration::from_millis(300);
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::FailAfter(internal()), 1);
    env.agent.inject(
        AgentOp::ListSandboxes,
        Fault::Fail(AgentError::unavailable("down")),
    );

    let err = env.create(team, sb, "snap").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::AgentError);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    let open = env.manager.open_operations().await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].phase, "resolving");

    // The background worker does it by itself.
    eventually("the operation resolves at its deadline", || async {
        env.manager.open_operations().await.unwrap().is_empty()
    })
    .await;
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Error);
    let resolved: Vec<AuditEntry> = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.action == actions::OPERATION_RESOLVE)
        .collect();
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert_eq!(resolved[0].actor, Actor::System);
    assert_eq!(resolved[0].metadata["reason"], "resolve_deadline");
    assert_eq!(resolved[0].metadata["sandbox_status"], "error");
    assert_eq!(resolved[0].metadata["operation_id"], open[0].id.to_string());
    // The half-written key was kept queued, and goes now that its create
    // is resolved.
    eventually("the half-written key is deleted", || async {
        env.manager.pending_deletions().await.unwrap().is_empty()
    })
    .await;
    assert!(env.agent.snapshot_keys().is_empty());
    // An operator can bring the sandbox back.
    env.manager
        .registry()
        .set_sandbox_status(sb, SandboxStatus::Running)
        .await
        .unwrap();
}

/// Defect 2: an operator resolves an open operation now — one waiting for
/// its host, and one whose create is still in flight.
async fn an_operator_resolves_open_operations_now(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let admin = Caller::admin(
        TeamId::PLATFORM,
        Actor::User {
            id: "op-1".into(),
            name: "Grace".into(),
        },
    );
    let (sb, sb2) = (env.sandbox(team).await, env.sandbox(team).await);
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::FailAfter(internal()), 1);
    env.agent.inject_times(
        AgentOp::ListSandboxes,
        Fault::Fail(AgentError::unavailable("down")),
        100,
    );
    env.create(team, sb, "waiting").await.unwrap_err();
    let open = env.manager.open_operations().await.unwrap();
    assert_eq!(open.len(), 1);
    let id = open[0].id;

    let refused = env
        .manager
        .resolve_operation(&caller(team), id, SandboxStatus::Paused)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::Forbidden);
    let refused = env
        .manager
        .resolve_operation(&admin, id, SandboxStatus::Snapshotting)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::InvalidRequest);
    let refused = env
        .manager
        .resolve_operation(&admin, OperationId::new(), SandboxStatus::Paused)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::NotFound);

    let resolved = env
        .manager
        .resolve_operation(&admin, id, SandboxStatus::Paused)
        .await
        .unwrap();
    assert_eq!((resolved.id, resolved.sandbox), (id, sb));
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    assert!(env.manager.open_operations().await.unwrap().is_empty());
    let again = env
        .manager
        .resolve_operation(&admin, id, SandboxStatus::Paused)
        .await
        .unwrap_err();
    assert_eq!(again.code(), ErrorCode::NotFound, "resolved once");

    // A create in flight: resolved, it reports failure to its caller, and
    // the files the agent then writes are deleted.
    env.agent.clear_faults();
    let (hold, pending) = held_create(&env, team, NewSnapshot::new(sb2, Some(name("in-flight"))));
    hold.arrived(1).await;
    let open = env.manager.open_operations().await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].phase, "started");
    env.manager
        .resolve_operation(&admin, open[0].id, SandboxStatus::Running)
        .await
        .unwrap();
    assert_eq!(env.sandbox_status(sb2).await, SandboxStatus::Running);
    hold.release();
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict, "{err:?}");
    drain(&env).await;
    assert_invariants(&env, &[team]).await;
    assert!(env.names(team).await.is_empty());
    assert!(env.agent.snapshot_keys().is_empty());
    assert_eq!(
        env.sandbox_status(sb2).await,
        SandboxStatus::Running,
        "what the operator chose"
    );

    let audit = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap()
        .items;
    let resolutions: Vec<&AuditEntry> = audit
        .iter()
        .filter(|e| e.action == actions::OPERATION_RESOLVE)
        .collect();
    assert_eq!(resolutions.len(), 2, "{audit:?}");
    for e in resolutions {
        assert_eq!(&e.actor, admin.actor());
        assert_eq!(e.metadata["reason"], "operator");
    }
}

/// Defect 3: against an agent that lists only running VMs and reports
/// every failure as Internal, a failed snapshot leaves the sandbox paused
/// (not missing), and the retry succeeds.
async fn go_agent_failed_snapshots_leave_the_sandbox_usable(backend: Backend) {
    let env = Env::on(&backend, fast_options(), Mode::GoLike).await;
    let team = TeamId::new();
    let cases = [
        (
            SandboxStatus::Paused,
            Fault::Fail(internal()),
            SandboxStatus::Paused,
        ),
        (
            SandboxStatus::Paused,
            Fault::FailAfter(internal()),
            SandboxStatus::Paused,
        ),
        (
            SandboxStatus::Running,
            Fault::FailAfter(internal()),
            SandboxStatus::Paused,
        ),
        (
            SandboxStatus::Running,
            Fault::Fail(internal()),
            SandboxStatus::Running,
        ),
        // The agent's own refusal (here: the key exists) is Internal too.
        (
            SandboxStatus::Paused,
            Fault::Fail(AgentError::rejected(AgentCode::FailedPrecondition, "x")),
            SandboxStatus::Paused,
        ),
    ];
    for (i, (before, fault, after)) in cases.into_iter().enumerate() {
        let case = format!("case {i}: {before} {fault:?}");
        let sb = env.sandbox_with(team, before).await;
        env.agent.inject_times(AgentOp::CreateSnapshot, fault, 1);
        let err = env.create(team, sb, &format!("s{i}")).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::AgentError, "{case}");
        assert_eq!(env.sandbox_status(sb).await, after, "{case}");
        env.create(team, sb, &format!("s{i}")).await.expect(&case);
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Paused,
            "{case}"
        );
    }
    drain(&env).await;
    assert_invariants(&env, &[team]).await;
}

/// Defect 6: while a create is in flight the worker sleeps. After a
/// routine pass it chooses to sleep the whole janitor interval (nothing
/// else is due); the old worker counted the create as due and slept zero,
/// burning a core until the snapshot finished.
async fn the_worker_stays_idle_while_a_create_is_in_flight(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let (hold, create) = held_create(&env, team, NewSnapshot::new(sb, Some(name("snap"))));
    hold.arrived(1).await;
    let before = env.manager.worker_stats();
    // A routine pass while the create is in flight, and the sleep it chose
    // (the background worker sleeps once after each of its passes).
    eventually("the worker goes back to sleep after a pass", || async {
        let now = env.manager.worker_stats();
        now.passes > before.passes && now.sleeps >= now.passes
    })
    .await;
    let stats = env.manager.worker_stats();
    assert_eq!(
        stats.last_sleep, env.options.janitor_interval,
        "nothing is due while the create is in flight: {stats:?}"
    );
    hold.release();
    create.await.unwrap().unwrap();
}

/// Defect 8a: a create times out while the agent goes on writing (the host
/// lists the sandbox `snapshotting`). Its key is not deleted while the
/// host is still at it, even past the grace (a NotFound then would be
/// counted as done and the key leaked); once the host is done it goes.
async fn a_key_still_being_written_is_deleted_only_once_its_create_is_resolved(backend: Backend) {
    let mut options = fast_options();
    options.create_timeout = Duration::from_millis(200);
    options.late_write_grace = Duration::ZERO;
    options.run_janitor = false;
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Detached(hold.clone()), 1);

    let err = env.create(team, sb, "snap").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::AgentError);
    assert_eq!(
        env.agent.sandbox_status(sb).as_deref(),
        Some("snapshotting")
    );
    for _ in 0..5 {
        env.manager.run_pending_work().await.unwrap();
    }
    assert_eq!(
        env.agent.calls(AgentOp::DeleteSnapshot),
        0,
        "no deletion while the host is writing the key"
    );
    let pending = env.manager.pending_deletions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    // Asked directly, the agent refuses to delete a key it is writing.
    let key = agent::SnapshotKey::for_template(pending[0].template_id);
    let refused = env
        .agent
        .delete_snapshot(agent::DeleteSnapshotRequest::new(key))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(AgentCode::FailedPrecondition));

    hold.release();
    eventually("the agent finishes writing", || async {
        env.agent.sandbox_status(sb).as_deref() == Some("paused")
    })
    .await;
    assert_eq!(env.agent.snapshot_keys().len(), 1);
    drain(&env).await;
    assert_invariants(&env, &[team]).await;
    assert!(
        env.agent.snapshot_keys().is_empty(),
        "the key is deleted, not leaked"
    );
    assert!(env.agent.calls(AgentOp::DeleteSnapshot) >= 1);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}

/// Defect 9: one host hangs (on `DeleteSnapshot`, or on `ListSandboxes`)
/// while another host's sandbox waits to be resolved: the healthy host's
/// work goes on.
async fn a_hanging_host_delays_only_its_own_work(backend: Backend) {
    for hang_on in [AgentOp::DeleteSnapshot, AgentOp::ListSandboxes] {
        let mut options = fast_options();
        options.delete_timeout = Duration::from_secs(60);
        options.list_timeout = Duration::from_secs(60);
        options.delete_wait = Duration::from_millis(50);
        let env = Env::on(&backend, options, Mode::Ours).await;
        let team = TeamId::new();
        let hanging = env.agent.clone();
        let hold = Hold::new();
        let sb1 = env.sandbox(team).await;
        match hang_on {
            AgentOp::DeleteSnapshot => {
                env.create(team, sb1, "on-hanging").await.unwrap();
                // The first attempt fails; the worker's retry hangs.
                blip(&hanging, AgentOp::DeleteSnapshot);
                hanging.inject(AgentOp::DeleteSnapshot, Fault::Hold(hold.clone()));
                env.manager
                    .delete(&caller(team), &name("on-hanging"))
                    .await
                    .unwrap();
            }
            _ => {
                // A failed snapshot whose status the worker asks again, and
                // the host hangs on that.
                ambiguous_create_then_blip(&hanging);
                hanging.inject(AgentOp::ListSandboxes, Fault::Hold(hold.clone()));
                env.create(team, sb1, "on-hanging").await.unwrap_err();
            }
        }
        hold.arrived(1).await;

        // A healthy host with a sandbox whose status is to be asked again.
        let (host2, healthy) = (HostId::new(), Arc::new(MemoryHostAgent::new()));
        env.transport.add_host(host2, healthy.clone());
        env.manager
            .registry()
            .register_host(host2, "in-process", HostStatus::Online)
            .await
            .unwrap();
        let sb2 = SandboxId::new();
        healthy.add_sandbox(sb2, "running", 2, 512);
        env.manager
            .registry()
            .register_sandbox(Sandbox::new(
                sb2,
                team,
                Some(host2),
                SandboxStatus::Running,
                2,
                512,
            ))
            .await
            .unwrap();
        ambiguous_create_then_blip(&healthy);
        env.create(team, sb2, "on-healthy").await.unwrap_err();
        assert_eq!(env.sandbox_status(sb2).await, SandboxStatus::Snapshotting);

        eventually("the healthy host's sandbox is resolved", || async {
            env.sandbox_status(sb2).await == SandboxStatus::Paused
        })
        .await;
        eventually("the healthy host's half-written key is deleted", || async {
            healthy.snapshot_keys().is_empty()
        })
        .await;
        assert_eq!(
            hanging.in_flight(),
            1,
            "{hang_on:?}: still hanging meanwhile"
        );
        hold.release();
        drain(&env).await;
        assert_eq!(
            env.sandbox_status(sb1).await,
            SandboxStatus::Paused,
            "{hang_on:?}"
        );
    }
}

/// Defect 4: the agent writes the snapshot of an overwrite and answers
/// Internal; while the manager asks for the sandbox's status, another
/// connection takes the write lock past `record_patience`. The caller is
/// told `db_error` (outcome unknown), the failure is recorded once the
/// lock goes, and the overwrite never takes effect: the old template the
/// caller still has stays, with its files.
async fn a_failure_the_store_cannot_record_never_takes_effect_later(backend: Backend) {
    let env = Env::on(&backend, impatient_options(), Mode::Ours).await;
    let team = TeamId::new();
    let (sb_old, sb) = (env.sandbox(team).await, env.sandbox(team).await);
    let old = env.create(team, sb_old, "snap").await.unwrap();
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::FailAfter(internal()), 1);
    env.agent
        .inject_times(AgentOp::ListSandboxes, Fault::Hold(hold.clone()), 1);
    let overwrite = env.spawn_create(
        team,
        NewSnapshot::new(sb, Some(name("snap"))).overwrite(true),
    );
    let lock = answered_while_locked(&env, &hold, overwrite).await;
    assert_eq!(
        env.manager.get(&caller(team), &name("snap")).await.unwrap(),
        old
    );
    lock.release().await;

    eventually("the failure is recorded", || async {
        env.manager.open_operations().await.unwrap().is_empty()
    })
    .await;
    drain(&env).await;
    assert_invariants(&env, &[team]).await;
    assert_eq!(
        env.manager.get(&caller(team), &name("snap")).await.unwrap(),
        old,
        "never rolled forward"
    );
    assert_eq!(env.agent.snapshot_keys(), vec![old.id.to_string()]);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}

/// Defect 5: the agent succeeds (and has no `ListSnapshots`), the store is
/// locked past `record_patience`: the caller is told `db_error`, outcome
/// unknown, and the snapshot appears once the lock goes — it is not rolled
/// back and its files are kept.
async fn a_success_the_store_cannot_record_appears_once_it_recovers(backend: Backend) {
    let env = Env::on(&backend, impatient_options(), Mode::Ours).await;
    env.agent.set_list_snapshots_supported(false);
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    // With an idempotency key: "outcome unknown" is no final answer, so a
    // retry meanwhile is told the request still runs, and once the store
    // recovers it gets the outcome that was recorded.
    let keyed = || {
        NewSnapshot::new(sb, Some(name("snap")))
            .idempotency_key(IdempotencyKey::parse("unrecorded").unwrap())
    };
    let (hold, create) = held_create(&env, team, keyed());
    let lock = answered_while_locked(&env, &hold, create).await;
    let retry = env
        .manager
        .create(&caller(team), keyed())
        .await
        .unwrap_err();
    assert_eq!(retry.code(), ErrorCode::IdempotencyInProgress, "{retry:?}");
    lock.release().await;

    eventually("the snapshot appears", || async {
        env.manager.get(&caller(team), &name("snap")).await.is_ok()
    })
    .await;
    drain(&env).await;
    assert_invariants(&env, &[team]).await;
    let t = env.manager.get(&caller(team), &name("snap")).await.unwrap();
    assert_eq!(env.agent.snapshot_keys(), vec![t.id.to_string()]);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    let replayed = env.manager.create(&caller(team), keyed()).await.unwrap();
    assert_eq!(replayed, t, "the recorded outcome, replayed");
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 1);
}

/// A restore whose agent answered while another connection holds the
/// store's writes: past `record_patience` the caller is told `db_error`
/// (outcome unknown), the sandbox stays owned by the restore meanwhile, and
/// once the store recovers what the host did takes effect: a VM that
/// started is registered `running`; one that did not answer is not
/// registered, and its possible VM is destroyed.
async fn a_restore_the_store_cannot_record_is_told_db_error_then_takes_effect(backend: Backend) {
    let cases = Mode::ALL
        .into_iter()
        .flat_map(|mode| [true, false].map(|started| (mode, started)));
    for (mode, started) in cases {
        let what = if started {
            "the VM started"
        } else {
            "no answer"
        };
        let case = &format!("{mode:?}: {what}");
        let env = Env::on(&backend, impatient_options(), mode).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        env.create(team, sb, "snap").await.unwrap();
        // Held where the outcome is known and not yet recorded: in the
        // agent's call, or (no answer) in the host's list asked after it.
        let hold = Hold::new();
        if started {
            env.agent
                .inject_times(AgentOp::CreateSandbox, Fault::Hold(hold.clone()), 1);
        } else {
            let timeout = Fault::Fail(AgentError::Timeout);
            env.agent.inject_times(AgentOp::CreateSandbox, timeout, 1);
            env.agent
                .inject_times(AgentOp::ListSandboxes, Fault::Hold(hold.clone()), 1);
        }
        let id = SandboxId::new();
        let restore = {
            let manager = env.manager.clone();
            let request = RestoreRequest::new(name("snap")).sandbox_id(id);
            tokio::spawn(async move { manager.restore(&caller(team), request).await })
        };
        hold.arrived(1).await;
        let lock = StoreLock::take(&env).await;
        hold.release();
        let err = restore.await.unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::DbError, "{case}: {err:?}");
        assert!(
            err.message().contains("outcome is unknown"),
            "{case}: {err:?}"
        );
        let owned = env.manager.registry().sandbox(id).await.unwrap();
        assert_eq!(
            owned.map(|s| s.status),
            Some(SandboxStatus::Starting),
            "{case}"
        );
        lock.release().await;

        eventually(case, || async {
            let _ = env.manager.run_pending_work().await;
            let registered = env.manager.registry().sandbox(id).await.unwrap();
            let settled = if started {
                registered.is_some_and(|s| s.status == SandboxStatus::Running)
            } else {
                registered.is_none() && env.manager.pending_destroys().await.unwrap().is_empty()
            };
            settled && env.count("SELECT count(*) FROM restores").await == 0
        })
        .await;
        let on_host = env.agent.sandbox_status(id);
        assert_eq!(on_host.as_deref(), started.then_some("running"), "{case}");
    }
}

/// A host back online drains its queue; once it is deleting, another
/// connection takes the store's writes, so the answers of its batches
/// cannot be recorded (nor a next batch claimed). The drain stops, leaving
/// every deletion queued and leased (the pass returns, asking at most the
/// two batches in hand); once the store recovers and the leases lapse,
/// each deletion whose answer was lost is asked once more (the host has no
/// such key any more: done) and the queue drains. Against both agents.
async fn a_drain_whose_answers_the_store_refuses_stops_and_repeats_them_later(backend: Backend) {
    const N: usize = 40;
    for mode in Mode::ALL {
        let mut options = impatient_options();
        options.run_janitor = false;
        // Leases of 2 s: lapsed well within `eventually`.
        options.delete_timeout = Duration::from_secs(1);
        let env = Env::on(&backend, options, mode).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        let names: Vec<String> = (0..N).map(|i| format!("q-{i}")).collect();
        for n in &names {
            env.create(team, sb, n).await.unwrap();
        }
        env.delete_while_away(team, &names).await;
        assert_eq!(env.agent.snapshot_keys().len(), N, "{mode:?}");

        let before = env.agent.calls(AgentOp::DeleteSnapshot);
        let hold = Hold::new();
        env.agent
            .inject_times(AgentOp::DeleteSnapshot, Fault::Hold(hold.clone()), 1);
        env.host_status(HostStatus::Online).await;
        let pass = {
            let manager = env.manager.clone();
            tokio::spawn(async move { manager.run_pending_work().await })
        };
        hold.arrived(1).await;
        let lock = StoreLock::take(&env).await;
        hold.release();
        // The pass ends (whatever it reports): no drain goes on against a
        // store that refuses it.
        tokio::time::timeout(Duration::from_secs(10), pass)
            .await
            .expect("the pass ends while the store refuses its records")
            .unwrap()
            .ok();
        let asked = env.agent.calls(AgentOp::DeleteSnapshot) - before;
        assert!(
            (16..=32).contains(&asked),
            "{mode:?}: {asked} deletes asked"
        );
        assert_eq!(
            env.agent.snapshot_keys().len(),
            N - asked,
            "{mode:?}: the host deleted what it was asked"
        );
        assert_eq!(
            env.manager.pending_deletions().await.unwrap().len(),
            N,
            "{mode:?}: no answer recorded while the store refused"
        );
        lock.release().await;

        eventually("the queue drains once the store recovers", || async {
            let _ = env.manager.run_pending_work().await;
            env.manager.pending_deletions().await.unwrap().is_empty()
        })
        .await;
        assert!(env.agent.snapshot_keys().is_empty(), "{mode:?}");
        assert_eq!(
            env.agent.calls(AgentOp::DeleteSnapshot) - before,
            N + asked,
            "{mode:?}: each lost answer asked once more, nothing else twice"
        );
        assert_invariants(&env, &[team]).await;
    }
}
