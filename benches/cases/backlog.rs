//! Backlog cases (issue 14, item 3): a host that comes back with a long
//! queue of deletions, and a start-up with many interrupted creates.
//!
//! Both journals are written with bulk SQL into a fresh store (as a crashed
//! or long-partitioned fleet leaves them), then a manager is let loose on
//! them. The drain runs in a child process of the bench binary (switch:
//! `SNAPSHOTS_BENCH_BACKLOG_DRAIN`) so that its peak RSS is the manager's.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

/// The child switch of [`drain`]: the database to drain, then the backlog
/// host and the quiet host, as `DB|HOST|HOST`.
pub(super) const DRAIN_ENV: &str = "SNAPSHOTS_BENCH_BACKLOG_DRAIN";

/// Concurrent deletes the worker runs on one host: the store claims at most
/// this many per host per batch (`PER_HOST` in the SQLite store) and the
/// host stays busy until its batch is done.
const PER_HOST: usize = 16;

/// How long the busy host's agent takes per delete.
const DELETE_TIME: Duration = Duration::from_millis(1);

fn sizes() -> (usize, usize, usize) {
    // (queued deletions, interrupted creates, hosts)
    if quick() {
        (2_000, 500, 20)
    } else {
        (100_000, 10_000, 100)
    }
}

fn blob(u: uuid::Uuid) -> Vec<u8> {
    u.as_bytes().to_vec()
}

/// Creates the schema the normal way and registers `hosts` with `status`.
fn fresh_store(rt: &Runtime, db: &Path, hosts: &[(HostId, HostStatus)]) -> BenchResult<()> {
    rt.block_on(async {
        let mut o = options(Synchronous::Full);
        o.run_janitor = false;
        let m = Manager::open(db, Arc::new(InProcessTransport::new()), o).await?;
        for (h, status) in hosts {
            m.registry()
                .register_host(*h, "in-process", *status)
                .await?;
        }
        m.shutdown().await;
        BenchResult::Ok(())
    })
}

fn bulk(
    db: &Path,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> BenchResult<()>,
) -> BenchResult<()> {
    let mut conn = Connection::open(db)?;
    conn.execute_batch("PRAGMA synchronous = OFF;")?;
    let tx = conn.transaction()?;
    f(&tx)?;
    tx.commit()?;
    conn.execute_batch("ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(())
}

fn count(conn: &Connection, sql: &str) -> BenchResult<i64> {
    Ok(conn.query_row(sql, [], |r| r.get(0))?)
}

// ------------------------------------------------------------ the drain

/// `n` deletes on `agent`, `PER_HOST` at a time: deletes per second.
async fn agent_delete_rate(agent: Arc<dyn HostAgent>, n: usize) -> BenchResult<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..PER_HOST {
        let (agent, next) = (agent.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                agent
                    .delete_snapshot(DeleteSnapshotRequest::new(
                        agent::SnapshotKey::for_template(TemplateId::new()),
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A host that was down comes back with a queue of deletions: drain rate
/// against the agent's own delete rate at the same concurrency, the
/// manager's peak RSS meanwhile, and the p99 of creates on another host
/// during the drain against the same creates once it is over.
pub(super) fn drain(rt: &Runtime, dir: &Path) -> BenchResult<Vec<Row>> {
    let (queued, _, _) = sizes();
    let db = dir.join("backlog.db");
    let (busy, quiet) = (HostId::new(), HostId::new());
    fresh_store(
        rt,
        &db,
        &[(busy, HostStatus::Offline), (quiet, HostStatus::Online)],
    )?;
    let team = TeamId::new();
    bulk(&db, |tx| {
        let mut tpl = tx.prepare(
            "INSERT INTO templates (id, team_id, name, type, state, size_bytes, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'snapshot', 'deleting', 4096, ?4, ?4)",
        )?;
        let mut placement = tx.prepare(
            "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt,
                                     created_at, updated_at)
             VALUES (?1, ?2, ?3, 'deleting', 0, ?4, ?4)",
        )?;
        let base_ms: i64 = 1_700_000_000_000;
        for i in 0..queued {
            let id = blob(uuid::Uuid::new_v4());
            let at = base_ms + i as i64;
            tpl.execute(params![id, blob(team.as_uuid()), format!("gone-{i}"), at])?;
            placement.execute(params![id, blob(busy.as_uuid()), blob(team.as_uuid()), at])?;
        }
        Ok(())
    })?;

    // The baseline: the same agent, as many deletes at a time as the worker.
    let baseline = rt.block_on(agent_delete_rate(
        Arc::new(SlowDeleteAgent(DELETE_TIME)),
        queued.min(20_000),
    ))?;

    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .env(
            DRAIN_ENV,
            format!("{}|{}|{}", db.display(), busy.as_uuid(), quiet.as_uuid()),
        )
        .output()?;
    if !out.status.success() {
        return Err(format!("drain failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> BenchResult<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("drain did not report {key}: {text}").into())
    };
    let (drained, secs) = (field("drained=")?, field("secs=")?);
    let left = field("left=")?;
    let unfinished = if left > 0.0 {
        format!("; not drained: {left:.0} left after {secs:.0} s")
    } else {
        String::new()
    };
    let (busy_p99, idle_p99) = (field("busy_p99_ms=")?, field("idle_p99_ms=")?);
    let (busy_n, idle_n) = (field("busy_creates=")?, field("idle_creates=")?);
    let mib = field("peak_rss_kib=")? / 1024.0;
    let ours = drained / secs;
    let ratio = ours / baseline;
    let p99_ratio = busy_p99 / idle_p99;
    let label = format!("{queued} queued deletions, host back online, {DELETE_TIME:?} deletes");
    Ok(vec![
        Row {
            case: format!("drain: {label}"),
            ours: format!("{ours:.0} deletions/s ({drained:.0} in {secs:.2} s{unfinished})"),
            baseline: format!("agent's own deletes, {PER_HOST} at a time: {baseline:.0}/s"),
            ratio,
            goal: "≥ 0.8".into(),
            met: ratio >= 0.8 && left == 0.0,
        },
        Row {
            case: format!("drain: manager peak RSS, {label}"),
            ours: format!("{mib:.1} MiB"),
            baseline: "—".into(),
            ratio: mib / 64.0,
            goal: "< 64 MiB".into(),
            met: mib < 64.0,
        },
        Row {
            case: format!("drain: create on another host meanwhile, {label}"),
            ours: format!("p99 {busy_p99:.3} ms ({busy_n:.0} creates)"),
            baseline: format!(
                "same creates after it, no drain running: p99 {idle_p99:.3} ms ({idle_n:.0})"
            ),
            ratio: p99_ratio,
            goal: "≤ 2".into(),
            met: p99_ratio <= 2.0,
        },
    ])
}

/// The child side of [`drain`]: opens a manager on the backlog, brings the
/// host back online, creates on the quiet host until the queue is empty,
/// then the same creates without a backlog; prints what it saw.
pub(super) fn drain_child(arg: &str) -> BenchResult<()> {
    let mut parts = arg.split('|');
    let (Some(db), Some(busy), Some(quiet)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad {DRAIN_ENV}: {arg}").into());
    };
    let busy = HostId::from_uuid(busy.parse()?);
    let quiet = HostId::from_uuid(quiet.parse()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let counter = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let queued = || {
        count(
            &counter,
            "SELECT count(*) FROM placements WHERE state = 'deleting'",
        )
    };
    let before = queued()?;
    let report = rt.block_on(async {
        let transport = Arc::new(InProcessTransport::new());
        transport.add_host(busy, Arc::new(SlowDeleteAgent(DELETE_TIME)));
        transport.add_host(quiet, Arc::new(NoopAgent));
        let manager = Manager::open(db, transport, options(Synchronous::Full)).await?;
        let manager = Arc::new(manager);
        let team = TeamId::new();
        let sb = SandboxId::new();
        manager
            .registry()
            .register_sandbox(Sandbox::new(
                sb,
                team,
                Some(quiet),
                SandboxStatus::Running,
                2,
                512,
            ))
            .await?;
        let caller = Caller::new(team, Actor::System);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let creates = |tag: &'static str, limit: Option<usize>| {
            let (manager, caller, stop) = (manager.clone(), caller.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| i < l) {
                    let name =
                        TemplateName::parse(&format!("{tag}-{i}")).map_err(|e| e.to_string())?;
                    let began = Instant::now();
                    manager
                        .create(&caller, NewSnapshot::new(sb, Some(name)))
                        .await
                        .map_err(|e| e.to_string())?;
                    latencies.push(began.elapsed());
                    i += 1;
                    // A create every few milliseconds, not a flood.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok::<_, String>(latencies)
            })
        };

        let start = Instant::now();
        manager
            .registry()
            .set_host_status(busy, HostStatus::Online)
            .await?;
        let during = creates("busy", None);
        // A drain that does not finish in this time is measured as far as
        // it got (its rate is what it confirmed meanwhile).
        let window = Duration::from_secs(if quick() { 30 } else { 90 });
        let mut left = before;
        while left > 0 && start.elapsed() < window {
            // Counting a long queue scans it: often enough to time the
            // drain to within a percent, seldom enough not to slow it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            left = queued()?;
        }
        let secs = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut busy_lat = during.await??;
        stop.store(false, Ordering::Relaxed);
        if left > 0 {
            // No backlog for the baseline: the host goes away again and
            // the deletions in hand finish.
            manager
                .registry()
                .set_host_status(busy, HostStatus::Offline)
                .await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut idle_lat = creates("idle", Some(busy_lat.len().max(200))).await??;
        manager.shutdown().await;
        let p99 = |l: &mut Vec<Duration>| percentile(l, 0.99).as_secs_f64() * 1000.0;
        BenchResult::Ok(format!(
            "drained={}\nleft={left}\nsecs={secs}\nbusy_creates={}\nbusy_p99_ms={}\nidle_creates={}\nidle_p99_ms={}",
            before - left,
            busy_lat.len(),
            p99(&mut busy_lat),
            idle_lat.len(),
            p99(&mut idle_lat),
        ))
    })?;
    println!("{report}");
    println!("peak_rss_kib={}", peak_rss_kib()?);
    Ok(())
}

fn peak_rss_kib() -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmHWM in /proc/self/status")?)
}

// --------------------------------------------------------- the recovery

/// A host agent that lists nothing and counts its list calls.
#[derive(Default)]
struct CountingAgent {
    snapshots: AtomicU64,
    sandboxes: AtomicU64,
}

#[async_trait]
impl HostAgent for CountingAgent {
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
        self.sandboxes.fetch_add(1, Ordering::Relaxed);
        Ok(SandboxList::default())
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    }
}

/// One interrupted create as the journal holds it.
struct Interrupted {
    template: Vec<u8>,
    sandbox: Vec<u8>,
    team: Vec<u8>,
    host: Vec<u8>,
    name: String,
    operation: Vec<u8>,
}

/// The rollback of one host's interrupted creates in one transaction:
/// the statements recovery needs for each entry (close it, drop the
/// `creating` row, queue the key, release the sandbox, audit).
fn raw_rollback(conn: &mut Connection, batch: &[Interrupted], now: i64) -> BenchResult<()> {
    let tx = conn.transaction()?;
    {
        let mut close = tx.prepare_cached(
            "DELETE FROM operations WHERE template_id = ?1 AND phase = 'started'",
        )?;
        let mut drop_row =
            tx.prepare_cached("DELETE FROM templates WHERE id = ?1 AND state = 'creating'")?;
        let mut queue = tx.prepare_cached(
            "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt,
                                     created_at, updated_at)
             VALUES (?1, ?2, ?3, 'deleting', ?4, ?4, ?4) ON CONFLICT DO NOTHING",
        )?;
        let mut release = tx.prepare_cached(
            "UPDATE sandboxes SET status = 'paused', updated_at = ?2
             WHERE id = ?1 AND status = 'snapshotting'",
        )?;
        let mut end = tx.prepare_cached(
            "UPDATE requests SET state = 'failed', finished_at = ?2 WHERE id = ?1 AND state = 'running'",
        )?;
        let mut audit = tx.prepare_cached(
            "INSERT INTO audit_log (id, team_id, actor_type, action, resource_type, resource_id,
                                    outcome, error_code, metadata, created_at)
             VALUES (?1, ?2, 'system', 'snapshot.create', 'snapshot', ?3, 'failure',
                     'interrupted', ?4, ?5)",
        )?;
        for e in batch {
            close.execute([&e.template])?;
            drop_row.execute([&e.template])?;
            queue.execute(params![e.template, e.host, e.team, now])?;
            release.execute(params![e.sandbox, now])?;
            end.execute(params![e.operation, now])?;
            audit.execute(params![
                blob(uuid::Uuid::new_v4()),
                e.team,
                hex(&e.template),
                format!(r#"{{"name":"{}","sandbox_id":"x","host_id":"y"}}"#, e.name),
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Start-up with interrupted creates across many hosts: time until no
/// journal entry is open, and list calls per host, against the hosts' list
/// calls timed directly (all hosts at once) plus one raw commit per host's
/// batch doing the same rows' rollback on a copy of the journal.
pub(super) fn recovery(rt: &Runtime, dir: &Path) -> BenchResult<Vec<Row>> {
    let (_, entries, host_count) = sizes();
    let db = dir.join("recovery.db");
    let hosts: Vec<HostId> = (0..host_count).map(|_| HostId::new()).collect();
    let registered: Vec<(HostId, HostStatus)> =
        hosts.iter().map(|h| (*h, HostStatus::Online)).collect();
    fresh_store(rt, &db, &registered)?;
    let gone = blob(uuid::Uuid::new_v4());
    let mut journal: Vec<Vec<Interrupted>> = hosts.iter().map(|_| Vec::new()).collect();
    bulk(&db, |tx| {
        let mut sandbox = tx.prepare(
            "INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'snapshotting', 2, 512, ?4, ?4)",
        )?;
        let mut tpl = tx.prepare(
            "INSERT INTO templates (id, team_id, name, type, state, source_sandbox_id,
                                    created_at, updated_at)
             VALUES (?1, ?2, ?3, 'snapshot', 'creating', ?4, ?5, ?5)",
        )?;
        let mut op = tx.prepare(
            "INSERT INTO operations (template_id, kind, phase, team_id, template_name, sandbox_id,
                                     host_id, prev_status, actor_type, id, owner, created_at,
                                     updated_at)
             VALUES (?1, 'create', 'started', ?2, ?3, ?4, ?5, 'running', 'system', ?6, ?7, ?8, ?8)",
        )?;
        // A moment ago: within every deadline and grace.
        let at = Timestamp::now().unix_millis() - 1000;
        for i in 0..entries {
            let h = i % host_count;
            let e = Interrupted {
                template: blob(uuid::Uuid::new_v4()),
                sandbox: blob(uuid::Uuid::new_v4()),
                team: blob(uuid::Uuid::from_u128(1 + (i % 50) as u128)),
                host: blob(hosts[h].as_uuid()),
                name: format!("interrupted-{i}"),
                operation: blob(uuid::Uuid::new_v4()),
            };
            sandbox.execute(params![e.sandbox, e.team, e.host, at])?;
            tpl.execute(params![e.template, e.team, e.name, e.sandbox, at])?;
            op.execute(params![
                e.template,
                e.team,
                e.name,
                e.sandbox,
                e.host,
                e.operation,
                gone,
                at
            ])?;
            journal[h].push(e);
        }
        Ok(())
    })?;
    let copy = dir.join("recovery-raw.db");
    std::fs::copy(&db, &copy)?;

    let agents: Vec<Arc<CountingAgent>> = hosts
        .iter()
        .map(|_| Arc::new(CountingAgent::default()))
        .collect();
    let counter = Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let (took, manager) = rt.block_on(async {
        let transport = Arc::new(InProcessTransport::new());
        for (h, a) in hosts.iter().zip(&agents) {
            transport.add_host(*h, a.clone());
        }
        let start = Instant::now();
        let manager = Manager::open(&db, transport, options(Synchronous::Full)).await?;
        let deadline = Duration::from_secs(if quick() { 30 } else { 600 });
        loop {
            if count(&counter, "SELECT count(*) FROM operations")? == 0 {
                break;
            }
            if start.elapsed() > deadline {
                return Err(format!("journal still open after {deadline:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        BenchResult::Ok((start.elapsed(), manager))
    })?;
    let calls: Vec<u64> = agents
        .iter()
        .map(|a| a.snapshots.load(Ordering::Relaxed) + a.sandboxes.load(Ordering::Relaxed))
        .collect();
    let max_calls = calls.iter().copied().max().unwrap_or(0);
    let mean_calls = calls.iter().sum::<u64>() as f64 / calls.len() as f64;
    let sandboxes_left = count(
        &counter,
        "SELECT count(*) FROM sandboxes WHERE status = 'snapshotting'",
    )?;
    rt.block_on(manager.shutdown());

    // The baseline: every host's two list calls at once, then one commit
    // per host's batch.
    let listing = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for a in &agents {
            let a = a.clone();
            tasks.spawn(async move {
                a.list_snapshots().await?;
                a.list_sandboxes().await?;
                Ok::<_, AgentError>(())
            });
        }
        while let Some(t) = tasks.join_next().await {
            t??;
        }
        BenchResult::Ok(start.elapsed())
    })?;
    let mut raw = Connection::open(&copy)?;
    raw.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    raw.execute_batch("PRAGMA synchronous = FULL;")?;
    let start = Instant::now();
    let now = Timestamp::now().unix_millis();
    for batch in &journal {
        raw_rollback(&mut raw, batch, now)?;
    }
    let commits = start.elapsed();
    let baseline = listing + commits;
    let ratio = took.as_secs_f64() / baseline.as_secs_f64();
    Ok(vec![
        Row {
            case: format!(
                "recovery: {entries} interrupted creates on {host_count} hosts ({sandboxes_left} left snapshotting)"
            ),
            ours: format!("{} until no entry is open", ms(took)),
            baseline: format!(
                "list calls {} + {host_count} raw batch commits {}",
                ms(listing),
                ms(commits)
            ),
            ratio,
            goal: "≤ 1.5".into(),
            met: ratio <= 1.5 && sandboxes_left == 0,
        },
        Row {
            case: format!("recovery: list calls per host, {entries} interrupted creates"),
            ours: format!("max {max_calls}, mean {mean_calls:.2}"),
            baseline: "1 ListSnapshots + 1 ListSandboxes".into(),
            ratio: max_calls as f64 / 2.0,
            goal: "≤ 2 per host".into(),
            met: max_calls <= 2,
        },
    ])
}
