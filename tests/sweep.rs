//! The orphan sweep, and what operators can see of pending work, on each
//! store (SQLite and PostgreSQL, see [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

conformance!(
    sweep_deletes_only_old_unowned_keys_in_our_format,
    sweep_spares_creates_in_flight_and_queued_keys,
    sweep_skips_hosts_that_cannot_answer,
    the_background_sweep_is_opt_in,
    pending_work_is_visible_and_survives_a_clean_shutdown,
    sweep_never_takes_keys_a_template_owns_on_another_host_record,
);

/// The platform team's audit log, where system actions (the sweep) go.
async fn platform_audit(env: &Env) -> Vec<AuditEntry> {
    env.manager
        .audit_log(&platform_admin(), AuditQuery::new())
        .await
        .unwrap()
        .items
}

/// Keys on a host that are not in our `tpl-<id>` format: never swept.
const FOREIGN_KEYS: [&str; 4] = [
    "ubuntu-24.04",
    "tpl-NOTOURS",
    "tpl-zzzzzzzzzzzzzzzzzzzzzzzzz",
    "backup.tar",
];

fn hours_ago(h: i64) -> Option<Timestamp> {
    Some(Timestamp::from_unix_millis(
        Timestamp::now().unix_millis() - h * 3600 * 1000,
    ))
}

async fn sweep_deletes_only_old_unowned_keys_in_our_format(backend: Backend) {
    // Explicit passes only: a background pass could delete the orphan
    // between the sweep queuing it and the check that it is queued.
    let mut options = fast_options();
    options.run_janitor = false;
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let kept = env.create(team, sb, "kept").await.unwrap();
    // Make the owned key look old too: age alone never condemns a key.
    env.agent
        .put_snapshot(&kept.id.to_string(), 1, hours_ago(5));

    let orphan = TemplateId::new().to_string();
    let young = TemplateId::new().to_string();
    let unknown_age = TemplateId::new().to_string();
    env.agent.put_snapshot(&orphan, 4096, hours_ago(2));
    env.agent.put_snapshot(&young, 4096, hours_ago(0));
    env.agent.put_snapshot(&unknown_age, 4096, None);
    for foreign in FOREIGN_KEYS {
        env.agent.put_snapshot(foreign, 1, hours_ago(100));
    }

    let report = env
        .manager
        .sweep_orphans(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(report.hosts_swept, 1);
    assert_eq!(report.orphans_queued, 1, "{report:?}");
    assert_eq!(report.orphans_too_young, 2, "{report:?}");
    assert_eq!(report.foreign_keys, 4, "{report:?}");
    let pending = env.manager.pending_deletions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].template_id.to_string(), orphan);

    drain(&env).await;
    assert!(!env.agent.has_snapshot(&orphan));
    for key in [&kept.id.to_string(), &young, &unknown_age] {
        assert!(env.agent.has_snapshot(key), "{key} must stay");
    }
    for foreign in FOREIGN_KEYS {
        assert!(env.agent.has_snapshot(foreign), "{foreign} is not ours");
    }
    assert_eq!(
        env.manager.get(&caller(team), &name("kept")).await.unwrap(),
        kept
    );

    // Audited as a system action, in the platform team's log.
    let audit = platform_audit(&env).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, actions::ORPHAN_SWEEP);
    assert_eq!(audit[0].actor, Actor::System);
    assert_eq!(audit[0].resource_id, orphan);
    assert_eq!(audit[0].metadata["host_id"], env.host.to_string());

    // A second sweep finds nothing new.
    let again = env
        .manager
        .sweep_orphans(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(again.orphans_queued, 0);
}

async fn sweep_spares_creates_in_flight_and_queued_keys(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    // A create in flight: its key exists on the host before the journal
    // entry closes.
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let in_flight = env.spawn_create(team, NewSnapshot::new(sb, Some(name("f"))));
    hold.arrived(1).await;
    let ops = env.manager.open_operations().await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].phase, "started");
    assert_eq!(ops[0].sandbox, sb);
    assert_eq!(ops[0].name.as_str(), "f");
    env.agent
        .put_snapshot(&ops[0].template_id.to_string(), 1, hours_ago(9));
    let report = env.manager.sweep_orphans(Duration::ZERO).await.unwrap();
    assert_eq!(report.orphans_queued, 0, "the journal owns it");
    hold.release();
    let _ = in_flight.await.unwrap();
}

async fn sweep_skips_hosts_that_cannot_answer(backend: Backend) {
    let env = Env::new_on(&backend).await;
    env.agent
        .put_snapshot(&TemplateId::new().to_string(), 1, hours_ago(9));
    env.agent.set_list_snapshots_supported(false);
    let report = env.manager.sweep_orphans(Duration::ZERO).await.unwrap();
    assert_eq!(
        (
            report.hosts_swept,
            report.hosts_failed,
            report.orphans_queued
        ),
        (0, 1, 0)
    );
    env.agent.set_list_snapshots_supported(true);
    env.host_status(HostStatus::Unreachable).await;
    let report = env.manager.sweep_orphans(Duration::ZERO).await.unwrap();
    assert_eq!((report.hosts_skipped, report.orphans_queued), (1, 0));
}

async fn the_background_sweep_is_opt_in(backend: Backend) {
    let orphan = TemplateId::new().to_string();
    // Off by default.
    let env = Env::new_on(&backend).await;
    env.agent.put_snapshot(&orphan, 1, hours_ago(9));
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.manager.run_pending_work().await.unwrap();
    assert!(env.agent.has_snapshot(&orphan));

    let mut options = fast_options();
    options.orphan_sweep = Some(SweepOptions::new(
        Duration::from_secs(3600),
        Duration::from_millis(50),
    ));
    let env = Env::on(&backend, options, Mode::Ours).await;
    env.agent.put_snapshot(&orphan, 1, hours_ago(9));
    eventually("the background sweep deletes the orphan", || async {
        !env.agent.has_snapshot(&orphan)
    })
    .await;
}

async fn pending_work_is_visible_and_survives_a_clean_shutdown(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let t = env.create(team, sb, "x").await.unwrap();
    env.agent.set_unavailable(true);
    env.manager.delete(&caller(team), &name("x")).await.unwrap();
    let sb2 = env.sandbox(team).await;
    env.create(team, sb2, "y").await.unwrap_err();

    let pending = env.manager.pending_deletions().await.unwrap();
    assert!(
        pending
            .iter()
            .any(|d| d.template_id == t.id && d.host == env.host)
    );
    let ops = env.manager.open_operations().await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].phase, "resolving");
    assert_eq!(ops[0].sandbox, sb2);

    // Shut down, reopen on the same store with the host back: the worker
    // resumes both.
    env.manager.shutdown().await;
    let Env {
        dir,
        store,
        manager,
        transport,
        agent,
        ..
    } = env;
    drop(manager);
    agent.set_unavailable(false);
    let manager = store.open(transport, fast_options()).await.unwrap();
    eventually("the reopened worker finishes the queue", || async {
        manager.pending_deletions().await.unwrap().is_empty()
            && manager.open_operations().await.unwrap().is_empty()
    })
    .await;
    assert!(!agent.has_snapshot(&t.id.to_string()));
    assert_eq!(
        manager
            .registry()
            .sandbox(sb2)
            .await
            .unwrap()
            .unwrap()
            .status,
        SandboxStatus::Running
    );
    drop(dir);
}

/// One agent registered under two host ids (a host re-registered without
/// its old id): the sweep through the second id must not take the live
/// template's files, nor anything already queued.
async fn sweep_never_takes_keys_a_template_owns_on_another_host_record(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let live = env.create(team, sb, "live").await.unwrap();
    env.agent
        .put_snapshot(&live.id.to_string(), 1, hours_ago(9));
    // A queued key (a tombstone) is not an orphan either.
    let queued = env.create(team, sb, "queued").await.unwrap();
    env.agent.set_unavailable(true);
    env.manager
        .delete(&caller(team), &name("queued"))
        .await
        .unwrap();
    env.agent.set_unavailable(false);
    env.agent
        .put_snapshot(&queued.id.to_string(), 1, hours_ago(9));

    let alias = HostId::new();
    env.transport.add_host(alias, env.agent.clone());
    env.manager
        .registry()
        .register_host(alias, "in-process", HostStatus::Online)
        .await
        .unwrap();
    let report = env.manager.sweep_orphans(Duration::ZERO).await.unwrap();
    assert_eq!(report.hosts_swept, 2);
    assert_eq!(report.orphans_queued, 0, "{report:?}");
    drain(&env).await;
    assert!(
        env.agent.has_snapshot(&live.id.to_string()),
        "the live files stay"
    );
    assert_eq!(
        env.manager.get(&caller(team), &name("live")).await.unwrap(),
        live
    );
    let audit = platform_audit(&env).await;
    assert!(audit.is_empty(), "no sweep entries: {audit:?}");
}
