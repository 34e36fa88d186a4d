//! The audit log: one entry per finished operation, success or failure,
//! keyed by the template id with the name in the metadata.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::ids::{AuditLogId, TeamId};
use crate::model::{Actor, Timestamp};

/// Whether the audited operation succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// It did.
    Success,
    /// It failed; the entry's `error_code` says how.
    Failure,
}

impl AuditOutcome {
    /// `success` or `failure`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// Audited actions.
pub mod actions {
    /// A snapshot was created (or failed to be).
    pub const SNAPSHOT_CREATE: &str = "snapshot.create";
    /// A template was deleted.
    pub const SNAPSHOT_DELETE: &str = "snapshot.delete";
    /// An open operation was resolved without its host's answer: its
    /// `resolve_deadline` passed (actor `system`), or an operator resolved
    /// it. In the operation's team's log.
    pub const OPERATION_RESOLVE: &str = "operation.resolve";
    /// The orphan sweep queued a key no template owns for deletion (a
    /// system action, in the platform team's log).
    pub const ORPHAN_SWEEP: &str = "snapshot.orphan_sweep";
    /// A sandbox was restored from a template (or failed to be); keyed by
    /// the sandbox id, with the template's name and id in the metadata.
    pub const SANDBOX_RESTORE: &str = "sandbox.restore";
}

/// The resource type of template entries.
pub const RESOURCE_TEMPLATE: &str = "template";
/// The resource type of sandbox entries ([`actions::SANDBOX_RESTORE`]).
pub const RESOURCE_SANDBOX: &str = "sandbox";

/// One audit log entry.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AuditEntry {
    /// Its id.
    pub id: AuditLogId,
    /// The team it belongs to.
    pub team: TeamId,
    /// Who acted.
    pub actor: Actor,
    /// What was done, e.g. [`actions::SNAPSHOT_CREATE`].
    pub action: String,
    /// The kind of resource, e.g. [`RESOURCE_TEMPLATE`].
    pub resource_type: String,
    /// The resource's id (a `tpl-…` id for templates).
    pub resource_id: String,
    /// Success or failure.
    pub outcome: AuditOutcome,
    /// The error code of a failure.
    pub error_code: Option<String>,
    /// Details: the template name, the sandbox, sizes, …
    pub metadata: Value,
    /// When it was written.
    pub created_at: Timestamp,
}

/// Filters and paging for [`crate::Manager::audit_log`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AuditQuery {
    /// Most entries to return; `None` for all.
    pub limit: Option<u32>,
    /// Continue after this cursor (from a previous page).
    pub cursor: Option<String>,
    /// Only entries about this resource type.
    pub resource_type: Option<String>,
    /// Only entries with this action.
    pub action: Option<String>,
}

impl AuditQuery {
    /// Everything, newest first.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `limit` entries.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Continue from `cursor`.
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    /// Only entries with `action`.
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Only entries about `resource_type`.
    pub fn resource_type(mut self, resource_type: impl Into<String>) -> Self {
        self.resource_type = Some(resource_type.into());
        self
    }

    /// The sequence number to continue below.
    pub(crate) fn cursor_seq(&self) -> Result<Option<i64>> {
        self.cursor
            .as_deref()
            .map(|c| {
                c.strip_prefix("a")
                    .and_then(|n| n.parse::<i64>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Error::invalid_request("invalid cursor"))
            })
            .transpose()
    }
}

pub(crate) fn audit_cursor(seq: i64) -> String {
    format!("a{seq}")
}

/// An entry about to be written (the store assigns nothing; ids are ours).
#[derive(Debug, Clone)]
pub(crate) struct NewAuditEntry {
    pub(crate) team: TeamId,
    pub(crate) actor: Actor,
    pub(crate) action: &'static str,
    pub(crate) resource_id: String,
    pub(crate) outcome: AuditOutcome,
    pub(crate) error_code: Option<&'static str>,
    pub(crate) metadata: Value,
}

impl NewAuditEntry {
    /// The kind of resource the entry is keyed by.
    pub(crate) fn resource_type(&self) -> &'static str {
        if self.action.starts_with("sandbox.") {
            RESOURCE_SANDBOX
        } else {
            RESOURCE_TEMPLATE
        }
    }
}
