//! Team quotas (SPEC §8) through the public API, on each store (see
//! [`conformance!`]): the count holds under concurrent creates (on
//! PostgreSQL across two replicas on one database), refused creates call
//! no host and write nothing, an overwrite needs no count headroom, and the
//! bytes limit is overshot by at most the one snapshot that crosses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sandbox_snapshots::agent::AgentOp;
use sandbox_snapshots::*;

conformance!(
    concurrent_creates_never_overshoot_the_count,
    an_overwrite_at_the_count_limit_succeeds,
    the_bytes_limit_is_overshot_by_at_most_one_snapshot,
);

/// What a snapshot of the test agent's sandboxes (512 MiB) holds.
const SNAPSHOT_BYTES: u64 = (512 + 16) * 1024 * 1024;

async fn limit(env: &Env, team: TeamId, limits: TeamLimits) -> Usage {
    env.manager
        .set_team_limits(&platform_admin(), team, limits)
        .await
        .unwrap()
}

async fn concurrent_creates_never_overshoot_the_count(backend: Backend) {
    let env = Env::new_on(&backend).await;
    // On PostgreSQL, half the creates go through a second replica on the
    // same database.
    let second = match &backend {
        Backend::Postgres(_) => Some(
            env.store
                .open(env.transport.clone(), env.options.clone())
                .await
                .unwrap(),
        ),
        Backend::Sqlite => None,
    };
    // Several rounds, a team each: an unserialized count overshoots only
    // in some interleavings.
    for _ in 0..5 {
        concurrent_round(&env, second.as_ref()).await;
    }
    if let Some(second) = second {
        second.shutdown().await;
    }
}

async fn concurrent_round(env: &Env, second: Option<&Manager>) {
    let team = TeamId::new();
    let calls_before = env.agent.calls(AgentOp::CreateSnapshot);
    let usage = limit(env, team, TeamLimits::new(Some(3), None)).await;
    assert_eq!((usage.snapshots, usage.limits.max_snapshots), (0, Some(3)));
    let mut sandboxes = Vec::new();
    for _ in 0..10 {
        sandboxes.push(env.sandbox(team).await);
    }
    let mut creates = Vec::new();
    for (i, sb) in sandboxes.iter().enumerate() {
        let manager = match (second, i % 2) {
            (Some(m), 1) => m.clone(),
            _ => env.manager.clone(),
        };
        let request = NewSnapshot::new(*sb, Some(name(&format!("s{i}"))));
        creates.push(tokio::spawn(async move {
            manager.create(&caller(team), request).await
        }));
    }
    let (mut made, mut refused) = (Vec::new(), 0);
    for create in creates {
        match create.await.unwrap() {
            Ok(t) => made.push(t),
            Err(err) => {
                assert_eq!(err.code(), ErrorCode::QuotaExceeded, "{err:?}");
                assert_eq!(err.http_status(), 403);
                assert!(err.message().contains("3"), "{err:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((made.len(), refused), (3, 7));
    assert_eq!(
        env.agent.calls(AgentOp::CreateSnapshot) - calls_before,
        3,
        "no host called for the refused ones"
    );
    assert_eq!(env.names(team).await.len(), 3);
    let usage = env.manager.usage(&caller(team)).await.unwrap();
    assert_eq!((usage.snapshots, usage.bytes), (3, 3 * SNAPSHOT_BYTES));
    // Refused creates wrote nothing: no journal entry, no sandbox held.
    assert!(env.manager.open_operations().await.unwrap().is_empty());
    for sb in &sandboxes {
        assert_ne!(env.sandbox_status(*sb).await, SandboxStatus::Snapshotting);
    }
    // Another team is not limited by this one's quota.
    let other = TeamId::new();
    let sb = env.sandbox(other).await;
    env.create(other, sb, "free").await.unwrap();
    // A deletion frees a place at once.
    let err = env.create(team, sandboxes[9], "again").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded);
    env.manager
        .delete(&caller(team), &made[0].name)
        .await
        .unwrap();
    env.create(team, sandboxes[9], "again").await.unwrap();
    if let Some(second) = second {
        second.shutdown().await;
    }
}

async fn an_overwrite_at_the_count_limit_succeeds(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    env.create(team, sb, "a").await.unwrap();
    limit(&env, team, TeamLimits::new(Some(1), None)).await;
    let err = env.create(team, sb, "b").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded, "{err:?}");
    let replaced = env.overwrite(team, sb, "a").await.expect("an overwrite");
    assert_eq!(env.names(team).await, vec!["a"]);
    assert_eq!(
        env.manager.get(&caller(team), &name("a")).await.unwrap().id,
        replaced.id
    );
    // A limit of zero refuses even the first create, and lifting it lets
    // creates through again.
    limit(&env, team, TeamLimits::new(Some(0), None)).await;
    let err = env.create(team, sb, "c").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded);
    limit(&env, team, TeamLimits::default()).await;
    env.create(team, sb, "c").await.unwrap();
    // Only administrators set quotas.
    let err = env
        .manager
        .set_team_limits(&caller(team), team, TeamLimits::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
}

async fn the_bytes_limit_is_overshot_by_at_most_one_snapshot(backend: Backend) {
    let env = Env::new_on(&backend).await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    // Room for one and a half snapshots.
    let max = SNAPSHOT_BYTES + SNAPSHOT_BYTES / 2;
    limit(&env, team, TeamLimits::new(None, Some(max))).await;
    env.create(team, sb, "one").await.unwrap();
    // Under the limit when it starts: allowed, and it crosses the limit.
    env.create(team, sb, "two").await.unwrap();
    let usage = env.manager.usage(&caller(team)).await.unwrap();
    assert_eq!(usage.bytes, 2 * SNAPSHOT_BYTES);
    assert!(usage.bytes > max && usage.bytes - max < SNAPSHOT_BYTES);
    let calls = env.agent.calls(AgentOp::CreateSnapshot);
    let err = env.create(team, sb, "three").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded, "{err:?}");
    assert!(err.message().contains("bytes"), "{err:?}");
    // At or over the bytes limit, an overwrite is refused too.
    let err = env.overwrite(team, sb, "one").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::QuotaExceeded, "{err:?}");
    assert_eq!(env.agent.calls(AgentOp::CreateSnapshot), calls);
    assert_eq!(env.names(team).await.len(), 2);
}
