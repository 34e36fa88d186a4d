//! List, get, delete, team isolation, platform templates and the audit log,
//! through the public API, on each store (SQLite and PostgreSQL, see
//! [`conformance!`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use sandbox_snapshots::agent::AgentOp;
use sandbox_snapshots::*;

conformance!(
    list_shows_own_and_platform_templates_newest_first,
    pagination_walks_every_template_once,
    delete_rows_of_the_spec_table,
    teams_cannot_see_get_overwrite_or_delete_each_other,
    platform_templates_are_visible_undeletable_and_reserve_their_names,
    delete_while_the_host_is_down_queues_the_files_until_it_is_back,
    an_offline_host_is_skipped_and_retried_when_it_comes_back_online,
    a_long_queue_drains_without_a_worker_pass_per_batch,
    a_host_failing_its_deletes_is_not_drained_further,
    delete_talks_to_every_holding_host_in_parallel_and_only_to_them,
    audit_log_pages_by_cursor_and_filters,
);

async fn get(env: &Env, team: TeamId, n: &str) -> Result<Template> {
    env.manager.get(&caller(team), &name(n)).await
}

/// A template of `team` registered on the env's host, its files there.
async fn registered(env: &Env, team: TeamId, n: &str, kind: TemplateType) -> Template {
    let t = env
        .manager
        .registry()
        .register_template(
            NewTemplate::new(team, name(n), kind)
                .shape(1, 256)
                .size_bytes(1000)
                .on_hosts([env.host]),
        )
        .await
        .unwrap();
    env.agent.put_snapshot(&t.id.to_string(), 1000, None);
    t
}

async fn platform_template(env: &Env, n: &str, kind: TemplateType) -> Template {
    registered(env, TeamId::PLATFORM, n, kind).await
}

async fn list_shows_own_and_platform_templates_newest_first(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let (a, b) = (TeamId::new(), TeamId::new());
    let base = platform_template(&env, "ubuntu-24.04", TemplateType::Base).await;
    let sa = env.sandbox(a).await;
    let sb = env.sandbox(b).await;
    env.create(a, sa, "a1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    env.create(b, sb, "b1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    env.create(a, sa, "a2").await.unwrap();

    assert_eq!(env.names(a).await, vec!["a2", "a1", "ubuntu-24.04"]);
    assert_eq!(env.names(b).await, vec!["b1", "ubuntu-24.04"]);
    let all = env
        .manager
        .list(&caller(a), ListQuery::new())
        .await
        .unwrap();
    assert!(
        all.next_cursor.is_none(),
        "an unpaginated call returns everything"
    );
    let platform: Vec<bool> = all.items.iter().map(Template::is_platform).collect();
    assert_eq!(platform, vec![false, false, true]);
    assert_eq!(all.items[2], base);

    let snaps = env
        .manager
        .list(
            &caller(a),
            ListQuery::new().template_type(TemplateType::Snapshot),
        )
        .await
        .unwrap();
    assert_eq!(snaps.items.len(), 2);
    let bases = env
        .manager
        .list(
            &caller(a),
            ListQuery::new().template_type(TemplateType::Base),
        )
        .await
        .unwrap();
    assert_eq!(bases.items, vec![base]);

    // The filter value is validated where it is parsed.
    let err = "image".parse::<TemplateType>().unwrap_err();
    assert_eq!(
        (err.code(), err.http_status()),
        (ErrorCode::InvalidRequest, 400)
    );
    assert_eq!(
        "snapshot".parse::<TemplateType>().unwrap(),
        TemplateType::Snapshot
    );
}

async fn pagination_walks_every_template_once(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    for i in 0..4 {
        platform_template(&env, &format!("base-{i}"), TemplateType::Base).await;
    }
    for i in 0..23 {
        env.create(team, sb, &format!("snap-{i}")).await.unwrap();
    }
    let all = env
        .manager
        .list(&caller(team), ListQuery::new())
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), 27);

    for page_size in [1, 5, 10, 27, 100] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = ListQuery::new().limit(page_size);
            if let Some(c) = cursor.take() {
                q = q.cursor(c);
            }
            let page = env.manager.list(&caller(team), q).await.unwrap();
            assert!(page.items.len() <= page_size as usize);
            seen.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(
            seen, all,
            "page size {page_size}: same order, no gaps or duplicates"
        );
    }

    for bad in [
        ListQuery::new().limit(0),
        ListQuery::new().limit(MAX_PAGE_SIZE + 1),
    ] {
        let err = env.manager.list(&caller(team), bad).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
    }
    for bad in ["", "x", "12.tpl-1", "abc.tpl-0000000000000000000000001"] {
        let err = env
            .manager
            .list(&caller(team), ListQuery::new().limit(5).cursor(bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad}");
    }
}

async fn delete_rows_of_the_spec_table(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    platform_template(&env, "base", TemplateType::Base).await;
    let t = env.create(team, sb, "gone").await.unwrap();

    // Invalid name: rejected where the name is parsed.
    let err: Error = TemplateName::parse("../etc").unwrap_err().into();
    assert_eq!(
        (err.code(), err.http_status()),
        (ErrorCode::InvalidRequest, 400)
    );
    assert!(err.message().starts_with("invalid snapshot name: "));

    for (n, code, status, message) in [
        ("nope", ErrorCode::NotFound, 404, "template not found"),
        (
            "base",
            ErrorCode::Forbidden,
            403,
            "platform templates cannot be deleted here",
        ),
    ] {
        let err = env
            .manager
            .delete(&caller(team), &name(n))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.http_status(), err.message()),
            (code, status, message),
            "delete {n}"
        );
    }

    let deleted = env
        .manager
        .delete(&caller(team), &name("gone"))
        .await
        .unwrap();
    assert_eq!(deleted.template, t);
    assert_eq!(deleted.hosts_confirmed, vec![env.host]);
    assert!(deleted.hosts_pending.is_empty());
    assert!(!env.agent.has_snapshot(&t.id.to_string()));
    assert_eq!(env.names(team).await, vec!["base"]);
    // The team's row is purged: only the platform template's is left.
    assert_eq!(
        env.count("SELECT count(*) FROM templates").await,
        1,
        "only the platform template's row"
    );

    let audit = env
        .manager
        .audit_log(
            &caller(team),
            AuditQuery::new().action(actions::SNAPSHOT_DELETE),
        )
        .await
        .unwrap();
    assert_eq!(audit.items.len(), 1);
    assert_eq!(audit.items[0].resource_id, t.id.to_string());
    assert_eq!(audit.items[0].metadata["name"], "gone");

    // The name is free again.
    env.create(team, sb, "gone").await.unwrap();
}

async fn teams_cannot_see_get_overwrite_or_delete_each_other(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let (a, b) = (TeamId::new(), TeamId::new());
    let sa = env.sandbox(a).await;
    let sb = env.sandbox(b).await;
    let ta = env.create(a, sa, "shared-name").await.unwrap();

    assert!(env.names(b).await.is_empty());
    let err = get(&env, b, "shared-name").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    let err = env
        .manager
        .delete(&caller(b), &name("shared-name"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);

    // B's overwrite of "shared-name" makes B's own template; A's is untouched.
    let tb = env.overwrite(b, sb, "shared-name").await.unwrap();
    assert_ne!(ta.id, tb.id);
    assert_eq!(get(&env, a, "shared-name").await.unwrap(), ta);
    assert_eq!(get(&env, b, "shared-name").await.unwrap(), tb);
    let keys: HashSet<String> = env.agent.snapshot_keys().into_iter().collect();
    assert_eq!(keys, HashSet::from([ta.id.to_string(), tb.id.to_string()]));

    // B cannot snapshot A's sandbox.
    let err = env.create(b, sa, "steal").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);

    // B deleting its own leaves A's.
    env.manager
        .delete(&caller(b), &name("shared-name"))
        .await
        .unwrap();
    assert_eq!(get(&env, a, "shared-name").await.unwrap(), ta);
    assert!(env.agent.has_snapshot(&ta.id.to_string()));

    // Audit logs are per team.
    let audit_b = env
        .manager
        .audit_log(&caller(b), AuditQuery::new())
        .await
        .unwrap();
    assert!(audit_b.items.iter().all(|e| e.team == b));
    assert!(
        audit_b
            .items
            .iter()
            .all(|e| e.resource_id != ta.id.to_string())
    );
}

async fn platform_templates_are_visible_undeletable_and_reserve_their_names(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let base = platform_template(&env, "python-3.12", TemplateType::Base).await;

    assert_eq!(get(&env, team, "python-3.12").await.unwrap(), base);
    for overwrite in [false, true] {
        let req = NewSnapshot::new(sb, Some(name("python-3.12"))).overwrite(overwrite);
        let err = env.manager.create(&caller(team), req).await.unwrap_err();
        assert_eq!(
            (err.code(), err.http_status()),
            (ErrorCode::NameReserved, 409)
        );
        assert_eq!(err.code().as_str(), "name_reserved");
    }
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), 0);
    let err = env
        .manager
        .delete(&caller(team), &name("python-3.12"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
    // A team admin is still not the platform.
    let admin = Caller::admin(team, Actor::System);
    assert_eq!(
        env.manager
            .delete(&admin, &name("python-3.12"))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::Forbidden
    );
    assert!(env.agent.has_snapshot(&base.id.to_string()));

    // A platform name cannot shadow a team's template either.
    env.create(team, sb, "mine").await.unwrap();
    let err = env
        .manager
        .registry()
        .register_template(NewTemplate::new(
            TeamId::PLATFORM,
            name("mine"),
            TemplateType::Base,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 409);

    // The platform admin can delete it, and files go too.
    env.manager
        .delete(&platform_admin(), &name("python-3.12"))
        .await
        .unwrap();
    assert!(!env.agent.has_snapshot(&base.id.to_string()));
    assert_eq!(env.names(team).await, vec!["mine"]);
}

async fn delete_while_the_host_is_down_queues_the_files_until_it_is_back(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let t = env.create(team, sb, "later").await.unwrap();
    let key = t.id.to_string();

    env.agent.set_unavailable(true);
    let deleted = env
        .manager
        .delete(&caller(team), &name("later"))
        .await
        .unwrap();
    assert_eq!(deleted.hosts_pending, vec![env.host]);
    assert!(deleted.hosts_confirmed.is_empty());
    // Gone from get/list at once, and the name is free.
    assert!(env.names(team).await.is_empty());
    assert_eq!(
        get(&env, team, "later").await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    // The files stay queued while the host is down; the worker keeps trying.
    let before = env.agent.calls(AgentOp::DeleteSnapshot);
    eventually("the worker retries", || async {
        env.agent.calls(AgentOp::DeleteSnapshot) >= before + 2
    })
    .await;
    assert!(env.agent.has_snapshot(&key));
    let pending = env.manager.pending_deletions().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].template_id, t.id);
    assert_eq!(pending[0].host, env.host);
    assert!(pending[0].attempts >= 1);
    assert!(
        pending[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("unavailable")
    );
    assert_eq!(
        env.count("SELECT count(*) FROM templates").await,
        1,
        "row kept until confirmed"
    );

    env.agent.set_unavailable(false);
    eventually("the worker deletes the files", || async {
        !env.agent.has_snapshot(&key)
    })
    .await;
    eventually("the row is purged", || async {
        env.count("SELECT count(*) FROM templates").await == 0
    })
    .await;
    assert!(env.manager.pending_deletions().await.unwrap().is_empty());
}

async fn an_offline_host_is_skipped_and_retried_when_it_comes_back_online(backend: Backend) {
    let mut options = fast_options();
    // Long backoff: only the host coming back can make the retry prompt.
    options.retry_base = std::time::Duration::from_secs(3600);
    options.retry_max = std::time::Duration::from_secs(3600);
    let env = Env::on(&backend, options, Mode::Ours).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let t = env.create(team, sb, "x").await.unwrap();

    env.agent.set_unavailable(true);
    env.manager.delete(&caller(team), &name("x")).await.unwrap();
    env.host_status(HostStatus::Offline).await;
    env.agent.set_unavailable(false);
    let calls = env.agent.calls(AgentOp::DeleteSnapshot);
    let report = env.manager.run_pending_work().await.unwrap();
    assert_eq!(
        report.deletions_confirmed + report.deletions_failed,
        0,
        "offline: skipped"
    );
    assert_eq!(env.agent.calls(AgentOp::DeleteSnapshot), calls);

    env.host_status(HostStatus::Online).await;
    eventually("deleted once the host is online", || async {
        !env.agent.has_snapshot(&t.id.to_string())
    })
    .await;
    eventually("purged", || async {
        env.count("SELECT count(*) FROM templates").await == 0
    })
    .await;
}

/// An env whose host is offline with `n` queued deletions (an hour's
/// backoff each: only the host coming back makes a retry prompt), its
/// agent reachable again.
async fn queued_on_an_offline_host(backend: &Backend, mode: Mode, n: usize, janitor: bool) -> Env {
    let mut options = fast_options();
    options.retry_base = std::time::Duration::from_secs(3600);
    options.retry_max = std::time::Duration::from_secs(3600);
    options.run_janitor = janitor;
    let env = Env::on(backend, options, mode).await;
    let team = TeamId::new();
    let names: Vec<String> = (0..n).map(|i| format!("q-{i}")).collect();
    for n in &names {
        registered(&env, team, n, TemplateType::Snapshot).await;
    }
    env.delete_while_away(team, &names).await;
    assert_eq!(env.manager.pending_deletions().await.unwrap().len(), n);
    env
}

/// A host back online with a queue many batches long: its task keeps
/// claiming the host's next batch itself (each claim reads the front of
/// that host's queue), so the drain takes a few worker passes, not one per
/// batch of 16, and every key is deleted exactly once.
async fn a_long_queue_drains_without_a_worker_pass_per_batch(backend: Backend) {
    const N: usize = 200;
    for mode in Mode::ALL {
        let env = queued_on_an_offline_host(&backend, mode, N, true).await;
        let (calls, passes) = (
            env.agent.calls(AgentOp::DeleteSnapshot),
            env.manager.worker_stats().passes,
        );
        env.host_status(HostStatus::Online).await;
        eventually("the queue is drained", || async {
            env.manager.pending_deletions().await.unwrap().is_empty()
        })
        .await;
        assert_eq!(env.agent.snapshot_keys().len(), 0, "{mode:?}");
        assert_eq!(
            env.agent.calls(AgentOp::DeleteSnapshot) - calls,
            N,
            "{mode:?}"
        );
        let passes = env.manager.worker_stats().passes - passes;
        assert!(
            passes < N.div_ceil(16) as u64 / 2,
            "{mode:?}: {passes} worker passes for {} batches",
            N.div_ceil(16)
        );
    }
}

/// A host that fails the deletes of a batch is not drained further by the
/// same task: one pass asks it for its first batch and the one claimed
/// meanwhile (32), not for its whole queue; the rest waits for a pass.
async fn a_host_failing_its_deletes_is_not_drained_further(backend: Backend) {
    for mode in Mode::ALL {
        let env = queued_on_an_offline_host(&backend, mode, 200, false).await;
        env.host_status(HostStatus::Online).await;
        env.agent.set_unavailable(true);
        let calls = env.agent.calls(AgentOp::DeleteSnapshot);
        let report = env.manager.run_pending_work().await.unwrap();
        let asked = env.agent.calls(AgentOp::DeleteSnapshot) - calls;
        assert!(
            asked <= 32,
            "{mode:?}: {asked} deletes asked of a failing host"
        );
        assert_eq!(report.deletions_failed, asked, "{mode:?}");
        assert_eq!(report.deletions_confirmed, 0, "{mode:?}");
        let pending = env.manager.pending_deletions().await.unwrap();
        assert_eq!(pending.len(), 200);
        // Every answer was recorded, the last batch's too (a drain records
        // a batch while asking the next): one more attempt each (the first
        // was the delete's own, while the host was away).
        let tried = pending.iter().filter(|p| p.attempts == 2).count();
        assert_eq!(tried, asked, "{mode:?}: attempts recorded");
        assert_eq!(
            tried + pending.iter().filter(|p| p.attempts == 1).count(),
            200
        );
    }
}

async fn delete_talks_to_every_holding_host_in_parallel_and_only_to_them(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let registry = env.manager.registry();
    let mut agents = Vec::new();
    for _ in 0..5 {
        let host = HostId::new();
        let agent = std::sync::Arc::new(MemoryHostAgent::new());
        env.transport.add_host(host, agent.clone());
        registry
            .register_host(host, "in-process", HostStatus::Online)
            .await
            .unwrap();
        agents.push((host, agent));
    }
    let team = TeamId::new();
    let holders: Vec<HostId> = agents[..3].iter().map(|(h, _)| *h).collect();
    let t = registry
        .register_template(
            NewTemplate::new(team, name("fleet"), TemplateType::Base).on_hosts(holders.clone()),
        )
        .await
        .unwrap();
    // Every holder's call must be in flight at the same time: a sequential
    // delete would never get all three to the gate.
    let gate = sandbox_snapshots::agent::Hold::new();
    for (_, agent) in &agents[..3] {
        agent.put_snapshot(&t.id.to_string(), 10, None);
        agent.inject(
            AgentOp::DeleteSnapshot,
            sandbox_snapshots::agent::Fault::Hold(gate.clone()),
        );
    }
    let deleting = {
        let m = env.manager.clone();
        tokio::spawn(async move { m.delete(&caller(team), &name("fleet")).await })
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), gate.arrived(3))
        .await
        .expect("all three hosts are asked at once");
    gate.release();
    let deleted = deleting.await.unwrap().unwrap();
    let mut confirmed = deleted.hosts_confirmed.clone();
    confirmed.sort();
    let mut expected = holders.clone();
    expected.sort();
    assert_eq!(confirmed, expected);
    for (_, agent) in &agents[3..] {
        assert_eq!(agent.calls(AgentOp::DeleteSnapshot), 0, "no broadcast");
    }
    for (_, agent) in &agents[..3] {
        assert!(agent.snapshot_keys().is_empty());
    }
}

async fn audit_log_pages_by_cursor_and_filters(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    for i in 0..5 {
        env.create(team, sb, &format!("s{i}")).await.unwrap();
    }
    env.manager
        .delete(&caller(team), &name("s0"))
        .await
        .unwrap();
    let _ = env.create(team, sb, "s1").await.unwrap_err(); // not audited: refused up front

    let all = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 6);
    assert_eq!(
        all.items[0].action,
        actions::SNAPSHOT_DELETE,
        "newest first"
    );
    let mut seen = Vec::new();
    let mut q = AuditQuery::new().limit(4);
    loop {
        let page = env
            .manager
            .audit_log(&caller(team), q.clone())
            .await
            .unwrap();
        seen.extend(page.items.into_iter().map(|e| e.id));
        match page.next_cursor {
            Some(c) => q = AuditQuery::new().limit(4).cursor(c),
            None => break,
        }
    }
    assert_eq!(seen, all.items.iter().map(|e| e.id).collect::<Vec<_>>());
    let creates = env
        .manager
        .audit_log(
            &caller(team),
            AuditQuery::new()
                .action(actions::SNAPSHOT_CREATE)
                .resource_type(RESOURCE_TEMPLATE),
        )
        .await
        .unwrap();
    assert_eq!(creates.items.len(), 5);
    let err = env
        .manager
        .audit_log(&caller(team), AuditQuery::new().cursor("bogus"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest);
}
