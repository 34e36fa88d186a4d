//! An in-memory host agent with fault injection, for the quickstart and tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    AgentCode, AgentError, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostAgent, HostInfo,
    SandboxInfo, SandboxList, SnapshotInfo,
};
use crate::ids::SandboxId;
use crate::time::Timestamp;

/// The calls of [`HostAgent`], for aiming faults and counting calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentOp {
    /// `CreateSnapshot`.
    CreateSnapshot,
    /// `DeleteSnapshot`.
    DeleteSnapshot,
    /// `ListSandboxes`.
    ListSandboxes,
    /// `ListSnapshots`.
    ListSnapshots,
    /// `CreateSandbox`.
    CreateSandbox,
    /// `DestroySandbox`.
    DestroySandbox,
    /// `GetHostInfo`.
    GetHostInfo,
}

/// A fault to inject into one call of a [`MemoryHostAgent`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this error without doing anything.
    Fail(AgentError),
    /// Do the work, then answer with this error: the caller cannot tell the
    /// work happened (a lost reply, an undecodable answer, a crash after the
    /// write).
    FailAfter(AgentError),
    /// Take this long. For `CreateSnapshot` the VM is paused first and the
    /// files are written after the wait, so a call cancelled during the wait
    /// leaves a paused VM and no files.
    Delay(Duration),
    /// Like [`Fault::Delay`], but wait until the [`Hold`] is released.
    Hold(Hold),
    /// `CreateSnapshot` only: the work runs on a task of its own that waits
    /// for the [`Hold`] and then writes the files, even if the caller gave
    /// up meanwhile (an agent that ignores its deadline).
    Detached(Hold),
}

/// A gate that stops calls until released, for deterministic interleavings.
#[derive(Debug, Clone)]
pub struct Hold {
    released: watch::Sender<bool>,
    arrived: Arc<watch::Sender<usize>>,
}

impl Default for Hold {
    fn default() -> Self {
        Self::new()
    }
}

impl Hold {
    /// A closed gate.
    pub fn new() -> Self {
        Self {
            released: watch::channel(false).0,
            arrived: Arc::new(watch::channel(0).0),
        }
    }

    /// Lets every waiting and future call through.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Waits until at least `n` calls have reached the gate.
    pub async fn arrived(&self, n: usize) {
        let mut rx = self.arrived.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    async fn pass(&self) {
        self.arrived.send_modify(|c| *c += 1);
        let mut rx = self.released.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// [`Hold::pass`] for synchronous code on a thread that may block (the
    /// blocking pool): parks the thread until the gate opens. The channels
    /// need no runtime, so neither does this.
    pub(crate) fn pass_blocking(&self) {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut pass = std::pin::pin!(self.pass());
        while pass.as_mut().poll(&mut cx).is_pending() {
            std::thread::park();
        }
    }
}

struct Injected {
    fault: Fault,
    remaining: Option<usize>,
}

#[derive(Default)]
struct State {
    sandboxes: BTreeMap<String, SandboxInfo>,
    snapshots: BTreeMap<String, SnapshotInfo>,
    /// Keys a create is still writing.
    writing: BTreeSet<String>,
    /// Base templates every sandbox may start from.
    base_templates: BTreeSet<String>,
    /// What `GetHostInfo` answers; `None`: Unimplemented.
    host_info: Option<HostInfo>,
}

/// A key being written, until the write is done or abandoned.
struct Writing {
    state: Arc<Mutex<State>>,
    key: String,
}

impl Drop for Writing {
    fn drop(&mut self) {
        lock(&self.state).writing.remove(&self.key);
    }
}

/// A host agent that keeps sandboxes and snapshots in memory.
///
/// Snapshot sizes are `(memory_mb + 16) MiB`. Faults are injected per call
/// kind with [`MemoryHostAgent::inject`]; [`MemoryHostAgent::set_unavailable`]
/// makes the whole agent unreachable.
///
/// [`MemoryHostAgent::go_like`] makes one that behaves like the original Go
/// host agent, the independent peer the control plane must be right
/// against: it lists only running VMs (a paused VM lives on disk, not in
/// the agent's memory), answers every `CreateSnapshot` failure with
/// Internal, deletes a missing key successfully, and has no `ListSnapshots`
/// (its mux answers the unknown route with a 404, read as Unimplemented).
#[derive(Default)]
pub struct MemoryHostAgent {
    state: Arc<Mutex<State>>,
    faults: Mutex<HashMap<AgentOp, VecDeque<Injected>>>,
    unavailable: std::sync::atomic::AtomicBool,
    calls: Mutex<HashMap<AgentOp, usize>>,
    in_flight: AtomicUsize,
    list_snapshots_unsupported: std::sync::atomic::AtomicBool,
    go_like: std::sync::atomic::AtomicBool,
}

/// What a memory agent says of itself by default.
fn default_host_info() -> HostInfo {
    HostInfo::new(
        "memory",
        env!("CARGO_PKG_VERSION"),
        "memory-1",
        std::env::consts::ARCH,
    )
}

impl std::fmt::Debug for MemoryHostAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHostAgent").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryHostAgent {
    /// An agent with no sandboxes, no snapshots and no faults, which
    /// describes itself as VMM `memory` (see
    /// [`MemoryHostAgent::set_host_info`]).
    pub fn new() -> Self {
        let agent = Self::default();
        lock(&agent.state).host_info = Some(default_host_info());
        agent
    }

    /// Sets what `GetHostInfo` answers (and `CreateSnapshot` reports as what
    /// produced a snapshot); `None` makes `GetHostInfo` Unimplemented and
    /// snapshots say nothing.
    pub fn set_host_info(&self, info: Option<HostInfo>) {
        lock(&self.state).host_info = info;
    }

    /// Makes `template` a base template sandboxes may start from.
    pub fn add_base_template(&self, template: &str) {
        lock(&self.state).base_templates.insert(template.to_owned());
    }

    /// An agent that behaves like the original Go host agent (see the type's
    /// documentation).
    pub fn go_like() -> Self {
        let agent = Self::default();
        agent.go_like.store(true, Ordering::SeqCst);
        agent.set_list_snapshots_supported(false);
        agent
    }

    /// Whether this agent behaves like the Go agent.
    pub fn is_go_like(&self) -> bool {
        self.go_like.load(Ordering::SeqCst)
    }

    /// Starts (or replaces) a sandbox on this host.
    pub fn add_sandbox(&self, id: SandboxId, status: &str, vcpus: u32, memory_mb: u32) {
        let mut info = SandboxInfo::new(id.to_string(), status);
        info.vcpus = vcpus;
        info.memory_mb = memory_mb;
        lock(&self.state).sandboxes.insert(id.to_string(), info);
    }

    /// Removes a sandbox from this host.
    pub fn remove_sandbox(&self, id: SandboxId) {
        lock(&self.state).sandboxes.remove(&id.to_string());
    }

    /// The host-side status of a sandbox.
    pub fn sandbox_status(&self, id: SandboxId) -> Option<String> {
        lock(&self.state)
            .sandboxes
            .get(&id.to_string())
            .map(|s| s.status.clone())
    }

    /// Sets the host-side status of a sandbox.
    pub fn set_sandbox_status(&self, id: SandboxId, status: &str) {
        if let Some(s) = lock(&self.state).sandboxes.get_mut(&id.to_string()) {
            s.status = status.to_owned();
        }
    }

    /// The snapshot keys on this host, sorted.
    pub fn snapshot_keys(&self) -> Vec<String> {
        lock(&self.state).snapshots.keys().cloned().collect()
    }

    /// Whether `key` is stored here.
    pub fn has_snapshot(&self, key: &str) -> bool {
        lock(&self.state).snapshots.contains_key(key)
    }

    /// Stores a snapshot directly (as if written by someone else).
    pub fn put_snapshot(&self, key: &str, size_bytes: u64, created_at: Option<Timestamp>) {
        lock(&self.state).snapshots.insert(
            key.to_owned(),
            SnapshotInfo::new(key, size_bytes, created_at),
        );
    }

    /// Injects `fault` into every following call of `op` (until cleared).
    pub fn inject(&self, op: AgentOp, fault: Fault) {
        self.push_fault(op, fault, None);
    }

    /// Injects `fault` into the next `times` calls of `op`.
    pub fn inject_times(&self, op: AgentOp, fault: Fault, times: usize) {
        self.push_fault(op, fault, Some(times));
    }

    fn push_fault(&self, op: AgentOp, fault: Fault, remaining: Option<usize>) {
        lock(&self.faults)
            .entry(op)
            .or_default()
            .push_back(Injected { fault, remaining });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    /// Makes every call fail as unavailable (a host that is down).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Makes `ListSnapshots` answer Unimplemented, like an older agent.
    pub fn set_list_snapshots_supported(&self, supported: bool) {
        self.list_snapshots_unsupported
            .store(!supported, Ordering::SeqCst);
    }

    /// How many calls of `op` reached this agent (including failed ones).
    pub fn calls(&self, op: AgentOp) -> usize {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    /// Calls currently executing.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Counts the call and picks the fault that applies to it.
    fn enter(&self, op: AgentOp) -> Result<Option<Fault>, AgentError> {
        *lock(&self.calls).entry(op).or_default() += 1;
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(AgentError::unavailable("host agent is down (injected)"));
        }
        let mut faults = lock(&self.faults);
        let Some(queue) = faults.get_mut(&op) else {
            return Ok(None);
        };
        let Some(front) = queue.front_mut() else {
            return Ok(None);
        };
        let fault = front.fault.clone();
        if let Some(remaining) = front.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                queue.pop_front();
            }
        }
        match fault {
            Fault::Fail(err) => Err(err),
            other => Ok(Some(other)),
        }
    }

    async fn wait(fault: &Option<Fault>) {
        match fault {
            Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
            Some(Fault::Hold(hold)) => hold.pass().await,
            _ => {}
        }
    }

    fn finish<T>(fault: Option<Fault>, value: T) -> Result<T, AgentError> {
        match fault {
            Some(Fault::FailAfter(err)) => Err(err),
            _ => Ok(value),
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemoryHostAgent {
    async fn create_snapshot_inner(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::CreateSnapshot)?;
        let sandbox_key = req.sandbox_id.to_string();
        let memory_mb = {
            let mut state = lock(&self.state);
            if state.snapshots.contains_key(req.key.as_str()) {
                return Err(AgentError::rejected(
                    AgentCode::AlreadyExists,
                    format!("snapshot {} already exists", req.key),
                ));
            }
            let sandbox = state.sandboxes.get_mut(&sandbox_key).ok_or_else(|| {
                AgentError::rejected(
                    AgentCode::NotFound,
                    format!("sandbox {sandbox_key} not found"),
                )
            })?;
            if sandbox.status != "running" && sandbox.status != "paused" {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("sandbox {sandbox_key} is {}", sandbox.status),
                ));
            }
            // The VM is paused before its memory is written out.
            sandbox.status = "paused".to_owned();
            let memory_mb = sandbox.memory_mb;
            state.writing.insert(req.key.as_str().to_owned());
            memory_mb
        };
        let writing = Writing {
            state: self.state.clone(),
            key: req.key.as_str().to_owned(),
        };
        let size_bytes = (u64::from(memory_mb) + 16) * 1024 * 1024;
        let compat = lock(&self.state).host_info.clone();
        let snapshot = SnapshotInfo::new(req.key.as_str(), size_bytes, Some(Timestamp::now()));
        if let Some(Fault::Detached(hold)) = &fault {
            // The agent goes on working after its caller gave up: until it
            // is done, the sandbox is listed as snapshotting (by an agent
            // that lists more than running VMs).
            if let Some(sandbox) = lock(&self.state).sandboxes.get_mut(&sandbox_key) {
                sandbox.status = "snapshotting".to_owned();
            }
            let (hold, state) = (hold.clone(), self.state.clone());
            let write = tokio::spawn(async move {
                hold.pass().await;
                let mut state = lock(&state);
                state.snapshots.insert(snapshot.key.clone(), snapshot);
                if let Some(sandbox) = state.sandboxes.get_mut(&sandbox_key) {
                    sandbox.status = "paused".to_owned();
                }
                drop(state);
                drop(writing);
            });
            write
                .await
                .map_err(|e| AgentError::rejected(AgentCode::Internal, e.to_string()))?;
        } else {
            Self::wait(&fault).await;
            lock(&self.state)
                .snapshots
                .insert(req.key.as_str().to_owned(), snapshot);
            drop(writing);
        }
        Self::finish(
            fault,
            CreateSnapshotResponse::new(req.key.as_str(), size_bytes).with_compat(compat),
        )
    }
}

#[async_trait]
impl HostAgent for MemoryHostAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError> {
        let result = self.create_snapshot_inner(req).await;
        match result {
            // The Go agent wraps every failure of its snapshot code as
            // Internal; what the transport reports stays as it is.
            Err(AgentError::Rejected { message, .. }) if self.is_go_like() => {
                Err(AgentError::rejected(AgentCode::Internal, message))
            }
            other => other,
        }
    }

    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::DeleteSnapshot)?;
        Self::wait(&fault).await;
        let removed = {
            let mut state = lock(&self.state);
            // Ours refuses to delete a key it is still writing (SPEC §4a
            // "Half-written keys"); the Go agent does not know to.
            if !self.is_go_like() && state.writing.contains(req.key.as_str()) {
                return Err(AgentError::rejected(
                    AgentCode::FailedPrecondition,
                    format!("snapshot {} is still being written; retry later", req.key),
                ));
            }
            state.snapshots.remove(req.key.as_str())
        };
        if removed.is_none() {
            // The Go agent removes the directory whether or not it exists.
            if self.is_go_like() {
                return Ok(());
            }
            return Err(AgentError::rejected(
                AgentCode::NotFound,
                format!("snapshot {} not found", req.key),
            ));
        }
        Self::finish(fault, ())
    }

    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::ListSandboxes)?;
        Self::wait(&fault).await;
        let go_like = self.is_go_like();
        let sandboxes = lock(&self.state)
            .sandboxes
            .values()
            .filter(|s| !go_like || s.status == "running")
            .cloned()
            .collect();
        Self::finish(
            fault,
            SandboxList {
                sandboxes,
                auto_paused_sandbox_ids: Vec::new(),
            },
        )
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::ListSnapshots)?;
        if self.list_snapshots_unsupported.load(Ordering::SeqCst) {
            return Err(AgentError::rejected(
                AgentCode::Unimplemented,
                "ListSnapshots is not implemented",
            ));
        }
        Self::wait(&fault).await;
        let snapshots = lock(&self.state).snapshots.values().cloned().collect();
        Self::finish(fault, snapshots)
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::CreateSandbox)?;
        let id = req.sandbox_id.to_string();
        let key = req.template.as_str();
        {
            let state = lock(&self.state);
            if state.sandboxes.contains_key(&id) {
                return Err(AgentError::rejected(
                    AgentCode::AlreadyExists,
                    format!("sandbox {id} exists"),
                ));
            }
            if !state.snapshots.contains_key(key) && !state.base_templates.contains(key) {
                return Err(AgentError::rejected(
                    AgentCode::NotFound,
                    format!("template {key} is not on this host"),
                ));
            }
        }
        // The VM starts after the wait: a call cut off meanwhile started
        // nothing.
        Self::wait(&fault).await;
        let mut info = SandboxInfo::new(id.clone(), "running");
        info.vcpus = req.vcpus;
        info.memory_mb = req.memory_mb;
        info.template = key.to_owned();
        info.team_id = req.team_id.map(|t| t.to_string()).unwrap_or_default();
        info.template_id = req.template_id.map(|t| t.to_string()).unwrap_or_default();
        info.timeout_sec = i32::try_from(req.timeout_sec).unwrap_or(i32::MAX);
        lock(&self.state).sandboxes.insert(id.clone(), info);
        Self::finish(fault, CreateSandboxResponse::new(id, "running"))
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::DestroySandbox)?;
        Self::wait(&fault).await;
        let id = req.sandbox_id.to_string();
        if lock(&self.state).sandboxes.remove(&id).is_none() {
            return Err(AgentError::rejected(
                AgentCode::NotFound,
                format!("sandbox {id} not found"),
            ));
        }
        Self::finish(fault, ())
    }

    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        let _guard = InFlight::new(&self.in_flight);
        let fault = self.enter(AgentOp::GetHostInfo)?;
        Self::wait(&fault).await;
        let info = lock(&self.state).host_info.clone();
        let info = match info {
            Some(info) if !self.is_go_like() => info,
            _ => {
                return Err(AgentError::rejected(
                    AgentCode::Unimplemented,
                    "GetHostInfo is not implemented",
                ));
            }
        };
        Self::finish(fault, info)
    }
}
