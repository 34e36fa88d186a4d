//! Running cached statements, encoding parameters and decoding rows. A
//! value that does not decode is [`StoreErrorKind::Corrupt`]; nothing from
//! the database is unwrapped.

use std::str::FromStr;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};

use crate::agent::{HostInfo, HostTarget};
use crate::error::Error;
use crate::ids::{
    ApiKeyId, AuditLogId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId,
};
use crate::model::{Host, Sandbox, Template, Timestamp};
use crate::names::TemplateName;
use crate::store::actor_from_columns;
use crate::store::{CreateOp, Deletion, StoreError, StoreErrorKind};

/// One statement parameter.
pub(super) type Param<'a> = &'a (dyn ToSql + Sync);

/// Prepares `sqls` on this connection (each once per connection, then
/// cached). Statements issued at once afterwards are pipelined *in the
/// order they are issued*: a cached statement is sent on the first poll of
/// its future, and `tokio::join!` polls in order. So the server runs them
/// one after the other exactly as if each had waited for the one before.
pub(super) async fn prepare_all(
    db: &impl GenericClient,
    sqls: &[&str],
) -> Result<(), tokio_postgres::Error> {
    for sql in sqls {
        db.prepare_cached(sql).await?;
    }
    Ok(())
}

/// Runs `sql` (prepared once per connection) and returns its rows.
pub(super) async fn query(
    db: &impl GenericClient,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = db.prepare_cached(sql).await?;
    db.query(&statement, params).await
}

/// Runs `sql` and returns its row, if any (more than one is an error).
pub(super) async fn query_opt(
    db: &impl GenericClient,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = db.prepare_cached(sql).await?;
    db.query_opt(&statement, params).await
}

/// Runs `sql` and returns its one row.
pub(super) async fn query_one(
    db: &impl GenericClient,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Row, tokio_postgres::Error> {
    let statement = db.prepare_cached(sql).await?;
    db.query_one(&statement, params).await
}

/// Runs `sql` and returns how many rows it changed.
pub(super) async fn execute(
    db: &impl GenericClient,
    sql: &str,
    params: &[Param<'_>],
) -> Result<u64, tokio_postgres::Error> {
    let statement = db.prepare_cached(sql).await?;
    db.execute(&statement, params).await
}

/// Whether `err` is a unique violation of the index (or key) `constraint`.
pub(super) fn violates(err: &tokio_postgres::Error, constraint: &str) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some(constraint)
    })
}

fn corrupt(idx: usize, what: impl std::fmt::Display) -> StoreError {
    StoreError::new(
        StoreErrorKind::Corrupt,
        format!("postgres: column {idx}: {what}"),
    )
}

/// Column `idx` as `T`.
pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => corrupt(idx, format_args!("{e}: {cause}")),
            None => corrupt(idx, e),
        })
}

/// A count or size column (never negative; clamped like SQLite's).
pub(super) fn get_u32(row: &Row, idx: usize) -> Result<u32, StoreError> {
    Ok(u32::try_from(get::<i64>(row, idx)?).unwrap_or(0))
}

/// A size column.
pub(super) fn get_u64(row: &Row, idx: usize) -> Result<u64, StoreError> {
    Ok(u64::try_from(get::<i64>(row, idx)?).unwrap_or(0))
}

/// A time column.
pub(super) fn get_time(row: &Row, idx: usize) -> Result<Timestamp, StoreError> {
    Ok(Timestamp::from_unix_millis(get(row, idx)?))
}

/// An enumeration stored as its text.
pub(super) fn get_enum<T: FromStr<Err = Error>>(row: &Row, idx: usize) -> Result<T, StoreError> {
    get::<&str>(row, idx)?
        .parse()
        .map_err(|e: Error| corrupt(idx, e.message()))
}

/// `u32`/`u64` values as BIGINT.
pub(super) fn big(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// An id type stored as 16 bytes.
pub(super) trait BlobId: Sized {
    /// Decodes the stored bytes.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
    /// The bytes to store.
    fn bytes(&self) -> &[u8];
}

macro_rules! blob_id {
    ($($ty:ty),+) => {$(
        impl BlobId for $ty {
            fn from_bytes(bytes: &[u8]) -> Option<Self> {
                <$ty>::from_blob(bytes)
            }
            fn bytes(&self) -> &[u8] {
                self.as_blob()
            }
        }
    )+};
}
blob_id!(
    SandboxId,
    HostId,
    TeamId,
    TemplateId,
    AuditLogId,
    ApiKeyId,
    OperationId,
    InstanceId
);

/// An id column.
pub(super) fn get_id<T: BlobId>(row: &Row, idx: usize) -> Result<T, StoreError> {
    let bytes: &[u8] = get(row, idx)?;
    T::from_bytes(bytes).ok_or_else(|| {
        corrupt(
            idx,
            format_args!("expected a 16-byte id, got {} bytes", bytes.len()),
        )
    })
}

/// A nullable id column.
pub(super) fn get_opt_id<T: BlobId>(row: &Row, idx: usize) -> Result<Option<T>, StoreError> {
    match get::<Option<&[u8]>>(row, idx)? {
        None => Ok(None),
        Some(bytes) => T::from_bytes(bytes).map(Some).ok_or_else(|| {
            corrupt(
                idx,
                format_args!("expected a 16-byte id, got {} bytes", bytes.len()),
            )
        }),
    }
}

/// A nullable id as a parameter.
pub(super) fn opt_bytes<T: BlobId>(id: &Option<T>) -> Option<&[u8]> {
    id.as_ref().map(BlobId::bytes)
}

/// Ids as a `bytea[]` parameter.
pub(super) fn id_array<T: BlobId>(ids: &[T]) -> Vec<&[u8]> {
    ids.iter().map(BlobId::bytes).collect()
}

pub(super) const HOST_COLS: &str = "id, address, status, last_heartbeat";

pub(super) fn host_row(row: &Row) -> Result<Host, StoreError> {
    Ok(Host {
        id: get_id(row, 0)?,
        address: get(row, 1)?,
        status: get_enum(row, 2)?,
        last_heartbeat: get::<Option<i64>>(row, 3)?.map(Timestamp::from_unix_millis),
    })
}

pub(super) const SANDBOX_COLS: &str =
    "id, team_id, host_id, status, vcpus, memory_mb, template_id, template_name, created_at";

/// The nine columns of [`SANDBOX_COLS`], in that order.
pub(super) fn sandbox_row(row: &Row) -> Result<Sandbox, StoreError> {
    Ok(Sandbox {
        id: get_id(row, 0)?,
        team: get_id(row, 1)?,
        host: get_opt_id(row, 2)?,
        status: get_enum(row, 3)?,
        vcpus: get_u32(row, 4)?,
        memory_mb: get_u32(row, 5)?,
        template_id: get_opt_id(row, 6)?,
        template: get::<Option<String>>(row, 7)?.map(TemplateName::from_trusted),
        created_at: get_time(row, 8)?,
    })
}

/// The columns [`template_row`] reads, from `templates`; `hosts` counts
/// its `present` placements.
pub(super) const TEMPLATE_COLS: &str =
    "id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id,
     state, (SELECT count(*) FROM placements p
             WHERE p.template_id = templates.id AND p.state = 'present'),
     compat, last_used_at, expires_at";

/// A `HostInfo` from its stored JSON; anything unreadable is unknown (as
/// in SQLite).
pub(super) fn get_host_info(row: &Row, idx: usize) -> Result<Option<HostInfo>, StoreError> {
    Ok(get::<Option<&str>>(row, idx)?.and_then(|json| serde_json::from_str(json).ok()))
}

/// A `HostInfo` as stored: JSON, or NULL when unknown.
pub(super) fn host_info_json(info: Option<&HostInfo>) -> Option<String> {
    info.filter(|i| !i.is_unknown())
        .and_then(|i| serde_json::to_string(i).ok())
}

pub(super) fn template_row(row: &Row) -> Result<Template, StoreError> {
    Ok(Template {
        id: get_id(row, 0)?,
        team: get_id(row, 1)?,
        name: TemplateName::from_trusted(get(row, 2)?),
        template_type: get_enum(row, 3)?,
        vcpus: get_u32(row, 4)?,
        memory_mb: get_u32(row, 5)?,
        size_bytes: get_u64(row, 6)?,
        created_at: get_time(row, 7)?,
        source_sandbox: get_opt_id(row, 8)?,
        state: get_enum(row, 9)?,
        hosts: get_u32(row, 10)?,
        compat: get_host_info(row, 11)?,
        last_used_at: get::<Option<i64>>(row, 12)?.map(Timestamp::from_unix_millis),
        expires_at: get::<Option<i64>>(row, 13)?.map(Timestamp::from_unix_millis),
    })
}

/// The journal columns `op_row` reads, from `operations o LEFT JOIN hosts h`.
pub(super) const OP_COLS: &str =
    "o.template_id, o.team_id, o.template_name, o.sandbox_id, o.host_id,
    coalesce(h.address, ''), o.prev_status, o.replaces, o.actor_type, o.actor_id, o.actor_name,
    o.attempts, o.id, o.created_at";

pub(super) fn op_row(row: &Row) -> Result<CreateOp, StoreError> {
    Ok(CreateOp {
        id: get_id(row, 12)?,
        template_id: get_id(row, 0)?,
        team: get_id(row, 1)?,
        name: TemplateName::from_trusted(get(row, 2)?),
        sandbox_id: get_id(row, 3)?,
        host: HostTarget {
            id: get_id(row, 4)?,
            address: get(row, 5)?,
        },
        prev_status: get_enum(row, 6)?,
        replaces: get_opt_id(row, 7)?,
        actor: actor_from_columns(get(row, 8)?, get(row, 9)?, get(row, 10)?),
        attempts: get_u32(row, 11)?,
        created_at: get_time(row, 13)?,
    })
}

/// `template_id, team_id, host_id, address, attempts`.
pub(super) fn deletion_row(row: &Row) -> Result<Deletion, StoreError> {
    Ok(Deletion {
        template_id: get_id(row, 0)?,
        team: get_id(row, 1)?,
        host: HostTarget {
            id: get_id(row, 2)?,
            address: get(row, 3)?,
        },
        attempts: get_u32(row, 4)?,
        claim: None,
    })
}

/// Decodes every row with `f`.
pub(super) fn all<T>(
    rows: &[Row],
    f: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(f).collect()
}
