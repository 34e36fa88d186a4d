//! Shared builders for the integration tests: a manager on a real store —
//! an SQLite file in a temp dir, or a fresh schema of the PostgreSQL server
//! at `SNAPSHOTS_TEST_POSTGRES_URL` — and one or more in-memory host agents
//! behind the in-process transport.
//!
//! [`conformance!`] runs one test body against both stores: the tests it
//! generates are named `sqlite::NAME` and `postgres::NAME`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod connect_server;
pub mod failure;
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

/// Which store a test runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file in the test's temp dir.
    Sqlite,
    /// A fresh schema on the PostgreSQL server at this URL.
    Postgres(String),
}

/// The variable naming the PostgreSQL server the tests use.
pub const POSTGRES_URL_VAR: &str = "SNAPSHOTS_TEST_POSTGRES_URL";

impl Backend {
    /// The PostgreSQL server of this run, or `None` (with one skip line per
    /// test binary) when there is none. With `CI` set, a missing server or
    /// a build without the `postgres` feature fails the test instead: the
    /// Postgres tests never silently skip there.
    pub fn postgres() -> Option<Backend> {
        static SKIP: std::sync::Once = std::sync::Once::new();
        let url = std::env::var(POSTGRES_URL_VAR)
            .ok()
            .filter(|u| !u.is_empty());
        let why = match (&url, cfg!(feature = "postgres")) {
            (Some(url), true) => return Some(Backend::Postgres(url.clone())),
            (None, _) => format!("{POSTGRES_URL_VAR} is not set"),
            (Some(_), false) => "this build has no `postgres` feature".to_owned(),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but the PostgreSQL tests cannot run: {why}"
        );
        SKIP.call_once(|| {
            // Straight to the process's stderr: the test harness captures
            // `eprintln!`, and this line is meant to be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping the PostgreSQL tests of this binary: {why} (see .ci/postgres.sh)"
            );
        });
        None
    }
}

/// Where a test's store lives, for raw checks and for reopening it.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(PathBuf),
    /// A URL whose `search_path` is the test's own schema.
    Postgres(String),
}

impl Db {
    /// A fresh store of `backend`'s kind (a file under `dir`, or a new
    /// schema).
    pub async fn fresh(backend: &Backend, dir: &Path) -> Db {
        match backend {
            Backend::Sqlite => Db::Sqlite(dir.join("snapshots.db")),
            Backend::Postgres(base) => Db::Postgres(postgres::fresh_schema(base).await),
        }
    }

    /// The URL `Manager::open_url` takes.
    pub fn url(&self) -> String {
        match self {
            Db::Sqlite(path) => format!("sqlite:{}", path.display()),
            Db::Postgres(url) => url.clone(),
        }
    }

    /// Opens a manager on this store.
    pub async fn open(
        &self,
        transport: Arc<dyn AgentTransport>,
        options: ManagerOptions,
    ) -> Result<Manager> {
        Manager::open_url(&self.url(), transport, options).await
    }

    /// A single number from a raw query of the store (`SELECT count(*) …`),
    /// for checks the public API hides on purpose (purged rows, journal
    /// entries). Use SQL both databases accept.
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(path) => count(path, sql),
            Db::Postgres(url) => postgres::count(url, sql).await,
        }
    }
}

/// PostgreSQL plumbing for the tests.
pub mod postgres {
    /// Creates a schema of its own for one test and returns `base` with
    /// that schema as its `search_path`.
    pub async fn fresh_schema(base: &str) -> String {
        #[cfg(feature = "postgres")]
        {
            let schema = format!("t_{}", uuid_simple());
            let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-csearch_path%3D{schema}")
        }
        #[cfg(not(feature = "postgres"))]
        {
            unreachable!("no postgres feature: {base}")
        }
    }

    pub async fn count(url: &str, sql: &str) -> i64 {
        #[cfg(feature = "postgres")]
        {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
        }
        #[cfg(not(feature = "postgres"))]
        {
            unreachable!("no postgres feature: {url} {sql}")
        }
    }

    #[cfg(feature = "postgres")]
    fn uuid_simple() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!(
            "{}_{}_{}",
            std::process::id(),
            nanos,
            N.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Runs each named test body (an `async fn NAME(backend: Backend)`) twice:
/// as `sqlite::NAME` on a temp SQLite file and as `postgres::NAME` on a
/// fresh PostgreSQL schema (skipped with a line when no server is set,
/// failed when `CI` is set and none is).
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = $crate::common::Backend::postgres() {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

pub struct Env {
    pub dir: TempDir,
    /// The SQLite file (SQLite backend only; a path nobody uses otherwise).
    pub db: PathBuf,
    /// The store, whichever backend.
    pub store: Db,
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
        Self::on(&Backend::Sqlite, options, mode).await
    }

    /// A manager on `backend` with the fast test options.
    pub async fn new_on(backend: &Backend) -> Env {
        Self::on(backend, fast_options(), Mode::Ours).await
    }

    /// A manager on a fresh store of `backend`, whose host agent behaves
    /// like ours or like the Go agent.
    pub async fn on(backend: &Backend, options: ManagerOptions, mode: Mode) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("snapshots.db");
        let store = Db::fresh(backend, dir.path()).await;
        let transport = Arc::new(InProcessTransport::new());
        let agent = Arc::new(mode.agent());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = store
            .open(transport.clone(), options.clone())
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
            store,
            manager,
            transport,
            agent,
            host,
            options,
        }
    }

    /// A running sandbox of `team` on the default host, known to both the
    /// registry and the agent.
    /// Deletes `team`'s templates `names` while the host is away (its
    /// agent unavailable, so each stays queued), then marks the host
    /// offline and makes its agent reachable again: a queue waiting for
    /// the host to come back.
    pub async fn delete_while_away(&self, team: TeamId, names: &[String]) {
        self.agent.set_unavailable(true);
        for n in names {
            self.manager.delete(&caller(team), &name(n)).await.unwrap();
        }
        self.host_status(HostStatus::Offline).await;
        self.agent.set_unavailable(false);
    }

    /// Sets the test host's status.
    pub async fn host_status(&self, status: HostStatus) {
        self.manager
            .registry()
            .set_host_status(self.host, status)
            .await
            .unwrap();
    }

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

    /// Raw read of the store, for checks the public API hides on purpose
    /// (purged rows, journal entries). SQL both databases accept.
    pub async fn count(&self, sql: &str) -> i64 {
        self.store.count(sql).await
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
    let open_ops = env.count("SELECT count(*) FROM operations").await;
    let stuck = env
        .count("SELECT count(*) FROM sandboxes WHERE status = 'snapshotting'")
        .await;
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
            && env.count("SELECT count(*) FROM operations").await == 0
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

/// Starts `command` with its stdout piped (killed when dropped) and waits
/// at most 60 s for its first line.
pub async fn spawn_first_line(
    command: &mut tokio::process::Command,
    what: &str,
) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{what} printed nothing in 60 s"))
        .unwrap()
        .unwrap_or_default();
    (child, line)
}

/// Runs `command` to the end, checks it succeeded, and returns the
/// `name=value` lines it printed (the key commands of `snapshots-server`).
pub async fn key_values(
    command: &mut tokio::process::Command,
) -> std::collections::HashMap<String, String> {
    let out = command.env("RUST_LOG", "warn").output().await.unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Starts the `crash_harness` example with `args`, waits (at most 60 s)
/// for its first line, checks it is `expect`, and returns the running
/// child (killed when dropped).
pub async fn harness(args: &[&str], expect: &str) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(example_binary("crash_harness"));
    command.args(args);
    let (child, line) = spawn_first_line(&mut command, &format!("the harness ({args:?})")).await;
    assert_eq!(line, expect, "harness {args:?}");
    child
}
