//! Shared builders for the integration tests: a manager on a real SQLite
//! file in a temp dir, one or more in-memory host agents behind the
//! in-process transport.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod connect_server;
pub mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandbox_snapshots::*;
use tempfile::TempDir;

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

pub struct Env {
    pub dir: TempDir,
    pub db: PathBuf,
    pub manager: SqliteSnapshotManager,
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
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("snapshots.db");
        let transport = Arc::new(InProcessTransport::new());
        let agent = Arc::new(MemoryHostAgent::new());
        let host = HostId::new();
        transport.add_host(host, agent.clone());
        let manager = SqliteSnapshotManager::open(&db, transport.clone(), options.clone())
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
