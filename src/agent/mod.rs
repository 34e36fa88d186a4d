//! Host agents and the transports that reach them.
//!
//! [`HostAgent`] is the host-agent service (SPEC §5) in domain types: the
//! same trait is implemented by agents (the in-memory one here, a real one
//! on a host) and by clients that reach a remote agent. An
//! [`AgentTransport`] hands out a client for a given host.

mod client;
pub(crate) mod connect;
mod dir;
mod go_like;
mod grpc;
mod in_process;
mod memory;
mod pb;
mod server;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::ids::{HostId, SandboxId, TeamId, TemplateId};
use crate::names::{NameError, TemplateName};
use crate::time::Timestamp;

pub use client::{ClientConfig, ConnectConfig, GrpcConfig, HttpVersion, TlsConfig};
pub use connect::ConnectTransport;
pub use dir::DirHostAgent;
pub use go_like::GoLikeAgent;
pub use grpc::GrpcTransport;
pub use in_process::InProcessTransport;
pub use memory::{AgentOp, Fault, Hold, MemoryHostAgent};
pub use server::{HostAgentServer, ServerTls};

/// Status codes a host agent answers with (gRPC/Connect codes). Unavailable
/// and DeadlineExceeded are not here: they are [`AgentError::Unavailable`]
/// and [`AgentError::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AgentCode {
    /// The operation was cancelled.
    Cancelled,
    /// Unknown error.
    Unknown,
    /// The request is malformed.
    InvalidArgument,
    /// The sandbox or snapshot does not exist.
    NotFound,
    /// The snapshot key already exists.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A quota or disk ran out.
    ResourceExhausted,
    /// The target is not in a state that allows the operation.
    FailedPrecondition,
    /// Aborted by a concurrent operation.
    Aborted,
    /// A value is out of range.
    OutOfRange,
    /// The agent does not implement the call.
    Unimplemented,
    /// An internal agent error.
    Internal,
    /// Unrecoverable data loss.
    DataLoss,
    /// Missing or wrong credentials.
    Unauthenticated,
}

impl AgentCode {
    /// The code's name in the Connect protocol (`not_found`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "canceled",
            Self::Unknown => "unknown",
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Aborted => "aborted",
            Self::OutOfRange => "out_of_range",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
            Self::DataLoss => "data_loss",
            Self::Unauthenticated => "unauthenticated",
        }
    }
}

impl fmt::Display for AgentCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed host-agent call, classified by what the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent could not be reached, or the connection failed during
    /// the call; retry later.
    #[error("host agent unavailable: {message}")]
    Unavailable {
        /// What went wrong (for logs).
        message: String,
        /// The request provably never reached the agent: the connection
        /// was refused, the name did not resolve, the TLS handshake failed,
        /// the host has no address. Such a failure is definite — the agent
        /// did nothing. `false` when the request may have been delivered
        /// (a connection lost mid-call, an agent answering "unavailable").
        not_sent: bool,
    },
    /// No answer within the deadline; the call may or may not have happened.
    #[error("host agent call timed out")]
    Timeout,
    /// The agent answered with an error code.
    #[error("host agent rejected the call ({code}): {message}")]
    Rejected {
        /// The agent's code.
        code: AgentCode,
        /// The agent's message (for logs; never shown to end users).
        message: String,
    },
    /// The answer could not be understood.
    #[error("host agent protocol error: {message}")]
    Protocol {
        /// What went wrong (for logs).
        message: String,
    },
}

impl AgentError {
    /// An [`AgentError::Rejected`] with `code`.
    pub fn rejected(code: AgentCode, message: impl Into<String>) -> Self {
        Self::Rejected {
            code,
            message: message.into(),
        }
    }

    /// An [`AgentError::Unavailable`] where the request may have been
    /// delivered.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            not_sent: false,
        }
    }

    /// An [`AgentError::Unavailable`] for a request that provably never
    /// reached the agent (refused, DNS, TLS handshake, no address).
    pub fn not_sent(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            not_sent: true,
        }
    }

    /// Whether the request provably never reached the agent, so the agent
    /// did nothing (see [`AgentError::Unavailable`]).
    pub fn is_not_sent(&self) -> bool {
        matches!(self, Self::Unavailable { not_sent: true, .. })
    }

    /// The agent's code, when it answered with one.
    pub fn code(&self) -> Option<AgentCode> {
        match self {
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the agent definitely did not act on the request: it refused
    /// it up front (bad argument, unknown sandbox, wrong state, …). Anything
    /// else (internal errors, timeouts, lost connections, undecodable
    /// answers) leaves the host's state unknown.
    pub fn is_definite_rejection(&self) -> bool {
        matches!(
            self.code(),
            Some(
                AgentCode::InvalidArgument
                    | AgentCode::NotFound
                    | AgentCode::AlreadyExists
                    | AgentCode::PermissionDenied
                    | AgentCode::FailedPrecondition
                    | AgentCode::OutOfRange
                    | AgentCode::Unimplemented
                    | AgentCode::Unauthenticated
            )
        )
    }
}

/// The key under which a host stores a snapshot's files (the wire's `name`
/// field). Ours are template ids (`tpl-…`); keys follow the template-name
/// rule, so a key can never name a path outside the agent's directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey(String);

impl SnapshotKey {
    /// The key of a template's files.
    pub fn for_template(id: TemplateId) -> Self {
        Self(id.to_string())
    }

    /// Validates a key received from the wire.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        TemplateName::parse(input).map(|n| Self(n.as_str().to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The template this key belongs to, when it is in our key format.
    pub fn template_id(&self) -> Option<TemplateId> {
        TemplateId::parse(&self.0).ok()
    }
}

impl fmt::Display for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Asks an agent to snapshot a sandbox into `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateSnapshotRequest {
    /// The sandbox to snapshot.
    pub sandbox_id: SandboxId,
    /// Where to store the files.
    pub key: SnapshotKey,
    /// The team that owns the template (informational for the agent).
    pub team_id: Option<TeamId>,
    /// The template being created (informational for the agent).
    pub template_id: Option<TemplateId>,
}

impl CreateSnapshotRequest {
    /// A request to snapshot `sandbox_id` under `key`.
    pub fn new(sandbox_id: SandboxId, key: SnapshotKey) -> Self {
        Self {
            sandbox_id,
            key,
            team_id: None,
            template_id: None,
        }
    }

    /// The request the manager sends for a template.
    pub fn for_template(sandbox_id: SandboxId, team_id: TeamId, template_id: TemplateId) -> Self {
        Self {
            sandbox_id,
            key: SnapshotKey::for_template(template_id),
            team_id: Some(team_id),
            template_id: Some(template_id),
        }
    }
}

/// A snapshot the agent wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateSnapshotResponse {
    /// The key the files were stored under.
    pub key: String,
    /// Bytes allocated on disk.
    pub size_bytes: u64,
    /// What produced the snapshot, when the agent says (our extension).
    pub compat: Option<HostInfo>,
}

impl CreateSnapshotResponse {
    /// A response for `key` holding `size_bytes`.
    pub fn new(key: impl Into<String>, size_bytes: u64) -> Self {
        Self {
            key: key.into(),
            size_bytes,
            compat: None,
        }
    }

    /// Says what produced the snapshot.
    pub fn with_compat(mut self, compat: Option<HostInfo>) -> Self {
        self.compat = compat;
        self
    }
}

/// Longest text field of a [`HostInfo`].
pub const HOST_INFO_MAX_TEXT: usize = 256;
/// Most CPU flags of a [`HostInfo`].
pub const HOST_INFO_MAX_FLAGS: usize = 1024;

/// What a host produces and can restore: the VMM and its snapshot format,
/// the kernel, the CPU (our `GetHostInfo` extension, and what a
/// `CreateSnapshot` answer says produced the snapshot). Empty fields are
/// unknown; a `HostInfo` whose every field is empty is no information at
/// all, and decodes as `None`.
///
/// Values from the wire are checked ([`HostInfo::validate`]): each text at
/// most [`HOST_INFO_MAX_TEXT`] bytes without control characters, at most
/// [`HOST_INFO_MAX_FLAGS`] flags, each a non-empty word.
///
/// As JSON (the template object's `compat`, and how stores keep it) an
/// unknown field is left out.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HostInfo {
    /// The VMM, e.g. `firecracker`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub vmm: String,
    /// Its version.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub vmm_version: String,
    /// The snapshot format version the VMM writes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot_format: String,
    /// The host kernel's release.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kernel_version: String,
    /// The CPU vendor.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cpu_vendor: String,
    /// The CPU model.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cpu_model: String,
    /// The CPU feature flags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpu_flags: Vec<String>,
    /// The machine architecture, e.g. `x86_64`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub arch: String,
}

impl HostInfo {
    /// A host running `vmm` at `vmm_version`, writing `snapshot_format`,
    /// on `arch`; the other fields unknown.
    pub fn new(
        vmm: impl Into<String>,
        vmm_version: impl Into<String>,
        snapshot_format: impl Into<String>,
        arch: impl Into<String>,
    ) -> Self {
        Self {
            vmm: vmm.into(),
            vmm_version: vmm_version.into(),
            snapshot_format: snapshot_format.into(),
            arch: arch.into(),
            ..Self::default()
        }
    }

    /// Sets the kernel release.
    pub fn kernel(mut self, version: impl Into<String>) -> Self {
        self.kernel_version = version.into();
        self
    }

    /// Sets the CPU.
    pub fn cpu(
        mut self,
        vendor: impl Into<String>,
        model: impl Into<String>,
        flags: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.cpu_vendor = vendor.into();
        self.cpu_model = model.into();
        self.cpu_flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// Whether nothing at all is known.
    pub fn is_unknown(&self) -> bool {
        self == &Self::default()
    }

    /// Checks the limits above; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let texts = [
            ("vmm", &self.vmm),
            ("vmm_version", &self.vmm_version),
            ("snapshot_format", &self.snapshot_format),
            ("kernel_version", &self.kernel_version),
            ("cpu_vendor", &self.cpu_vendor),
            ("cpu_model", &self.cpu_model),
            ("arch", &self.arch),
        ];
        for (field, text) in texts {
            if text.len() > HOST_INFO_MAX_TEXT {
                return Err(format!("{field} is longer than {HOST_INFO_MAX_TEXT} bytes"));
            }
            if text.chars().any(char::is_control) {
                return Err(format!("{field} contains control characters"));
            }
        }
        if self.cpu_flags.len() > HOST_INFO_MAX_FLAGS {
            return Err(format!("more than {HOST_INFO_MAX_FLAGS} cpu_flags"));
        }
        for flag in &self.cpu_flags {
            let word =
                !flag.is_empty() && flag.len() <= 64 && flag.chars().all(|c| c.is_ascii_graphic());
            if !word {
                return Err(format!("cpu_flags holds a bad flag {flag:?}"));
            }
        }
        Ok(())
    }
}

/// Asks an agent to start a sandbox from a snapshot key it holds, or from
/// a base template.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateSandboxRequest {
    /// The id to give the sandbox.
    pub sandbox_id: SandboxId,
    /// The snapshot key (`tpl-…`) or base template name to start from.
    pub template: SnapshotKey,
    /// Virtual CPUs (0: the template's).
    pub vcpus: u32,
    /// Memory in MiB (0: the template's).
    pub memory_mb: u32,
    /// Idle timeout in seconds (0: the agent's default).
    pub timeout_sec: u32,
    /// Disk size in MiB (0: the template's).
    pub disk_size_mb: u32,
    /// The team the sandbox belongs to (informational).
    pub team_id: Option<TeamId>,
    /// The template's id (informational).
    pub template_id: Option<TemplateId>,
}

impl CreateSandboxRequest {
    /// A request to start `sandbox_id` from `template`, sizes the
    /// template's.
    pub fn new(sandbox_id: SandboxId, template: SnapshotKey) -> Self {
        Self {
            sandbox_id,
            template,
            vcpus: 0,
            memory_mb: 0,
            timeout_sec: 0,
            disk_size_mb: 0,
            team_id: None,
            template_id: None,
        }
    }
}

/// A sandbox the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CreateSandboxResponse {
    /// Its id, as the agent spells it.
    pub sandbox_id: String,
    /// Its status (`running`, …).
    pub status: String,
    /// Its IP on the host network.
    pub host_ip: String,
    /// Free-form labels.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl CreateSandboxResponse {
    /// A response for `sandbox_id` in `status`.
    pub fn new(sandbox_id: impl Into<String>, status: impl Into<String>) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            status: status.into(),
            ..Self::default()
        }
    }
}

/// Asks an agent to stop a sandbox and remove its state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DestroySandboxRequest {
    /// The sandbox.
    pub sandbox_id: SandboxId,
}

impl DestroySandboxRequest {
    /// A request to destroy `sandbox_id`.
    pub fn new(sandbox_id: SandboxId) -> Self {
        Self { sandbox_id }
    }
}

/// Asks an agent to delete the files under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteSnapshotRequest {
    /// The files to delete.
    pub key: SnapshotKey,
    /// The owning team (informational).
    pub team_id: Option<TeamId>,
    /// The template (informational).
    pub template_id: Option<TemplateId>,
}

impl DeleteSnapshotRequest {
    /// A request to delete `key`.
    pub fn new(key: SnapshotKey) -> Self {
        Self {
            key,
            team_id: None,
            template_id: None,
        }
    }
}

/// A sandbox as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SandboxInfo {
    /// Its id, as the agent spells it.
    pub sandbox_id: String,
    /// Its status on the host (`running`, `paused`, …).
    pub status: String,
    /// The template it was started from.
    pub template: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Its IP on the host network.
    pub host_ip: String,
    /// Creation time, Unix seconds.
    pub created_at_unix: i64,
    /// Last activity, Unix seconds.
    pub last_active_at_unix: i64,
    /// Idle timeout in seconds.
    pub timeout_sec: i32,
    /// The team that owns it, if the agent says.
    pub team_id: String,
    /// The template it was started from, by id, if the agent says.
    pub template_id: String,
    /// Free-form labels.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl SandboxInfo {
    /// A sandbox with an id and a status; other fields zero.
    pub fn new(sandbox_id: impl Into<String>, status: impl Into<String>) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            status: status.into(),
            ..Self::default()
        }
    }
}

/// What `ListSandboxes` returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SandboxList {
    /// The sandboxes on the host.
    pub sandboxes: Vec<SandboxInfo>,
    /// Sandboxes the host paused on its own (idle timeout).
    pub auto_paused_sandbox_ids: Vec<String>,
}

/// One snapshot held by a host (our `ListSnapshots` extension).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Its key.
    pub key: String,
    /// Bytes allocated on disk.
    pub size_bytes: u64,
    /// When it was written, if the host knows.
    pub created_at: Option<Timestamp>,
}

impl SnapshotInfo {
    /// A snapshot entry.
    pub fn new(key: impl Into<String>, size_bytes: u64, created_at: Option<Timestamp>) -> Self {
        Self {
            key: key.into(),
            size_bytes,
            created_at,
        }
    }
}

/// The host-agent service (SPEC §5), in domain types.
///
/// # Contract
/// - `create_snapshot` writes the sandbox's state under `key` and leaves the
///   VM paused. It either stores the whole snapshot under `key` or nothing;
///   after an error other than a definite rejection
///   ([`AgentError::is_definite_rejection`]) the caller must assume a partial
///   key may exist and delete it. NotFound: no such sandbox;
///   FailedPrecondition: the sandbox cannot be snapshotted in its state;
///   AlreadyExists: the key is taken. Its answer may say what produced the
///   snapshot (`compat`).
/// - `delete_snapshot` is idempotent in effect: a missing key answers
///   `Rejected { code: NotFound }`, which callers treat as done. A key the
///   agent is still writing answers FailedPrecondition (retry later),
///   never NotFound.
/// - `create_sandbox` starts a sandbox from a snapshot key the host holds
///   or a base template, running when it answers. NotFound: the template is
///   not on this host; AlreadyExists: a sandbox with that id exists (the
///   agent did nothing); InvalidArgument: a bad id, key or size;
///   FailedPrecondition / ResourceExhausted: the host cannot run it now.
///   After any other error the sandbox may or may not exist: ask
///   `list_sandboxes`, and destroy it if it must not run.
/// - `destroy_sandbox` stops a sandbox and removes its state; NotFound
///   means there is none (callers treat it as done).
/// - `host_info` (extension) says what the host produces and can restore;
///   Unimplemented (the default) means unknown, never an error to act on.
/// - `list_snapshots` is an extension; an agent without it answers
///   `Rejected { code: Unimplemented }` (the default). It lists only
///   complete snapshots: a key being written is not listed, because
///   recovery makes a template of every listed key it was waiting for.
/// - Implementations must be cancel-safe: a call whose future is dropped
///   either happened or did not, and `create_snapshot` may leave a partial key.
#[async_trait]
pub trait HostAgent: Send + Sync + 'static {
    /// Snapshots a sandbox.
    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, AgentError>;

    /// Deletes a snapshot's files.
    async fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<(), AgentError>;

    /// Lists the sandboxes on the host.
    async fn list_sandboxes(&self) -> Result<SandboxList, AgentError>;

    /// Lists the snapshot keys held by the host.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentError> {
        Err(AgentError::rejected(
            AgentCode::Unimplemented,
            "ListSnapshots is not implemented by this agent",
        ))
    }

    /// Starts a sandbox from a snapshot or base template.
    async fn create_sandbox(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, AgentError> {
        let _ = req;
        Err(AgentError::rejected(
            AgentCode::Unimplemented,
            "CreateSandbox is not implemented by this agent",
        ))
    }

    /// Stops a sandbox and removes its state.
    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<(), AgentError> {
        let _ = req;
        Err(AgentError::rejected(
            AgentCode::Unimplemented,
            "DestroySandbox is not implemented by this agent",
        ))
    }

    /// What the host produces and can restore.
    async fn host_info(&self) -> Result<HostInfo, AgentError> {
        Err(AgentError::rejected(
            AgentCode::Unimplemented,
            "GetHostInfo is not implemented by this agent",
        ))
    }
}

/// A bearer token that authenticates the control plane to host agents.
/// Never printed: `Debug` shows `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The `authorization` header value: `Bearer <token>`.
    pub(crate) fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `authorization` header carries this token, compared in
    /// constant time.
    pub(crate) fn matches(&self, header: &[u8]) -> bool {
        let expected = self.header_value();
        let expected = expected.as_bytes();
        if header.len() != expected.len() {
            return false;
        }
        header
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

/// Where a host's agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostTarget {
    /// The host.
    pub id: HostId,
    /// Its agent's address as registered.
    pub address: String,
}

/// Reaches host agents.
///
/// # Contract
/// - `agent` is cheap and does no I/O: connections are made lazily on the
///   first call and cached per host; a changed address replaces the cached
///   connection.
/// - Errors from the returned client are classified as [`AgentError`]; a
///   transport never panics on a bad answer.
pub trait AgentTransport: Send + Sync + 'static {
    /// A client for the agent on `host`.
    fn agent(&self, host: &HostTarget) -> Result<Arc<dyn HostAgent>, AgentError>;
}
