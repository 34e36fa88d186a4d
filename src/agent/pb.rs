//! The generated protobuf types (private) and every conversion between them
//! and the domain types. `tonic::Status` is converted to and from
//! [`AgentError`] here and nowhere else.

use std::error::Error as _;
use std::sync::{Arc, Mutex};

use super::{
    AgentCode, AgentError, CreateSandboxRequest, CreateSandboxResponse, CreateSnapshotRequest,
    CreateSnapshotResponse, DeleteSnapshotRequest, DestroySandboxRequest, HostInfo, SandboxInfo,
    SandboxList, SnapshotInfo, SnapshotKey,
};
use crate::ids::{SandboxId, TeamId, TemplateId};
use crate::time::Timestamp;

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub(crate) mod wire {
    tonic::include_proto!("hostagent.v1");
    // The proto3 JSON mapping (pbjson): lowerCamelCase names, 64-bit
    // integers as strings, defaults left out; either name form accepted.
    include!(concat!(env!("OUT_DIR"), "/hostagent.v1.serde.rs"));
}

/// Fully-qualified service name, the path prefix of every method.
pub(crate) const SERVICE: &str = "hostagent.v1.HostAgentService";

fn protocol(message: impl Into<String>) -> AgentError {
    AgentError::Protocol {
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::rejected(AgentCode::InvalidArgument, message)
}

fn non_negative_u64(value: i64, field: &str) -> Result<u64, AgentError> {
    u64::try_from(value).map_err(|_| protocol(format!("negative {field}: {value}")))
}

fn non_negative_u32(value: i32, field: &str) -> Result<u32, AgentError> {
    u32::try_from(value).map_err(|_| protocol(format!("negative {field}: {value}")))
}

fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn clamp_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn opt_text<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn parse_opt<T>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, crate::ids::IdError>,
    field: &str,
) -> Result<Option<T>, AgentError> {
    if text.is_empty() {
        return Ok(None);
    }
    parse(text)
        .map(Some)
        .map_err(|e| invalid(format!("invalid {field}: {e}")))
}

// ------------------------------------------------------------- requests

impl From<CreateSnapshotRequest> for wire::CreateSnapshotRequest {
    fn from(r: CreateSnapshotRequest) -> Self {
        Self {
            sandbox_id: r.sandbox_id.to_string(),
            name: r.key.as_str().to_owned(),
            team_id: opt_text(r.team_id),
            template_id: opt_text(r.template_id),
        }
    }
}

/// Server side: a request from the wire, validated before it reaches an
/// agent (bad ids or keys are InvalidArgument).
impl TryFrom<wire::CreateSnapshotRequest> for CreateSnapshotRequest {
    type Error = AgentError;
    fn try_from(r: wire::CreateSnapshotRequest) -> Result<Self, AgentError> {
        let sandbox_id = SandboxId::parse(&r.sandbox_id)
            .map_err(|e| invalid(format!("invalid sandbox_id: {e}")))?;
        let key = SnapshotKey::parse(&r.name).map_err(|e| invalid(format!("invalid name: {e}")))?;
        Ok(Self {
            sandbox_id,
            key,
            team_id: parse_opt(&r.team_id, TeamId::parse, "team_id")?,
            template_id: parse_opt(&r.template_id, TemplateId::parse, "template_id")?,
        })
    }
}

impl From<DeleteSnapshotRequest> for wire::DeleteSnapshotRequest {
    fn from(r: DeleteSnapshotRequest) -> Self {
        Self {
            name: r.key.as_str().to_owned(),
            team_id: opt_text(r.team_id),
            template_id: opt_text(r.template_id),
        }
    }
}

impl TryFrom<wire::DeleteSnapshotRequest> for DeleteSnapshotRequest {
    type Error = AgentError;
    fn try_from(r: wire::DeleteSnapshotRequest) -> Result<Self, AgentError> {
        let key = SnapshotKey::parse(&r.name).map_err(|e| invalid(format!("invalid name: {e}")))?;
        Ok(Self {
            key,
            team_id: parse_opt(&r.team_id, TeamId::parse, "team_id")?,
            template_id: parse_opt(&r.template_id, TemplateId::parse, "template_id")?,
        })
    }
}

// ------------------------------------------------------------ responses

impl From<CreateSnapshotResponse> for wire::CreateSnapshotResponse {
    fn from(r: CreateSnapshotResponse) -> Self {
        Self {
            name: r.key,
            size_bytes: clamp_i64(r.size_bytes),
            compat: r.compat.map(Into::into),
        }
    }
}

impl TryFrom<wire::CreateSnapshotResponse> for CreateSnapshotResponse {
    type Error = AgentError;
    fn try_from(r: wire::CreateSnapshotResponse) -> Result<Self, AgentError> {
        Ok(Self {
            key: r.name,
            size_bytes: non_negative_u64(r.size_bytes, "size_bytes")?,
            compat: host_info_from_wire(r.compat)?,
        })
    }
}

impl From<HostInfo> for wire::HostInfo {
    fn from(h: HostInfo) -> Self {
        Self {
            vmm: h.vmm,
            vmm_version: h.vmm_version,
            snapshot_format: h.snapshot_format,
            kernel_version: h.kernel_version,
            cpu_vendor: h.cpu_vendor,
            cpu_model: h.cpu_model,
            cpu_flags: h.cpu_flags,
            arch: h.arch,
        }
    }
}

/// A `HostInfo` from the wire, checked; `None` when absent or empty (the
/// agent does not say: unknown, never guessed).
pub(crate) fn host_info_from_wire(
    h: Option<wire::HostInfo>,
) -> Result<Option<HostInfo>, AgentError> {
    let Some(h) = h else {
        return Ok(None);
    };
    let info = HostInfo {
        vmm: h.vmm,
        vmm_version: h.vmm_version,
        snapshot_format: h.snapshot_format,
        kernel_version: h.kernel_version,
        cpu_vendor: h.cpu_vendor,
        cpu_model: h.cpu_model,
        cpu_flags: h.cpu_flags,
        arch: h.arch,
    };
    info.validate()
        .map_err(|e| protocol(format!("bad host info: {e}")))?;
    Ok((!info.is_unknown()).then_some(info))
}

impl From<CreateSandboxRequest> for wire::CreateSandboxRequest {
    fn from(r: CreateSandboxRequest) -> Self {
        Self {
            template: r.template.as_str().to_owned(),
            vcpus: clamp_i32(r.vcpus),
            memory_mb: clamp_i32(r.memory_mb),
            timeout_sec: clamp_i32(r.timeout_sec),
            sandbox_id: r.sandbox_id.to_string(),
            disk_size_mb: clamp_i32(r.disk_size_mb),
            team_id: opt_text(r.team_id),
            template_id: opt_text(r.template_id),
        }
    }
}

fn size_arg(value: i32, field: &str) -> Result<u32, AgentError> {
    u32::try_from(value).map_err(|_| invalid(format!("negative {field}: {value}")))
}

/// Server side: validated before it reaches an agent.
impl TryFrom<wire::CreateSandboxRequest> for CreateSandboxRequest {
    type Error = AgentError;
    fn try_from(r: wire::CreateSandboxRequest) -> Result<Self, AgentError> {
        let sandbox_id = SandboxId::parse(&r.sandbox_id)
            .map_err(|e| invalid(format!("invalid sandbox_id: {e}")))?;
        let template = SnapshotKey::parse(&r.template)
            .map_err(|e| invalid(format!("invalid template: {e}")))?;
        Ok(Self {
            sandbox_id,
            template,
            vcpus: size_arg(r.vcpus, "vcpus")?,
            memory_mb: size_arg(r.memory_mb, "memory_mb")?,
            timeout_sec: size_arg(r.timeout_sec, "timeout_sec")?,
            disk_size_mb: size_arg(r.disk_size_mb, "disk_size_mb")?,
            team_id: parse_opt(&r.team_id, TeamId::parse, "team_id")?,
            template_id: parse_opt(&r.template_id, TemplateId::parse, "template_id")?,
        })
    }
}

impl From<CreateSandboxResponse> for wire::CreateSandboxResponse {
    fn from(r: CreateSandboxResponse) -> Self {
        Self {
            sandbox_id: r.sandbox_id,
            status: r.status,
            host_ip: r.host_ip,
            metadata: r.metadata.into_iter().collect(),
        }
    }
}

impl From<wire::CreateSandboxResponse> for CreateSandboxResponse {
    fn from(r: wire::CreateSandboxResponse) -> Self {
        Self {
            sandbox_id: r.sandbox_id,
            status: r.status,
            host_ip: r.host_ip,
            metadata: r.metadata.into_iter().collect(),
        }
    }
}

impl From<DestroySandboxRequest> for wire::DestroySandboxRequest {
    fn from(r: DestroySandboxRequest) -> Self {
        Self {
            sandbox_id: r.sandbox_id.to_string(),
        }
    }
}

impl TryFrom<wire::DestroySandboxRequest> for DestroySandboxRequest {
    type Error = AgentError;
    fn try_from(r: wire::DestroySandboxRequest) -> Result<Self, AgentError> {
        let sandbox_id = SandboxId::parse(&r.sandbox_id)
            .map_err(|e| invalid(format!("invalid sandbox_id: {e}")))?;
        Ok(Self { sandbox_id })
    }
}

impl From<SandboxInfo> for wire::SandboxInfo {
    fn from(s: SandboxInfo) -> Self {
        Self {
            sandbox_id: s.sandbox_id,
            status: s.status,
            template: s.template,
            vcpus: clamp_i32(s.vcpus),
            memory_mb: clamp_i32(s.memory_mb),
            host_ip: s.host_ip,
            created_at_unix: s.created_at_unix,
            last_active_at_unix: s.last_active_at_unix,
            timeout_sec: s.timeout_sec,
            team_id: s.team_id,
            template_id: s.template_id,
            metadata: s.metadata.into_iter().collect(),
        }
    }
}

impl TryFrom<wire::SandboxInfo> for SandboxInfo {
    type Error = AgentError;
    fn try_from(s: wire::SandboxInfo) -> Result<Self, AgentError> {
        Ok(Self {
            vcpus: non_negative_u32(s.vcpus, "vcpus")?,
            memory_mb: non_negative_u32(s.memory_mb, "memory_mb")?,
            sandbox_id: s.sandbox_id,
            status: s.status,
            template: s.template,
            host_ip: s.host_ip,
            created_at_unix: s.created_at_unix,
            last_active_at_unix: s.last_active_at_unix,
            timeout_sec: s.timeout_sec,
            team_id: s.team_id,
            template_id: s.template_id,
            metadata: s.metadata.into_iter().collect(),
        })
    }
}

impl From<SandboxList> for wire::ListSandboxesResponse {
    fn from(l: SandboxList) -> Self {
        Self {
            sandboxes: l.sandboxes.into_iter().map(Into::into).collect(),
            auto_paused_sandbox_ids: l.auto_paused_sandbox_ids,
        }
    }
}

impl TryFrom<wire::ListSandboxesResponse> for SandboxList {
    type Error = AgentError;
    fn try_from(l: wire::ListSandboxesResponse) -> Result<Self, AgentError> {
        Ok(Self {
            sandboxes: l
                .sandboxes
                .into_iter()
                .map(SandboxInfo::try_from)
                .collect::<Result<_, _>>()?,
            auto_paused_sandbox_ids: l.auto_paused_sandbox_ids,
        })
    }
}

impl From<SnapshotInfo> for wire::SnapshotInfo {
    fn from(s: SnapshotInfo) -> Self {
        Self {
            name: s.key,
            size_bytes: clamp_i64(s.size_bytes),
            created_at_unix: s.created_at.map_or(0, |t| t.unix_millis().div_euclid(1000)),
        }
    }
}

impl TryFrom<wire::SnapshotInfo> for SnapshotInfo {
    type Error = AgentError;
    fn try_from(s: wire::SnapshotInfo) -> Result<Self, AgentError> {
        let created_at = (s.created_at_unix > 0)
            .then(|| Timestamp::from_unix_millis(s.created_at_unix.saturating_mul(1000)));
        Ok(Self {
            size_bytes: non_negative_u64(s.size_bytes, "size_bytes")?,
            key: s.name,
            created_at,
        })
    }
}

pub(crate) fn snapshots_to_wire(list: Vec<SnapshotInfo>) -> wire::ListSnapshotsResponse {
    wire::ListSnapshotsResponse {
        snapshots: list.into_iter().map(Into::into).collect(),
    }
}

pub(crate) fn snapshots_from_wire(
    r: wire::ListSnapshotsResponse,
) -> Result<Vec<SnapshotInfo>, AgentError> {
    r.snapshots
        .into_iter()
        .map(SnapshotInfo::try_from)
        .collect()
}

// ---------------------------------------------------------------- codes

impl AgentCode {
    /// Parses a Connect error code (`not_found`, …). Unknown codes are
    /// [`AgentCode::Unknown`]; `unavailable` and `deadline_exceeded` are not
    /// codes here (see [`connect_code_to_error`]).
    fn from_connect(code: &str) -> Self {
        match code {
            "canceled" => Self::Cancelled,
            "invalid_argument" => Self::InvalidArgument,
            "not_found" => Self::NotFound,
            "already_exists" => Self::AlreadyExists,
            "permission_denied" => Self::PermissionDenied,
            "resource_exhausted" => Self::ResourceExhausted,
            "failed_precondition" => Self::FailedPrecondition,
            "aborted" => Self::Aborted,
            "out_of_range" => Self::OutOfRange,
            "unimplemented" => Self::Unimplemented,
            "internal" => Self::Internal,
            "data_loss" => Self::DataLoss,
            "unauthenticated" => Self::Unauthenticated,
            _ => Self::Unknown,
        }
    }

    fn to_grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Cancelled => Code::Cancelled,
            Self::Unknown => Code::Unknown,
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::Aborted => Code::Aborted,
            Self::OutOfRange => Code::OutOfRange,
            Self::Unimplemented => Code::Unimplemented,
            Self::Internal => Code::Internal,
            Self::DataLoss => Code::DataLoss,
            Self::Unauthenticated => Code::Unauthenticated,
        }
    }
}

/// A Connect error code and message, as an [`AgentError`].
///
/// `canceled` is [`AgentError::Timeout`], as on gRPC (see
/// [`status_to_error`]): our calls are never cancelled on purpose, so an
/// agent that says "canceled" has cut the call off (servers answer an
/// expired deadline that way) and the outcome is unknown. It must not read
/// as a rejection, and both transports must agree.
pub(crate) fn connect_code_to_error(code: &str, message: String) -> AgentError {
    match code {
        "unavailable" => AgentError::unavailable(message),
        "deadline_exceeded" | "canceled" => AgentError::Timeout,
        other => AgentError::Rejected {
            code: AgentCode::from_connect(other),
            message,
        },
    }
}

/// An HTTP response that is not an RPC answer (no gRPC status, no Connect
/// error body) — a proxy's error page, the Go agent's mux answering an
/// unknown route with a plain-text 404 — read by its HTTP status, the same
/// way on both transports (the gRPC and Connect specifications agree on
/// these). Only statuses that say something definite about the call are
/// mapped to codes; anything else could not be understood.
pub(crate) fn http_status_to_error(status: http::StatusCode) -> AgentError {
    let message = format!("HTTP {status} without an RPC status");
    match status.as_u16() {
        401 => AgentError::rejected(AgentCode::Unauthenticated, message),
        403 => AgentError::rejected(AgentCode::PermissionDenied, message),
        404 => AgentError::rejected(AgentCode::Unimplemented, message),
        429 | 502 | 503 | 504 => AgentError::unavailable(message),
        _ => protocol(message),
    }
}

/// A verdict on a gRPC call reached by our own client before tonic saw the
/// answer (see `grpc::Checked`). It travels to [`status_to_error`] as the
/// service error, which tonic keeps in the `Status`'s source chain.
#[derive(Debug)]
pub(crate) struct ClientVerdict(pub(crate) AgentError);

impl std::fmt::Display for ClientVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ClientVerdict {}

/// The `grpc-status` the agent itself put on the wire for one call (in the
/// response headers or trailers), recorded as the answer passes through
/// `grpc::Checked`. tonic makes statuses of its own (undecodable frames,
/// a message over the limit, a missing status) that look just like the
/// agent's; only a status whose code the agent really sent is its answer.
#[derive(Debug, Clone, Default)]
pub(crate) struct SentStatus(Arc<Mutex<Option<tonic::Code>>>);

impl SentStatus {
    pub(crate) fn record(&self, value: &http::HeaderValue) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tonic::Code::from_bytes(value.as_bytes()));
    }

    fn get(&self) -> Option<tonic::Code> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The one conversion from `tonic::Status` to [`AgentError`]. `sent` is
/// what the agent itself sent on this call.
///
/// A `Status` with a `source()` was made on our side: tonic attaches the
/// error it was made from (connect, h2, hyper, I/O, our own
/// [`ClientVerdict`]); a status decoded from the agent's `grpc-status` has
/// none. Such a failure is never the agent's answer. A status without a
/// source is the agent's answer only when the agent sent that very code;
/// otherwise tonic made it because the answer could not be understood.
pub(crate) fn status_to_error(status: tonic::Status, sent: &SentStatus) -> AgentError {
    if status.source().is_some() {
        return client_side_error(&status);
    }
    if sent.get() != Some(status.code()) {
        return protocol(format!(
            "the answer could not be understood ({:?}): {}",
            status.code(),
            status.message()
        ));
    }
    agent_status_to_error(status)
}

/// Every error in the chain under `status`, outermost first.
fn source_chain(status: &tonic::Status) -> Vec<&(dyn std::error::Error + 'static)> {
    std::iter::successors(status.source(), |&e| e.source()).collect()
}

/// A failure of our side of the call: connecting, the HTTP/2 connection,
/// the client's own deadline, or a verdict of [`ClientVerdict`].
fn client_side_error(status: &tonic::Status) -> AgentError {
    let chain = source_chain(status);
    if let Some(verdict) = chain.iter().find_map(|e| e.downcast_ref::<ClientVerdict>()) {
        return verdict.0.clone();
    }
    let mut message = status.message().to_owned();
    for e in &chain {
        let text = e.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
    }
    if chain.iter().any(|e| e.is::<tonic::TimeoutExpired>()) {
        return AgentError::Timeout;
    }
    // TCP connect (refused, unreachable, timed out), name resolution and
    // the TLS handshake: tonic wraps every failure before the HTTP/2
    // connection exists in a `ConnectError`. Nothing was sent.
    if chain.iter().any(|e| e.is::<tonic::ConnectError>()) {
        return AgentError::not_sent(message);
    }
    if let Some(h2) = chain.iter().find_map(|e| e.downcast_ref::<h2::Error>()) {
        use h2::Reason;
        return match h2.reason() {
            // RST_STREAM(REFUSED_STREAM): the peer guarantees it did not
            // process the stream (RFC 9113 §8.7).
            Some(Reason::REFUSED_STREAM) if h2.is_reset() && h2.is_remote() => {
                AgentError::not_sent(message)
            }
            // Frames that break HTTP/2 — for instance an HTTP/1.1-only
            // server answering the h2c preface with an HTTP/1.1 response.
            Some(
                Reason::PROTOCOL_ERROR
                | Reason::FRAME_SIZE_ERROR
                | Reason::COMPRESSION_ERROR
                | Reason::FLOW_CONTROL_ERROR
                | Reason::HTTP_1_1_REQUIRED,
            ) => protocol(message),
            // The connection was lost or the stream reset mid-call.
            _ => AgentError::unavailable(message),
        };
    }
    if chain
        .iter()
        .filter_map(|e| e.downcast_ref::<hyper::Error>())
        .any(hyper::Error::is_parse)
    {
        return protocol(message);
    }
    // Reset, EOF, broken pipe, keep-alive timeout: the request may have
    // been delivered.
    AgentError::unavailable(message)
}

/// A status the agent really sent, by its code.
fn agent_status_to_error(status: tonic::Status) -> AgentError {
    use tonic::Code;
    let message = status.message().to_owned();
    let code = match status.code() {
        Code::Unavailable => return AgentError::unavailable(message),
        Code::DeadlineExceeded => return AgentError::Timeout,
        Code::Ok => return protocol("error status with code OK"),
        // Our calls always carry a deadline and are never cancelled on
        // purpose; servers answer an expired deadline with CANCELLED
        // (tonic: "Timeout expired"). The call was cut off and its outcome
        // is unknown: a timeout, never a rejection. The Connect transport
        // reads `canceled` the same way (see `connect_code_to_error`).
        Code::Cancelled => return AgentError::Timeout,
        Code::Unknown => AgentCode::Unknown,
        Code::InvalidArgument => AgentCode::InvalidArgument,
        Code::NotFound => AgentCode::NotFound,
        Code::AlreadyExists => AgentCode::AlreadyExists,
        Code::PermissionDenied => AgentCode::PermissionDenied,
        Code::ResourceExhausted => AgentCode::ResourceExhausted,
        Code::FailedPrecondition => AgentCode::FailedPrecondition,
        Code::Aborted => AgentCode::Aborted,
        Code::OutOfRange => AgentCode::OutOfRange,
        Code::Unimplemented => AgentCode::Unimplemented,
        Code::Internal => AgentCode::Internal,
        Code::DataLoss => AgentCode::DataLoss,
        Code::Unauthenticated => AgentCode::Unauthenticated,
    };
    AgentError::Rejected { code, message }
}

/// The Connect protocol's name for a gRPC code and the HTTP status a
/// Connect server answers it with (the Connect specification's table, as
/// connect-go and connect-es apply it). Server side.
pub(crate) fn connect_error_of(code: tonic::Code) -> (&'static str, http::StatusCode) {
    use http::StatusCode as H;
    use tonic::Code;
    match code {
        Code::Cancelled => ("canceled", H::from_u16(499).unwrap_or(H::BAD_REQUEST)),
        Code::InvalidArgument => ("invalid_argument", H::BAD_REQUEST),
        Code::DeadlineExceeded => ("deadline_exceeded", H::GATEWAY_TIMEOUT),
        Code::NotFound => ("not_found", H::NOT_FOUND),
        Code::AlreadyExists => ("already_exists", H::CONFLICT),
        Code::PermissionDenied => ("permission_denied", H::FORBIDDEN),
        Code::ResourceExhausted => ("resource_exhausted", H::TOO_MANY_REQUESTS),
        Code::FailedPrecondition => ("failed_precondition", H::BAD_REQUEST),
        Code::Aborted => ("aborted", H::CONFLICT),
        Code::OutOfRange => ("out_of_range", H::BAD_REQUEST),
        Code::Unimplemented => ("unimplemented", H::NOT_IMPLEMENTED),
        Code::Internal => ("internal", H::INTERNAL_SERVER_ERROR),
        Code::Unavailable => ("unavailable", H::SERVICE_UNAVAILABLE),
        Code::DataLoss => ("data_loss", H::INTERNAL_SERVER_ERROR),
        Code::Unauthenticated => ("unauthenticated", H::UNAUTHORIZED),
        // `Ok` is not an error; an error that says so is unknown.
        Code::Unknown | Code::Ok => ("unknown", H::INTERNAL_SERVER_ERROR),
    }
}

/// The one conversion from [`AgentError`] to `tonic::Status` (server side).
pub(crate) fn error_to_status(err: AgentError) -> tonic::Status {
    match err {
        AgentError::Unavailable { message, .. } => tonic::Status::unavailable(message),
        AgentError::Timeout => tonic::Status::deadline_exceeded("host agent call timed out"),
        AgentError::Rejected { code, message } => tonic::Status::new(code.to_grpc(), message),
        AgentError::Protocol { message } => tonic::Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Existing agents decode `CreateSnapshotRequest` by field number:
    /// sandbox_id = 1, name = 2, team_id = 3, template_id = 4.
    #[test]
    fn create_snapshot_request_golden_bytes() {
        let msg = wire::CreateSnapshotRequest {
            sandbox_id: "sb".into(),
            name: "n".into(),
            team_id: "t".into(),
            template_id: "p".into(),
        };
        let expected: &[u8] = &[
            0x0a, 2, b's', b'b', // field 1, length-delimited
            0x12, 1, b'n', // field 2
            0x1a, 1, b't', // field 3
            0x22, 1, b'p', // field 4
        ];
        assert_eq!(msg.encode_to_vec(), expected);
    }

    /// What the server answers, our Connect client reads back as the same
    /// code (the client side of the mapping is `connect_code_to_error`).
    #[test]
    fn connect_names_round_trip() {
        use tonic::Code;
        let codes = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
            Code::Unauthenticated,
            Code::Unknown,
        ];
        for code in codes {
            let (name, status) = connect_error_of(code);
            assert_eq!(AgentCode::from_connect(name).to_grpc(), code, "{name}");
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{name}"
            );
        }
        assert_eq!(connect_error_of(Code::Cancelled).1.as_u16(), 499);
        assert_eq!(connect_error_of(Code::Unavailable).0, "unavailable");
        assert_eq!(
            connect_error_of(Code::DeadlineExceeded).0,
            "deadline_exceeded"
        );
    }

    #[test]
    fn bad_wire_values_are_refused_not_panicked_on() {
        let bad = wire::CreateSnapshotRequest {
            sandbox_id: "sb-zzzzzzzzzzzzzzzzzzzzzzzzz".into(),
            name: "../etc".into(),
            ..Default::default()
        };
        let err = CreateSnapshotRequest::try_from(bad).unwrap_err();
        assert_eq!(err.code(), Some(AgentCode::InvalidArgument));
        let resp = wire::CreateSnapshotResponse {
            name: "k".into(),
            size_bytes: -1,
            compat: None,
        };
        assert!(matches!(
            CreateSnapshotResponse::try_from(resp),
            Err(AgentError::Protocol { .. })
        ));
    }

    /// An agent's `HostInfo` is checked when it arrives: an empty one is
    /// unknown, a bad one is a protocol error, never passed on.
    #[test]
    fn host_info_from_the_wire_is_checked() {
        assert_eq!(host_info_from_wire(None).unwrap(), None);
        assert_eq!(
            host_info_from_wire(Some(wire::HostInfo::default())).unwrap(),
            None
        );
        let good = wire::HostInfo {
            vmm: "firecracker".into(),
            cpu_flags: vec!["avx2".into()],
            ..Default::default()
        };
        let info = host_info_from_wire(Some(good)).unwrap().unwrap();
        assert_eq!(info.vmm, "firecracker");
        let bad = wire::HostInfo {
            cpu_model: "x".repeat(1000),
            ..Default::default()
        };
        assert!(matches!(
            host_info_from_wire(Some(bad)),
            Err(AgentError::Protocol { .. })
        ));
        // And a restore request from the wire is validated like a snapshot's.
        let escape = wire::CreateSandboxRequest {
            template: "../x".into(),
            sandbox_id: crate::ids::SandboxId::new().to_string(),
            ..Default::default()
        };
        let err = CreateSandboxRequest::try_from(escape).unwrap_err();
        assert_eq!(err.code(), Some(AgentCode::InvalidArgument));
        let negative = wire::CreateSandboxRequest {
            template: "tpl-a".into(),
            sandbox_id: crate::ids::SandboxId::new().to_string(),
            memory_mb: -1,
            ..Default::default()
        };
        let err = CreateSandboxRequest::try_from(negative).unwrap_err();
        assert_eq!(err.code(), Some(AgentCode::InvalidArgument));
    }
}
