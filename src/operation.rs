//! Requests the store remembers (SPEC §8): creates and restores carrying
//! an idempotency key, or started asynchronously. Each is one row keyed by
//! its journal entry's operation id, written in the transaction that opens
//! the operation and given its outcome in the transaction that decides it,
//! so that a crash or a restart never separates the two.
//!
//! - [`IdempotencyKey`]: 1–255 printable ASCII characters, scoped to a
//!   team. The same key with the same request returns the first answer;
//!   while that is still running, 409 `idempotency_in_progress`; with a
//!   different request, 422 `idempotency_key_reused`.
//! - [`Operation`]: what `GET /v1/operations/{id}` and
//!   [`crate::Manager::operation`] show: `running`, then `succeeded` with
//!   the template or sandbox, or `failed` with the error.
//!
//! Rows are kept [`crate::ManagerOptions::request_retention`] (24 h by
//! default) after they end, then purged by the background worker.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{HostId, OperationId, SandboxId, TeamId, TemplateId};
use crate::model::{Sandbox, SandboxStatus, Template, TemplateState, TemplateType, Timestamp};
use crate::names::TemplateName;

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A client's idempotency key: 1–255 printable ASCII characters (space to
/// `~`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates `key`: 400 `invalid_request` unless it is 1–255 printable
    /// ASCII characters.
    pub fn parse(key: &str) -> Result<Self> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Error::invalid_request(format!(
                "invalid Idempotency-Key: it must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
            )));
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(Error::invalid_request(
                "invalid Idempotency-Key: only printable ASCII characters are allowed",
            ));
        }
        Ok(Self(key.to_owned()))
    }

    /// The key as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys may be derived from client secrets: never print them whole.
        write!(f, "IdempotencyKey({} chars)", self.0.len())
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OperationKind {
    /// A snapshot of a sandbox into a template (`snapshot.create`).
    SnapshotCreate,
    /// A restore of a template into a new sandbox (`sandbox.restore`).
    SandboxRestore,
}

impl OperationKind {
    /// The wire form: the audit action of the same work.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SnapshotCreate => crate::audit::actions::SNAPSHOT_CREATE,
            Self::SandboxRestore => crate::audit::actions::SANDBOX_RESTORE,
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        [Self::SnapshotCreate, Self::SandboxRestore]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OperationState {
    /// Still running.
    Running,
    /// Done: the template or sandbox exists.
    Succeeded,
    /// Failed: nothing was created (the error says why).
    Failed,
}

impl OperationState {
    /// The wire form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        [Self::Running, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A remembered create or restore, as its team sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Operation {
    /// Its id (`op-…`), the journal entry's.
    pub id: OperationId,
    /// What it does.
    pub kind: OperationKind,
    /// Where it is.
    pub state: OperationState,
    /// The template it created (a succeeded create), as it was then.
    pub template: Option<Template>,
    /// The sandbox it restored (a succeeded restore), as it was then.
    pub sandbox: Option<Sandbox>,
    /// Why it failed (a failed one).
    pub error: Option<Error>,
    /// When it began.
    pub created_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

impl Operation {
    pub(crate) fn running(id: OperationId, kind: OperationKind, created_at: Timestamp) -> Self {
        Self {
            id,
            kind,
            state: OperationState::Running,
            template: None,
            sandbox: None,
            error: None,
            created_at,
            finished_at: None,
        }
    }
}

/// What the store writes with an operation's journal entry.
#[derive(Debug, Clone)]
pub(crate) struct RequestRecord {
    pub(crate) kind: OperationKind,
    pub(crate) key: Option<IdempotencyKey>,
    /// What the request was: the same key with another fingerprint is 422.
    pub(crate) fingerprint: String,
    /// Whether the first answer was 202 (replayed as such).
    pub(crate) respond_async: bool,
    /// Until when it is kept (moved on by the operation's duration when it
    /// ends, so that an outcome is kept as long as a start).
    pub(crate) expires_at: Timestamp,
}

/// A remembered request as stored.
#[derive(Debug)]
pub(crate) struct StoredRequest {
    pub(crate) id: OperationId,
    pub(crate) kind: OperationKind,
    pub(crate) fingerprint: String,
    pub(crate) respond_async: bool,
    pub(crate) state: OperationState,
    /// The outcome's JSON (see [`encode_template`] and friends).
    pub(crate) result: Option<String>,
    pub(crate) created_at: Timestamp,
    pub(crate) finished_at: Option<Timestamp>,
}

impl StoredRequest {
    /// The operation it records; an outcome that no longer decodes (a
    /// damaged row) reads as a failure, never a panic.
    pub(crate) fn operation(&self) -> Operation {
        let mut op = Operation {
            id: self.id,
            kind: self.kind,
            state: self.state,
            template: None,
            sandbox: None,
            error: None,
            created_at: self.created_at,
            finished_at: self.finished_at,
        };
        let result = self.result.as_deref().unwrap_or("null");
        match (self.state, self.kind) {
            (OperationState::Running, _) => {}
            (OperationState::Failed, _) => op.error = Some(decode_error(result)),
            (OperationState::Succeeded, OperationKind::SnapshotCreate) => {
                match decode_template(result) {
                    Some(t) => op.template = Some(t),
                    None => damaged(&mut op),
                }
            }
            (OperationState::Succeeded, OperationKind::SandboxRestore) => {
                match decode_sandbox(result) {
                    Some(s) => op.sandbox = Some(s),
                    None => damaged(&mut op),
                }
            }
        }
        op
    }
}

fn damaged(op: &mut Operation) {
    op.state = OperationState::Failed;
    op.error = Some(Error::new(
        ErrorCode::DbError,
        "the operation's recorded outcome cannot be read",
    ));
}

#[derive(Serialize, Deserialize)]
struct TemplateJson {
    id: TemplateId,
    team: TeamId,
    name: String,
    #[serde(rename = "type")]
    template_type: String,
    vcpus: u32,
    memory_mb: u32,
    size_bytes: u64,
    created_at: i64,
    #[serde(default)]
    source_sandbox: Option<SandboxId>,
    state: String,
    hosts: u32,
    #[serde(default)]
    compat: Option<crate::agent::HostInfo>,
    #[serde(default)]
    last_used_at: Option<i64>,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// A created template as its operation's outcome.
pub(crate) fn encode_template(t: &Template) -> String {
    let json = TemplateJson {
        id: t.id,
        team: t.team,
        name: t.name.to_string(),
        template_type: t.template_type.as_str().to_owned(),
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        size_bytes: t.size_bytes,
        created_at: t.created_at.unix_millis(),
        source_sandbox: t.source_sandbox,
        state: t.state.as_str().to_owned(),
        hosts: t.hosts,
        compat: t.compat.clone(),
        last_used_at: t.last_used_at.map(Timestamp::unix_millis),
        expires_at: t.expires_at.map(Timestamp::unix_millis),
    };
    serde_json::to_string(&json).unwrap_or_else(|_| "null".to_owned())
}

fn decode_template(text: &str) -> Option<Template> {
    let j: TemplateJson = serde_json::from_str(text).ok()?;
    Some(Template {
        id: j.id,
        team: j.team,
        name: TemplateName::parse(&j.name).ok()?,
        template_type: j.template_type.parse::<TemplateType>().ok()?,
        vcpus: j.vcpus,
        memory_mb: j.memory_mb,
        size_bytes: j.size_bytes,
        created_at: Timestamp::from_unix_millis(j.created_at),
        source_sandbox: j.source_sandbox,
        state: j.state.parse::<TemplateState>().ok()?,
        hosts: j.hosts,
        compat: j.compat,
        last_used_at: j.last_used_at.map(Timestamp::from_unix_millis),
        expires_at: j.expires_at.map(Timestamp::from_unix_millis),
    })
}

#[derive(Serialize, Deserialize)]
struct SandboxJson {
    id: SandboxId,
    team: TeamId,
    #[serde(default)]
    host: Option<HostId>,
    status: String,
    vcpus: u32,
    memory_mb: u32,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    template_id: Option<TemplateId>,
    created_at: i64,
}

/// A restored sandbox as its operation's outcome.
pub(crate) fn encode_sandbox(s: &Sandbox) -> String {
    let json = SandboxJson {
        id: s.id,
        team: s.team,
        host: s.host,
        status: s.status.as_str().to_owned(),
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        template: s.template.as_ref().map(ToString::to_string),
        template_id: s.template_id,
        created_at: s.created_at.unix_millis(),
    };
    serde_json::to_string(&json).unwrap_or_else(|_| "null".to_owned())
}

fn decode_sandbox(text: &str) -> Option<Sandbox> {
    let j: SandboxJson = serde_json::from_str(text).ok()?;
    let template = match j.template {
        Some(name) => Some(TemplateName::parse(&name).ok()?),
        None => None,
    };
    Some(Sandbox {
        template,
        template_id: j.template_id,
        created_at: Timestamp::from_unix_millis(j.created_at),
        ..Sandbox::new(
            j.id,
            j.team,
            j.host,
            j.status.parse::<SandboxStatus>().ok()?,
            j.vcpus,
            j.memory_mb,
        )
    })
}

#[derive(Serialize, Deserialize)]
struct ErrorJson {
    code: String,
    message: String,
}

/// A failure as its operation's outcome: the code and message the caller
/// was (or would have been) told.
pub(crate) fn encode_error(code: &str, message: &str) -> String {
    let json = ErrorJson {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    serde_json::to_string(&json).unwrap_or_else(|_| "null".to_owned())
}

/// A recorded failure as an [`Error`]. Codes that are the journal's own
/// (`interrupted`, `unresolved`: the operation was rolled back without
/// an answer to its caller) read as `conflict`.
fn decode_error(text: &str) -> Error {
    match serde_json::from_str::<ErrorJson>(text) {
        Ok(j) => Error::new(
            ErrorCode::from_wire(&j.code).unwrap_or(ErrorCode::Conflict),
            j.message,
        ),
        Err(_) => Error::new(
            ErrorCode::DbError,
            "the operation's recorded outcome cannot be read",
        ),
    }
}

/// The message of a failure the journal records without a caller's
/// answer (a create or restore interrupted, or resolved by deadline or an
/// operator).
pub(crate) const INTERRUPTED_MESSAGE: &str =
    "the operation was interrupted before it completed and was rolled back";

/// The 409 and 422 of a remembered request that cannot be replayed.
pub(crate) fn replay_check(stored: &StoredRequest, fingerprint: &str) -> Result<()> {
    if stored.fingerprint != fingerprint {
        return Err(Error::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was already used for a different request",
        ));
    }
    if stored.state == OperationState::Running && !stored.respond_async {
        return Err(in_progress());
    }
    Ok(())
}

pub(crate) fn in_progress() -> Error {
    Error::new(
        ErrorCode::IdempotencyInProgress,
        "a request with this Idempotency-Key is still running",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_printable_ascii_of_1_to_255_chars() {
        for ok in ["a", "order-42/retry", " ~", &"k".repeat(255)] {
            assert_eq!(IdempotencyKey::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "tab\there", "é", "nl\n", &"k".repeat(256), "\u{7f}"] {
            let err = IdempotencyKey::parse(bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad:?}");
            assert!(err.message().contains("Idempotency-Key"), "{bad:?}");
        }
    }

    #[test]
    fn outcomes_round_trip() {
        let mut template = Template {
            id: TemplateId::new(),
            team: TeamId::new(),
            name: TemplateName::parse("snap-1").unwrap(),
            template_type: TemplateType::Snapshot,
            vcpus: 2,
            memory_mb: 512,
            size_bytes: 1 << 40,
            created_at: Timestamp::from_unix_millis(1_700_000_000_123),
            source_sandbox: Some(SandboxId::new()),
            state: TemplateState::Ready,
            hosts: 1,
            compat: None,
            last_used_at: Some(Timestamp::from_unix_millis(5)),
            expires_at: Some(Timestamp::from_unix_millis(9)),
        };
        assert_eq!(
            decode_template(&encode_template(&template)).as_ref(),
            Some(&template)
        );
        template.source_sandbox = None;
        template.last_used_at = None;
        template.expires_at = None;
        assert_eq!(
            decode_template(&encode_template(&template)).as_ref(),
            Some(&template)
        );
        let sandbox = Sandbox {
            template: Some(template.name.clone()),
            template_id: Some(template.id),
            ..Sandbox::new(
                SandboxId::new(),
                template.team,
                Some(HostId::new()),
                SandboxStatus::Running,
                2,
                512,
            )
        };
        assert_eq!(
            decode_sandbox(&encode_sandbox(&sandbox)).as_ref(),
            Some(&sandbox)
        );
        let err = decode_error(&encode_error("agent_error", "the host failed"));
        assert_eq!(
            (err.code(), err.message()),
            (ErrorCode::AgentError, "the host failed")
        );
        assert_eq!(
            decode_error(&encode_error("interrupted", INTERRUPTED_MESSAGE)).code(),
            ErrorCode::Conflict
        );
        assert_eq!(decode_error("{").code(), ErrorCode::DbError);
        assert!(decode_template("{\"id\":1}").is_none());
    }

    #[test]
    fn every_error_code_reads_back_from_its_wire_form() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(*code));
        }
        assert_eq!(ErrorCode::from_wire("nope"), None);
    }
}
