//! Create: every row of the SPEC §3 create table, overwrite, concurrency,
//! dropped callers and timeouts — through the public API, on each store
//! (SQLite and PostgreSQL, see [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    success_records_template_pauses_sandbox_and_audits,
    a_paused_sandbox_can_be_snapshotted_and_stays_paused,
    name_taken_without_overwrite_is_409_already_exists,
    sandbox_of_another_team_or_unknown_is_404,
    sandbox_not_running_or_paused_is_409_invalid_state,
    unknown_host_or_no_address_or_offline_is_503,
    agent_rejections_map_to_spec_codes_and_restore_the_sandbox,
    unavailable_agent_is_502_and_the_sandbox_waits_for_its_host,
    ambiguous_failure_reads_the_status_from_the_host,
    overwrite_replaces_files_and_frees_the_old_ones,
    failed_overwrite_keeps_the_old_template,
    concurrent_creates_of_one_name_one_wins_no_orphans,
    concurrent_overwrites_one_wins,
    create_while_the_sandbox_is_snapshotting_is_409,
    a_dropped_caller_does_not_abort_the_snapshot,
    a_timed_out_create_leaves_no_template_and_the_hosts_status,
    only_admins_create_platform_templates,
);

fn assert_err(result: Result<Template>, code: ErrorCode, status: u16, message_part: &str) -> Error {
    let err = result.expect_err("expected an error");
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(err.http_status(), status, "{err:?}");
    assert!(
        err.message().contains(message_part),
        "message {:?} should contain {message_part:?}",
        err.message()
    );
    err
}

#[test]
fn request_validation_rows() {
    let err = NewSnapshot::parse("", "x").unwrap_err();
    assert_eq!(
        (err.code(), err.http_status()),
        (ErrorCode::InvalidRequest, 400)
    );
    assert_eq!(err.message(), "sandbox_id is required");

    for bad in [
        "sb-1",
        "tpl-0000000000000000000000001",
        "sb-zzzzzzzzzzzzzzzzzzzzzzzzz",
    ] {
        let err = NewSnapshot::parse(bad, "x").unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert_eq!(err.message(), "invalid sandbox_id");
    }

    let sb = SandboxId::new().to_string();
    for bad in [".x", "a/b", "a b", "~x", &"a".repeat(65)] {
        let err = NewSnapshot::parse(&sb, bad).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad}");
        assert!(
            err.message().starts_with("invalid snapshot name: "),
            "{err:?}"
        );
    }

    // An empty name gets a generated one.
    let generated = NewSnapshot::parse(&sb, "").unwrap();
    let text = generated.name().as_str();
    assert!(text.starts_with("template-") && text.len() == 17, "{text}");
    assert!(
        text[9..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
}

async fn success_records_template_pauses_sandbox_and_audits(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;

    let t = env.create(team, sb, "nightly").await.unwrap();
    assert_eq!(t.name.as_str(), "nightly");
    assert_eq!(t.team, team);
    assert_eq!(t.template_type, TemplateType::Snapshot);
    assert_eq!((t.vcpus, t.memory_mb), (2, 512));
    assert_eq!(
        t.size_bytes,
        (512 + 16) * 1024 * 1024,
        "size comes from the agent"
    );
    assert_eq!(t.source_sandbox, Some(sb));
    assert!(!t.is_platform());

    // Files are keyed by template id, not by name.
    assert_eq!(env.agent.snapshot_keys(), vec![t.id.to_string()]);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    assert_eq!(
        env.manager
            .get(&caller(team), &name("nightly"))
            .await
            .unwrap(),
        t
    );
    let placements = env
        .manager
        .placements(&caller(team), &name("nightly"))
        .await
        .unwrap();
    assert_eq!(placements.len(), 1);
    assert_eq!(placements[0].host, env.host);
    assert_eq!(
        env.count("SELECT count(*) FROM operations").await,
        0,
        "journal closed"
    );

    let audit = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
    let entry = &audit.items[0];
    assert_eq!(entry.action, actions::SNAPSHOT_CREATE);
    assert_eq!(entry.outcome, AuditOutcome::Success);
    assert_eq!(entry.resource_id, t.id.to_string());
    assert_eq!(entry.metadata["name"], "nightly");
    assert_eq!(
        entry.actor,
        Actor::User {
            id: "user-1".into(),
            name: "Ada".into()
        }
    );
}

async fn a_paused_sandbox_can_be_snapshotted_and_stays_paused(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox_with(team, SandboxStatus::Paused).await;
    env.create(team, sb, "p").await.unwrap();
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}

async fn name_taken_without_overwrite_is_409_already_exists(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.create(team, sb, "dup").await.unwrap();
    let calls = env.agent.calls(AgentOp::CreateSnapshot);
    let err = assert_err(
        env.create(team, sb, "dup").await,
        ErrorCode::AlreadyExists,
        409,
        "use ?overwrite=true to replace",
    );
    assert_eq!(err.code().as_str(), "already_exists");
    assert_eq!(
        env.agent.calls(AgentOp::CreateSnapshot),
        calls,
        "no agent call"
    );
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}

async fn sandbox_of_another_team_or_unknown_is_404(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let (a, b) = (TeamId::new(), TeamId::new());
    let sb_a = env.sandbox(a).await;
    assert_err(
        env.create(b, sb_a, "x").await,
        ErrorCode::NotFound,
        404,
        "sandbox not found",
    );
    assert_err(
        env.create(b, SandboxId::new(), "x").await,
        ErrorCode::NotFound,
        404,
        "sandbox not found",
    );
    assert_eq!(
        env.sandbox_status(sb_a).await,
        SandboxStatus::Running,
        "untouched"
    );
}

async fn sandbox_not_running_or_paused_is_409_invalid_state(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    for status in [
        SandboxStatus::Pending,
        SandboxStatus::Starting,
        SandboxStatus::Stopped,
        SandboxStatus::Missing,
        SandboxStatus::Error,
    ] {
        let sb = env.sandbox_with(team, status).await;
        assert_err(
            env.create(team, sb, "x").await,
            ErrorCode::InvalidState,
            409,
            "sandbox must be running or paused",
        );
        assert_eq!(env.sandbox_status(sb).await, status);
    }
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 0);
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
}

async fn unknown_host_or_no_address_or_offline_is_503(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let registry = env.manager.registry();

    // No host at all.
    let sb = SandboxId::new();
    registry
        .register_sandbox(Sandbox::new(sb, team, None, SandboxStatus::Running, 1, 128))
        .await
        .unwrap();
    assert_err(
        env.create(team, sb, "x").await,
        ErrorCode::HostUnavailable,
        503,
        "sandbox host is not reachable",
    );

    // A host without an address.
    let blank = HostId::new();
    registry
        .register_host(blank, "", HostStatus::Online)
        .await
        .unwrap();
    let sb2 = SandboxId::new();
    registry
        .register_sandbox(Sandbox::new(
            sb2,
            team,
            Some(blank),
            SandboxStatus::Running,
            1,
            128,
        ))
        .await
        .unwrap();
    assert_err(
        env.create(team, sb2, "x").await,
        ErrorCode::HostUnavailable,
        503,
        "",
    );

    // An offline host.
    let sb3 = env.sandbox(team).await;
    env.host_status(HostStatus::Offline).await;
    assert_err(
        env.create(team, sb3, "x").await,
        ErrorCode::HostUnavailable,
        503,
        "",
    );

    for s in [sb, sb2, sb3] {
        assert_eq!(env.sandbox_status(s).await, SandboxStatus::Running);
    }
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
}

async fn agent_rejections_map_to_spec_codes_and_restore_the_sandbox(backend: Backend) {
    let cases = [
        (AgentCode::NotFound, ErrorCode::NotFound, 404),
        (AgentCode::InvalidArgument, ErrorCode::InvalidRequest, 400),
        (AgentCode::FailedPrecondition, ErrorCode::Conflict, 409),
        (AgentCode::Internal, ErrorCode::AgentError, 502),
        (AgentCode::PermissionDenied, ErrorCode::AgentError, 502),
    ];
    for (agent_code, code, status) in cases {
        let env = Env::new_on(&backend).await;
        let team = TeamId::new();
        let sb = env.sandbox(team).await;
        env.agent.inject_times(
            AgentOp::CreateSnapshot,
            Fault::Fail(AgentError::rejected(
                agent_code,
                "secret internal detail /var/lib/x",
            )),
            1,
        );
        let err = assert_err(env.create(team, sb, "x").await, code, status, "");
        assert!(
            !err.message().contains("secret") && !err.message().contains("/var/lib"),
            "agent text must not leak: {:?}",
            err.message()
        );
        // Nothing half-written; the failed key is queued or already gone.
        assert!(env.manager.get(&caller(team), &name("x")).await.is_err());
        assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
        // The agent refused before touching the VM: its status is kept
        // (definite rejection) or read back from the host (ambiguous).
        assert_eq!(
            env.sandbox_status(sb).await,
            SandboxStatus::Running,
            "{agent_code}"
        );
        // The failure is audited, keyed by template id, with the name.
        let audit = env
            .manager
            .audit_log(&caller(team), AuditQuery::new())
            .await
            .unwrap();
        assert_eq!(audit.items.len(), 1);
        assert_eq!(audit.items[0].outcome, AuditOutcome::Failure);
        assert_eq!(audit.items[0].error_code.as_deref(), Some(code.as_str()));
        assert_eq!(audit.items[0].metadata["name"], "x");
        assert!(audit.items[0].resource_id.starts_with("tpl-"));
        // The name is free again.
        env.create(team, sb, "x").await.unwrap();
    }
}

async fn unavailable_agent_is_502_and_the_sandbox_waits_for_its_host(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.agent.set_unavailable(true);
    assert_err(
        env.create(team, sb, "x").await,
        ErrorCode::AgentError,
        502,
        "",
    );
    // The host could not say what happened to the VM: the sandbox stays
    // out of new operations until it can.
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    assert_err(
        env.create(team, sb, "y").await,
        ErrorCode::InvalidState,
        409,
        "",
    );
    env.agent.set_unavailable(false);
    eventually("the worker resolves the sandbox status", || async {
        env.sandbox_status(sb).await == SandboxStatus::Running
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
    eventually("the key is deleted or confirmed absent", || async {
        env.manager.pending_deletions().await.unwrap().is_empty()
    })
    .await;
}

async fn ambiguous_failure_reads_the_status_from_the_host(backend: Backend) {
    // The agent paused the VM and wrote the files, then its reply was lost.
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::FailAfter(AgentError::rejected(AgentCode::Internal, "disk hiccup")),
        1,
    );
    assert_err(
        env.create(team, sb, "x").await,
        ErrorCode::AgentError,
        502,
        "",
    );
    // Not the blind revert to `running` of the reference: the host says paused.
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
    eventually("the half-written key is deleted", || async {
        env.agent.snapshot_keys().is_empty()
    })
    .await;
    eventually("the tombstone is purged", || async {
        env.count("SELECT count(*) FROM placements").await == 0
    })
    .await;
}

async fn overwrite_replaces_files_and_frees_the_old_ones(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let old = env.create(team, sb, "app").await.unwrap();
    let new = env.overwrite(team, sb, "app").await.unwrap();
    assert_ne!(old.id, new.id);
    assert_eq!(env.names(team).await, vec!["app"]);
    assert_eq!(
        env.manager
            .get(&caller(team), &name("app"))
            .await
            .unwrap()
            .id,
        new.id
    );
    eventually("old files deleted, new kept", || async {
        env.agent.snapshot_keys() == vec![new.id.to_string()]
    })
    .await;
    eventually("old row purged", || async {
        env.count("SELECT count(*) FROM templates").await == 1
    })
    .await;
    // Overwrite of a name that does not exist yet is a plain create.
    env.overwrite(team, sb, "fresh").await.unwrap();
}

async fn failed_overwrite_keeps_the_old_template(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let old = env.create(team, sb, "app").await.unwrap();
    env.agent.set_sandbox_status(sb, "running");
    env.manager
        .registry()
        .set_sandbox_status(sb, SandboxStatus::Running)
        .await
        .unwrap();

    env.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::Fail(AgentError::rejected(AgentCode::FailedPrecondition, "busy")),
        1,
    );
    assert_err(
        env.overwrite(team, sb, "app").await,
        ErrorCode::Conflict,
        409,
        "",
    );
    assert_eq!(
        env.manager.get(&caller(team), &name("app")).await.unwrap(),
        old
    );
    assert_eq!(env.names(team).await, vec!["app"]);
    assert!(
        env.agent.has_snapshot(&old.id.to_string()),
        "old files intact"
    );
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Running);

    // An ambiguous failure too.
    env.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::FailAfter(AgentError::Protocol {
            message: "garbage".into(),
        }),
        1,
    );
    assert_err(
        env.overwrite(team, sb, "app").await,
        ErrorCode::AgentError,
        502,
        "",
    );
    assert_eq!(
        env.manager.get(&caller(team), &name("app")).await.unwrap(),
        old
    );
    eventually("only the old files remain", || async {
        env.agent.snapshot_keys() == vec![old.id.to_string()]
    })
    .await;
    assert_eq!(
        env.sandbox_status(sb).await,
        SandboxStatus::Paused,
        "as the host says"
    );
}

async fn concurrent_creates_of_one_name_one_wins_no_orphans(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let (sb1, sb2) = (env.sandbox(team).await, env.sandbox(team).await);
    env.agent.inject(
        AgentOp::CreateSnapshot,
        Fault::Delay(Duration::from_millis(50)),
    );
    let (r1, r2) = tokio::join!(env.create(team, sb1, "same"), env.create(team, sb2, "same"));
    let (ok, err) = match (r1, r2) {
        (Ok(t), Err(e)) | (Err(e), Ok(t)) => (t, e),
        other => panic!("expected exactly one success: {other:?}"),
    };
    assert_eq!(err.http_status(), 409);
    assert_eq!(err.code(), ErrorCode::AlreadyExists);
    assert_eq!(
        env.agent.calls(AgentOp::CreateSnapshot),
        1,
        "the loser never reached a host"
    );
    assert_eq!(env.agent.snapshot_keys(), vec![ok.id.to_string()]);
    assert_eq!(env.names(team).await, vec!["same"]);
    // The loser's sandbox is untouched.
    let loser = if ok.source_sandbox == Some(sb1) {
        sb2
    } else {
        sb1
    };
    assert_eq!(env.sandbox_status(loser).await, SandboxStatus::Running);
}

async fn concurrent_overwrites_one_wins(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let (sb1, sb2) = (env.sandbox(team).await, env.sandbox(team).await);
    let old = env.create(team, sb1, "o").await.unwrap();
    let hold = Hold::new();
    env.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let first = env.spawn_create(team, NewSnapshot::new(sb1, Some(name("o"))).overwrite(true));
    hold.arrived(1).await;
    assert_err(
        env.overwrite(team, sb2, "o").await,
        ErrorCode::Conflict,
        409,
        "in progress",
    );
    assert_err(
        env.create(team, sb2, "o").await,
        ErrorCode::AlreadyExists,
        409,
        "",
    );
    // The old one stays visible while the overwrite runs.
    assert_eq!(
        env.manager.get(&caller(team), &name("o")).await.unwrap().id,
        old.id
    );
    hold.release();
    let new = first.await.unwrap().unwrap();
    assert_eq!(
        env.manager.get(&caller(team), &name("o")).await.unwrap().id,
        new.id
    );
}

async fn create_while_the_sandbox_is_snapshotting_is_409(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let first = env.spawn_create(team, NewSnapshot::new(sb, Some(name("a"))));
    hold.arrived(1).await;
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Snapshotting);
    assert_err(
        env.create(team, sb, "b").await,
        ErrorCode::InvalidState,
        409,
        "",
    );
    // The application cannot pause or remove it meanwhile either.
    let registry = env.manager.registry();
    let err = registry
        .set_sandbox_status(sb, SandboxStatus::Stopped)
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 409);
    assert_eq!(
        registry.remove_sandbox(sb).await.unwrap_err().http_status(),
        409
    );
    hold.release();
    first.await.unwrap().unwrap();
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
}

async fn a_dropped_caller_does_not_abort_the_snapshot(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()));
    let task = env.spawn_create(team, NewSnapshot::new(sb, Some(name("kept"))));
    hold.arrived(1).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    hold.release();
    eventually("the template is recorded", || async {
        env.manager.get(&caller(team), &name("kept")).await.is_ok()
    })
    .await;
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
}

async fn a_timed_out_create_leaves_no_template_and_the_hosts_status(backend: Backend) {
    let mut options = fast_options();
    options.create_timeout = Duration::from_millis(200);
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.agent.inject_times(
        AgentOp::CreateSnapshot,
        Fault::Delay(Duration::from_secs(30)),
        1,
    );
    assert_err(
        env.create(team, sb, "slow").await,
        ErrorCode::AgentError,
        502,
        "in time",
    );
    assert!(env.manager.get(&caller(team), &name("slow")).await.is_err());
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
    // The agent paused the VM before it was cut off; the host says so.
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Paused);
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
    eventually(
        "the possibly half-written key is confirmed gone",
        || async { env.manager.pending_deletions().await.unwrap().is_empty() },
    )
    .await;
    assert!(env.agent.snapshot_keys().is_empty());
}

async fn only_admins_create_platform_templates(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let sb = env.sandbox(TeamId::PLATFORM).await;
    let err = env
        .manager
        .create(
            &caller(TeamId::PLATFORM),
            NewSnapshot::new(sb, Some(name("base"))),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
    let t = env
        .manager
        .create(&platform_admin(), NewSnapshot::new(sb, Some(name("base"))))
        .await
        .unwrap();
    assert!(t.is_platform());
}

// SQLite-only: another connection holds SQLite's write lock (busy_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failure_is_500_db_error_with_nothing_written() {
    let mut options = fast_options();
    options.store.busy_timeout = Duration::from_millis(100);
    let env = Env::with_options(options).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;

    // Another connection holds the write lock.
    let blocker = rusqlite::Connection::open(&env.db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_err(env.create(team, sb, "x").await, ErrorCode::DbError, 500, "");
    blocker.execute_batch("ROLLBACK").unwrap();

    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 0);
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Running);
    env.create(team, sb, "x").await.unwrap();
}

// PostgreSQL-only: another session holds a row lock past `lock_timeout`
// (the counterpart of SQLite's busy timeout above).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_row_lock_past_lock_timeout_is_500_db_error_with_nothing_written() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let mut options = fast_options();
    options.postgres.lock_timeout = Duration::from_millis(300);
    let env = Env::on(&backend, options, common::Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;

    // Another session locks the sandbox's row and keeps its transaction open.
    let common::Db::Postgres(url) = &env.store else {
        unreachable!()
    };
    let (mut blocker, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM sandboxes WHERE id = $1 FOR UPDATE",
        &[&sb.as_uuid().as_bytes().to_vec()],
    )
    .await
    .unwrap();
    assert_err(env.create(team, sb, "x").await, ErrorCode::DbError, 500, "");
    tx.rollback().await.unwrap();

    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 0);
    assert_eq!(env.count("SELECT count(*) FROM templates").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM operations").await, 0);
    assert_eq!(env.sandbox_status(sb).await, SandboxStatus::Running);
    env.create(team, sb, "x").await.unwrap();
}
