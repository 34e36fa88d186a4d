//! Shared builders for the integration tests: a manager on a real SQLite
//! file in a temp dir, one or more in-memory host agents behind the
//! in-process transport.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod connect_server;
pub mod pki;
pub mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandbox_snapshots::*;
use tempfile::TempDir;

/// Every code an agent can answer with.
pub const CODES: [AgentCode; 14] = [
    AgentCode::Cancelled,
    AgentCode::Unknown,
    AgentCode::InvalidArgument,
    AgentCode::NotFound,
    AgentCode::AlreadyExists,
    AgentCode::PermissionDenied,
    AgentCode::ResourceExhausted,
    AgentCode::FailedPrecondition,
    AgentCode::Aborted,
    AgentCode::OutOfRange,
    AgentCode::Unimplemented,
    AgentCode::Internal,
    AgentCode::DataLoss,
    AgentCode::Unauthenticated,
];

/// Options tuned for tests: short retries, and FULL sync kept (it is what
/// users run).
pub fn fast_options() -> ManagerOptions {
    let mut o = ManagerOptions::default();
    o.create_timeout = Duration::from_secs(10);
    o.delete_timeout = Duration::from_secs(2);
    o.delete_wait = Duration::from_secs(2);
    o.list_timeout = Duration::from_secs(2);
    o.late_write_grace = Duration::from_millis(50);
    o.retry_base = Duration::from_millis(20);
    o.retry_max = Duration::from_millis(200);
    o.janitor_interval = Duration::from_millis(200);
    o
}

/// Which kind of host agent a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ours: lists every sandbox, precise error codes, `ListSnapshots`.
    Ours,
    /// Like the original Go agent: lists only running VMs, every
    /// `CreateSnapshot` failure is Internal, a delete of a missing key
    /// succeeds, no `ListSnapshots`.
    GoLike,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Ours, Mode::GoLike];

    pub fn agent(self) -> MemoryHostAgent {
        match self {
            Mode::Ours => MemoryHostAgent::new(),
            Mode::GoLike => MemoryHostAgent::go_like(),
        }
    }
}

pub struct Env {
    pub dir: TempDir,
    pub db: PathBuf,
    pub manager: Manager,
    pub transport: Arc<InProcessTransport>,
    pub agent: Arc<MemoryHostAgent>,
    pub host: HostId,
    pub options: ManagerOptions,
}

impl Env {
    pub async fn new() -> Env {
        Self::with_options(fast_options()).await
    }

    pub async fn with_options(options: ManagerOptions) -> Env {
        Self::with_mode(options, Mode::Ours).await
    }

    /// A manager whose host agent behaves like ours or like the Go agent.
    pub async fn with_mode(options: ManagerOptions, mode: Mode) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("snapshots.db");
        let transport = Arc::new(InProcessTransport::new());
        let agent = Arc::new(mode.agent());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = Manager::open(&db, transport.clone(), options.clone())
            .await
            .unwrap();
        manager
            .registry()
            .register_host(host, "in-process", HostStatus::Online)
            .await
            .unwrap();
        Env {
            dir,
            db,
            manager,
            transport,
            agent,
            host,
            options,
        }
    }

    /// A running sandbox of `team` on the default host, known to both the
    /// registry and the agent.
    pub async fn sandbox(&self, team: TeamId) -> SandboxId {
        self.sandbox_with(team, SandboxStatus::Running).await
    }

    pub async fn sandbox_with(&self, team: TeamId, status: SandboxStatus) -> SandboxId {
        let id = SandboxId::new();
        self.agent.add_sandbox(id, status.as_str(), 2, 512);
        self.manager
            .registry()
            .register_sandbox(Sandbox::new(id, team, Some(self.host), status, 2, 512))
            .await
            .unwrap();
        id
    }

    pub async fn sandbox_status(&self, id: SandboxId) -> SandboxStatus {
        self.manager
            .registry()
            .sandbox(id)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    pub async fn create(&self, team: TeamId, sandbox: SandboxId, name: &str) -> Result<Template> {
        self.manager
            .create(
                &caller(team),
                NewSnapshot::parse(&sandbox.to_string(), name)?,
            )
            .await
    }

    /// Starts `snapshot` on a task of its own, for tests that interleave
    /// other work with a create the agent holds.
    pub fn spawn_create(
        &self,
        team: TeamId,
        snapshot: NewSnapshot,
    ) -> tokio::task::JoinHandle<Result<Template>> {
        let manager = self.manager.clone();
        tokio::spawn(async move { manager.create(&caller(team), snapshot).await })
    }

    pub async fn overwrite(
        &self,
        team: TeamId,
        sandbox: SandboxId,
        name: &str,
    ) -> Result<Template> {
        self.manager
            .create(
                &caller(team),
                NewSnapshot::parse(&sandbox.to_string(), name)?.overwrite(true),
            )
            .await
    }

    pub async fn names(&self, team: TeamId) -> Vec<String> {
        self.manager
            .list(&caller(team), ListQuery::new())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    /// Raw read of the store file, for checks the public API hides on
    /// purpose (purged rows, journal entries).
    pub fn count(&self, sql: &str) -> i64 {
        count(&self.db, sql)
    }
}

pub fn count(db: &Path, sql: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

pub fn caller(team: TeamId) -> Caller {
    Caller::new(
        team,
        Actor::User {
            id: "user-1".into(),
            name: "Ada".into(),
        },
    )
}

pub fn platform_admin() -> Caller {
    Caller::admin(TeamId::PLATFORM, Actor::System)
}

pub fn name(s: &str) -> TemplateName {
    TemplateName::parse(s).unwrap()
}

/// Polls `check` until it holds, failing after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The invariants of SPEC §4a, checked from outside: every ready template
/// has a present placement whose host holds its files; every key on the
/// host belongs to a template or is queued for deletion; no sandbox is
/// `snapshotting` unless its operation is still open (`allow_open_ops`).
/// `teams` are the teams whose templates are listed.
pub async fn assert_invariants(env: &Env, teams: &[TeamId]) {
    use std::collections::HashSet;
    let mut owned = HashSet::new();
    let mut seen_names = HashSet::new();
    for team in teams {
        for t in env
            .manager
            .list(&caller(*team), ListQuery::new())
            .await
            .unwrap()
            .items
        {
            assert!(
                seen_names.insert((t.team, t.name.clone())),
                "one visible template per name: {t:?}"
            );
            let placements = env
                .manager
                .placements(&caller(*team), &t.name)
                .await
                .unwrap();
            assert!(!placements.is_empty(), "no placement for {t:?}");
            for p in &placements {
                assert_eq!(p.state, "present", "{t:?}");
            }
            assert!(
                env.agent.has_snapshot(&t.id.to_string()),
                "files of {t:?} missing"
            );
            owned.insert(t.id.to_string());
        }
    }
    let queued: HashSet<String> = env
        .manager
        .pending_deletions()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.template_id.to_string())
        .collect();
    for key in env.agent.snapshot_keys() {
        assert!(
            owned.contains(&key) || queued.contains(&key),
            "orphan key {key}"
        );
    }
    let open_ops = env.count("SELECT count(*) FROM operations");
    let stuck = env.count("SELECT count(*) FROM sandboxes WHERE status = 'snapshotting'");
    assert!(
        stuck <= open_ops,
        "{stuck} sandboxes snapshotting with {open_ops} open operations"
    );
}

/// Runs the background work until nothing is queued or open (at most 10 s),
/// with every fault cleared.
pub async fn drain(env: &Env) {
    env.agent.clear_faults();
    env.agent.set_unavailable(false);
    eventually("the worker drains", || async {
        let _ = env.manager.run_pending_work().await;
        env.manager.pending_deletions().await.unwrap().is_empty()
            && env.count("SELECT count(*) FROM operations") == 0
    })
    .await;
}

/// An example binary, built by `cargo test` next to the test binaries
/// (`target/<profile>/examples/NAME`), or built on demand.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("examples").join(name);
    if !binary.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--example", name, "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .status()
            .unwrap();
        assert!(status.success(), "building the {name} example failed");
    }
    binary
}

/// Starts the `crash_harness` example with `args`, waits (at most 60 s)
/// for its first line, checks it is `expect`, and returns the running
/// child (killed when dropped).
pub async fn harness(args: &[&str], expect: &str) -> tokio::process::Child {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(example_binary("crash_harness"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("the harness ({args:?}) did not say {expect:?} in 60 s"))
        .unwrap()
        .unwrap_or_default();
    assert_eq!(line, expect, "harness {args:?}");
    child
}
