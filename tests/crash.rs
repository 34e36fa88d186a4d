//! Crash safety with real process kills: a helper process (the
//! `crash_harness` example) drives the manager against an SQLite file and
//! the reference agent, stops at a chosen step, and is killed with SIGKILL.
//! A fresh manager on the same file then recovers, and the invariants of
//! SPEC §4a are checked against the files on disk. Every scene runs with
//! the reference agent as it is and answering like the Go agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Mode, caller, count, eventually, fast_options, harness, name};
use sandbox_snapshots::*;

struct Scene {
    mode: Mode,
    _dir: tempfile::TempDir,
    db: PathBuf,
    root: PathBuf,
    host: HostId,
    team: TeamId,
    sandbox: SandboxId,
    /// The sandbox a restore creates.
    restored: SandboxId,
}

impl Scene {
    fn new(mode: Mode) -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("agent");
        let sandbox = SandboxId::new();
        let state = root.join("sandboxes").join(sandbox.to_string());
        std::fs::create_dir_all(state.join("disk")).unwrap();
        std::fs::write(state.join("memory.bin"), vec![1u8; 32 * 1024]).unwrap();
        std::fs::write(state.join("disk/root.img"), b"root").unwrap();
        Scene {
            mode,
            db: dir.path().join("s.db"),
            root,
            _dir: dir,
            host: HostId::new(),
            team: TeamId::new(),
            sandbox,
            restored: SandboxId::new(),
        }
    }

    /// A manager in this process over the same file and agent root.
    async fn manager(&self) -> Manager {
        self.manager_with(true).await
    }

    /// The same, with an agent that may lack the `ListSnapshots` extension.
    async fn manager_with(&self, list_snapshots: bool) -> Manager {
        self.manager_opts(list_snapshots, fast_options()).await
    }

    async fn manager_opts(&self, list_snapshots: bool, options: ManagerOptions) -> Manager {
        let agent = DirHostAgent::open(&self.root).await.unwrap();
        let agent: Arc<dyn HostAgent> = match (self.mode, list_snapshots) {
            (Mode::GoLike, _) => Arc::new(agent::GoLikeAgent::new(agent)),
            (Mode::Ours, true) => Arc::new(agent),
            (Mode::Ours, false) => Arc::new(OlderAgent(agent)),
        };
        let transport = Arc::new(InProcessTransport::new());
        transport.add_host(self.host, agent);
        let manager = Manager::open(&self.db, transport, options).await.unwrap();
        let registry = manager.registry();
        registry
            .register_host(self.host, "in-process", HostStatus::Online)
            .await
            .unwrap();
        manager
    }

    /// Creates `n` before the crash, in this process.
    async fn prepare(&self, n: &str) -> Template {
        let manager = self.manager().await;
        manager
            .registry()
            .register_sandbox(Sandbox::new(
                self.sandbox,
                self.team,
                Some(self.host),
                SandboxStatus::Running,
                1,
                64,
            ))
            .await
            .unwrap();
        let t = manager
            .create(
                &caller(self.team),
                NewSnapshot::new(self.sandbox, Some(name(n))),
            )
            .await
            .unwrap();
        manager.shutdown().await;
        t
    }

    /// Runs the harness until it reports `pause`, then SIGKILLs it.
    async fn crash(&self, op: &str, n: &str, pause: &str) {
        let (host, team, sandbox, restored) = (
            self.host.to_string(),
            self.team.to_string(),
            self.sandbox.to_string(),
            self.restored.to_string(),
        );
        let agent = if self.mode == Mode::GoLike {
            "go"
        } else {
            "ours"
        };
        let args = [
            "run",
            "--db",
            self.db.to_str().unwrap(),
            "--root",
            self.root.to_str().unwrap(),
            "--host",
            &host,
            "--team",
            &team,
            "--sandbox",
            &sandbox,
            "--name",
            n,
            "--op",
            op,
            "--pause",
            pause,
            "--agent",
            agent,
            "--restore-id",
            &restored,
        ];
        let mut child = harness(&args, &format!("PAUSED {pause}")).await;
        child.start_kill().unwrap(); // SIGKILL
        let status = child.wait().await.unwrap();
        assert!(!status.success(), "killed, not exited");
    }

    /// A fresh manager recovers; waits until the journals (operations and
    /// restores) and the deletion and destroy queues are empty; checks the
    /// invariants; returns what `n` shows.
    async fn recover_and_check(&self, n: &str) -> (Manager, Option<Template>) {
        self.recover_and_check_with(n, true).await
    }

    async fn recover_and_check_with(
        &self,
        n: &str,
        list_snapshots: bool,
    ) -> (Manager, Option<Template>) {
        let manager = self.manager_with(list_snapshots).await;
        eventually("recovery and the worker finish", || async {
            manager.open_operations().await.unwrap().is_empty()
                && manager.pending_deletions().await.unwrap().is_empty()
                && count(&self.db, "SELECT count(*) FROM restores") == 0
                && manager.pending_destroys().await.unwrap().is_empty()
        })
        .await;
        let visible = manager
            .list(&caller(self.team), ListQuery::new())
            .await
            .unwrap()
            .items;
        // Every ready template has its files on its placement host.
        for t in &visible {
            let placements = manager
                .placements(&caller(self.team), &t.name)
                .await
                .unwrap();
            assert_eq!(placements.len(), 1, "{t:?}");
            assert_eq!(placements[0].host, self.host);
            assert!(
                snapshot_dir(&self.root, t.id).join("memory.bin").exists(),
                "files of {t:?}"
            );
        }
        // Every key on the host belongs to a template (nothing is queued).
        let owned: HashSet<String> = visible.iter().map(|t| t.id.to_string()).collect();
        for entry in std::fs::read_dir(self.root.join("snapshots")).unwrap() {
            let key = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(owned.contains(&key), "orphan {key} on the host");
        }
        // No sandbox is stuck.
        let sb = manager
            .registry()
            .sandbox(self.sandbox)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(sb.status, SandboxStatus::Snapshotting);
        // A name maps to at most one template.
        let names: HashSet<&str> = visible.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), visible.len());
        let shown = manager.get(&caller(self.team), &name(n)).await.ok();
        (manager, shown)
    }

    /// How many keys (complete snapshots) the agent's directory holds.
    fn keys(&self) -> usize {
        std::fs::read_dir(self.root.join("snapshots"))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    }

    async fn sandbox_status(&self, manager: &Manager) -> SandboxStatus {
        manager
            .registry()
            .sandbox(self.sandbox)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    /// The names under the agent's `sandboxes/`.
    fn sandbox_dirs(&self) -> HashSet<String> {
        std::fs::read_dir(self.root.join("sandboxes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// SPEC §4a "Restore" after recovery: the restored sandbox is
    /// registered `running` on the host and its VM runs, or neither (`kept`
    /// says which); no VM the store does not know, no row `starting`.
    async fn check_restored(&self, manager: &Manager, kept: bool, case: &str) {
        let registered = manager.registry().sandbox(self.restored).await.unwrap();
        if let Some(sb) = &registered {
            assert_eq!(sb.status, SandboxStatus::Running, "{case}");
            assert_eq!(sb.host, Some(self.host), "{case}");
        }
        assert_eq!(registered.is_some(), kept, "{case}: {registered:?}");
        let mut expected = HashSet::from([self.sandbox.to_string()]);
        if kept {
            expected.insert(self.restored.to_string());
        }
        assert_eq!(self.sandbox_dirs(), expected, "{case}: the VMs on the host");
        let starting = "SELECT count(*) FROM sandboxes WHERE status = 'starting'";
        assert_eq!(count(&self.db, starting), 0, "{case}");
    }
}

/// An agent from before the `ListSnapshots` extension: it answers
/// Unimplemented (the trait's default).
struct OlderAgent(DirHostAgent);

#[async_trait::async_trait]
impl HostAgent for OlderAgent {
    async fn create_snapshot(
        &self,
        req: agent::CreateSnapshotRequest,
    ) -> Result<agent::CreateSnapshotResponse, AgentError> {
        self.0.create_snapshot(req).await
    }
    async fn delete_snapshot(&self, req: agent::DeleteSnapshotRequest) -> Result<(), AgentError> {
        self.0.delete_snapshot(req).await
    }
    async fn list_sandboxes(&self) -> Result<agent::SandboxList, AgentError> {
        self.0.list_sandboxes().await
    }
}

fn snapshot_dir(root: &Path, id: TemplateId) -> PathBuf {
    root.join("snapshots").join(id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_after_the_first_transaction_rolls_back() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        scene.crash("create", "c", "before-call").await;
        let (manager, shown) = scene.recover_and_check("c").await;
        assert_eq!(shown, None, "{mode:?}");
        assert_eq!(
            scene.sandbox_status(&manager).await,
            SandboxStatus::Running,
            "{mode:?}"
        );
        let audit = manager
            .audit_log(&caller(scene.team), AuditQuery::new())
            .await
            .unwrap();
        assert_eq!(audit.items.len(), 1, "{mode:?}");
        assert_eq!(audit.items[0].outcome, AuditOutcome::Failure, "{mode:?}");
        assert_eq!(
            audit.items[0].error_code.as_deref(),
            Some("interrupted"),
            "{mode:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_while_the_agent_writes_rolls_back() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        scene.crash("create", "c", "in-agent").await;
        let (manager, shown) = scene.recover_and_check("c").await;
        assert_eq!(shown, None, "{mode:?}");
        // The restarted reference agent runs the VM again: the status the
        // host reports.
        assert_eq!(
            scene.sandbox_status(&manager).await,
            SandboxStatus::Running,
            "{mode:?}"
        );
    }
}

/// The snapshot was written: recovery keeps it where the host can say so
/// (`ListSnapshots`); the Go agent cannot, so it is rolled back and its
/// files deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_after_the_agent_answered_rolls_forward_where_the_host_can_say() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        scene.crash("create", "c", "after-call").await;
        let (manager, shown) = scene.recover_and_check("c").await;
        if mode == Mode::GoLike {
            assert_eq!(shown, None);
            assert_eq!(scene.keys(), 0, "the key was deleted");
        } else {
            let t = shown.expect("the snapshot the host holds is kept");
            assert_eq!(t.source_sandbox, Some(scene.sandbox));
            assert!(t.size_bytes > 0);
            assert_eq!(
                std::fs::read(snapshot_dir(&scene.root, t.id).join("disk/root.img")).unwrap(),
                b"root"
            );
        }
        // Kept: paused by the snapshot; rolled back: what the (restarted)
        // host reports.
        let expected = if mode == Mode::Ours {
            SandboxStatus::Paused
        } else {
            SandboxStatus::Running
        };
        assert_eq!(scene.sandbox_status(&manager).await, expected, "{mode:?}");
    }
}

/// With an agent that cannot list its snapshots, recovery cannot know the
/// key exists: it takes the conservative path, rolls back and deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_after_the_agent_answered_rolls_back_without_list_snapshots() {
    let scene = Scene::new(Mode::Ours);
    scene.crash("create", "c", "after-call").await;
    assert_eq!(
        scene.keys(),
        1,
        "the agent wrote the snapshot before the kill"
    );
    let (manager, shown) = scene.recover_and_check_with("c", false).await;
    assert_eq!(shown, None);
    assert_eq!(scene.keys(), 0, "the key was deleted");
    assert_ne!(
        scene.sandbox_status(&manager).await,
        SandboxStatus::Snapshotting
    );
}

/// Killed inside the failure path: the agent wrote the files and answered
/// an error, and the process dies before the rollback commits — while it
/// asks the host for the sandbox's status, or while another connection
/// holds the write lock so that the rollback cannot commit. The caller
/// never heard an answer, so either outcome is allowed; recovery settles
/// it with nothing stuck and nothing leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_in_the_failure_path_recovers() {
    for mode in Mode::ALL {
        for pause in ["in-failure", "in-failure-locked"] {
            let case = format!("{mode:?} {pause}");
            let scene = Scene::new(mode);
            scene.crash("create", "c", pause).await;
            assert_eq!(scene.keys(), 1, "{case}: the agent wrote the files");
            let (manager, shown) = scene.recover_and_check("c").await;
            // Ours lists the key, so recovery keeps it; the Go agent's
            // cannot be seen, so it is rolled back and deleted.
            assert_eq!(shown.is_some(), mode == Mode::Ours, "{case}");
            assert_eq!(scene.keys(), usize::from(mode == Mode::Ours), "{case}");
            let expected = if mode == Mode::Ours {
                SandboxStatus::Paused
            } else {
                SandboxStatus::Running
            };
            assert_eq!(scene.sandbox_status(&manager).await, expected, "{case}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_killed_before_the_call_or_in_the_agent_keeps_the_old_template() {
    for mode in Mode::ALL {
        for pause in ["before-call", "in-agent"] {
            let scene = Scene::new(mode);
            let old = scene.prepare("o").await;
            scene.crash("overwrite", "o", pause).await;
            let (_manager, shown) = scene.recover_and_check("o").await;
            assert_eq!(
                shown.map(|t| t.id),
                Some(old.id),
                "{mode:?} {pause}: the old one, never neither"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_killed_after_the_agent_answered_shows_one_of_the_two() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        let old = scene.prepare("o").await;
        scene.crash("overwrite", "o", "after-call").await;
        let (_manager, shown) = scene.recover_and_check("o").await;
        let shown = shown.expect("the old or the new one, never neither");
        if mode == Mode::GoLike {
            // The host cannot say it holds the new one: rolled back.
            assert_eq!(shown.id, old.id);
        } else {
            assert_ne!(shown.id, old.id);
            assert!(
                !snapshot_dir(&scene.root, old.id).exists(),
                "old files deleted"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_killed_while_deleting_the_old_files_finishes() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        let old = scene.prepare("o").await;
        scene.crash("overwrite", "o", "in-delete").await;
        let (_manager, shown) = scene.recover_and_check("o").await;
        let new = shown.expect("the swap was committed");
        assert_ne!(new.id, old.id, "{mode:?}");
        assert!(
            !snapshot_dir(&scene.root, old.id).exists(),
            "{mode:?}: the worker deleted the old files"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_killed_mid_way_finishes() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        let t = scene.prepare("d").await;
        assert!(snapshot_dir(&scene.root, t.id).exists());
        scene.crash("delete", "d", "in-delete").await;
        let (manager, shown) = scene.recover_and_check("d").await;
        assert_eq!(
            shown, None,
            "{mode:?}: an acknowledged delete stays deleted"
        );
        assert!(!snapshot_dir(&scene.root, t.id).exists(), "{mode:?}");
        assert!(
            manager
                .list(&caller(scene.team), ListQuery::new())
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }
}

/// A restore killed at each step, with either agent: after recovery its
/// sandbox is registered `running` with its VM on the host, or neither;
/// one the caller was told failed is destroyed; the template is intact;
/// and the sandbox id stays taken either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_killed_at_each_step_leaves_no_vm_the_store_does_not_know() {
    // (step, the VM exists at the kill, recovery keeps it)
    let steps = [
        ("restore-before-call", false, false),
        ("restore-in-agent", true, true),
        ("restore-in-agent-partial", false, false),
        ("restore-in-failure", true, true),
        ("restore-destroy-queued", true, false),
    ];
    for mode in Mode::ALL {
        for (pause, started, kept) in steps {
            let case = format!("{mode:?} {pause}");
            let scene = Scene::new(mode);
            let t = scene.prepare("r").await;
            scene.crash("restore", "r", pause).await;
            let dirs = scene.sandbox_dirs();
            assert_eq!(
                dirs.contains(&scene.restored.to_string()),
                started,
                "{case}"
            );
            let partial = format!(".tmp-{}-", scene.restored);
            assert_eq!(
                dirs.iter().any(|d| d.starts_with(&partial)),
                pause == "restore-in-agent-partial",
                "{case}: {dirs:?}"
            );
            let (manager, shown) = scene.recover_and_check("r").await;
            scene.check_restored(&manager, kept, &case).await;
            assert_eq!(
                shown.map(|s| s.id),
                Some(t.id),
                "{case}: the template stays"
            );
            assert!(
                snapshot_dir(&scene.root, t.id).join("memory.bin").exists(),
                "{case}"
            );
            let again = RestoreRequest::new(name("r")).sandbox_id(scene.restored);
            let err = manager
                .restore(&caller(scene.team), again)
                .await
                .unwrap_err();
            assert_eq!(
                (err.code(), err.http_status()),
                (ErrorCode::AlreadyExists, 409),
                "{case}: ids are never reused"
            );
        }
    }
}

/// A template deleted while its restore is interrupted: its files stay
/// until the restore is resolved, then go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_deleted_during_an_interrupted_restore_keeps_its_files_until_resolved() {
    for mode in Mode::ALL {
        let scene = Scene::new(mode);
        let t = scene.prepare("r").await;
        scene.crash("restore", "r", "restore-before-call").await;
        let mut options = fast_options();
        options.run_janitor = false;
        let manager = scene.manager_opts(true, options).await;
        manager
            .delete(&caller(scene.team), &name("r"))
            .await
            .unwrap();
        let files = snapshot_dir(&scene.root, t.id);
        let restores = "SELECT count(*) FROM restores";
        assert_eq!(count(&scene.db, restores), 1, "{mode:?}");
        assert!(files.exists(), "{mode:?}: the open restore holds the files");
        eventually("the restore and the deletion settle", || async {
            manager.run_pending_work().await.unwrap();
            assert!(
                count(&scene.db, restores) == 0 || files.exists(),
                "{mode:?}"
            );
            !files.exists()
        })
        .await;
        manager.shutdown().await;
        drop(manager);
        let (manager, shown) = scene.recover_and_check("r").await;
        assert_eq!(shown, None, "{mode:?}");
        assert_eq!(scene.keys(), 0, "{mode:?}");
        scene
            .check_restored(&manager, false, &format!("{mode:?}"))
            .await;
    }
}

/// Another process holds SQLite's write lock for longer than the busy
/// timeout: operations fail with `db_error`, nothing is half-written, and
/// all is well once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_holding_the_write_lock_gives_db_error_and_no_half_writes() {
    let scene = Scene::new(Mode::Ours);
    let kept = scene.prepare("kept").await;
    let mut options = fast_options();
    options.store.busy_timeout = Duration::from_millis(200);
    let agent = DirHostAgent::open(&scene.root).await.unwrap();
    let transport = Arc::new(InProcessTransport::new());
    transport.add_host(scene.host, Arc::new(agent));
    let manager = Manager::open(&scene.db, transport, options).await.unwrap();
    manager
        .registry()
        .set_sandbox_status(scene.sandbox, SandboxStatus::Running)
        .await
        .unwrap();

    let mut locker = harness(
        &[
            "hold-lock",
            "--db",
            scene.db.to_str().unwrap(),
            "--seconds",
            "3",
        ],
        "LOCKED",
    )
    .await;

    let err = manager
        .create(
            &caller(scene.team),
            NewSnapshot::new(scene.sandbox, Some(name("new"))),
        )
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.http_status()), (ErrorCode::DbError, 500));
    let err = manager
        .delete(&caller(scene.team), &name("kept"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DbError);
    // Reads still work under WAL, and show nothing half-done.
    assert_eq!(
        manager
            .get(&caller(scene.team), &name("kept"))
            .await
            .unwrap(),
        kept
    );
    assert!(manager.open_operations().await.unwrap().is_empty());
    assert_eq!(scene.sandbox_status(&manager).await, SandboxStatus::Running);
    let keys = std::fs::read_dir(scene.root.join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(keys, 1, "no agent call was made");

    assert!(locker.wait().await.unwrap().success());
    manager
        .create(
            &caller(scene.team),
            NewSnapshot::new(scene.sandbox, Some(name("new"))),
        )
        .await
        .unwrap();
}

/// An interrupted create whose host cannot be reached at all does not stay
/// open for ever: at `resolve_deadline` the sandbox becomes `error`, the
/// possibly half-written key stays queued, and it goes once the host is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_create_whose_host_is_gone_resolves_at_the_deadline() {
    let scene = Scene::new(Mode::Ours);
    scene.crash("create", "c", "in-agent").await;
    let mut options = fast_options();
    options.resolve_deadline = Duration::from_millis(300);
    // A transport that cannot reach the host.
    let manager = Manager::open(&scene.db, Arc::new(InProcessTransport::new()), options)
        .await
        .unwrap();
    eventually("the operation resolves at its deadline", || async {
        manager.open_operations().await.unwrap().is_empty()
    })
    .await;
    assert_eq!(scene.sandbox_status(&manager).await, SandboxStatus::Error);
    assert_eq!(manager.pending_deletions().await.unwrap().len(), 1);
    let audit = manager
        .audit_log(&caller(scene.team), AuditQuery::new())
        .await
        .unwrap()
        .items;
    assert!(
        audit.iter().any(|e| e.action == actions::OPERATION_RESOLVE
            && e.metadata["reason"] == "resolve_deadline"),
        "{audit:?}"
    );
    manager.shutdown().await;
    drop(manager);
    // The host is back: the queued key goes.
    let (manager, shown) = scene.recover_and_check("c").await;
    assert_eq!(shown, None);
    assert_eq!(scene.sandbox_status(&manager).await, SandboxStatus::Error);
}

/// A small tmpfs, mounted for one test (CI runs as root, so it must work
/// there; elsewhere a test without it says so and passes).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            return Some(Tmpfs { dir });
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system; returns the filler's path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [64 * 1024, 4096, 1] {
            let block = vec![0u8; chunk];
            while file.write_all(&block).is_ok() {}
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Defect 7: with the disk full, an interrupted create cannot be rolled
/// back. The operation is then held back in memory (the store cannot keep
/// the postponement): twenty passes in a row ask the host once, not twenty
/// times. Once space is freed, recovery finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_backs_the_worker_off() {
    let Some(tmpfs) = Tmpfs::mount("8m") else {
        return;
    };
    let mut scene = Scene::new(Mode::Ours);
    scene.db = tmpfs.path().join("s.db");
    scene.crash("create", "c", "before-call").await;

    let agent = Arc::new(MemoryHostAgent::new());
    let transport = Arc::new(InProcessTransport::new());
    transport.add_host(scene.host, agent.clone());
    let mut options = fast_options();
    options.run_janitor = false;
    options.retry_base = Duration::from_secs(60);
    let manager = Manager::open(&scene.db, transport, options).await.unwrap();
    let filler = tmpfs.fill();

    for _ in 0..20 {
        manager.run_pending_work().await.unwrap();
    }
    assert_eq!(
        agent.calls(agent::AgentOp::ListSnapshots),
        1,
        "the host is asked once while the store cannot record the answer"
    );
    assert_eq!(
        manager.open_operations().await.unwrap().len(),
        1,
        "the rollback cannot be written while the disk is full"
    );

    std::fs::remove_file(filler).unwrap();
    manager.shutdown().await;
    drop(manager);
    let (manager, shown) = scene.recover_and_check("c").await;
    assert_eq!(shown, None);
    assert_ne!(
        scene.sandbox_status(&manager).await,
        SandboxStatus::Snapshotting
    );
}

/// The reference agent killed with SIGKILL while a snapshot of a large
/// sparse file sits complete in its `.tmp-` directory, not yet renamed:
/// reopened, the agent lists no such key and has removed the leftover.
#[tokio::test]
async fn the_reference_agent_killed_mid_copy_leaves_no_partial_key() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::TempDir::new().unwrap();
    let root = dir.path().join("agent");
    let sandbox = SandboxId::new();
    let src = root.join("sandboxes").join(sandbox.to_string());
    std::fs::create_dir_all(&src).unwrap();
    let mut memory = std::fs::File::create(src.join("memory")).unwrap();
    memory.set_len(4 << 30).unwrap();
    for i in 0..16u64 {
        memory.seek(SeekFrom::Start(i * (256 << 20))).unwrap();
        memory.write_all(&[0x5a; 1 << 20]).unwrap();
    }
    drop(memory);

    let sandbox_arg = sandbox.to_string();
    let args = [
        "dir-copy",
        "--root",
        root.to_str().unwrap(),
        "--sandbox",
        &sandbox_arg,
        "--key",
        "tpl-killed",
    ];
    let mut child = harness(&args, "PAUSED before-rename").await;
    let snapshots = root.join("snapshots");
    let names = || -> Vec<String> {
        std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        names().iter().any(|n| n.starts_with(".tmp-tpl-killed-")),
        "the copy is in its temporary directory: {:?}",
        names()
    );
    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited");

    let agent = DirHostAgent::open(&root).await.unwrap();
    let listed = agent.list_snapshots().await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(names().is_empty(), "leftovers removed: {:?}", names());
}
