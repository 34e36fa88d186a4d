//! Operational metrics (SPEC §10), recorded through the [`metrics`] facade:
//! whatever recorder the embedding application installs receives them (the
//! `snapshots-server` binary installs a Prometheus one and serves it at
//! `GET /metrics`). Without a recorder every call here is a no-op.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `snapshots_operations_total` | counter | `kind` (`create`, `delete`), `outcome` (`success` or the error code) |
//! | `snapshots_operation_duration_seconds` | histogram | `kind`, `outcome` |
//! | `snapshots_agent_calls_total` | counter | `host`, `call`, `result` (`ok`, `not_sent`, `unavailable`, `timeout`, `rejected_<code>`, `protocol`) |
//! | `snapshots_queued_deletions` | gauge | |
//! | `snapshots_queued_deletions_oldest_age_seconds` | gauge | |
//! | `snapshots_open_operations` | gauge | |
//! | `snapshots_open_operations_oldest_age_seconds` | gauge | |
//! | `snapshots_janitor_passes_total` | counter | |

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::agent::{
    AgentError, AgentTransport, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostAgent, HostInfo,
    HostTarget, SandboxList, SnapshotInfo,
};
use crate::error::Result;
use crate::ids::HostId;

/// Operations by kind and outcome.
pub const OPERATIONS_TOTAL: &str = "snapshots_operations_total";
/// Their latency.
pub const OPERATION_DURATION_SECONDS: &str = "snapshots_operation_duration_seconds";
/// Host-agent calls by host, call and result.
pub const AGENT_CALLS_TOTAL: &str = "snapshots_agent_calls_total";
/// Placements waiting for their files to be deleted.
pub const QUEUED_DELETIONS: &str = "snapshots_queued_deletions";
/// How long the oldest of them has waited.
pub const QUEUED_DELETIONS_OLDEST_AGE_SECONDS: &str =
    "snapshots_queued_deletions_oldest_age_seconds";
/// Creates in the operations journal (interrupted or in flight).
pub const OPEN_OPERATIONS: &str = "snapshots_open_operations";
/// How long the oldest of them has been open.
pub const OPEN_OPERATIONS_OLDEST_AGE_SECONDS: &str = "snapshots_open_operations_oldest_age_seconds";
/// Passes of the background worker.
pub const JANITOR_PASSES_TOTAL: &str = "snapshots_janitor_passes_total";

/// Describes every metric to the installed recorder (help text, units).
/// The server calls it once after installing its recorder.
pub fn describe() {
    ::metrics::describe_counter!(
        OPERATIONS_TOTAL,
        "Snapshot operations by kind (create, delete) and outcome (success or the error code)"
    );
    ::metrics::describe_histogram!(
        OPERATION_DURATION_SECONDS,
        ::metrics::Unit::Seconds,
        "Latency of snapshot operations by kind and outcome"
    );
    ::metrics::describe_counter!(
        AGENT_CALLS_TOTAL,
        "Host-agent calls by host, call and result (ok or the error class)"
    );
    ::metrics::describe_gauge!(
        QUEUED_DELETIONS,
        "Snapshot files queued for deletion on their hosts"
    );
    ::metrics::describe_gauge!(
        QUEUED_DELETIONS_OLDEST_AGE_SECONDS,
        ::metrics::Unit::Seconds,
        "Age of the oldest queued deletion (0 when none)"
    );
    ::metrics::describe_gauge!(
        OPEN_OPERATIONS,
        "Creates in the operations journal: in flight or interrupted"
    );
    ::metrics::describe_gauge!(
        OPEN_OPERATIONS_OLDEST_AGE_SECONDS,
        ::metrics::Unit::Seconds,
        "Age of the oldest open operation (0 when none)"
    );
    ::metrics::describe_counter!(JANITOR_PASSES_TOTAL, "Passes of the background worker");
}

/// Counts an operation that returned to its caller, and its latency.
pub(crate) fn operation<T>(kind: &'static str, started: Instant, result: &Result<T>) {
    let outcome = match result {
        Ok(_) => "success",
        Err(err) => err.code().as_str(),
    };
    let labels = [("kind", kind), ("outcome", outcome)];
    ::metrics::counter!(OPERATIONS_TOTAL, &labels).increment(1);
    ::metrics::histogram!(OPERATION_DURATION_SECONDS, &labels).record(started.elapsed());
}

/// Counts a pass of the background worker.
pub(crate) fn janitor_pass() {
    ::metrics::counter!(JANITOR_PASSES_TOTAL).increment(1);
}

/// A backlog: how many, and the age of the oldest.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Backlog {
    pub(crate) count: u64,
    pub(crate) oldest_age: Duration,
}

/// Sets the backlog gauges (the worker, on a pass, at most once a second).
pub(crate) fn backlogs(deletions: Backlog, operations: Backlog) {
    ::metrics::gauge!(QUEUED_DELETIONS).set(deletions.count as f64);
    ::metrics::gauge!(QUEUED_DELETIONS_OLDEST_AGE_SECONDS).set(deletions.oldest_age.as_secs_f64());
    ::metrics::gauge!(OPEN_OPERATIONS).set(operations.count as f64);
    ::metrics::gauge!(OPEN_OPERATIONS_OLDEST_AGE_SECONDS).set(operations.oldest_age.as_secs_f64());
}

/// The result label of an agent call.
fn agent_result<T>(result: &std::result::Result<T, AgentError>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(err) => error_class(err),
    }
}

/// The class of an agent error, as a label.
fn error_class(err: &AgentError) -> String {
    match err {
        AgentError::Unavailable { not_sent: true, .. } => "not_sent".to_owned(),
        AgentError::Unavailable { .. } => "unavailable".to_owned(),
        AgentError::Timeout => "timeout".to_owned(),
        AgentError::Rejected { code, .. } => format!("rejected_{}", code.as_str()),
        AgentError::Protocol { .. } => "protocol".to_owned(),
    }
}

fn agent_call<T>(host: &HostId, call: &'static str, result: &std::result::Result<T, AgentError>) {
    count_agent_call(host, call, agent_result(result));
}

fn count_agent_call(host: &HostId, call: &'static str, result: String) {
    ::metrics::counter!(
        AGENT_CALLS_TOTAL,
        "host" => host.to_string(),
        "call" => call,
        "result" => result,
    )
    .increment(1);
}

/// Wraps the manager's transport so that every agent call — the manager's
/// and the worker's alike, whatever the transport — is counted in one
/// place, next to the transports rather than in each of them (so
/// in-process, gRPC and Connect agents are counted alike, and the memory
/// agent's injected faults too). A call dropped before it answers (the
/// caller's deadline passed) is counted as `timeout`; a client that cannot
/// be made at all is counted with `call="connect"`.
pub(crate) struct MeteredTransport {
    inner: Arc<dyn AgentTransport>,
}

impl MeteredTransport {
    pub(crate) fn wrap(inner: Arc<dyn AgentTransport>) -> Arc<dyn AgentTransport> {
        Arc::new(Self { inner })
    }
}

impl AgentTransport for MeteredTransport {
    fn agent(&self, host: &HostTarget) -> std::result::Result<Arc<dyn HostAgent>, AgentError> {
        match self.inner.agent(host) {
            Ok(agent) => Ok(Arc::new(MeteredAgent {
                host: host.id,
                inner: agent,
            })),
            Err(err) => {
                count_agent_call(&host.id, "connect", error_class(&err));
                Err(err)
            }
        }
    }
}

struct MeteredAgent {
    host: HostId,
    inner: Arc<dyn HostAgent>,
}

/// Counts a call when it answers, and as `timeout` when it is dropped
/// unanswered (a caller's deadline passed).
struct CallGuard<'a> {
    host: &'a HostId,
    call: &'static str,
    done: bool,
}

impl<'a> CallGuard<'a> {
    fn new(host: &'a HostId, call: &'static str) -> Self {
        Self {
            host,
            call,
            done: false,
        }
    }

    fn finish<T>(
        mut self,
        result: std::result::Result<T, AgentError>,
    ) -> std::result::Result<T, AgentError> {
        self.done = true;
        agent_call(self.host, self.call, &result);
        result
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            agent_call::<()>(self.host, self.call, &Err(AgentError::Timeout));
        }
    }
}

#[async_trait]
impl HostAgent for MeteredAgent {
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> std::result::Result<CreateSnapshotResponse, AgentError> {
        let guard = CallGuard::new(&self.host, "create_snapshot");
        guard.finish(self.inner.create_snapshot(req).await)
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> std::result::Result<(), AgentError> {
        let guard = CallGuard::new(&self.host, "delete_snapshot");
        guard.finish(self.inner.delete_snapshot(req).await)
    }

    async fn list_sandboxes(&self) -> std::result::Result<SandboxList, AgentError> {
        let guard = CallGuard::new(&self.host, "list_sandboxes");
        guard.finish(self.inner.list_sandboxes().await)
    }

    async fn list_snapshots(&self) -> std::result::Result<Vec<SnapshotInfo>, AgentError> {
        let guard = CallGuard::new(&self.host, "list_snapshots");
        guard.finish(self.inner.list_snapshots().await)
    }

    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> std::result::Result<CreateSandboxResponse, AgentError> {
        let guard = CallGuard::new(&self.host, "create_sandbox");
        guard.finish(self.inner.create_sandbox(req).await)
    }

    async fn destroy_sandbox(
        &self,
        req: DestroySandboxRequest,
    ) -> std::result::Result<(), AgentError> {
        let guard = CallGuard::new(&self.host, "destroy_sandbox");
        guard.finish(self.inner.destroy_sandbox(req).await)
    }

    async fn host_info(&self) -> std::result::Result<HostInfo, AgentError> {
        let guard = CallGuard::new(&self.host, "host_info");
        guard.finish(self.inner.host_info().await)
    }
}
