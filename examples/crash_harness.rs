//! Run with: cargo run --example crash_harness -- <mode> [options]
//!
//! Test support for `tests/crash.rs`: a process that drives the manager and
//! stops dead at a chosen step so that the test can SIGKILL it there.
//!
//! Modes:
//!   run --db PATH --root DIR --host ID --team ID --sandbox ID --name NAME
//!       --op create|overwrite|delete|restore [--restore-id ID] --pause STEP
//!     Opens the manager on PATH with the reference agent over DIR
//!     (in-process), registers the host and the (running) sandbox, runs the
//!     operation, and when it reaches STEP prints `PAUSED STEP` and waits
//!     forever. `restore` restores the ready template NAME (the test made
//!     it) into a new sandbox `--restore-id`; its destroys are queued after
//!     a grace of 50 ms, so that the recovering test's worker runs them.
//!     STEP is one of:
//!       before-call  the first transaction is committed, the agent not called
//!       in-agent     the agent has paused the VM and written part of the files
//!       after-call   the agent answered, the final transaction not run
//!       in-delete    a DeleteSnapshot call is about to be made (the delete,
//!                    or the overwrite's final transaction, is committed)
//!       in-failure   the agent wrote the files and answered Internal; the
//!                    manager is asking for the sandbox's status (the
//!                    rollback not yet written)
//!       in-failure-locked
//!                    the same, but the status is answered while this
//!                    process holds SQLite's write lock on another
//!                    connection, so the rollback can never commit
//!     and, for `restore`:
//!       restore-before-call
//!                    the journal entry and the `starting` row are
//!                    committed, the agent not called
//!       restore-in-agent
//!                    the agent started the VM (its directory is under
//!                    `sandboxes/`) but has not answered
//!       restore-in-agent-partial
//!                    the agent's copy is cut short: it sits in a `.tmp-`
//!                    directory under `sandboxes/`, no VM
//!       restore-in-failure
//!                    the agent started the VM and answered Internal; the
//!                    manager is asking ListSandboxes (the outcome not yet
//!                    written)
//!       restore-destroy-queued
//!                    the agent started the VM and timed out, ListSandboxes
//!                    does not show it: the caller was told it failed and
//!                    a destroy is queued, none has run
//!     With `--agent go`, the reference agent answers like the Go agent
//!     (see `GoLikeAgent`).
//!   hold-lock --db PATH --seconds N
//!     Takes SQLite's write lock on PATH, prints `LOCKED`, holds it N
//!     seconds, then exits.
//!   hold-manager --db PATH
//!     Opens a manager on PATH (no hosts, no background worker), prints
//!     `OPEN` and waits forever, for `tests/lock.rs`.
//!   dir-copy --root DIR --sandbox ID --key KEY
//!     Opens the reference agent on DIR alone (no manager) and snapshots
//!     the sandbox ID (whose directory the test filled) as KEY; when the
//!     copy is complete in its `.tmp-` directory but not yet renamed under
//!     KEY, prints `PAUSED before-rename` and waits forever.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sandbox_snapshots::agent::GoLikeAgent;
use sandbox_snapshots::agent::{
    CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    DeleteSnapshotRequest, DestroySandboxRequest, Hold, SandboxList, SnapshotInfo, SnapshotKey,
};
use sandbox_snapshots::{
    Actor, AgentCode, AgentError, AgentTransport, Caller, DirHostAgent, HostAgent, HostId,
    HostInfo, HostStatus, HostTarget, InProcessTransport, Manager, ManagerOptions, NewSnapshot,
    RestoreRequest, Sandbox, SandboxId, SandboxStatus, SnapshotManager, TeamId, TemplateName,
};

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn announce(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn stop_here(step: &str) -> ! {
    announce(&format!("PAUSED {step}"));
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The reference agent, stopping at the chosen step.
struct Pausing {
    agent: DirHostAgent,
    pause: String,
    db: PathBuf,
    /// The sandbox a restore creates (hidden from ListSandboxes at
    /// `restore-destroy-queued`).
    restored: Option<SandboxId>,
}

#[async_trait]
impl HostAgent for Pausing {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        match self.pause.as_str() {
            "before-call" => stop_here("before-call").await,
            "in-agent" => {
                // What a copy cut short leaves: the VM paused and part of the
                // files in the agent's temporary directory.
                self.agent.set_sandbox_status(req.sandbox_id, "paused");
                let temp = self
                    .agent
                    .root()
                    .join("snapshots")
                    .join(format!(".tmp-{}-crash", req.key));
                let _ = std::fs::create_dir_all(&temp);
                let _ = std::fs::write(temp.join("memory.bin"), b"partial");
                stop_here("in-agent").await
            }
            "after-call" => {
                let response = self.agent.create_snapshot(req).await?;
                drop(response);
                stop_here("after-call").await
            }
            "in-failure" | "in-failure-locked" => {
                self.agent.create_snapshot(req).await?;
                Err(AgentError::rejected(
                    AgentCode::Internal,
                    "snapshot written, then failed",
                ))
            }
            _ => self.agent.create_snapshot(req).await,
        }
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        if self.pause == "in-delete" {
            stop_here("in-delete").await;
        }
        self.agent.delete_snapshot(req).await
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        match self.pause.as_str() {
            "in-failure" => stop_here("in-failure").await,
            "restore-in-failure" => stop_here("restore-in-failure").await,
            "restore-destroy-queued" => {
                let mut list = self.agent.list_sandboxes().await?;
                let hidden = self.restored.map(|id| id.to_string());
                list.sandboxes
                    .retain(|s| Some(&s.sandbox_id) != hidden.as_ref());
                Ok(list)
            }
            "in-failure-locked" => {
                // Held until the process dies: the rollback cannot commit.
                let conn = rusqlite::Connection::open(&self.db)
                    .and_then(|c| c.execute_batch("BEGIN IMMEDIATE").map(|()| c))
                    .map_err(|e| AgentError::rejected(AgentCode::Internal, e.to_string()))?;
                std::mem::forget(conn);
                announce("PAUSED in-failure-locked");
                self.agent.list_sandboxes().await
            }
            _ => self.agent.list_sandboxes().await,
        }
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.agent.list_snapshots().await
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        match self.pause.as_str() {
            "restore-before-call" => stop_here("restore-before-call").await,
            "restore-in-agent" => {
                self.agent.create_sandbox(req).await?;
                stop_here("restore-in-agent").await
            }
            "restore-in-agent-partial" => {
                // The agent's own copy, stopped before its rename.
                let hold = Hold::new();
                self.agent.pause_before_rename(Some(hold.clone()));
                let agent = self.agent.clone();
                let copy = tokio::spawn(async move { agent.create_sandbox(req).await });
                tokio::select! {
                    () = hold.arrived(1) => stop_here("restore-in-agent-partial").await,
                    done = copy => Err(AgentError::rejected(
                        AgentCode::Internal,
                        format!("the copy ended before its rename: {done:?}"),
                    )),
                }
            }
            "restore-in-failure" => {
                self.agent.create_sandbox(req).await?;
                Err(AgentError::rejected(
                    AgentCode::Internal,
                    "sandbox started, then failed",
                ))
            }
            "restore-destroy-queued" => {
                self.agent.create_sandbox(req).await?;
                Err(AgentError::Timeout)
            }
            _ => self.agent.create_sandbox(req).await,
        }
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        self.agent.destroy_sandbox(req).await
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        self.agent.host_info().await
    }
}

struct One {
    host: HostId,
    agent: Arc<dyn HostAgent>,
}

impl AgentTransport for One {
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError> {
        if host.id == self.host {
            Ok(self.agent.clone())
        } else {
            Err(AgentError::unavailable("unknown host"))
        }
    }
}

fn options(args: &[String]) -> Result<HashMap<String, String>, Failure> {
    let mut map = HashMap::new();
    let mut it = args.iter();
    while let Some(key) = it.next() {
        let key = key
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {key:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        map.insert(key.to_owned(), value.clone());
    }
    Ok(map)
}

fn get<'a>(opts: &'a HashMap<String, String>, key: &str) -> Result<&'a str, Failure> {
    opts.get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("--{key} is required").into())
}

async fn run(opts: HashMap<String, String>) -> Result<(), Failure> {
    let host = HostId::parse(get(&opts, "host")?)?;
    let team = TeamId::parse(get(&opts, "team")?)?;
    let sandbox = SandboxId::parse(get(&opts, "sandbox")?)?;
    let name = TemplateName::parse(get(&opts, "name")?)?;
    let pause = get(&opts, "pause")?.to_owned();
    let agent = DirHostAgent::open(get(&opts, "root")?).await?;
    let db = PathBuf::from(get(&opts, "db")?);
    let restored = opts
        .get("restore-id")
        .map(|id| SandboxId::parse(id))
        .transpose()?;
    let pausing = Pausing {
        agent,
        pause: pause.clone(),
        db: db.clone(),
        restored,
    };
    let agent: Arc<dyn HostAgent> = match opts.get("agent").map(String::as_str) {
        None | Some("ours") => Arc::new(pausing),
        Some("go") => Arc::new(GoLikeAgent::new(pausing)),
        Some(other) => return Err(format!("unknown --agent {other:?}").into()),
    };
    let transport = Arc::new(One { host, agent });
    let mut manager_options = ManagerOptions::default();
    // This process only drives the one operation.
    manager_options.run_janitor = false;
    manager_options.store.busy_timeout = Duration::from_millis(100);
    if opts.get("op").map(String::as_str) == Some("restore") {
        // A destroy the restore queues is due soon enough for the test's
        // worker.
        manager_options.late_write_grace = Duration::from_millis(50);
    }
    let manager = Manager::open(db, transport, manager_options).await?;
    let registry = manager.registry();
    registry
        .register_host(host, "in-process", HostStatus::Online)
        .await?;
    registry
        .register_sandbox(Sandbox::new(
            sandbox,
            team,
            Some(host),
            SandboxStatus::Running,
            1,
            64,
        ))
        .await?;
    let caller = Caller::new(team, Actor::System);
    match get(&opts, "op")? {
        "create" => {
            manager
                .create(&caller, NewSnapshot::new(sandbox, Some(name)))
                .await?;
        }
        "overwrite" => {
            manager
                .create(
                    &caller,
                    NewSnapshot::new(sandbox, Some(name)).overwrite(true),
                )
                .await?;
        }
        "delete" => {
            manager.delete(&caller, &name).await?;
        }
        "restore" => {
            let id = restored.ok_or("--restore-id is required")?;
            let result = manager
                .restore(&caller, RestoreRequest::new(name).sandbox_id(id))
                .await;
            if pause == "restore-destroy-queued" {
                // The caller was told it failed; the destroy waits, queued.
                let err = result.err().ok_or("the restore succeeded")?;
                let queued = manager.pending_destroys().await?;
                if queued.len() != 1 || queued[0].sandbox != id {
                    return Err(format!("after {err}: destroys queued {queued:?}").into());
                }
                stop_here("restore-destroy-queued").await;
            }
            result?;
        }
        other => return Err(format!("unknown --op {other:?}").into()),
    }
    // The pause point was never reached.
    announce("DONE");
    Ok(())
}

fn hold_lock(opts: HashMap<String, String>) -> Result<(), Failure> {
    let conn = rusqlite::Connection::open(get(&opts, "db")?)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    announce("LOCKED");
    let seconds: u64 = get(&opts, "seconds")?.parse()?;
    std::thread::sleep(Duration::from_secs(seconds));
    conn.execute_batch("ROLLBACK")?;
    Ok(())
}

async fn hold_manager(opts: HashMap<String, String>) -> Result<(), Failure> {
    let mut manager_options = ManagerOptions::default();
    manager_options.run_janitor = false;
    let _manager = Manager::open(
        PathBuf::from(get(&opts, "db")?),
        Arc::new(InProcessTransport::new()),
        manager_options,
    )
    .await?;
    announce("OPEN");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// The `dir-copy` mode: the agent's own copy, stopped before its rename.
async fn dir_copy(opts: HashMap<String, String>) -> Result<(), Failure> {
    let agent = DirHostAgent::open(PathBuf::from(get(&opts, "root")?)).await?;
    let sandbox = SandboxId::parse(get(&opts, "sandbox")?)?;
    let key = SnapshotKey::parse(get(&opts, "key")?)?;
    let hold = Hold::new();
    agent.pause_before_rename(Some(hold.clone()));
    let copying = agent.clone();
    let create = tokio::spawn(async move {
        copying
            .create_snapshot(CreateSnapshotRequest::new(sandbox, key))
            .await
    });
    tokio::select! {
        () = hold.arrived(1) => stop_here("before-rename").await,
        done = create => Err(format!("the create ended before its rename: {done:?}").into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        return Err("usage: crash_harness run|hold-lock|hold-manager|dir-copy [options]".into());
    };
    let opts = options(rest)?;
    match mode.as_str() {
        "run" => run(opts).await,
        "hold-lock" => hold_lock(opts),
        "hold-manager" => hold_manager(opts).await,
        "dir-copy" => dir_copy(opts).await,
        other => Err(format!("unknown mode {other:?}").into()),
    }
}
