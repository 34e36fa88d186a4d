//! Tests of what only the PostgreSQL store has: the migrator under
//! concurrent opens, claims by concurrent replicas, adoption by lease, and
//! races that SQLite's single writer cannot have. (What both stores share
//! is the conformance suite's.)
//!
//! They need a server: `SNAPSHOTS_TEST_POSTGRES_URL=postgres://…`. Without
//! it each test prints one line and passes, except under CI (`CI` set),
//! where a missing server is a failure. Each test gets a fresh schema.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::NoTls;

use super::migrate::SCHEMA_VERSION;
use super::{PostgresOptions, PostgresStore};
use crate::error::ErrorCode;
use crate::ids::{HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId};
use crate::model::{Actor, HostStatus, Sandbox, SandboxStatus, Timestamp};
use crate::names::TemplateName;
use crate::store::{CreateInput, InHand, Phase, Store, StoreErrorKind};

/// A fresh schema on the test server: its URL (selecting it through the
/// `search_path` option) and a plain client on it; `None` to skip.
async fn fresh_schema() -> Option<(String, tokio_postgres::Client)> {
    let Ok(base) = std::env::var("SNAPSHOTS_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but SNAPSHOTS_TEST_POSTGRES_URL is not: the PostgreSQL tests cannot run"
        );
        static SKIP: std::sync::Once = std::sync::Once::new();
        SKIP.call_once(|| {
            // Past the harness's capture of `eprintln!`: meant to be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping the PostgreSQL store tests: set SNAPSHOTS_TEST_POSTGRES_URL"
            );
        });
        return None;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    let (client, connection) = tokio_postgres::connect(&base, NoTls)
        .await
        .expect("connect to SNAPSHOTS_TEST_POSTGRES_URL");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}"
        ))
        .await
        .expect("create the test schema");
    Some((url, client))
}

async fn open(url: &str) -> PostgresStore {
    PostgresStore::open(url, PostgresOptions::default())
        .await
        .expect("open the store")
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn later(at: Timestamp, ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(at.unix_millis() + ms)
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .expect("count query")
        .get(0)
}

/// An online host with an address, and `n` running sandboxes of `team` on it.
async fn host_with_sandboxes(
    store: &PostgresStore,
    team: TeamId,
    n: usize,
) -> (HostId, Vec<SandboxId>) {
    let host = HostId::new();
    store
        .upsert_host(host, "http://127.0.0.1:1".into(), HostStatus::Online, now())
        .await
        .expect("upsert host");
    let mut sandboxes = Vec::new();
    for _ in 0..n {
        let id = SandboxId::new();
        store
            .upsert_sandbox(
                Sandbox::new(id, team, Some(host), SandboxStatus::Running, 2, 512),
                now(),
            )
            .await
            .expect("upsert sandbox");
        sandboxes.push(id);
    }
    (host, sandboxes)
}

fn create_input(
    team: TeamId,
    sandbox: SandboxId,
    name: &str,
    overwrite: bool,
    owner: InstanceId,
) -> CreateInput {
    CreateInput {
        actor: Actor::System,
        team,
        sandbox_id: sandbox,
        name: TemplateName::parse(name).expect("valid name"),
        overwrite,
        template_id: TemplateId::new(),
        operation_id: OperationId::new(),
        lease_until: later(now(), 60_000),
        owner,
        request: None,
        expires_at: None,
    }
}

// ------------------------------------------------------------ migrator

/// The migrations applied, as (version, applied_at).
async fn versions(client: &tokio_postgres::Client) -> Vec<(i64, i64)> {
    client
        .query(
            "SELECT version, applied_at FROM schema_version ORDER BY version",
            &[],
        )
        .await
        .expect("read versions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn migrating_an_up_to_date_schema_is_a_no_op() {
    let Some((url, client)) = fresh_schema().await else {
        return;
    };
    let _first = open(&url).await;
    let before = versions(&client).await;
    assert_eq!(
        before.len(),
        usize::try_from(SCHEMA_VERSION).expect("small")
    );
    let _second = open(&url).await;
    let after = versions(&client).await;
    assert_eq!(before, after, "a second open must not migrate again");
    assert_eq!(count(&client, "SELECT count(*) FROM teams").await, 1);
}

#[tokio::test]
async fn a_newer_schema_is_refused_unchanged() {
    let Some((url, client)) = fresh_schema().await else {
        return;
    };
    drop(open(&url).await);
    client
        .execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .expect("pretend a newer build migrated");
    let err = PostgresStore::open(&url, PostgresOptions::default())
        .await
        .expect_err("a newer schema must be refused");
    assert_eq!(err.kind(), StoreErrorKind::NewerSchema, "{err}");
    assert!(err.to_string().starts_with("postgres: "), "{err}");
    assert_eq!(
        count(&client, "SELECT max(version) FROM schema_version").await,
        SCHEMA_VERSION + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_opening_together_migrate_once() {
    let Some((url, client)) = fresh_schema().await else {
        return;
    };
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::open(&url, PostgresOptions::default()).await })
        })
        .collect();
    for open in opens {
        open.await.expect("open task").expect("every replica opens");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM schema_version").await,
        SCHEMA_VERSION
    );
    assert_eq!(count(&client, "SELECT count(*) FROM teams").await, 1);
}

// -------------------------------------------------------------- claims

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_claim_one_deletion_twice() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let a = open(&url).await;
    let b = open(&url).await;
    let t0 = now();
    let mut queued = HashSet::new();
    for _ in 0..3 {
        let (host, _) = host_with_sandboxes(&a, TeamId::new(), 0).await;
        for _ in 0..20 {
            let template = TemplateId::new();
            assert!(a.queue_orphan(template, host, 1, t0).await.expect("queue"));
            queued.insert((template, host));
        }
    }
    let claim = |store: PostgresStore| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim_due_deletions(later(t0, 1), later(t0, 600_000), 7, Vec::new())
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|d| (d.template_id, d.host.id)));
            }
        })
    };
    let (from_a, from_b) = (claim(a.clone()), claim(b.clone()));
    let (from_a, from_b) = (from_a.await.expect("a"), from_b.await.expect("b"));
    let mut seen = HashSet::new();
    for d in from_a.iter().chain(&from_b) {
        assert!(seen.insert(*d), "{d:?} was claimed twice");
    }
    assert_eq!(seen, queued, "every due deletion is claimed exactly once");
    // All leased now: nothing is due until the lease ends.
    let again = a
        .claim_due_deletions(later(t0, 2), later(t0, 600_000), 100, Vec::new())
        .await
        .expect("claim");
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_claim_takes_at_most_16_per_host_and_skips_hosts_in_hand() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let t0 = now();
    let (busy, _) = host_with_sandboxes(&store, TeamId::new(), 0).await;
    let (free, _) = host_with_sandboxes(&store, TeamId::new(), 0).await;
    for host in [busy, free] {
        for _ in 0..20 {
            store
                .queue_orphan(TemplateId::new(), host, 1, t0)
                .await
                .expect("queue");
        }
    }
    let batch = store
        .claim_due_deletions(later(t0, 1), later(t0, 60_000), 100, vec![busy])
        .await
        .expect("claim");
    assert_eq!(batch.len(), 16);
    assert!(batch.iter().all(|d| d.host.id == free));
}

// ------------------------------------------------------------ adoption

#[tokio::test]
async fn adoption_leaves_a_live_lease_alone_and_takes_a_lapsed_one() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let t0 = now();
    let (dead, me) = (InstanceId::new(), InstanceId::new());
    let lease_end = later(t0, 30_000);
    store
        .register_instance(dead, lease_end, t0)
        .await
        .expect("register");
    store
        .register_instance(me, lease_end, t0)
        .await
        .expect("register");
    let team = TeamId::new();
    let (_, sandboxes) = host_with_sandboxes(&store, team, 1).await;
    let (op, _) = store
        .begin_create(create_input(team, sandboxes[0], "adopted", false, dead), t0)
        .await
        .expect("begin create");

    // The owner's lease is live: its entry stays its own.
    assert_eq!(
        store
            .adopt_operations(me, later(t0, 1))
            .await
            .expect("adopt"),
        0
    );
    assert!(
        store
            .open_operations(me, Phase::Started, None)
            .await
            .expect("open ops")
            .is_empty()
    );
    assert_eq!(
        store
            .open_operations(dead, Phase::Started, None)
            .await
            .expect("open ops")
            .len(),
        1
    );
    // The worker wakes when that lease ends, not before.
    assert_eq!(
        store
            .next_due(me, InHand::default())
            .await
            .expect("next due"),
        Some(lease_end)
    );
    // A heartbeat extends it.
    let extended = later(t0, 45_000);
    store.heartbeat(dead, extended).await.expect("heartbeat");
    assert_eq!(
        store
            .adopt_operations(me, later(lease_end, 1))
            .await
            .expect("adopt"),
        0
    );

    // Lapsed: the entry is ours, due at once (the dead driver's lease of
    // the create is void).
    let after_lapse = later(extended, 1);
    assert_eq!(
        store
            .adopt_operations(me, after_lapse)
            .await
            .expect("adopt"),
        1
    );
    let mine = store
        .open_operations(me, Phase::Started, Some(after_lapse))
        .await
        .expect("open ops");
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, op.id);
    assert!(
        store
            .open_operations(dead, Phase::Started, None)
            .await
            .expect("open ops")
            .is_empty()
    );
    // Adopting again takes nothing (our own entries are never re-adopted).
    assert_eq!(
        store
            .adopt_operations(me, after_lapse)
            .await
            .expect("adopt"),
        0
    );
}

#[tokio::test]
async fn a_closed_instance_s_entries_are_adoptable_at_once() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let t0 = now();
    let (gone, me) = (InstanceId::new(), InstanceId::new());
    for id in [gone, me] {
        store
            .register_instance(id, later(t0, 30_000), t0)
            .await
            .expect("register");
    }
    let team = TeamId::new();
    let (_, sandboxes) = host_with_sandboxes(&store, team, 1).await;
    store
        .begin_create(create_input(team, sandboxes[0], "closed", false, gone), t0)
        .await
        .expect("begin create");
    store.close(gone).await.expect("close");
    // Due now (its owner has no lease any more), and adopted.
    let due = store
        .next_due(me, InHand::default())
        .await
        .expect("next due")
        .expect("something is due");
    assert!(due.unix_millis() <= t0.unix_millis(), "{due:?}");
    assert_eq!(store.adopt_operations(me, t0).await.expect("adopt"), 1);
}

// --------------------------------------------------------------- races

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_of_one_name_one_wins_the_other_gets_the_check_s_error() {
    let Some((url, client)) = fresh_schema().await else {
        return;
    };
    let (a, b) = (open(&url).await, open(&url).await);
    let owner = InstanceId::new();
    let team = TeamId::new();
    let (_, sandboxes) = host_with_sandboxes(&a, team, 20).await;
    for (round, pair) in sandboxes.chunks(2).enumerate() {
        let overwrite = round % 2 == 1;
        let name = format!("race-{round}");
        let first = a.begin_create(create_input(team, pair[0], &name, overwrite, owner), now());
        let second = b.begin_create(create_input(team, pair[1], &name, overwrite, owner), now());
        let (first, second) = tokio::join!(first, second);
        let (won, lost, loser) = match (first, second) {
            (Ok(won), Err(lost)) => (won, lost, pair[1]),
            (Err(lost), Ok(won)) => (won, lost, pair[0]),
            other => panic!("round {round}: exactly one create must win, got {other:?}"),
        };
        let (code, message) = if overwrite {
            (
                ErrorCode::Conflict,
                "a snapshot with this name is being created; try again when it finishes",
            )
        } else {
            (
                ErrorCode::AlreadyExists,
                "a snapshot with this name is being created",
            )
        };
        assert_eq!(
            (lost.code(), lost.message()),
            (code, message),
            "round {round}"
        );
        assert_eq!(won.0.name.as_str(), name);
        let loser_status = a.get_sandbox(loser).await.expect("get").expect("sandbox");
        assert_eq!(loser_status.status, SandboxStatus::Running, "round {round}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM templates").await, 10);
    assert_eq!(count(&client, "SELECT count(*) FROM operations").await, 10);
}

/// The loser of a name race blocks on the name index until the winner
/// commits, violates it, and is run again: then its check sees the winner
/// and answers exactly as SQLite's would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_loses_a_name_race_is_retried_and_answers_like_the_check() {
    let Some((url, mut client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let team = TeamId::new();
    let (_, sandboxes) = host_with_sandboxes(&store, team, 1).await;
    // A concurrent create, stopped between its insert and its commit.
    let winner = TemplateId::new();
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO templates (id, team_id, name, type, state, created_at, updated_at)
         VALUES ($1, $2, 'taken', 'snapshot', 'creating', 0, 0)",
        &[&&winner.as_blob()[..], &&team.as_blob()[..]],
    )
    .await
    .expect("insert the winner");
    let loser = {
        let store = store.clone();
        let input = create_input(team, sandboxes[0], "taken", false, InstanceId::new());
        tokio::spawn(async move { store.begin_create(input, now()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!loser.is_finished(), "the loser waits on the name index");
    tx.commit().await.expect("commit the winner");
    let err = loser.await.expect("task").expect_err("the name is taken");
    assert_eq!(err.code(), ErrorCode::AlreadyExists);
    assert_eq!(err.message(), "a snapshot with this name is being created");
    let sandbox = store
        .get_sandbox(sandboxes[0])
        .await
        .expect("get")
        .expect("sandbox");
    assert_eq!(sandbox.status, SandboxStatus::Running);
}

/// A platform template and a team template of one name, created at once:
/// the later one waits on the name's advisory lock and then sees the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_name_and_a_team_name_cannot_be_taken_at_once() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let (a, b) = (open(&url).await, open(&url).await);
    let team = TeamId::new();
    let (host, sandboxes) = host_with_sandboxes(&a, team, 10).await;
    for (round, sandbox) in sandboxes.iter().enumerate() {
        let name = format!("shared-{round}");
        let platform = template_record(TeamId::PLATFORM, &name, crate::model::TemplateType::Base);
        let (base, snapshot) = tokio::join!(
            a.insert_ready_template(platform, vec![host], now()),
            b.begin_create(
                create_input(team, *sandbox, &name, false, InstanceId::new()),
                now()
            ),
        );
        match (base, snapshot) {
            (Ok(()), Err(err)) => assert_eq!(err.code(), ErrorCode::NameReserved, "{err:?}"),
            (Err(err), Ok(_)) => assert_eq!(err.code(), ErrorCode::AlreadyExists, "{err:?}"),
            other => panic!("round {round}: exactly one may take the name, got {other:?}"),
        }
    }
}

/// Waits until `n` sessions wait on a lock held (directly or through
/// another waiter) by the session `root`.
async fn wait_blocked_behind(client: &tokio_postgres::Client, root: i32, n: usize) {
    loop {
        let rows = client
            .query(
                "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        let mut behind: HashSet<i32> = HashSet::from([root]);
        loop {
            let before = behind.len();
            for r in &rows {
                let (pid, blockers): (i32, Vec<i32>) = (r.get(0), r.get(1));
                if blockers.iter().any(|b| behind.contains(b)) {
                    behind.insert(pid);
                }
            }
            if behind.len() == before {
                break;
            }
        }
        if behind.len() > n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A delete of a name whose overwrite is being finished at that moment
/// must delete one of the two templates that held the name (the old one,
/// or the new one once it took over), as SQLite's single writer would: the
/// name is visible before, during and after the finish.
///
/// Interleaving: `finish_create` of the overwrite holds a share lock on
/// the old template and waits to lock it for update (behind a session that
/// also reads it `FOR SHARE`); the delete's `SELECT … FOR UPDATE` then
/// waits behind the finish. The finish commits (old: `deleting`, new:
/// `ready`); the delete re-checks the one row its snapshot found, the old
/// one, finds it deleting, and never sees the new one: 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_an_overwrite_s_finish_deletes_a_template_not_404() {
    let Some((url, mut client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let team = TeamId::new();
    let (host, sandboxes) = host_with_sandboxes(&store, team, 1).await;
    let old = template_record(team, "busy", crate::model::TemplateType::Snapshot);
    let old_id = old.id;
    store
        .insert_ready_template(old, vec![host], now())
        .await
        .expect("the old template");
    let (op, _) = store
        .begin_create(
            create_input(team, sandboxes[0], "busy", true, InstanceId::new()),
            now(),
        )
        .await
        .expect("begin the overwrite");
    assert_eq!(op.replaces, Some(old_id));
    let new_id = op.template_id;

    // Another session reads the old template FOR SHARE (as any name check
    // does), so that the finish stops just before locking it for update.
    let reader = client.transaction().await.expect("begin");
    let root: i32 = reader
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    reader
        .execute(
            "SELECT 1 FROM templates WHERE id = $1 FOR SHARE",
            &[&&old_id.as_blob()[..]],
        )
        .await
        .expect("share lock");
    let watcher = fresh_watcher(&url).await;

    let finishing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .finish_create(op, 7, None, later(now(), 60_000), now())
                .await
        })
    };
    wait_blocked_behind(&watcher, root, 1).await;
    let deleting = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .begin_delete(
                    Actor::System,
                    team,
                    false,
                    TemplateName::parse("busy").expect("name"),
                    later(now(), 60_000),
                    now(),
                )
                .await
        })
    };
    wait_blocked_behind(&watcher, root, 2).await;
    reader.rollback().await.expect("release the share lock");

    let finished = finishing.await.expect("task").expect("finish");
    assert!(
        matches!(finished, crate::store::Finish::Done(_)),
        "{finished:?}"
    );
    let (deleted, _) = deleting
        .await
        .expect("task")
        .expect("the name was visible throughout: the delete must find a template");
    assert_eq!(deleted.id, new_id, "the delete ran after the finish");
    assert!(
        store
            .find_visible(team, TemplateName::parse("busy").expect("name"))
            .await
            .expect("find")
            .is_none()
    );
}

/// A second plain client on the test's schema, for watching locks.
async fn fresh_watcher(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// A deletion claimed by replica A, whose lease lapsed while A stalled, is
/// claimed again by B. A then resumes and records its own attempt's
/// failure: that must not end B's lease, or a third claim runs the same
/// deletion beside B's ("replicas never run one deletion twice at once").
/// `deletion_failed` clears `lease_until` whoever holds it now.
#[tokio::test]
async fn a_lapsed_claimer_s_late_failure_does_not_release_the_next_claim() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let t0 = now();
    let (host, _) = host_with_sandboxes(&store, TeamId::new(), 0).await;
    assert!(
        store
            .queue_orphan(TemplateId::new(), host, 1, t0)
            .await
            .expect("queue")
    );
    let by_a = store
        .claim_due_deletions(later(t0, 1), later(t0, 10), 10, Vec::new())
        .await
        .expect("A claims");
    assert_eq!(by_a.len(), 1);
    // A stalls past its lease; B claims the deletion for a long attempt.
    let by_b = store
        .claim_due_deletions(later(t0, 20), later(t0, 600_000), 10, Vec::new())
        .await
        .expect("B claims");
    assert_eq!(by_b.len(), 1, "A's lease lapsed");
    // A resumes: its attempt failed; it schedules a retry soon.
    store
        .record_deletions(
            vec![(
                by_a[0].clone(),
                crate::store::DeletionResult::Failed {
                    error: "timed out".into(),
                    retry_at: later(t0, 30),
                },
            )],
            later(t0, 21),
        )
        .await
        .expect("A records its failure");
    // B's attempt is still within its lease: nobody may claim it.
    let by_c = store
        .claim_due_deletions(later(t0, 40), later(t0, 600_000), 10, Vec::new())
        .await
        .expect("C claims");
    assert!(
        by_c.is_empty(),
        "claimed again while B's lease runs: {by_c:?}"
    );
}

/// TLS to the database: with the server's CA the pool's connections are
/// encrypted; a CA that did not sign the server's certificate, or no TLS
/// at all, cannot connect when the URL says `sslmode=require`. Needs the
/// test server's certificate in `SNAPSHOTS_TEST_POSTGRES_CA` (`.ci/run`
/// sets it; `.ci/postgres.sh` starts the server with TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_against_the_given_ca_only() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let Some(ca) = std::env::var_os("SNAPSHOTS_TEST_POSTGRES_CA") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but SNAPSHOTS_TEST_POSTGRES_CA is not: the TLS test cannot run"
        );
        return;
    };
    let ca = std::fs::read(ca).expect("read the server's certificate");
    let require = format!("{url}&sslmode=require");
    let with_ca = |pem: Vec<u8>| PostgresOptions {
        tls: Some(crate::agent::TlsConfig::new(pem)),
        ..PostgresOptions::default()
    };

    let store = PostgresStore::open(&require, with_ca(ca))
        .await
        .expect("open over TLS with the server's CA");
    let client = store.client().await.expect("a pooled connection");
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("ask the server")
        .get(0);
    assert!(encrypted, "the pool's connection is not encrypted");

    let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .expect("another CA")
        .cert
        .pem();
    let refused = PostgresStore::open(&require, with_ca(stranger.into_bytes()))
        .await
        .expect_err("a CA that did not sign the server's certificate");
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );
    PostgresStore::open(&require, PostgresOptions::default())
        .await
        .expect_err("sslmode=require without TLS configured");
}

// ------------------------------------------------------------- restores

/// A ready template record of `team` (1 vCPU, 128 MiB, 1 byte).
fn template_record(
    team: TeamId,
    name: &str,
    template_type: crate::model::TemplateType,
) -> crate::model::Template {
    crate::model::Template {
        id: TemplateId::new(),
        team,
        name: TemplateName::parse(name).expect("name"),
        template_type,
        vcpus: 1,
        memory_mb: 128,
        size_bytes: 1,
        created_at: now(),
        source_sandbox: None,
        state: crate::model::TemplateState::Ready,
        hosts: 0,
        compat: None,
        last_used_at: None,
        expires_at: None,
    }
}

/// A ready snapshot template of `team` named `name`, held by `host`.
async fn ready_template(
    store: &PostgresStore,
    team: TeamId,
    name: &str,
    host: HostId,
) -> TemplateId {
    let template = template_record(team, name, crate::model::TemplateType::Snapshot);
    let id = template.id;
    store
        .insert_ready_template(template, vec![host], now())
        .await
        .expect("insert the template");
    id
}

/// A restore of `template` (named `name`, held by `host`) into `sandbox`.
fn restore_input(
    team: TeamId,
    template: TemplateId,
    name: &str,
    host: HostId,
    sandbox: SandboxId,
    owner: InstanceId,
) -> crate::store::RestoreInput {
    crate::store::RestoreInput {
        op: crate::store::RestoreOp {
            id: OperationId::new(),
            team,
            template_id: template,
            template_name: TemplateName::parse(name).expect("name"),
            sandbox_id: sandbox,
            host: crate::agent::HostTarget {
                id: host,
                address: "http://127.0.0.1:1".into(),
            },
            vcpus: 1,
            memory_mb: 128,
            timeout_sec: 0,
            disk_size_mb: 0,
            actor: Actor::System,
            attempts: 0,
            created_at: now(),
        },
        placed: true,
        lease_until: later(now(), 60_000),
        owner,
        request: None,
    }
}

/// Two replicas restoring into one explicit sandbox id at once: exactly
/// one succeeds, the other gets 409 `already_exists` (never `db_error`),
/// and one sandbox row and one journal entry exist. In every other round
/// both first wait behind a session that locks the template, so that both
/// pass the id check before either inserts: the key decides, and the loser
/// (run again) answers what the check answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_restores_of_one_sandbox_id_one_wins_the_other_gets_already_exists() {
    let Some((url, mut client)) = fresh_schema().await else {
        return;
    };
    let (a, b) = (open(&url).await, open(&url).await);
    let team = TeamId::new();
    let (host, _) = host_with_sandboxes(&a, team, 0).await;
    let template = ready_template(&a, team, "golden", host).await;
    let watcher = fresh_watcher(&url).await;
    for round in 0..8 {
        let sandbox = SandboxId::new();
        let blocker = if round % 2 == 0 {
            let tx = client.transaction().await.expect("begin");
            let root: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get(0);
            tx.execute(
                "SELECT 1 FROM templates WHERE id = $1 FOR UPDATE",
                &[&&template.as_blob()[..]],
            )
            .await
            .expect("lock the template");
            Some((tx, root))
        } else {
            None
        };
        let restore = |store: &PostgresStore| {
            let store = store.clone();
            let input = restore_input(team, template, "golden", host, sandbox, InstanceId::new());
            tokio::spawn(async move { store.begin_restore(input, now()).await })
        };
        let (from_a, from_b) = (restore(&a), restore(&b));
        if let Some((tx, root)) = blocker {
            wait_blocked_behind(&watcher, root, 2).await;
            tx.rollback().await.expect("release the template");
        }
        let (from_a, from_b) = (from_a.await.expect("task a"), from_b.await.expect("task b"));
        match (from_a, from_b) {
            (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => {
                assert_eq!(
                    lost.code(),
                    ErrorCode::AlreadyExists,
                    "round {round}: {lost:?}"
                );
                assert_eq!(won.id, sandbox);
                assert_eq!(won.status, SandboxStatus::Starting);
                assert_eq!(won.template_id, Some(template));
            }
            other => panic!("round {round}: exactly one restore may take the id, got {other:?}"),
        }
        let id = &sandbox.as_blob()[..];
        for table in ["sandboxes WHERE id", "restores WHERE sandbox_id"] {
            let n: i64 = watcher
                .query_one(&format!("SELECT count(*) FROM {table} = $1"), &[&id])
                .await
                .expect("count")
                .get(0);
            assert_eq!(n, 1, "round {round}: {table}");
        }
    }
}

/// A delete that meets a restore of the same template still in its first
/// transaction waits for it (the restore share-locks the template), and
/// then queues the files the restore starts from without leasing them to
/// its own attempt; the worker gets them only once the restore is over.
///
/// Interleaving: a session holds an uncommitted journal row of the same
/// sandbox id, so `begin_restore` stops at its insert into `restores`,
/// after its checks and its template lock; the delete then waits behind
/// it. Without the lock the delete would not see the uncommitted journal
/// entry and hand the files to its caller for deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waits_for_a_restore_s_first_step_and_keeps_its_files() {
    let Some((url, mut client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let team = TeamId::new();
    let (host, _) = host_with_sandboxes(&store, team, 0).await;
    let template = ready_template(&store, team, "golden", host).await;
    let me = InstanceId::new();
    store
        .register_instance(me, later(now(), 60_000), now())
        .await
        .expect("register");
    let sandbox = SandboxId::new();
    let input = restore_input(team, template, "golden", host, sandbox, me);
    let op = input.op.clone();

    let holder = client.transaction().await.expect("begin");
    let root: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let blob = |b: &[u8]| b.to_vec();
    holder
        .execute(
            "INSERT INTO restores (id, sandbox_id, team_id, template_id, template_name, host_id,
                                   vcpus, memory_mb, timeout_sec, disk_size_mb, actor_type,
                                   created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'golden', $5, 1, 1, 0, 0, 'system', 0, 0)",
            &[
                &blob(OperationId::new().as_blob()),
                &blob(sandbox.as_blob()),
                &blob(team.as_blob()),
                &blob(template.as_blob()),
                &blob(host.as_blob()),
            ],
        )
        .await
        .expect("an uncommitted journal row");
    let watcher = fresh_watcher(&url).await;

    let restoring = {
        let store = store.clone();
        tokio::spawn(async move { store.begin_restore(input, now()).await })
    };
    wait_blocked_behind(&watcher, root, 1).await;
    let mut deleting = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .begin_delete(
                    Actor::System,
                    team,
                    false,
                    TemplateName::parse("golden").expect("name"),
                    later(now(), 60_000),
                    now(),
                )
                .await
        })
    };
    tokio::select! {
        () = wait_blocked_behind(&watcher, root, 2) => {}
        done = &mut deleting => panic!("the delete did not wait for the restore: {done:?}"),
    }
    holder.rollback().await.expect("release the journal row");

    let sandbox_row = restoring.await.expect("task").expect("the restore begins");
    assert_eq!(sandbox_row.status, SandboxStatus::Starting);
    let (deleted, targets) = deleting.await.expect("task").expect("the delete");
    assert_eq!(deleted.id, template);
    // Reported (the caller says the host is pending), but not claimed: the
    // caller does not try them.
    assert!(
        targets.iter().all(|d| d.claim.is_none()),
        "the restore's files were handed out: {targets:?}"
    );
    assert_eq!(targets.len(), 1, "{targets:?}");
    let t = later(now(), 1);
    assert!(
        store
            .claim_due_deletions(t, later(t, 60_000), 10, Vec::new())
            .await
            .expect("claim")
            .is_empty(),
        "claimable while the restore is open"
    );
    assert!(
        store
            .next_due(me, InHand::default())
            .await
            .expect("next due")
            .is_none_or(|at| at > t),
        "the held-back deletion must not wake the worker (only the restore's lease)"
    );

    let ended = store
        .end_restore(op, crate::store::RestoreEnd::Running, now())
        .await
        .expect("end")
        .expect("it was open");
    assert_eq!(ended.status, SandboxStatus::Running);
    let t = later(now(), 1);
    let claimed = store
        .claim_due_deletions(t, later(t, 60_000), 10, Vec::new())
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "due once the restore is over");
    assert_eq!(
        (claimed[0].template_id, claimed[0].host.id),
        (template, host)
    );
}

/// `n` sandboxes queued for destruction on `host` from `from` on: restores
/// that failed ambiguously.
async fn queue_destroys(
    store: &PostgresStore,
    team: TeamId,
    host: HostId,
    n: usize,
    from: Timestamp,
) -> HashSet<SandboxId> {
    let name = format!("t-{}", uuid::Uuid::new_v4().simple());
    let template = ready_template(store, team, &name, host).await;
    let mut queued = HashSet::new();
    for _ in 0..n {
        let input = restore_input(
            team,
            template,
            &name,
            host,
            SandboxId::new(),
            InstanceId::new(),
        );
        let op = input.op.clone();
        store.begin_restore(input, now()).await.expect("begin");
        let end = crate::store::RestoreEnd::Failed {
            error_code: "agent_error",
            message: "the host agent failed to start the sandbox".into(),
            destroy_from: Some(from),
        };
        store
            .end_restore(op.clone(), end, now())
            .await
            .expect("end")
            .expect("it was open");
        queued.insert(op.sandbox_id);
    }
    queued
}

/// Two replicas' workers claiming the destroy queue at once never get one
/// destroy both; a claim leases it; a lapsed claimer's late failure does
/// not end the next claimer's lease, while that claimer's own does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroys_are_never_claimed_twice_at_once() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let (a, b) = (open(&url).await, open(&url).await);
    let team = TeamId::new();
    let t0 = now();
    let mut queued = HashSet::new();
    for _ in 0..3 {
        let (host, _) = host_with_sandboxes(&a, team, 0).await;
        queued.extend(queue_destroys(&a, team, host, 10, t0).await);
    }
    let claim = |store: PostgresStore| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim_due_destroys(later(t0, 1), later(t0, 600_000), 4, Vec::new())
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch);
            }
        })
    };
    let (from_a, from_b) = (claim(a.clone()), claim(b.clone()));
    let (from_a, from_b) = (from_a.await.expect("a"), from_b.await.expect("b"));
    let mut seen = HashSet::new();
    for d in from_a.iter().chain(&from_b) {
        assert!(seen.insert(d.sandbox_id), "{d:?} was claimed twice");
        assert!(d.claim.is_some());
    }
    assert_eq!(seen, queued, "every due destroy is claimed exactly once");
    assert!(
        a.claim_due_destroys(later(t0, 2), later(t0, 600_000), 100, Vec::new())
            .await
            .expect("claim")
            .is_empty(),
        "leased"
    );

    // A lapsed claim, claimed again; the first claimer's late failure.
    let lapsed = later(t0, 600_001);
    let by_b = b
        .claim_due_destroys(lapsed, later(lapsed, 600_000), 100, Vec::new())
        .await
        .expect("B claims again");
    assert_eq!(by_b.len(), queued.len(), "the first leases lapsed");
    let first = from_a.first().or(from_b.first()).expect("claimed").clone();
    a.record_destroy(
        first.clone(),
        crate::store::DeletionResult::Failed {
            error: "timed out".into(),
            retry_at: later(lapsed, 10),
        },
        later(lapsed, 5),
    )
    .await
    .expect("the late failure");
    assert!(
        a.claim_due_destroys(later(lapsed, 20), later(lapsed, 600_000), 100, Vec::new())
            .await
            .expect("claim")
            .is_empty(),
        "claimed again while B's lease runs"
    );
    // B's own failure of the same destroy ends its lease.
    let mine = by_b
        .iter()
        .find(|d| d.sandbox_id == first.sandbox_id)
        .expect("B holds it")
        .clone();
    b.record_destroy(
        mine,
        crate::store::DeletionResult::Failed {
            error: "unavailable".into(),
            retry_at: later(lapsed, 30),
        },
        later(lapsed, 25),
    )
    .await
    .expect("B's failure");
    let retried = a
        .claim_due_destroys(later(lapsed, 40), later(lapsed, 600_000), 100, Vec::new())
        .await
        .expect("claim");
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].sandbox_id, first.sandbox_id);
    assert_eq!(retried[0].attempts, 1);
    // Confirmed: no longer queued, and the id stays used.
    a.record_destroy(
        retried[0].clone(),
        crate::store::DeletionResult::Confirmed,
        later(lapsed, 45),
    )
    .await
    .expect("confirm");
    let pending = a.pending_destroys().await.expect("pending");
    assert_eq!(pending.len(), queued.len() - 1);
    assert!(pending.iter().all(|p| p.sandbox != first.sandbox_id));
}

/// Restores follow their owner's lease as operations do: another
/// replica's restore is neither listed nor due to `me` while that lease
/// lives (the worker wakes at its end), and is taken over — due at once —
/// once it lapsed; a backed-off one keeps its backoff.
#[tokio::test]
async fn restores_are_adopted_only_once_their_owner_s_lease_lapsed() {
    let Some((url, _client)) = fresh_schema().await else {
        return;
    };
    let store = open(&url).await;
    let t0 = now();
    let (dead, me) = (InstanceId::new(), InstanceId::new());
    let lease_end = later(t0, 30_000);
    for id in [dead, me] {
        store
            .register_instance(id, lease_end, t0)
            .await
            .expect("register");
    }
    let team = TeamId::new();
    let (host, _) = host_with_sandboxes(&store, team, 0).await;
    let template = ready_template(&store, team, "golden", host).await;
    let driven = restore_input(team, template, "golden", host, SandboxId::new(), dead);
    let backed_off = restore_input(team, template, "golden", host, SandboxId::new(), dead);
    for input in [&driven, &backed_off] {
        store
            .begin_restore(input.clone(), t0)
            .await
            .expect("begin restore");
    }
    let backoff_end = later(t0, 120_000);
    store
        .postpone_restore(backed_off.op.id, "unreachable".into(), backoff_end, t0)
        .await
        .expect("postpone");

    assert!(
        store
            .open_restores(me, None)
            .await
            .expect("open")
            .is_empty()
    );
    assert_eq!(
        store.open_restores(dead, None).await.expect("open").len(),
        2
    );
    assert_eq!(
        store
            .adopt_operations(me, later(t0, 1))
            .await
            .expect("adopt"),
        0
    );
    assert_eq!(
        store
            .next_due(me, InHand::default())
            .await
            .expect("next due"),
        Some(lease_end),
        "the worker wakes when the owner's lease ends"
    );

    let lapsed = later(lease_end, 1);
    assert_eq!(store.adopt_operations(me, lapsed).await.expect("adopt"), 2);
    assert!(
        store
            .open_restores(dead, None)
            .await
            .expect("open")
            .is_empty()
    );
    let due: Vec<OperationId> = store
        .open_restores(me, Some(lapsed))
        .await
        .expect("open")
        .iter()
        .map(|op| op.id)
        .collect();
    assert_eq!(due, vec![driven.op.id], "the dead driver's lease is void");
    assert_eq!(store.open_restores(me, None).await.expect("open").len(), 2);
    // Held in hand, the due one does not wake the worker; the other's
    // backoff does.
    let in_hand = InHand {
        restores: vec![driven.op.id],
        ..InHand::default()
    };
    assert_eq!(
        store.next_due(me, in_hand).await.expect("next due"),
        Some(backoff_end)
    );
    assert_eq!(
        store.adopt_operations(me, lapsed).await.expect("adopt"),
        0,
        "our own entries are never taken again"
    );
}
