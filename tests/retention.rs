//! Retention (SPEC §8) through the public API, on each store (see
//! [`conformance!`]): TTLs (a create's own, or its team's default) and the
//! team policies `delete_unused_after` and `keep_last_per_sandbox` delete
//! what they select through the ordinary delete — invisible at once, files
//! deleted on the host, audited as the system with the policy — and never
//! anything else: templates without a TTL, recently used ones, the newest
//! of each sandbox, platform templates. Replicas sweeping at once (on
//! PostgreSQL, two managers on one database) delete and audit each
//! template once, past the batch size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::AgentOp;
use sandbox_snapshots::*;

conformance!(
    an_expired_snapshot_is_deleted_by_the_worker,
    the_team_default_ttl_applies_unless_the_create_has_its_own,
    keep_last_per_sandbox_deletes_the_oldest_of_each_sandbox,
    delete_unused_after_spares_recently_restored_snapshots,
    platform_templates_are_never_selected,
    concurrent_sweeps_delete_and_audit_each_template_once,
);

/// The test options, with the sweep every 100 ms.
fn options() -> ManagerOptions {
    let mut o = fast_options();
    o.retention_interval = Duration::from_millis(100);
    o
}

/// A manager whose sweeps are the test's explicit passes only: a
/// background pass running beside one would hold the rows it sweeps
/// (`SKIP LOCKED` on PostgreSQL), and the explicit pass would return
/// before that one commits.
async fn env_on(backend: &Backend) -> Env {
    let mut options = options();
    options.run_janitor = false;
    Env::on(backend, options, Mode::Ours).await
}

async fn set_policy(env: &Env, team: TeamId, policy: RetentionPolicy) -> RetentionPolicy {
    env.manager
        .set_team_retention(&platform_admin(), team, policy)
        .await
        .unwrap()
}

async fn create_with_ttl(env: &Env, team: TeamId, sb: SandboxId, n: &str, ttl: u64) -> Template {
    env.manager
        .create(
            &caller(team),
            NewSnapshot::new(sb, Some(name(n))).ttl(Duration::from_secs(ttl)),
        )
        .await
        .unwrap()
}

/// Whether `team` sees `n` (get, and in its list).
async fn visible(env: &Env, team: TeamId, n: &str) -> bool {
    let got = env.manager.get(&caller(team), &name(n)).await;
    let listed = env.names(team).await.contains(&n.to_owned());
    match got {
        Ok(_) => {
            assert!(listed, "{n}: get finds it, list does not");
            true
        }
        Err(err) => {
            assert_eq!(err.code(), ErrorCode::NotFound, "{n}: {err:?}");
            assert!(!listed, "{n}: list shows it, get does not");
            false
        }
    }
}

/// The system's `snapshot.delete` entries of `team`, by template id.
async fn retention_deletes(env: &Env, team: TeamId) -> Vec<AuditEntry> {
    env.manager
        .audit_log(
            &caller(team),
            AuditQuery::new()
                .action(actions::SNAPSHOT_DELETE)
                .limit(MAX_PAGE_SIZE),
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.actor == Actor::System)
        .collect()
}

/// Runs passes until nothing is queued for deletion.
async fn drain_deletions(env: &Env) {
    eventually("the deletions drain", || async {
        let _ = env.manager.run_pending_work().await;
        env.manager.pending_deletions().await.unwrap().is_empty()
    })
    .await;
}

async fn an_expired_snapshot_is_deleted_by_the_worker(backend: Backend) {
    let env = Env::on(&backend, options(), Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let short = create_with_ttl(&env, team, sb, "short", 1).await;
    let kept = env.create(team, sb, "kept").await.unwrap();
    let expires = short.expires_at.expect("a TTL gives expires_at");
    let ahead = expires.unix_millis() - Timestamp::now().unix_millis();
    assert!((0..=1000).contains(&ahead), "expires in {ahead} ms");
    assert_eq!(kept.expires_at, None);
    // Not yet expired: a pass leaves it.
    env.manager.run_pending_work().await.unwrap();
    assert!(visible(&env, team, "short").await);
    assert!(env.agent.has_snapshot(&short.id.to_string()));
    let deletes = env.agent.calls(AgentOp::DeleteSnapshot);

    // The background worker (no explicit pass) deletes it once expired.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    eventually("the expired snapshot is gone", || async {
        !visible(&env, team, "short").await
    })
    .await;
    eventually("its files are deleted on the host", || async {
        !env.agent.has_snapshot(&short.id.to_string())
    })
    .await;
    drain_deletions(&env).await;
    assert!(env.agent.calls(AgentOp::DeleteSnapshot) > deletes);
    // Its name is free again.
    env.create(team, sb, "short").await.unwrap();

    let audited = retention_deletes(&env, team).await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    let entry = &audited[0];
    assert_eq!(entry.resource_id, short.id.to_string());
    assert_eq!(entry.outcome, AuditOutcome::Success);
    assert_eq!(entry.metadata["policy"], "ttl", "{:?}", entry.metadata);
    assert_eq!(entry.metadata["name"], "short");
    assert_eq!(
        entry.metadata["expires_at"],
        serde_json::json!(expires.to_rfc3339())
    );
    // The one without a TTL stays, files and all.
    assert!(visible(&env, team, "kept").await);
    assert!(env.agent.has_snapshot(&kept.id.to_string()));
    assert_invariants(&env, &[team]).await;
}

async fn the_team_default_ttl_applies_unless_the_create_has_its_own(backend: Backend) {
    let env = env_on(&backend).await;
    let team = TeamId::new();
    let other = TeamId::new();
    let sb = env.sandbox(team).await;
    let other_sb = env.sandbox(other).await;
    let before = env.create(team, sb, "before").await.unwrap();
    let policy = set_policy(
        &env,
        team,
        RetentionPolicy::new().default_ttl(Duration::from_secs(3600)),
    )
    .await;
    assert_eq!(policy.default_ttl, Some(Duration::from_secs(3600)));
    assert_eq!(env.manager.retention(&caller(team)).await.unwrap(), policy);
    assert!(
        env.manager
            .retention(&caller(other))
            .await
            .unwrap()
            .is_off()
    );

    let t0 = Timestamp::now().unix_millis();
    let defaulted = env.create(team, sb, "defaulted").await.unwrap();
    let own = create_with_ttl(&env, team, sb, "own", 1).await;
    let t1 = Timestamp::now().unix_millis();
    let in_range = |t: &Template, ttl_ms: i64| {
        let at = t.expires_at.expect("expires_at").unix_millis();
        (t0 + ttl_ms..=t1 + ttl_ms).contains(&at)
    };
    assert!(in_range(&defaulted, 3_600_000), "{defaulted:?}");
    assert!(in_range(&own, 1000), "the create's own TTL wins: {own:?}");
    // Shown by get too; templates made before the policy keep none, and
    // another team's creates get none.
    let got = env.manager.get(&caller(team), &name("defaulted")).await;
    assert_eq!(got.unwrap().expires_at, defaulted.expires_at);
    assert_eq!(before.expires_at, None);
    let unlimited = env.create(other, other_sb, "other").await.unwrap();
    assert_eq!(unlimited.expires_at, None);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.manager.run_pending_work().await.unwrap();
    assert!(!visible(&env, team, "own").await);
    for kept in ["defaulted", "before"] {
        assert!(visible(&env, team, kept).await, "{kept}");
    }
    assert!(visible(&env, other, "other").await);
    // Turning the policy off leaves templates already made as they are.
    let off = set_policy(&env, team, RetentionPolicy::new()).await;
    assert!(off.is_off());
    let got = env.manager.get(&caller(team), &name("defaulted")).await;
    assert_eq!(got.unwrap().expires_at, defaulted.expires_at);
    assert_eq!(
        env.create(team, sb, "after").await.unwrap().expires_at,
        None
    );

    // Bad values are refused; only administrators set policies.
    for bad in [
        RetentionPolicy::new().default_ttl(Duration::ZERO),
        RetentionPolicy::new().default_ttl(Duration::from_millis(1500)),
        RetentionPolicy::new().delete_unused_after(MAX_TTL + Duration::from_secs(1)),
        RetentionPolicy::new().keep_last_per_sandbox(0),
    ] {
        let err = env
            .manager
            .set_team_retention(&platform_admin(), team, bad)
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad:?}: {err:?}");
    }
    let err = env
        .manager
        .set_team_retention(&caller(team), team, RetentionPolicy::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
    let calls = env.agent.calls(AgentOp::CreateSnapshot);
    for ttl in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
        let err = env
            .manager
            .create(
                &caller(team),
                NewSnapshot::new(sb, Some(name("bad"))).ttl(ttl),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{ttl:?}: {err:?}");
    }
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), calls);
}

async fn keep_last_per_sandbox_deletes_the_oldest_of_each_sandbox(backend: Backend) {
    let env = env_on(&backend).await;
    let team = TeamId::new();
    let (a, b) = (env.sandbox(team).await, env.sandbox(team).await);
    let mut of_a = Vec::new();
    for i in 1..=4 {
        of_a.push(env.create(team, a, &format!("a{i}")).await.unwrap());
        // Distinct creation times, so that "newest" is well defined.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.create(team, b, "b1").await.unwrap();
    // Another team's snapshots of many per sandbox are not this policy's.
    let other = TeamId::new();
    let c = env.sandbox(other).await;
    for i in 1..=3 {
        env.create(other, c, &format!("c{i}")).await.unwrap();
    }
    env.manager.run_pending_work().await.unwrap();
    assert_eq!(env.names(team).await.len(), 5, "no policy yet: all stay");

    set_policy(&env, team, RetentionPolicy::new().keep_last_per_sandbox(2)).await;
    env.manager.run_pending_work().await.unwrap();
    let mut names = env.names(team).await;
    names.sort();
    assert_eq!(names, vec!["a3", "a4", "b1"]);
    assert_eq!(env.names(other).await.len(), 3);
    drain_deletions(&env).await;
    for (t, kept) in of_a.iter().zip([false, false, true, true]) {
        assert_eq!(
            env.agent.has_snapshot(&t.id.to_string()),
            kept,
            "{}",
            t.name
        );
    }
    let audited = retention_deletes(&env, team).await;
    let mut ids: Vec<String> = audited.iter().map(|e| e.resource_id.clone()).collect();
    ids.sort();
    let mut expected = vec![of_a[0].id.to_string(), of_a[1].id.to_string()];
    expected.sort();
    assert_eq!(ids, expected);
    for e in &audited {
        assert_eq!(e.metadata["policy"], "keep_last_per_sandbox", "{e:?}");
        assert_eq!(e.metadata["keep_last_per_sandbox"], 2);
        assert_eq!(e.metadata["source_sandbox_id"], a.to_string());
    }
    // A new snapshot of `a` makes the oldest kept one go at the next pass.
    env.create(team, a, "a5").await.unwrap();
    env.manager.run_pending_work().await.unwrap();
    let mut names = env.names(team).await;
    names.sort();
    assert_eq!(names, vec!["a4", "a5", "b1"]);
    drain_deletions(&env).await;
    assert_invariants(&env, &[team, other]).await;
}

async fn delete_unused_after_spares_recently_restored_snapshots(backend: Backend) {
    let env = env_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let used = env.create(team, sb, "used").await.unwrap();
    let unused = env.create(team, sb, "unused").await.unwrap();
    set_policy(
        &env,
        team,
        RetentionPolicy::new().delete_unused_after(Duration::from_secs(2)),
    )
    .await;
    env.manager.run_pending_work().await.unwrap();
    assert!(
        visible(&env, team, "unused").await,
        "not unused long enough"
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let restored = env
        .manager
        .restore(&caller(team), RestoreRequest::new(name("used")))
        .await
        .unwrap();
    assert_eq!(restored.status, SandboxStatus::Running);
    let last_used = env
        .manager
        .get(&caller(team), &name("used"))
        .await
        .unwrap()
        .last_used_at
        .expect("a restore sets last_used_at");
    // Past two seconds since both were created, one since `used` was used.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    env.manager.run_pending_work().await.unwrap();
    assert!(!visible(&env, team, "unused").await);
    assert!(visible(&env, team, "used").await);
    drain_deletions(&env).await;
    assert!(!env.agent.has_snapshot(&unused.id.to_string()));
    assert!(env.agent.has_snapshot(&used.id.to_string()));
    let audited = retention_deletes(&env, team).await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].resource_id, unused.id.to_string());
    assert_eq!(audited[0].metadata["policy"], "delete_unused_after");
    assert_eq!(audited[0].metadata["delete_unused_after"], 2);
    assert_eq!(audited[0].metadata["last_used_at"], serde_json::Value::Null);
    // Unused again for long enough, it goes too.
    let used_ms = last_used.unix_millis();
    let wait = (used_ms + 2100 - Timestamp::now().unix_millis()).max(0);
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;
    env.manager.run_pending_work().await.unwrap();
    assert!(!visible(&env, team, "used").await);
    let audited = retention_deletes(&env, team).await;
    let entry = audited
        .iter()
        .find(|e| e.resource_id == used.id.to_string())
        .expect("audited");
    assert_eq!(
        entry.metadata["last_used_at"],
        serde_json::json!(last_used.to_rfc3339())
    );
}

async fn platform_templates_are_never_selected(backend: Backend) {
    let env = env_on(&backend).await;
    let platform_sb = env.sandbox(TeamId::PLATFORM).await;
    // Every policy on the platform team, and a TTL on its snapshots.
    set_policy(
        &env,
        TeamId::PLATFORM,
        RetentionPolicy::new()
            .default_ttl(Duration::from_secs(1))
            .delete_unused_after(Duration::from_secs(1))
            .keep_last_per_sandbox(1),
    )
    .await;
    let admin = platform_admin();
    let mut platform = Vec::new();
    for (n, ttl) in [("plat-ttl", Some(1)), ("plat-default", None)] {
        let mut request = NewSnapshot::new(platform_sb, Some(name(n)));
        if let Some(ttl) = ttl {
            request = request.ttl(Duration::from_secs(ttl));
        }
        let t = env.manager.create(&admin, request).await.unwrap();
        assert!(t.is_platform());
        assert!(t.expires_at.is_some(), "{t:?}");
        platform.push(t);
    }
    let base = env
        .manager
        .registry()
        .register_template(
            NewTemplate::new(TeamId::PLATFORM, name("plat-base"), TemplateType::Base)
                .on_hosts([env.host]),
        )
        .await
        .unwrap();
    // A team's expiring snapshot: the control that the sweep did run.
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    create_with_ttl(&env, team, sb, "control", 1).await;

    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.manager.run_pending_work().await.unwrap();
    assert!(!visible(&env, team, "control").await, "the sweep ran");
    for n in ["plat-ttl", "plat-default", "plat-base"] {
        // Platform templates are visible to every team.
        assert!(visible(&env, team, n).await, "{n}");
    }
    for t in &platform {
        assert!(env.agent.has_snapshot(&t.id.to_string()), "{}", t.name);
    }
    let audited = env
        .manager
        .audit_log(&admin, AuditQuery::new().action(actions::SNAPSHOT_DELETE))
        .await
        .unwrap()
        .items;
    assert!(audited.is_empty(), "{audited:?}");
    assert_eq!(base.template_type, TemplateType::Base);
}

/// More expired templates than one batch holds, swept by two managers at
/// once (on PostgreSQL two replicas of one database; on SQLite, where one
/// process owns the file, passes of one manager at once): each is deleted
/// and audited exactly once, and all of them go.
async fn concurrent_sweeps_delete_and_audit_each_template_once(backend: Backend) {
    let env = env_on(&backend).await;
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
    // Four sandboxes, creating at once: 130 snapshots, past the batch of 100.
    let mut tasks = Vec::new();
    for s in 0..4 {
        let sb = env.sandbox(team).await;
        let manager = env.manager.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..33 {
                if s == 3 && i >= 31 {
                    break;
                }
                manager
                    .create(
                        &caller(team),
                        NewSnapshot::new(sb, Some(name(&format!("s{s}-{i}"))))
                            .ttl(Duration::from_secs(1)),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(env.names(team).await.len(), 130);
    let keep_sb = env.sandbox(team).await;
    env.create(team, keep_sb, "keep").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut passes = Vec::new();
    for i in 0..4 {
        let manager = match (&second, i % 2) {
            (Some(m), 1) => m.clone(),
            _ => env.manager.clone(),
        };
        passes.push(tokio::spawn(
            async move { manager.run_pending_work().await },
        ));
    }
    for p in passes {
        p.await.unwrap().unwrap();
    }
    assert_eq!(env.names(team).await, vec!["keep"]);
    let audited = retention_deletes(&env, team).await;
    let ids: std::collections::HashSet<&str> =
        audited.iter().map(|e| e.resource_id.as_str()).collect();
    assert_eq!(audited.len(), 130, "one entry per template");
    assert_eq!(ids.len(), 130);
    drain_deletions(&env).await;
    assert_eq!(env.agent.snapshot_keys().len(), 1, "only `keep`'s files");
    if let Some(second) = second {
        second.shutdown().await;
    }
}
