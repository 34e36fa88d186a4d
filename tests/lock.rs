//! One manager per database file: the lock is on the file itself, so no
//! other path to the same file (a symlink, a hard link, a bind mount) and no
//! other process can open it while a manager holds it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Env, caller, harness, name};
use sandbox_snapshots::agent::{AgentOp, Fault, Hold};
use sandbox_snapshots::*;

async fn open(db: &Path) -> Result<Manager> {
    let mut options = ManagerOptions::default();
    options.run_janitor = false;
    Manager::open(db, Arc::new(InProcessTransport::new()), options).await
}

#[track_caller]
fn assert_in_use(result: Result<Manager>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: a second manager opened the database"),
        Err(err) => {
            assert_eq!(err.code(), ErrorCode::DbError, "{what}: {err:?}");
            assert!(
                err.message().contains("in use by another snapshot manager"),
                "{what}: {err:?}"
            );
        }
    }
}

/// A bind mount of `source` onto `target`, unmounted on drop.
struct BindMount {
    target: PathBuf,
}

impl BindMount {
    /// `None` when this environment refuses to mount (not root, or a
    /// sandbox without `CAP_SYS_ADMIN`); a failure when `CI` is set, where
    /// the case must run.
    fn new(source: &Path, target: &Path) -> Option<BindMount> {
        let output = std::process::Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output();
        match output {
            Ok(out) if out.status.success() => Some(BindMount {
                target: target.to_path_buf(),
            }),
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "mount --bind is refused here: {other:?}"
                );
                eprintln!("skipping the bind-mount case: mount --bind is refused: {other:?}");
                None
            }
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        // Lazy: a connection of a manager that was just dropped may still
        // be closing.
        let status = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.target)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("cannot unmount {}: {status:?}", self.target.display());
        }
    }
}

/// Another path to the database file.
#[derive(Debug, Clone, Copy)]
enum Alias {
    SamePath,
    Symlink,
    HardLink,
    BindMount,
}

struct Aliased {
    path: PathBuf,
    _mount: Option<BindMount>,
    _other: tempfile::TempDir,
}

/// `db` (an existing file in `dir`) reached through `alias`; `None` when the
/// environment cannot make one.
fn alias(dir: &Path, db: &Path, alias: Alias) -> Option<Aliased> {
    let other = tempfile::tempdir().unwrap();
    let (path, mount) = match alias {
        Alias::SamePath => (db.to_path_buf(), None),
        Alias::Symlink => {
            let path = other.path().join("link.db");
            std::os::unix::fs::symlink(db, &path).unwrap();
            (path, None)
        }
        Alias::HardLink => {
            let path = dir.join("hard.db");
            std::fs::hard_link(db, &path).unwrap();
            (path, None)
        }
        Alias::BindMount => {
            let mount = BindMount::new(dir, other.path())?;
            (other.path().join(db.file_name().unwrap()), Some(mount))
        }
    };
    Some(Aliased {
        path,
        _mount: mount,
        _other: other,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_manager_is_refused_whatever_the_path_and_reopening_works_after_shutdown() {
    for case in [
        Alias::SamePath,
        Alias::Symlink,
        Alias::HardLink,
        Alias::BindMount,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let first = open(&db).await.unwrap();
        let Some(aliased) = alias(dir.path(), &db, case) else {
            continue;
        };
        assert_in_use(open(&aliased.path).await, &format!("{case:?}"));
        // And the other way round: the alias first, then the path.
        first.shutdown().await;
        drop(first);
        let second = open(&aliased.path)
            .await
            .unwrap_or_else(|e| panic!("{case:?}: reopening after shutdown: {e:?}"));
        assert_in_use(open(&db).await, &format!("{case:?}, reversed"));
        second.shutdown().await;
        drop(second);
        let third = open(&db)
            .await
            .unwrap_or_else(|e| panic!("{case:?}: reopening again: {e:?}"));
        third.shutdown().await;
        drop(third);
        // The lock is on the file itself: no sidecar appears next to it.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(
            names.iter().all(|n| !n.ends_with(".lock")),
            "{case:?}: {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_in_another_process_holds_the_file_until_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let link = dir.path().join("hard.db");
    // The child creates the file; the hard link is made once it exists.
    let mut child = harness(&["hold-manager", "--db", db.to_str().unwrap()], "OPEN").await;
    std::fs::hard_link(&db, &link).unwrap();

    assert_in_use(open(&db).await, "same path, child alive");
    assert_in_use(open(&link).await, "hard link, child alive");

    child.start_kill().unwrap(); // SIGKILL: no clean-up of its own.
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited");

    // The kernel dropped the dead process's lock.
    let manager = open(&link).await.unwrap();
    manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_manager_cannot_roll_back_a_create_in_flight() {
    let env = Env::new().await;
    let team = TeamId::new();
    let sb = env.sandbox(team).await;
    let hold = Hold::new();
    env.agent
        .inject_times(AgentOp::CreateSnapshot, Fault::Hold(hold.clone()), 1);
    let create = {
        let m = env.manager.clone();
        tokio::spawn(async move {
            m.create(&caller(team), NewSnapshot::new(sb, Some(name("inflight"))))
                .await
        })
    };
    hold.arrived(1).await;

    // A second manager on the same file would take the open journal entry
    // for an interrupted operation and roll it back.
    let link = env.dir.path().join("hard.db");
    std::fs::hard_link(&env.db, &link).unwrap();
    let transport = Arc::new(InProcessTransport::new());
    transport.add_host(env.host, env.agent.clone());
    let second = Manager::open(&link, transport, env.options.clone()).await;
    assert_in_use(second, "hard link, create in flight");

    hold.release();
    let template = create.await.unwrap().unwrap();
    assert_eq!(template.name.as_str(), "inflight");
    assert_eq!(env.names(team).await, ["inflight"]);
    assert!(env.agent.has_snapshot(&template.id.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locking_leaves_a_file_that_is_not_a_database_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.txt");
    let content = b"these are my notes, not a database\n".repeat(200);
    std::fs::write(&db, &content).unwrap();
    let modified = std::fs::metadata(&db).unwrap().modified().unwrap();
    for attempt in 0..2 {
        let err = open(&db).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::DbError, "attempt {attempt}: {err:?}");
        assert!(
            !err.message().contains("in use"),
            "attempt {attempt}: a refused open keeps no lock: {err:?}"
        );
        assert_eq!(std::fs::read(&db).unwrap(), content, "attempt {attempt}");
        assert_eq!(
            std::fs::metadata(&db).unwrap().modified().unwrap(),
            modified,
            "attempt {attempt}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_creates_a_missing_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new").join("s.db");
    let manager = open(&db).await.unwrap();
    assert!(std::fs::metadata(&db).unwrap().len() > 0);
    manager.shutdown().await;
}
