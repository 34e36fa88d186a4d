//! Seeded randomised concurrency (issue 4): many tasks doing random
//! creates, overwrites, deletes, gets and lists on a few shared names and
//! sandboxes, against a host agent that fails (before or after doing the
//! work) and delays at random, sometimes past the manager's timeouts.
//! While it runs, no name ever shows two templates; at the end, once the
//! worker has drained, the invariants of SPEC §4a hold, no sandbox is left
//! `snapshotting`, the journal is empty, every key on the host belongs to
//! a visible template, every sandbox's status is the one its host reports,
//! and the audit log has exactly one entry per operation that got past its
//! first transaction (successful creates and deletes, creates that failed
//! with 502), with the success/failure split matching what callers saw.
//!
//! Each seed runs against our agent and against one that behaves like the
//! original Go agent (lists only running VMs, every snapshot failure is
//! Internal), on each store (SQLite and PostgreSQL, see [`conformance!`]).
//!
//! The seed fixes each task's sequence of operations and faults; how the
//! tasks interleave is up to the scheduler. A failing run names its seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sandbox_snapshots::agent::{AgentOp, Fault};
use sandbox_snapshots::*;

conformance!(random_operations_with_random_faults_keep_the_invariants);

const SEEDS: [u64; 4] = [0x5eed_0001, 0xdead_beef, 0x0123_4567_89ab_cdef, 42];
const TASKS: u64 = 8;
const OPS_PER_TASK: usize = 30;
const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];
const SANDBOXES: usize = 4;

/// Agent-call timeouts, short enough that random delays hit them: a
/// create that times out is a 502 like the injected failures.
const TIMEOUT_MS: u64 = 50;

fn options() -> ManagerOptions {
    let mut o = fast_options();
    let timeout = Duration::from_millis(TIMEOUT_MS);
    o.create_timeout = timeout;
    o.list_timeout = timeout;
    o.delete_timeout = timeout;
    // Deletes (and overwrites) often return before the host answered.
    o.delete_wait = Duration::from_millis(20);
    o
}

/// xorshift64*: tiny, seeded, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Any non-zero state works; mix the seed so nearby seeds differ.
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap()
    }
}

/// What one task saw.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Creates that returned a template.
    ok_creates: usize,
    /// Creates that failed with 502 `agent_error` (audited as failures).
    failed_creates: usize,
    /// Deletes that returned Ok.
    ok_deletes: usize,
    /// Operations refused up front (409, or 404 for a missing name): no
    /// effect, no audit entry.
    refused: usize,
    /// Gets and lists.
    reads: usize,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.ok_creates += o.ok_creates;
        self.failed_creates += o.failed_creates;
        self.ok_deletes += o.ok_deletes;
        self.refused += o.refused;
        self.reads += o.reads;
    }
}

/// Every error injected here makes a failed create a 502: Internal,
/// unavailable, or an undecodable answer.
fn random_error(rng: &mut Rng) -> AgentError {
    match rng.below(3) {
        0 => AgentError::rejected(AgentCode::Internal, "injected"),
        1 => AgentError::unavailable("injected"),
        _ => AgentError::Protocol {
            message: "injected".into(),
        },
    }
}

/// Maybe injects one fault into the next call of a random agent call.
fn maybe_inject(env: &Env, rng: &mut Rng) {
    if !rng.percent(25) {
        return;
    }
    let op = match rng.below(10) {
        0..=3 => AgentOp::CreateSnapshot,
        4..=7 => AgentOp::DeleteSnapshot,
        _ => AgentOp::ListSandboxes,
    };
    let fault = match rng.below(5) {
        0 | 1 => Fault::Fail(random_error(rng)),
        2 | 3 => Fault::FailAfter(random_error(rng)),
        // Sometimes longer than the timeouts of `options()`.
        _ => Fault::Delay(Duration::from_millis(1 + rng.below(2 * TIMEOUT_MS))),
    };
    env.agent.inject_times(op, fault, 1);
}

/// A visible name never maps to two templates.
fn check_unique(what: &str, items: &[Template]) {
    let mut seen = HashSet::new();
    for t in items {
        assert!(
            seen.insert(t.name.clone()),
            "{what}: {t:?} twice in {items:?}"
        );
    }
}

async fn run_task(env: &Env, team: TeamId, sandboxes: &[SandboxId], seed: u64, task: u64) -> Tally {
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(task));
    let mut tally = Tally::default();
    let who = caller(team);
    for step in 0..OPS_PER_TASK {
        let at = format!("seed {seed:#x}, task {task}, step {step}");
        // A little jitter spreads the tasks over each other's operations.
        tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
        maybe_inject(env, &mut rng);
        let n = name(NAMES[rng.index(NAMES.len())]);
        match rng.below(100) {
            0..=54 => {
                let sb = sandboxes[rng.index(sandboxes.len())];
                let overwrite = rng.percent(50);
                let request = NewSnapshot::new(sb, Some(n.clone())).overwrite(overwrite);
                match env.manager.create(&who, request).await {
                    Ok(t) => {
                        assert_eq!(t.name, n, "{at}");
                        assert_eq!(t.source_sandbox, Some(sb), "{at}");
                        tally.ok_creates += 1;
                    }
                    Err(e) => match e.code() {
                        ErrorCode::AgentError => tally.failed_creates += 1,
                        ErrorCode::AlreadyExists
                        | ErrorCode::Conflict
                        | ErrorCode::InvalidState => tally.refused += 1,
                        _ => panic!("{at}: create {n} on {sb} (overwrite {overwrite}): {e:?}"),
                    },
                }
            }
            55..=77 => match env.manager.delete(&who, &n).await {
                Ok(deleted) => {
                    assert_eq!(deleted.template.name, n, "{at}");
                    tally.ok_deletes += 1;
                }
                Err(e) if e.code() == ErrorCode::NotFound => tally.refused += 1,
                Err(e) => panic!("{at}: delete {n}: {e:?}"),
            },
            78..=89 => {
                match env.manager.get(&who, &n).await {
                    Ok(t) => assert_eq!(t.name, n, "{at}"),
                    Err(e) => assert_eq!(e.code(), ErrorCode::NotFound, "{at}: get {n}: {e:?}"),
                }
                tally.reads += 1;
            }
            _ => {
                let page = env.manager.list(&who, ListQuery::new()).await.unwrap();
                check_unique(&at, &page.items);
                tally.reads += 1;
            }
        }
    }
    tally
}

async fn run_seed(backend: &Backend, seed: u64, mode: Mode) {
    let env = Arc::new(Env::on(backend, options(), mode).await);
    let team = TeamId::new();
    let mut sandboxes = Vec::new();
    for _ in 0..SANDBOXES {
        sandboxes.push(env.sandbox(team).await);
    }
    let sandboxes = Arc::new(sandboxes);

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (env, sandboxes) = (env.clone(), sandboxes.clone());
        tasks.spawn(async move { run_task(&env, team, &sandboxes, seed, task).await });
    }
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        total += joined.unwrap_or_else(|e| panic!("seed {seed:#x}: a task failed: {e}"));
    }
    let at = format!("{mode:?} seed {seed:#x}, {total:?}");
    assert_eq!(
        total.ok_creates + total.failed_creates + total.ok_deletes + total.refused + total.reads,
        usize::try_from(TASKS).unwrap() * OPS_PER_TASK,
        "{at}: every operation accounted for"
    );

    drain(&env).await;
    assert_invariants(&env, &[team]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM operations").await,
        0,
        "{at}: the journal is empty"
    );
    for sb in sandboxes.iter() {
        let status = env.sandbox_status(*sb).await;
        assert!(
            matches!(status, SandboxStatus::Running | SandboxStatus::Paused),
            "{at}: {sb} is {status}"
        );
        // No definite rejection was injected, so the registry agrees with
        // the host about every sandbox.
        assert_eq!(
            env.agent.sandbox_status(*sb).as_deref(),
            Some(status.as_str()),
            "{at}: {sb}"
        );
    }
    let visible = env
        .manager
        .list(&caller(team), ListQuery::new())
        .await
        .unwrap()
        .items;
    check_unique(&at, &visible);
    let visible_ids: BTreeSet<String> = visible.iter().map(|t| t.id.to_string()).collect();
    let host_keys: BTreeSet<String> = env.agent.snapshot_keys().into_iter().collect();
    assert_eq!(
        host_keys, visible_ids,
        "{at}: keys on the host vs ready templates"
    );

    let audit = env
        .manager
        .audit_log(&caller(team), AuditQuery::new())
        .await
        .unwrap()
        .items;
    let count = |action: &str, outcome: AuditOutcome| {
        audit
            .iter()
            .filter(|e| e.action == action && e.outcome == outcome)
            .count()
    };
    assert_eq!(
        audit.len(),
        total.ok_creates + total.failed_creates + total.ok_deletes,
        "{at}: one audit entry per finished operation"
    );
    for (action, outcome, seen) in [
        (
            actions::SNAPSHOT_CREATE,
            AuditOutcome::Success,
            total.ok_creates,
        ),
        (
            actions::SNAPSHOT_CREATE,
            AuditOutcome::Failure,
            total.failed_creates,
        ),
        (
            actions::SNAPSHOT_DELETE,
            AuditOutcome::Success,
            total.ok_deletes,
        ),
    ] {
        assert_eq!(
            count(action, outcome),
            seen,
            "{at}: {action} {outcome:?} entries vs what callers saw"
        );
    }
    for e in &audit {
        if e.outcome == AuditOutcome::Failure {
            assert_eq!(e.error_code.as_deref(), Some("agent_error"), "{at}: {e:?}");
        }
        assert!(
            NAMES.contains(&e.metadata["name"].as_str().unwrap_or("")),
            "{at}: {e:?}"
        );
    }
}

async fn random_operations_with_random_faults_keep_the_invariants(backend: Backend) {
    for mode in Mode::ALL {
        for seed in SEEDS {
            run_seed(&backend, seed, mode).await;
        }
    }
}
