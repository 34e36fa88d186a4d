//! Every SQL statement of the SQLite store, by concern. Functions take a
//! connection that is already inside the right transaction (the writer's)
//! or a read connection. Shared here: how ids, enumerations and numbers map
//! to SQLite values, and the imports every part uses.

mod audit;
// API keys: used by the HTTP API only.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod keys;
mod operations;
mod placements;
mod policies;
mod registry;
mod requests;
mod restores;
mod retention;
mod templates;

pub(crate) use audit::*;
pub(crate) use keys::*;
pub(crate) use operations::*;
pub(crate) use placements::*;
pub(crate) use policies::*;
pub(crate) use registry::*;
pub(crate) use requests::*;
pub(crate) use restores::*;
pub(crate) use retention::*;
pub(crate) use templates::*;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::agent::HostTarget;
use crate::audit::{AuditEntry, AuditOutcome, NewAuditEntry};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{
    ApiKeyId, AuditLogId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId,
};
use crate::model::{
    Actor, Host, HostStatus, Sandbox, SandboxStatus, TeamLimits, Template, TemplateState,
    TemplateType, Timestamp, Usage,
};
use crate::names::TemplateName;

use crate::store::{
    Backlog, CreateDone, CreateInput, CreateOp, DELETIONS_PER_HOST, Deletion, Destroy, Failure,
    Finish, HostChange, InHand, KeyRecord, ListPosition, OpenOperation, PendingDeletion,
    PendingDestroy, ResolveReason, RestoreCandidate, RestoreEnd, RestoreInput, RestoreOp,
    SandboxOutcome, StoreError, actor_from_columns,
};

macro_rules! sql_id {
    ($($ty:ty),+) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::Borrowed(ValueRef::Blob(self.as_blob())))
            }
        }
        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let bytes = value.as_blob()?;
                <$ty>::from_blob(bytes).ok_or(FromSqlError::InvalidBlobSize {
                    expected_size: 16,
                    blob_size: bytes.len(),
                })
            }
        }
    )+};
}
sql_id!(
    SandboxId,
    HostId,
    TeamId,
    TemplateId,
    AuditLogId,
    ApiKeyId,
    OperationId,
    InstanceId
);

macro_rules! sql_enum {
    ($($ty:ty),+) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::Borrowed(ValueRef::Text(self.as_str().as_bytes())))
            }
        }
        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                text.parse::<$ty>()
                    .map_err(|e| FromSqlError::Other(Box::new(StoreError::corrupt(e.message().to_owned()))))
            }
        }
    )+};
}
sql_enum!(SandboxStatus, HostStatus, TemplateType, TemplateState);

pub(super) fn u32_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    row.get::<_, i64>(idx)
        .map(|v| u32::try_from(v).unwrap_or(0))
}

pub(super) fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(idx)
        .map(|v| u64::try_from(v).unwrap_or(0))
}

pub(super) fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
