//! Run with: cargo bench --bench snapshots
//!
//! Measures the manager against the physical limits it sits on, each case
//! next to a baseline measured in the same run on the same machine, and
//! prints one table: case, ours, baseline, ratio, goal. Absolute times mean
//! little on shared machines; the ratios are the result.
//!
//! `cargo bench --bench snapshots -- NAME` runs the cases whose name
//! contains NAME. The one-million-template fixture is generated on first
//! use (bulk insert) and kept in `target/bench-fixtures/`. The PostgreSQL
//! cases run with `--features postgres` and a server in
//! `SNAPSHOTS_BENCH_POSTGRES_URL` (or `SNAPSHOTS_TEST_POSTGRES_URL`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use rusqlite::{Connection, params};
use sandbox_snapshots::agent::{
    CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest, SandboxList, SnapshotInfo,
};
use sandbox_snapshots::*;
use tokio::runtime::Runtime;

#[path = "cases/backlog.rs"]
mod backlog;
#[path = "cases/data_path.rs"]
mod data_path;

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Whether this is a quick run (`SNAPSHOTS_BENCH_QUICK=1`, as CI runs it so
/// that no case rots): small sizes and few iterations; the ratios of a quick
/// run mean little, the cases only have to run.
fn quick() -> bool {
    std::env::var("SNAPSHOTS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// How long a rate is measured: 3 s, or 0.3 s in a quick run.
fn budget() -> Duration {
    if quick() {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(3)
    }
}

/// `full` iterations, or `small` in a quick run.
fn iterations(full: usize, small: usize) -> usize {
    if quick() { small } else { full }
}

// ------------------------------------------------------------------ agents

/// A host agent that does no VM work at all.
struct NoopAgent;

#[async_trait]
impl HostAgent for NoopAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        Ok(CreateSnapshotResponse::new(req.key.as_str(), 4096))
    }
    async fn delete_snapshot(&self, _: DeleteSnapshotRequest) -> Result<(), AgentError> {
        Ok(())
    }
    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        Ok(SandboxList::default())
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        Ok(Vec::new())
    }
}

/// A host agent whose deletes take a fixed time (a busy fleet).
struct SlowDeleteAgent(Duration);

#[async_trait]
impl HostAgent for SlowDeleteAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        Ok(CreateSnapshotResponse::new(req.key.as_str(), 4096))
    }
    async fn delete_snapshot(&self, _: DeleteSnapshotRequest) -> Result<(), AgentError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        Ok(SandboxList::default())
    }
}

// ----------------------------------------------------------------- helpers

struct Row {
    case: String,
    ours: String,
    baseline: String,
    ratio: f64,
    goal: String,
    met: bool,
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn options(sync: Synchronous) -> ManagerOptions {
    let mut o = ManagerOptions::default();
    o.store.synchronous = sync;
    o
}

fn sync_pragma(sync: Synchronous) -> &'static str {
    match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
        _ => "OFF",
    }
}

struct Fleet {
    manager: Manager,
    team: TeamId,
    host: HostId,
}

async fn fleet(dir: &Path, sync: Synchronous, agent: Arc<dyn HostAgent>) -> BenchResult<Fleet> {
    let url = format!("sqlite:{}", dir.join("bench.db").display());
    fleet_on(&url, options(sync), agent).await
}

/// A manager on the database `url` with one in-process host.
async fn fleet_on(
    url: &str,
    options: ManagerOptions,
    agent: Arc<dyn HostAgent>,
) -> BenchResult<Fleet> {
    let transport = Arc::new(InProcessTransport::new());
    let host = HostId::new();
    transport.add_host(host, agent);
    let manager = Manager::open_url(url, transport, options).await?;
    manager
        .registry()
        .register_host(host, "in-process", HostStatus::Online)
        .await?;
    Ok(Fleet {
        manager,
        team: TeamId::new(),
        host,
    })
}

impl Fleet {
    async fn sandbox(&self) -> BenchResult<SandboxId> {
        let id = SandboxId::new();
        self.manager
            .registry()
            .register_sandbox(Sandbox::new(
                id,
                self.team,
                Some(self.host),
                SandboxStatus::Running,
                2,
                512,
            ))
            .await?;
        Ok(id)
    }

    fn caller(&self) -> Caller {
        Caller::new(self.team, Actor::System)
    }
}

/// `commits` single-row insert commits, like the manager's transactions,
/// on a fresh WAL file with the same `synchronous`.
struct RawCommits {
    conn: Connection,
}

impl RawCommits {
    fn open(path: &Path, sync: Synchronous) -> BenchResult<Self> {
        let conn = Connection::open(path)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}; CREATE TABLE IF NOT EXISTS t (id BLOB PRIMARY KEY, v TEXT NOT NULL);",
            sync_pragma(sync)
        ))?;
        Ok(Self { conn })
    }

    fn commit(&self) -> BenchResult<()> {
        self.conn.execute(
            "INSERT INTO t (id, v) VALUES (?1, 'x')",
            params![uuid::Uuid::new_v4().as_bytes().to_vec()],
        )?;
        Ok(())
    }
}

/// Runs `f` repeatedly for at least `budget`, returning runs per second.
fn rate(budget: Duration, mut f: impl FnMut() -> BenchResult<()>) -> BenchResult<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget || n < 20 {
        f()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- cases

/// Create+delete cycles, one task, against raw commits: a cycle needs four
/// (create: journal + finish; delete: mark + confirm).
fn cycle(rt: &Runtime, dir: &Path, sync: Synchronous) -> BenchResult<Row> {
    let budget = budget();
    let ours = rt.block_on(async {
        let f = fleet(
            &dir.join(format!("cycle-{}", sync_pragma(sync))),
            sync,
            Arc::new(NoopAgent),
        )
        .await?;
        cycles(f, budget).await
    })?;
    let raw = RawCommits::open(&dir.join(format!("raw-{}.db", sync_pragma(sync))), sync)?;
    let baseline = rate(budget, || {
        for _ in 0..4 {
            raw.commit()?;
        }
        Ok(())
    })?;
    let ratio = ours / baseline;
    // FULL: a confirmed deletion's record commits without fsync (losing it
    // only repeats a harmless delete), so a cycle pays three of the four.
    let goal = match sync {
        Synchronous::Full => 0.7,
        _ => 0.5,
    };
    Ok(Row {
        case: format!("create+delete cycle, synchronous={}", sync_pragma(sync)),
        ours: format!("{ours:.0} cycles/s"),
        baseline: format!("{baseline:.0} (4 raw commits)/s"),
        ratio,
        goal: format!("≥ {goal}"),
        met: ratio >= goal,
    })
}

/// Create+delete cycles of one task for `budget`: cycles per second.
async fn cycles(f: Fleet, budget: Duration) -> BenchResult<f64> {
    {
        let sb = f.sandbox().await?;
        let name = TemplateName::parse("cycle")?;
        let caller = f.caller();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget || n < 20 {
            f.manager
                .create(&caller, NewSnapshot::new(sb, Some(name.clone())))
                .await?;
            f.manager.delete(&caller, &name).await?;
            n += 1;
        }
        let per_sec = n as f64 / start.elapsed().as_secs_f64();
        f.manager.shutdown().await;
        BenchResult::Ok(per_sec)
    }
}

/// What [`creates`] measured.
struct Creates {
    single_rate: f64,
    throughput: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// 64 tasks creating concurrently on distinct sandboxes, against one task.
fn concurrent(rt: &Runtime, dir: &Path) -> BenchResult<Vec<Row>> {
    let c = rt.block_on(async {
        let f = fleet(
            &dir.join("concurrent"),
            Synchronous::Full,
            Arc::new(NoopAgent),
        )
        .await?;
        creates(f).await
    })?;
    let ratio = c.throughput / c.single_rate;
    Ok(vec![Row {
        case: format!("64 concurrent creates (FULL), {} errors", c.errors),
        ours: format!(
            "{:.0} creates/s, p50 {}, p99 {}",
            c.throughput,
            ms(c.p50),
            ms(c.p99)
        ),
        baseline: format!("{:.0} creates/s, one task", c.single_rate),
        ratio,
        goal: "≥ 0.8, 0 errors".into(),
        met: ratio >= 0.8 && c.errors == 0,
    }])
}

/// Sequential creates for 3 s, then 64 tasks creating on distinct
/// sandboxes for 3 s.
async fn creates(f: Fleet) -> BenchResult<Creates> {
    const TASKS: usize = 64;
    let budget = budget();
    {
        let f = Arc::new(f);
        // One task, sequential creates.
        let sb = f.sandbox().await?;
        let caller = f.caller();
        let start = Instant::now();
        let mut single = 0u64;
        while start.elapsed() < budget || single < 20 {
            f.manager
                .create(
                    &caller,
                    NewSnapshot::new(sb, Some(TemplateName::parse(&format!("s{single}"))?)),
                )
                .await?;
            single += 1;
        }
        let single_rate = single as f64 / start.elapsed().as_secs_f64();

        let mut sandboxes = Vec::new();
        for _ in 0..TASKS {
            sandboxes.push(f.sandbox().await?);
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (t, sb) in sandboxes.into_iter().enumerate() {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                let caller = f.caller();
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut i = 0u64;
                while start.elapsed() < budget {
                    let name =
                        TemplateName::parse(&format!("t{t}-{i}")).map_err(|e| e.to_string())?;
                    let began = Instant::now();
                    match f
                        .manager
                        .create(&caller, NewSnapshot::new(sb, Some(name)))
                        .await
                    {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                Ok::<_, String>((latencies, errors))
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (l, e) = task.await??;
            latencies.extend(l);
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let throughput = latencies.len() as f64 / elapsed;
        let p99 = percentile(&mut latencies, 0.99);
        let p50 = percentile(&mut latencies, 0.50);
        f.manager.shutdown().await;
        Ok(Creates {
            single_rate,
            throughput,
            p50,
            p99,
            errors,
        })
    }
}

#[cfg(feature = "server")]
#[path = "cases/api_load.rs"]
mod api_load;

// ------------------------------------------------------------ PostgreSQL

/// The PostgreSQL cases: the create+delete cycle and 64 concurrent creates
/// on the PostgreSQL store, against raw `tokio-postgres` commits of the same
/// count on the same server in the same run. They need a server:
/// `SNAPSHOTS_BENCH_POSTGRES_URL` (or `SNAPSHOTS_TEST_POSTGRES_URL`), e.g.
/// from `bash .ci/postgres.sh start DIR`; each run uses a fresh schema.
#[cfg(feature = "postgres")]
mod pg {
    use super::*;

    pub(super) fn server() -> Option<String> {
        [
            "SNAPSHOTS_BENCH_POSTGRES_URL",
            "SNAPSHOTS_TEST_POSTGRES_URL",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
    }

    /// A fresh schema on `base`, as a URL whose `search_path` is it.
    async fn schema(base: &str, name: &str) -> BenchResult<String> {
        let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let schema = format!("bench_{name}_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(format!("{base}{sep}options=-csearch_path%3D{schema}"))
    }

    /// The baseline: a pool of the store's size doing single-row insert
    /// transactions (BEGIN, INSERT, COMMIT), like the manager's.
    struct Raw {
        pool: deadpool_postgres::Pool,
    }

    impl Raw {
        async fn open(url: &str) -> BenchResult<Self> {
            let config: tokio_postgres::Config = url.parse()?;
            let manager = deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres::NoTls,
                deadpool_postgres::ManagerConfig {
                    recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                },
            );
            let pool = deadpool_postgres::Pool::builder(manager)
                .max_size(PostgresOptions::default().max_connections)
                .build()?;
            pool.get()
                .await?
                .batch_execute("CREATE TABLE t (id BYTEA PRIMARY KEY, v TEXT NOT NULL)")
                .await?;
            Ok(Self { pool })
        }

        async fn commit(&self) -> BenchResult<()> {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let id = uuid::Uuid::new_v4().as_bytes().to_vec();
            tx.execute("INSERT INTO t (id, v) VALUES ($1, 'x')", &[&id])
                .await?;
            tx.commit().await?;
            Ok(())
        }

        /// Commits per second of `tasks` tasks each doing `per_op` commits
        /// back to back, for `budget`: operations of `per_op` commits per
        /// second.
        async fn rate(
            self: &Arc<Self>,
            tasks: usize,
            per_op: usize,
            budget: Duration,
        ) -> BenchResult<f64> {
            let start = Instant::now();
            let mut handles = Vec::new();
            for _ in 0..tasks {
                let raw = self.clone();
                handles.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while start.elapsed() < budget || n < 5 {
                        for _ in 0..per_op {
                            raw.commit().await.map_err(|e| e.to_string())?;
                        }
                        n += 1;
                    }
                    Ok::<_, String>(n)
                }));
            }
            let mut total = 0u64;
            for h in handles {
                total += h.await??;
            }
            Ok(total as f64 / start.elapsed().as_secs_f64())
        }
    }

    pub(super) fn cases(rt: &Runtime, base: &str) -> BenchResult<Vec<Row>> {
        let budget = budget();
        rt.block_on(async {
            // The cycle: four commits (create: journal + finish; delete:
            // mark + confirm).
            let url = schema(base, "cycle").await?;
            let f = fleet_on(&url, ManagerOptions::default(), Arc::new(NoopAgent)).await?;
            let ours = cycles(f, budget).await?;
            let raw = Arc::new(Raw::open(&schema(base, "raw").await?).await?);
            let baseline = raw.rate(1, 4, budget).await?;
            let ratio = ours / baseline;
            let mut rows = vec![Row {
                case: "PostgreSQL: create+delete cycle".into(),
                ours: format!("{ours:.0} cycles/s"),
                baseline: format!("{baseline:.0} (4 raw commits)/s"),
                ratio,
                goal: "≥ 0.5".into(),
                met: ratio >= 0.5,
            }];

            // 64 concurrent creates: two commits each, against 64 tasks of
            // two raw commits; and against one task of ours.
            let url = schema(base, "concurrent").await?;
            let f = fleet_on(&url, ManagerOptions::default(), Arc::new(NoopAgent)).await?;
            let c = creates(f).await?;
            let raw64 = raw.rate(64, 2, budget).await?;
            let ratio = c.throughput / raw64;
            let scaling = c.throughput / c.single_rate;
            rows.push(Row {
                case: format!("PostgreSQL: 64 concurrent creates, {} errors", c.errors),
                ours: format!(
                    "{:.0} creates/s, p50 {}, p99 {}; one task {:.0}/s",
                    c.throughput,
                    ms(c.p50),
                    ms(c.p99),
                    c.single_rate
                ),
                baseline: format!("{raw64:.0} (2 raw commits)/s, 64 tasks"),
                ratio,
                goal: format!("≥ 0.5, and ≥ 3× one task (is {scaling:.2}×), 0 errors"),
                met: ratio >= 0.5 && scaling >= 3.0 && c.errors == 0,
            });
            Ok(rows)
        })
    }
}

// --------------------------------------------------------- the big store

/// The big store's shape: (teams, the big team's templates, the other
/// teams' templates each, platform templates). About a million templates;
/// a quick run uses a store of about 3,000.
fn shape() -> (usize, usize, usize, usize) {
    if quick() {
        (20, 1_000, 99, 100)
    } else {
        (1000, 10_000, 990, 100)
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-fixtures")
}

/// A store with about a million templates across a thousand teams: one team
/// of 10,000, the others of 990, and 100 platform templates. Built once with
/// a bulk insert; returns the path and the big team.
fn big_store(rt: &Runtime) -> BenchResult<(PathBuf, TeamId)> {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir)?;
    let (teams, big_team, per_team, platform) = shape();
    let db = dir.join(if quick() { "quick.db" } else { "million.db" });
    let big = TeamId::from_uuid(uuid::Uuid::from_u128(0xb16));
    let expected = (big_team + (teams - 1) * per_team + platform) as i64;
    if db.exists() {
        let conn = Connection::open(&db)?;
        let n: i64 = conn
            .query_row("SELECT count(*) FROM templates", [], |r| r.get(0))
            .unwrap_or(0);
        if n == expected {
            return Ok((db, big));
        }
        drop(conn);
        std::fs::remove_file(&db)?;
    }
    eprintln!("building the million-template fixture (once) ...");
    let started = Instant::now();
    // Create the schema the normal way.
    rt.block_on(async {
        let mut options = ManagerOptions::default();
        options.run_janitor = false;
        let m = Manager::open(&db, Arc::new(InProcessTransport::new()), options).await?;
        m.shutdown().await;
        BenchResult::Ok(())
    })?;
    let mut conn = Connection::open(&db)?;
    conn.execute_batch("PRAGMA synchronous = OFF;")?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                    created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'ready', 2, 512, 1048576, ?5, ?5)",
        )?;
        let base_ms: i64 = 1_700_000_000_000;
        let mut seq: i64 = 0;
        let mut add = |team: uuid::Uuid, count: usize, kind: &str| -> BenchResult<()> {
            for i in 0..count {
                seq += 1;
                insert.execute(params![
                    uuid::Uuid::new_v4().as_bytes().to_vec(),
                    team.as_bytes().to_vec(),
                    format!("snap-{i}"),
                    kind,
                    base_ms + (seq * 7919) % 100_000_000,
                ])?;
            }
            Ok(())
        };
        add(uuid::Uuid::nil(), platform, "base")?;
        add(big.as_uuid(), big_team, "snapshot")?;
        for t in 1..teams {
            add(uuid::Uuid::from_u128(t as u128), per_team, "snapshot")?;
        }
    }
    tx.commit()?;
    conn.execute_batch("ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")?;
    eprintln!("fixture built in {:.1} s", started.elapsed().as_secs_f64());
    Ok((db, big))
}

/// The listing query the manager runs, on a plain connection, decoding the
/// same columns into plain tuples.
const RAW_LIST: &str = "SELECT * FROM (
    SELECT id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id
    FROM templates INDEXED BY templates_visible WHERE team_id = ?1 AND state = 'ready'
    ORDER BY created_at DESC, id DESC LIMIT ?3)
  UNION ALL SELECT * FROM (
    SELECT id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id
    FROM templates INDEXED BY templates_visible WHERE team_id = ?2 AND state = 'ready'
    ORDER BY created_at DESC, id DESC LIMIT ?3)
  ORDER BY created_at DESC, id DESC LIMIT ?3";

type RawRow = (
    Vec<u8>,
    Vec<u8>,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<Vec<u8>>,
);

fn raw_list(conn: &Connection, team: TeamId, limit: i64) -> BenchResult<usize> {
    let mut stmt = conn.prepare_cached(RAW_LIST)?;
    let rows = stmt
        .query_map(
            params![
                team.as_uuid().as_bytes().to_vec(),
                uuid::Uuid::nil().as_bytes().to_vec(),
                limit
            ],
            |r| -> rusqlite::Result<RawRow> {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows.len())
}

fn lists(rt: &Runtime) -> BenchResult<Vec<Row>> {
    let (db, big) = big_store(rt)?;
    let mut rows = Vec::new();
    let conn = Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    rt.block_on(async {
        let mut o = ManagerOptions::default();
        o.run_janitor = false;
        let manager = Manager::open(&db, Arc::new(InProcessTransport::new()), o).await?;
        let caller = Caller::new(big, Actor::System);
        let (teams, big_team, per_team, platform) = shape();
        let scale = if quick() {
            format!(
                "{} templates / {teams} teams (quick)",
                big_team + (teams - 1) * per_team + platform
            )
        } else {
            "1M templates / 1,000 teams".to_owned()
        };
        for (label, limit, iterations) in [
            ("first page of 100", Some(100u32), iterations(300, 20)),
            ("whole team of 10,000", None, iterations(30, 5)),
        ] {
            let expected = limit.map_or(big_team + platform, |l| l as usize);
            let mut ours = Vec::new();
            let mut raw = Vec::new();
            for i in 0..iterations + 3 {
                let mut q = ListQuery::new();
                if let Some(l) = limit {
                    q = q.limit(l);
                }
                let began = Instant::now();
                let page = manager.list(&caller, q).await?;
                let took = began.elapsed();
                assert_eq!(page.items.len(), expected);
                let began = Instant::now();
                let n = raw_list(&conn, big, limit.map_or(-1, i64::from))?;
                let raw_took = began.elapsed();
                assert_eq!(n, expected);
                if i >= 3 {
                    ours.push(took);
                    raw.push(raw_took);
                }
            }
            let (p50, p99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
            let (r50, r99) = (percentile(&mut raw, 0.5), percentile(&mut raw, 0.99));
            let ratio = p50.as_secs_f64() / r50.as_secs_f64();
            let ratio99 = p99.as_secs_f64() / r99.as_secs_f64();
            rows.push(Row {
                case: format!("list {label}, {scale}"),
                ours: format!("p50 {}, p99 {}", ms(p50), ms(p99)),
                baseline: format!("raw SQL p50 {}, p99 {}", ms(r50), ms(r99)),
                ratio,
                goal: format!("≤ 2 (p99 ratio {ratio99:.2})"),
                met: ratio <= 2.0 && ratio99 <= 2.0,
            });
        }
        manager.shutdown().await;
        BenchResult::Ok(())
    })?;
    Ok(rows)
}

/// Peak RSS of a child process that pages through every template of every
/// team with pages of 1,000.
fn memory(rt: &Runtime) -> BenchResult<Row> {
    let (db, _) = big_store(rt)?;
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .env("SNAPSHOTS_BENCH_PAGE_ALL", &db)
        .output()?;
    if !out.status.success() {
        return Err(format!("pager failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> BenchResult<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("pager did not report {key}: {text}").into())
    };
    let peak_kib = field("peak_rss_kib=")?;
    let seen = field("templates=")?;
    let mib = peak_kib as f64 / 1024.0;
    Ok(Row {
        case: format!("peak RSS paging all {seen} templates"),
        ours: format!("{mib:.1} MiB"),
        baseline: "—".into(),
        ratio: mib / 64.0,
        goal: "< 64 MiB".into(),
        met: mib < 64.0,
    })
}

/// The child side of [`memory`].
fn page_all(db: &str) -> BenchResult<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let teams: Vec<TeamId> = {
        let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut stmt = conn.prepare("SELECT DISTINCT team_id FROM templates")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        ids.into_iter()
            .filter_map(|b| uuid::Uuid::from_slice(&b).ok().map(TeamId::from_uuid))
            .collect()
    };
    let seen = rt.block_on(async {
        let mut o = ManagerOptions::default();
        o.run_janitor = false;
        let manager = Manager::open(db, Arc::new(InProcessTransport::new()), o).await?;
        let mut seen = 0usize;
        for team in teams {
            let caller = Caller::new(team, Actor::System);
            let mut cursor: Option<String> = None;
            loop {
                let mut q = ListQuery::new().limit(1000);
                if let Some(c) = cursor.take() {
                    q = q.cursor(c);
                }
                let page = manager.list(&caller, q).await?;
                // Platform templates show in every team's list: count them once.
                seen += page
                    .items
                    .iter()
                    .filter(|t| !t.is_platform() || team.is_platform())
                    .count();
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        manager.shutdown().await;
        BenchResult::Ok(seen)
    })?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    println!("templates={seen}");
    println!("peak_rss_kib={peak}");
    Ok(())
}

/// Delete on a fleet of 100 hosts whose agents each take 50 ms.
fn fleet_delete(rt: &Runtime, dir: &Path) -> BenchResult<Row> {
    const HOSTS: usize = 100;
    let delay = Duration::from_millis(50);
    rt.block_on(async {
        let transport = Arc::new(InProcessTransport::new());
        let agent: Arc<dyn HostAgent> = Arc::new(SlowDeleteAgent(delay));
        let mut o = options(Synchronous::Full);
        o.run_janitor = false;
        let manager = Manager::open(dir.join("fleet.db"), transport.clone(), o).await?;
        let mut hosts = Vec::new();
        for _ in 0..HOSTS {
            let h = HostId::new();
            transport.add_host(h, agent.clone());
            manager
                .registry()
                .register_host(h, "in-process", HostStatus::Online)
                .await?;
            hosts.push(h);
        }
        let team = TeamId::new();
        let caller = Caller::new(team, Actor::System);
        let mut ours = Vec::new();
        for i in 0..12 {
            let name = TemplateName::parse(&format!("fleet-{i}"))?;
            manager
                .registry()
                .register_template(
                    NewTemplate::new(team, name.clone(), TemplateType::Base)
                        .on_hosts(hosts.clone()),
                )
                .await?;
            let began = Instant::now();
            let deleted = manager.delete(&caller, &name).await?;
            let took = began.elapsed();
            assert_eq!(deleted.hosts_confirmed.len(), HOSTS);
            if i >= 2 {
                ours.push(took);
            }
        }
        // (a) one agent round trip; (b) the reference's sequential broadcast.
        let mut one = Vec::new();
        for _ in 0..10 {
            let began = Instant::now();
            agent
                .delete_snapshot(DeleteSnapshotRequest::new(
                    agent::SnapshotKey::for_template(TemplateId::new()),
                ))
                .await?;
            one.push(began.elapsed());
        }
        let began = Instant::now();
        for _ in 0..HOSTS {
            agent
                .delete_snapshot(DeleteSnapshotRequest::new(
                    agent::SnapshotKey::for_template(TemplateId::new()),
                ))
                .await?;
        }
        let sequential = began.elapsed();
        manager.shutdown().await;
        let p50 = percentile(&mut ours, 0.5);
        let one = percentile(&mut one, 0.5);
        let ratio = p50.as_secs_f64() / one.as_secs_f64();
        BenchResult::Ok(Row {
            case: "delete on 100 hosts, 50 ms agents".into(),
            ours: format!("p50 {}", ms(p50)),
            baseline: format!(
                "(a) one round trip {}; (b) sequential broadcast {}",
                ms(one),
                ms(sequential)
            ),
            ratio,
            goal: format!(
                "≤ 1.2 × (a) (vs (b): {:.3})",
                p50.as_secs_f64() / sequential.as_secs_f64()
            ),
            met: ratio <= 1.2,
        })
    })
}

/// The create request as existing agents see it, for the raw tonic call.
#[derive(Clone, PartialEq, prost::Message)]
struct WireCreate {
    #[prost(string, tag = "1")]
    sandbox_id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "3")]
    team_id: String,
    #[prost(string, tag = "4")]
    template_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireCreated {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "2")]
    size_bytes: i64,
}

/// Create over gRPC on loopback against a raw tonic call of the same
/// message; the overhead should be at most the two commits a create needs.
fn grpc_create(rt: &Runtime, dir: &Path) -> BenchResult<Row> {
    let n = iterations(300, 30);
    rt.block_on(async {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, _server) = HostAgentServer::new(Arc::new(NoopAgent))
            .spawn("127.0.0.1:0".parse()?, async {
                let _ = stopped.await;
            })
            .await?;
        let mut o = options(Synchronous::Full);
        o.run_janitor = false;
        let manager = Manager::open(
            dir.join("grpc.db"),
            Arc::new(GrpcTransport::new(GrpcConfig::default())),
            o,
        )
        .await?;
        let host = HostId::new();
        manager
            .registry()
            .register_host(host, addr.to_string(), HostStatus::Online)
            .await?;
        let team = TeamId::new();
        let sb = SandboxId::new();
        manager
            .registry()
            .register_sandbox(Sandbox::new(
                sb,
                team,
                Some(host),
                SandboxStatus::Running,
                1,
                1,
            ))
            .await?;
        let caller = Caller::new(team, Actor::System);

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        let path =
            ::http::uri::PathAndQuery::from_static("/hostagent.v1.HostAgentService/CreateSnapshot");
        let raw_db = RawCommits::open(&dir.join("pair.db"), Synchronous::Full)?;

        let (mut ours, mut raw, mut pair) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n + 20 {
            let name = TemplateName::parse(&format!("g{i}"))?;
            let began = Instant::now();
            manager
                .create(&caller, NewSnapshot::new(sb, Some(name)))
                .await?;
            let o = began.elapsed();

            let msg = WireCreate {
                sandbox_id: sb.to_string(),
                name: TemplateId::new().to_string(),
                team_id: team.to_string(),
                template_id: TemplateId::new().to_string(),
            };
            let began = Instant::now();
            grpc.ready().await?;
            let _: tonic::Response<WireCreated> = grpc
                .unary(
                    tonic::Request::new(msg.clone()),
                    path.clone(),
                    tonic_prost::ProstCodec::default(),
                )
                .await?;
            let r = began.elapsed();
            let _ = msg.encoded_len();

            let began = Instant::now();
            raw_db.commit()?;
            raw_db.commit()?;
            let p = began.elapsed();
            if i >= 20 {
                ours.push(o);
                raw.push(r);
                pair.push(p);
            }
        }
        let _ = stop.send(());
        manager.shutdown().await;
        let (o50, r50, p50) = (
            percentile(&mut ours, 0.5),
            percentile(&mut raw, 0.5),
            percentile(&mut pair, 0.5),
        );
        let overhead = o50.saturating_sub(r50);
        let ratio = overhead.as_secs_f64() / p50.as_secs_f64();
        BenchResult::Ok(Row {
            case: "create over gRPC on loopback (FULL)".into(),
            ours: format!("p50 {} (overhead {})", ms(o50), ms(overhead)),
            baseline: format!(
                "raw tonic call p50 {}; commit pair p50 {}",
                ms(r50),
                ms(p50)
            ),
            ratio,
            goal: "overhead ≤ 1 commit pair".into(),
            met: ratio <= 1.0,
        })
    })
}

fn main() -> BenchResult<()> {
    if let Ok(db) = std::env::var("SNAPSHOTS_BENCH_PAGE_ALL") {
        return page_all(&db);
    }
    if let Ok(arg) = std::env::var(backlog::DRAIN_ENV) {
        return backlog::drain_child(&arg);
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let mut timings: HashMap<&str, f64> = HashMap::new();
    let mut run = |name: &'static str,
                   rows_out: &mut Vec<Row>,
                   f: &mut dyn FnMut() -> BenchResult<Vec<Row>>|
     -> BenchResult<()> {
        if wanted(name) {
            let began = Instant::now();
            rows_out.extend(f()?);
            timings.insert(name, began.elapsed().as_secs_f64());
        }
        Ok(())
    };
    run("cycle", &mut rows, &mut || {
        Ok(vec![
            cycle(&rt, dir.path(), Synchronous::Normal)?,
            cycle(&rt, dir.path(), Synchronous::Full)?,
        ])
    })?;
    run("concurrent", &mut rows, &mut || concurrent(&rt, dir.path()))?;
    run("list", &mut rows, &mut || lists(&rt))?;
    run("fleet", &mut rows, &mut || {
        Ok(vec![fleet_delete(&rt, dir.path())?])
    })?;
    run("grpc", &mut rows, &mut || {
        Ok(vec![grpc_create(&rt, dir.path())?])
    })?;
    run("memory", &mut rows, &mut || Ok(vec![memory(&rt)?]))?;
    run("api", &mut rows, &mut || {
        #[cfg(feature = "server")]
        {
            api_load::cases(&rt, dir.path())
        }
        #[cfg(not(feature = "server"))]
        {
            eprintln!("skipping the REST API cases: they need --features server");
            Ok(Vec::new())
        }
    })?;
    run("datapath", &mut rows, &mut || data_path::cases(&rt))?;
    run("backlog", &mut rows, &mut || {
        let mut rows = backlog::drain(&rt, dir.path())?;
        rows.extend(backlog::recovery(&rt, dir.path())?);
        Ok(rows)
    })?;
    run("postgres", &mut rows, &mut || {
        #[cfg(feature = "postgres")]
        if let Some(base) = pg::server() {
            return pg::cases(&rt, &base);
        }
        eprintln!(
            "skipping the PostgreSQL cases: they need --features postgres and \
             SNAPSHOTS_BENCH_POSTGRES_URL (or SNAPSHOTS_TEST_POSTGRES_URL)"
        );
        Ok(Vec::new())
    })?;

    println!();
    println!("| case | ours | baseline (same run) | ratio | goal | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {} | {} |",
            r.case,
            r.ours,
            r.baseline,
            r.ratio,
            r.goal,
            if r.met { "yes" } else { "**no**" }
        );
    }
    let mut names: Vec<_> = timings.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    eprintln!("case wall times: {names:?}");
    Ok(())
}
