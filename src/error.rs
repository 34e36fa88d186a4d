//! The crate's error: a stable machine code, an HTTP status, and a message
//! that is safe to show to the caller (no host or database internals; those
//! travel in the `source` chain for logs).

use std::fmt;

use crate::agent::{AgentCode, AgentError};
use crate::store::StoreError;

/// Stable machine-readable error codes (SPEC §3/§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the request is malformed (bad id, bad name, bad filter, …).
    InvalidRequest,
    /// 401: no or unknown credentials.
    Unauthorized,
    /// 403: the caller may not do this (e.g. delete a platform template).
    Forbidden,
    /// 403: the team's snapshot quota (count or bytes) is used up.
    QuotaExceeded,
    /// 404: the sandbox or template is not visible to the caller (or, over
    /// HTTP, no such route).
    NotFound,
    /// 405: the route exists but not with this method (HTTP only).
    MethodNotAllowed,
    /// 409: the name is taken by the caller's team.
    AlreadyExists,
    /// 409: the name belongs to a platform template.
    NameReserved,
    /// 409: the sandbox is not in a state that allows the operation.
    InvalidState,
    /// 409: a concurrent operation or the host agent refused on a precondition.
    Conflict,
    /// 409: no host that holds the template can run it (another VMM,
    /// snapshot format, architecture or CPU model; the message says which).
    Incompatible,
    /// 409: a request with this `Idempotency-Key` is still running.
    IdempotencyInProgress,
    /// 413: the request body is too large (HTTP only).
    PayloadTooLarge,
    /// 422: the `Idempotency-Key` was used for a different request.
    IdempotencyKeyReused,
    /// 500: the store failed.
    DbError,
    /// 502: the host agent failed.
    AgentError,
    /// 503: the sandbox's host cannot be reached.
    HostUnavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire, e.g. `already_exists`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::QuotaExceeded => "quota_exceeded",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::AlreadyExists => "already_exists",
            Self::NameReserved => "name_reserved",
            Self::InvalidState => "invalid_state",
            Self::Conflict => "conflict",
            Self::Incompatible => "incompatible",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::DbError => "db_error",
            Self::AgentError => "agent_error",
            Self::HostUnavailable => "host_unavailable",
        }
    }

    /// The HTTP status that goes with the code.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::QuotaExceeded => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::PayloadTooLarge => 413,
            Self::AlreadyExists
            | Self::NameReserved
            | Self::InvalidState
            | Self::Conflict
            | Self::Incompatible
            | Self::IdempotencyInProgress => 409,
            Self::IdempotencyKeyReused => 422,
            Self::DbError => 500,
            Self::AgentError => 502,
            Self::HostUnavailable => 503,
        }
    }
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        Self::InvalidRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::QuotaExceeded,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::AlreadyExists,
        Self::NameReserved,
        Self::InvalidState,
        Self::Conflict,
        Self::Incompatible,
        Self::IdempotencyInProgress,
        Self::PayloadTooLarge,
        Self::IdempotencyKeyReused,
        Self::DbError,
        Self::AgentError,
        Self::HostUnavailable,
    ];

    /// The code whose wire form is `text`, if any.
    pub fn from_wire(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == text)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from the snapshot manager.
///
/// [`Error::code`] and [`Error::http_status`] are stable; [`Error::message`]
/// is meant for the end user and never contains agent or SQLite text.
pub struct Error {
    code: ErrorCode,
    message: String,
    source: Option<Source>,
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with a code and a user-facing message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause (shown in logs, not to users).
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The stable machine code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The user-facing message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// Maps a failed `CreateSnapshot` call to what the caller sees (SPEC §3):
    /// NotFound / InvalidArgument / FailedPrecondition keep their meaning, a
    /// request that never reached the agent is `host_unavailable`, anything
    /// else is a generic agent error. The agent's own text stays in
    /// the source.
    pub(crate) fn from_create_failure(err: AgentError) -> Self {
        let (code, message) = match &err {
            AgentError::Rejected {
                code: AgentCode::NotFound,
                ..
            } => (ErrorCode::NotFound, "sandbox not found on its host"),
            AgentError::Rejected {
                code: AgentCode::InvalidArgument,
                ..
            } => (
                ErrorCode::InvalidRequest,
                "the host agent refused the snapshot request as invalid",
            ),
            AgentError::Rejected {
                code: AgentCode::FailedPrecondition,
                ..
            } => (
                ErrorCode::Conflict,
                "the sandbox cannot be snapshotted in its current state on the host",
            ),
            AgentError::Timeout => (
                ErrorCode::AgentError,
                "the host agent did not finish the snapshot in time",
            ),
            // The request never reached the agent: nothing happened on the
            // host, and trying again later may work.
            AgentError::Unavailable { not_sent: true, .. } => (
                ErrorCode::HostUnavailable,
                "the sandbox's host agent cannot be reached",
            ),
            _ => (
                ErrorCode::AgentError,
                "the host agent failed to create the snapshot",
            ),
        };
        Self::new(code, message).with_source(err)
    }
}

impl Error {
    /// The caller's error for a failed `CreateSandbox` (SPEC §7: agent
    /// codes mapped as for a create). The agent's text stays in the source.
    pub(crate) fn from_restore_failure(err: AgentError) -> Self {
        let (code, message) = match &err {
            AgentError::Rejected { code, .. } => match code {
                AgentCode::NotFound => (
                    ErrorCode::NotFound,
                    "the template's files are not on the chosen host",
                ),
                AgentCode::InvalidArgument => (
                    ErrorCode::InvalidRequest,
                    "the host agent refused the restore request as invalid",
                ),
                AgentCode::AlreadyExists => (
                    ErrorCode::AlreadyExists,
                    "a sandbox with this id already exists on the host",
                ),
                AgentCode::FailedPrecondition | AgentCode::ResourceExhausted => {
                    (ErrorCode::Conflict, "the host cannot start the sandbox now")
                }
                _ => (
                    ErrorCode::AgentError,
                    "the host agent failed to start the sandbox",
                ),
            },
            AgentError::Timeout => (
                ErrorCode::AgentError,
                "the host agent did not start the sandbox in time",
            ),
            AgentError::Unavailable { not_sent: true, .. } => (
                ErrorCode::HostUnavailable,
                "the chosen host's agent cannot be reached",
            ),
            _ => (
                ErrorCode::AgentError,
                "the host agent failed to start the sandbox",
            ),
        };
        Self::new(code, message).with_source(err)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Error");
        s.field("code", &self.code).field("message", &self.message);
        if let Some(source) = &self.source {
            s.field("source", &format_args!("{source}"));
        }
        s.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        Self::new(ErrorCode::DbError, "the snapshot store failed").with_source(err)
    }
}

/// SQLite errors reach callers as `db_error`, through [`StoreError`]'s
/// single conversion.
impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::from(err).into()
    }
}

/// A bad template name in a request: 400 `invalid_request` with the
/// message "invalid snapshot name: …" (SPEC §3).
impl From<crate::names::NameError> for Error {
    fn from(err: crate::names::NameError) -> Self {
        Error::invalid_request(format!("invalid snapshot name: {err}"))
    }
}
