//! Every SQL statement the library runs. Functions take a connection that
//! is already inside the right transaction (writer) or a read connection.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::agent::HostTarget;
use crate::audit::{AuditEntry, AuditOutcome, NewAuditEntry, RESOURCE_TEMPLATE};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{
    ApiKeyId, AuditLogId, HostId, InstanceId, OperationId, SandboxId, TeamId, TemplateId,
};
use crate::model::{
    Actor, Host, HostStatus, Sandbox, SandboxStatus, Template, TemplateState, TemplateType,
    Timestamp,
};
use crate::names::TemplateName;

use crate::store::{
    Backlog, CreateDone, CreateInput, CreateOp, Deletion, Finish, HostChange, InHand, KeyRecord,
    ListPosition, OpenOperation, PendingDeletion, ResolveReason, SandboxOutcome, StoreError,
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

fn u32_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    row.get::<_, i64>(idx)
        .map(|v| u32::try_from(v).unwrap_or(0))
}

fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(idx)
        .map(|v| u64::try_from(v).unwrap_or(0))
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------- hosts

const HOST_COLS: &str = "id, address, status, last_heartbeat";

fn host_row(row: &Row<'_>) -> rusqlite::Result<Host> {
    Ok(Host {
        id: row.get(0)?,
        address: row.get(1)?,
        status: row.get(2)?,
        last_heartbeat: row
            .get::<_, Option<i64>>(3)?
            .map(Timestamp::from_unix_millis),
    })
}

/// Registers a host or replaces its address and status. Returns the host
/// and whether it just came online (its queued work is then due now).
pub(crate) fn upsert_host(
    conn: &Connection,
    id: HostId,
    address: &str,
    status: HostStatus,
    now: Timestamp,
) -> Result<(Host, bool)> {
    let previous = get_host(conn, id)?.map(|h| h.status);
    conn.prepare_cached(
        "INSERT INTO hosts (id, address, status, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (id) DO UPDATE SET address = excluded.address, status = excluded.status,
                                        updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute(params![id, address, status, now.unix_millis()]))?;
    let came_online = status == HostStatus::Online && previous != Some(HostStatus::Online);
    if came_online {
        make_host_work_due(conn, id, now)?;
    }
    let host = get_host(conn, id)?.ok_or_else(|| Error::not_found("host not found"))?;
    Ok((host, came_online))
}

pub(crate) fn get_host(conn: &Connection, id: HostId) -> Result<Option<Host>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?1"))
        .and_then(|mut s| s.query_row([id], host_row).optional())?)
}

pub(crate) fn list_hosts(conn: &Connection) -> Result<Vec<Host>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {HOST_COLS} FROM hosts ORDER BY created_at, id"
    ))?;
    let rows = stmt
        .query_map([], host_row)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// Applies `change` to a host. When the host becomes online, its queued
/// work is made due now. Returns whether it just came online.
pub(crate) fn update_host(
    conn: &Connection,
    id: HostId,
    change: &HostChange,
    now: Timestamp,
) -> Result<bool> {
    let previous = get_host(conn, id)?
        .ok_or_else(|| Error::not_found(format!("host {id} not found")))?
        .status;
    let mut status = change.status.unwrap_or(previous);
    if change.heartbeat && matches!(status, HostStatus::Pending | HostStatus::Unreachable) {
        status = HostStatus::Online;
    }
    conn.prepare_cached(
        "UPDATE hosts SET status = ?2, address = coalesce(?3, address),
                          last_heartbeat = CASE WHEN ?4 THEN ?5 ELSE last_heartbeat END,
                          updated_at = ?5
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            status,
            change.address,
            change.heartbeat,
            now.unix_millis()
        ])
    })?;
    let came_online = status == HostStatus::Online && previous != HostStatus::Online;
    if came_online {
        make_host_work_due(conn, id, now)?;
    }
    Ok(came_online)
}

fn make_host_work_due(conn: &Connection, host: HostId, now: Timestamp) -> Result<()> {
    conn.prepare_cached(
        "UPDATE placements SET next_attempt = ?2 WHERE host_id = ?1 AND state = 'deleting'",
    )
    .and_then(|mut s| s.execute(params![host, now.unix_millis()]))?;
    // Creates still driven by their task (phase `started`, never postponed)
    // keep their lease: they are not the worker's to retry.
    conn.prepare_cached(
        "UPDATE operations SET next_attempt = ?2
         WHERE host_id = ?1 AND (phase = 'resolving' OR attempts > 0)",
    )
    .and_then(|mut s| s.execute(params![host, now.unix_millis()]))?;
    Ok(())
}

// ------------------------------------------------------------ sandboxes

const SANDBOX_COLS: &str = "id, team_id, host_id, status, vcpus, memory_mb";

fn sandbox_row(row: &Row<'_>) -> rusqlite::Result<Sandbox> {
    Ok(Sandbox {
        id: row.get(0)?,
        team: row.get(1)?,
        host: row.get(2)?,
        status: row.get(3)?,
        vcpus: u32_col(row, 4)?,
        memory_mb: u32_col(row, 5)?,
    })
}

pub(crate) fn get_sandbox(conn: &Connection, id: SandboxId) -> Result<Option<Sandbox>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], sandbox_row).optional())?)
}

fn sandbox_busy(id: SandboxId) -> Error {
    Error::conflict(format!(
        "sandbox {id} is being snapshotted; try again when the snapshot finishes"
    ))
}

/// Registers or replaces a sandbox. A sandbox owned by an operation
/// (`snapshotting`) cannot be changed here.
pub(crate) fn upsert_sandbox(conn: &Connection, sandbox: &Sandbox, now: Timestamp) -> Result<()> {
    if let Some(existing) = get_sandbox(conn, sandbox.id)?
        && existing.status == SandboxStatus::Snapshotting
    {
        return Err(sandbox_busy(sandbox.id));
    }
    if sandbox.status == SandboxStatus::Snapshotting {
        return Err(Error::invalid_request(
            "only a snapshot operation may set a sandbox to snapshotting",
        ));
    }
    if let Some(host) = sandbox.host
        && get_host(conn, host)?.is_none()
    {
        return Err(Error::not_found(format!("host {host} not found")));
    }
    conn.prepare_cached(
        "INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
         ON CONFLICT (id) DO UPDATE SET team_id = excluded.team_id, host_id = excluded.host_id,
             status = excluded.status, vcpus = excluded.vcpus, memory_mb = excluded.memory_mb,
             updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(params![
            sandbox.id,
            sandbox.team,
            sandbox.host,
            sandbox.status,
            sandbox.vcpus,
            sandbox.memory_mb,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

/// Changes a sandbox's status, optionally only from `expected`. A sandbox
/// owned by a snapshot operation answers 409.
pub(crate) fn set_sandbox_status(
    conn: &Connection,
    id: SandboxId,
    expected: Option<SandboxStatus>,
    status: SandboxStatus,
    now: Timestamp,
) -> Result<Sandbox> {
    let current = get_sandbox(conn, id)?.ok_or_else(|| Error::not_found("sandbox not found"))?;
    if current.status == SandboxStatus::Snapshotting || status == SandboxStatus::Snapshotting {
        return Err(sandbox_busy(id));
    }
    if let Some(expected) = expected
        && current.status != expected
    {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!("sandbox {id} is {}, not {expected}", current.status),
        ));
    }
    conn.prepare_cached("UPDATE sandboxes SET status = ?2, updated_at = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, status, now.unix_millis()]))?;
    Ok(Sandbox { status, ..current })
}

pub(crate) fn remove_sandbox(conn: &Connection, id: SandboxId) -> Result<()> {
    let current = get_sandbox(conn, id)?.ok_or_else(|| Error::not_found("sandbox not found"))?;
    if current.status == SandboxStatus::Snapshotting {
        return Err(sandbox_busy(id));
    }
    conn.prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
        .and_then(|mut s| s.execute([id]))?;
    Ok(())
}

/// Sets the status an operation decided on, only if the operation still
/// owns the sandbox.
fn release_sandbox(
    conn: &Connection,
    id: SandboxId,
    status: SandboxStatus,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE sandboxes SET status = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'snapshotting'",
    )
    .and_then(|mut s| s.execute(params![id, status, now.unix_millis()]))?;
    Ok(())
}

// ------------------------------------------------------------ templates

const TEMPLATE_COLS: &str =
    "id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id";

fn template_row(row: &Row<'_>) -> rusqlite::Result<Template> {
    Ok(Template {
        id: row.get(0)?,
        team: row.get(1)?,
        name: TemplateName::from_trusted(row.get(2)?),
        template_type: row.get(3)?,
        vcpus: u32_col(row, 4)?,
        memory_mb: u32_col(row, 5)?,
        size_bytes: u64_col(row, 6)?,
        created_at: Timestamp::from_unix_millis(row.get(7)?),
        source_sandbox: row.get(8)?,
    })
}

/// The template `team` sees under `name`: its own, else a platform one.
pub(crate) fn find_visible(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
) -> Result<Option<Template>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {TEMPLATE_COLS} FROM templates
             WHERE team_id IN (?1, ?2) AND name = ?3 AND state = 'ready' AND replaces IS NULL
             ORDER BY team_id = ?2 LIMIT 1"
        ))
        .and_then(|mut s| {
            s.query_row(params![team, TeamId::PLATFORM, name.as_str()], template_row)
                .optional()
        })?)
}

/// The caller's templates plus platform templates, newest first, after
/// `after`, at most `limit` (all when `None`).
pub(crate) fn list_visible(
    conn: &Connection,
    team: TeamId,
    kind: Option<TemplateType>,
    after: Option<ListPosition>,
    limit: Option<u32>,
) -> Result<Vec<Template>> {
    // Each side reads at most `limit` rows in index order and the outer
    // query merges the two; `team_id IN (..)` would sort every visible row.
    let side = |team_param: &str| {
        format!(
            "SELECT {TEMPLATE_COLS} FROM templates INDEXED BY templates_visible
             WHERE team_id = {team_param} AND state = 'ready'{kind}{after}
             ORDER BY created_at DESC, id DESC LIMIT ?6",
            kind = if kind.is_some() { " AND type = ?3" } else { "" },
            after = if after.is_some() {
                " AND (created_at, id) < (?4, ?5)"
            } else {
                ""
            },
        )
    };
    let sql = if team.is_platform() {
        side("?1")
    } else {
        format!(
            "SELECT * FROM ({}) UNION ALL SELECT * FROM ({})
             ORDER BY created_at DESC, id DESC LIMIT ?6",
            side("?1"),
            side("?2")
        )
    };
    let (after_ms, after_id) = match after {
        Some(p) => (Some(p.created_at), Some(p.id)),
        None => (None, None),
    };
    let limit = limit.map_or(-1, i64::from);
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(
            params![team, TeamId::PLATFORM, kind, after_ms, after_id, limit],
            template_row,
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// A template's placements and their states.
pub(crate) fn placements_of(
    conn: &Connection,
    template: TemplateId,
) -> Result<Vec<(HostId, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT host_id, state FROM placements WHERE template_id = ?1 ORDER BY host_id",
    )?;
    let rows = stmt
        .query_map([template], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// Registers a ready template whose files already exist on `hosts` (base
/// images, or templates copied by other means).
pub(crate) fn insert_ready_template(
    conn: &Connection,
    template: &Template,
    hosts: &[HostId],
    now: Timestamp,
) -> Result<()> {
    check_name_free(conn, template.team, &template.name, false)?;
    conn.prepare_cached(
        "INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                source_sandbox_id, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'ready', ?5, ?6, ?7, ?8, ?9, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            template.id,
            template.team,
            template.name.as_str(),
            template.template_type,
            template.vcpus,
            template.memory_mb,
            clamp_i64(template.size_bytes),
            template.source_sandbox,
            template.created_at.unix_millis(),
        ])
    })?;
    for host in hosts {
        if get_host(conn, *host)?.is_none() {
            return Err(Error::not_found(format!("host {host} not found")));
        }
        insert_placement(conn, template.id, *host, template.team, "present", now)?;
    }
    Ok(())
}

fn insert_placement(
    conn: &Connection,
    template: TemplateId,
    host: HostId,
    team: TeamId,
    state: &str,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)
         ON CONFLICT (template_id, host_id) DO UPDATE SET state = excluded.state,
             next_attempt = excluded.next_attempt, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| s.execute(params![template, host, team, state, now.unix_millis()]))?;
    Ok(())
}

/// What holds `name` in `team` (not counting templates being deleted or
/// pending overwrites).
fn name_holder(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
) -> Result<Option<(TemplateId, TemplateState)>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, state FROM templates
             WHERE team_id = ?1 AND name = ?2 AND state <> 'deleting' AND replaces IS NULL",
        )
        .and_then(|mut s| {
            s.query_row(params![team, name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })?)
}

/// Checks that `team` may take `name`. Returns the ready template an
/// overwrite would replace.
fn check_name_free(
    conn: &Connection,
    team: TeamId,
    name: &TemplateName,
    overwrite: bool,
) -> Result<Option<TemplateId>> {
    if team.is_platform() {
        let used_by_team: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM templates
                                WHERE name = ?1 AND state <> 'deleting' AND team_id <> ?2)",
            )
            .and_then(|mut s| {
                s.query_row(params![name.as_str(), TeamId::PLATFORM], |r| r.get(0))
            })?;
        if used_by_team {
            return Err(Error::new(
                ErrorCode::AlreadyExists,
                format!("name {name:?} is already used by a team template"),
            ));
        }
    } else if name_holder(conn, TeamId::PLATFORM, name)?.is_some() {
        return Err(Error::new(
            ErrorCode::NameReserved,
            format!("name {name:?} is reserved by a platform template"),
        ));
    }
    match name_holder(conn, team, name)? {
        None => Ok(None),
        Some((_, TemplateState::Creating)) => Err(if overwrite {
            Error::conflict(
                "a snapshot with this name is being created; try again when it finishes",
            )
        } else {
            Error::new(
                ErrorCode::AlreadyExists,
                "a snapshot with this name is being created",
            )
        }),
        Some((_, TemplateState::Deleting)) => Ok(None),
        Some((id, TemplateState::Ready)) => {
            if !overwrite {
                return Err(Error::new(
                    ErrorCode::AlreadyExists,
                    "snapshot name already exists; use ?overwrite=true to replace",
                ));
            }
            let pending: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM templates WHERE replaces = ?1)")
                .and_then(|mut s| s.query_row([id], |r| r.get(0)))?;
            if pending {
                return Err(Error::conflict(
                    "an overwrite of this snapshot is already in progress",
                ));
            }
            Ok(Some(id))
        }
    }
}

// -------------------------------------------------------------- journal

const OP_COLS: &str = "o.template_id, o.team_id, o.template_name, o.sandbox_id, o.host_id,
    coalesce(h.address, ''), o.prev_status, o.replaces, o.actor_type, o.actor_id, o.actor_name,
    o.attempts, o.id, o.created_at";

fn actor_from_columns(kind: &str, id: Option<String>, name: Option<String>) -> Actor {
    match (kind, id) {
        ("user", Some(id)) => Actor::User {
            id,
            name: name.unwrap_or_default(),
        },
        ("api_key", Some(id)) => match ApiKeyId::parse(&id) {
            Ok(id) => Actor::ApiKey {
                id,
                name: name.unwrap_or_default(),
            },
            Err(_) => Actor::System,
        },
        _ => Actor::System,
    }
}

fn op_row(row: &Row<'_>) -> rusqlite::Result<CreateOp> {
    Ok(CreateOp {
        id: row.get(12)?,
        template_id: row.get(0)?,
        team: row.get(1)?,
        name: TemplateName::from_trusted(row.get(2)?),
        sandbox_id: row.get(3)?,
        host: HostTarget {
            id: row.get(4)?,
            address: row.get(5)?,
        },
        prev_status: row.get(6)?,
        replaces: row.get(7)?,
        actor: actor_from_columns(&row.get::<_, String>(8)?, row.get(9)?, row.get(10)?),
        attempts: u32_col(row, 11)?,
        created_at: Timestamp::from_unix_millis(row.get(13)?),
    })
}

/// Open operations in `phase`, only those due at `due_before` if given.
pub(crate) fn open_operations(
    conn: &Connection,
    phase: &str,
    due_before: Option<Timestamp>,
) -> Result<Vec<CreateOp>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {OP_COLS} FROM operations o LEFT JOIN hosts h ON h.id = o.host_id
             WHERE o.phase = ?1 AND (?2 IS NULL OR o.next_attempt <= ?2) ORDER BY o.created_at, o.template_id"
    ))?;
    let rows = stmt
        .query_map(
            params![phase, due_before.map(Timestamp::unix_millis)],
            op_row,
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// The backlogs the worker reports as gauges: queued deletions and open
/// operations, each as (count, oldest start in unix millis). A deletion
/// started when its template went to `deleting` (a placement queued on its
/// own, by recovery or the sweep, when it was inserted). Two aggregate
/// scans of small tables: queued rows are few (see `placements_due`).
pub(crate) fn backlogs(conn: &Connection) -> Result<(Backlog, Backlog)> {
    let deletions = conn
        .prepare_cached(
            "SELECT count(*), min(CASE WHEN t.state = 'deleting' THEN t.updated_at
                                       ELSE p.created_at END)
             FROM placements p LEFT JOIN templates t ON t.id = p.template_id
             WHERE p.state = 'deleting'",
        )
        .and_then(|mut s| s.query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?))))?;
    let operations = conn
        .prepare_cached("SELECT count(*), min(created_at) FROM operations")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?))))?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((
        (count(deletions.0), deletions.1),
        (count(operations.0), operations.1),
    ))
}

/// The open operation `id`, if there is one.
pub(crate) fn get_operation(conn: &Connection, id: OperationId) -> Result<Option<CreateOp>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {OP_COLS} FROM operations o LEFT JOIN hosts h ON h.id = o.host_id
             WHERE o.id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], op_row).optional())?)
}

/// The phase of the open operation of `template`, if it is open.
fn operation_phase(conn: &Connection, template: TemplateId) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT phase FROM operations WHERE template_id = ?1")
        .and_then(|mut s| s.query_row([template], |r| r.get(0)).optional())?)
}

fn delete_operation(conn: &Connection, template: TemplateId) -> Result<bool> {
    let n = conn
        .prepare_cached("DELETE FROM operations WHERE template_id = ?1")
        .and_then(|mut s| s.execute([template]))?;
    Ok(n == 1)
}

/// Backs off an operation that could not be resolved yet.
pub(crate) fn postpone_operation(
    conn: &Connection,
    template: TemplateId,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE operations SET attempts = attempts + 1, next_attempt = ?2, last_error = ?3,
                               updated_at = ?4
         WHERE template_id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            template,
            next_attempt.unix_millis(),
            error,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

// --------------------------------------------------------------- create

/// Step one of a create, in one transaction: name checks, team-scoped
/// sandbox lookup, status and host checks, sandbox → `snapshotting` (CAS),
/// the `creating` template row, and the journal entry.
pub(crate) fn begin_create(
    conn: &Connection,
    input: &CreateInput,
    now: Timestamp,
) -> Result<(CreateOp, Sandbox)> {
    let CreateInput {
        actor,
        team,
        sandbox_id,
        name,
        overwrite,
        template_id,
        operation_id,
        lease_until,
        // One process per file: every entry is this process's.
        owner: _,
    } = input;
    let (team, sandbox_id, overwrite, template_id) = (*team, *sandbox_id, *overwrite, *template_id);
    let replaces = check_name_free(conn, team, name, overwrite)?;
    let sandbox = conn
        .prepare_cached(&format!(
            "SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1 AND team_id = ?2"
        ))
        .and_then(|mut s| {
            s.query_row(params![sandbox_id, team], sandbox_row)
                .optional()
        })?
        .ok_or_else(|| Error::not_found("sandbox not found"))?;
    if !matches!(
        sandbox.status,
        SandboxStatus::Running | SandboxStatus::Paused
    ) {
        return Err(Error::new(
            ErrorCode::InvalidState,
            "sandbox must be running or paused",
        ));
    }
    let unreachable = || Error::new(ErrorCode::HostUnavailable, "sandbox host is not reachable");
    let host_id = sandbox.host.ok_or_else(unreachable)?;
    let host = get_host(conn, host_id)?.ok_or_else(unreachable)?;
    if host.address.is_empty() || !host.status.accepts_snapshots() {
        return Err(unreachable());
    }
    let now_ms = now.unix_millis();
    let swapped = conn
        .prepare_cached(
            "UPDATE sandboxes SET status = 'snapshotting', updated_at = ?3 WHERE id = ?1 AND status = ?2",
        )
        .and_then(|mut s| s.execute(params![sandbox_id, sandbox.status, now_ms]))
        ?;
    if swapped != 1 {
        return Err(Error::new(
            ErrorCode::InvalidState,
            "sandbox must be running or paused",
        ));
    }
    conn.prepare_cached(
        "INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                source_sandbox_id, replaces, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'snapshot', 'creating', ?4, ?5, 0, ?6, ?7, ?8, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            template_id,
            team,
            name.as_str(),
            sandbox.vcpus,
            sandbox.memory_mb,
            sandbox_id,
            replaces,
            now_ms
        ])
    })?;
    conn.prepare_cached(
        "INSERT INTO operations (kind, phase, template_id, team_id, template_name, sandbox_id,
                                 host_id, prev_status, replaces, actor_type, actor_id, actor_name,
                                 created_at, updated_at, id, next_attempt)
         VALUES ('create', 'started', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12, ?13)",
    )
    .and_then(|mut s| {
        s.execute(params![
            template_id,
            team,
            name.as_str(),
            sandbox_id,
            host_id,
            sandbox.status,
            replaces,
            actor.kind(),
            actor.id_text(),
            actor.name_text(),
            now_ms,
            operation_id,
            lease_until.unix_millis()
        ])
    })?;
    let op = CreateOp {
        id: *operation_id,
        template_id,
        team,
        name: name.clone(),
        sandbox_id,
        host: HostTarget {
            id: host_id,
            address: host.address,
        },
        prev_status: sandbox.status,
        replaces,
        actor: actor.clone(),
        attempts: 0,
        created_at: now,
    };
    Ok((op, sandbox))
}

/// Marks a template deleted and its placements queued for deletion (with
/// a lease of `lease_until` for the caller's own immediate attempt).
/// Purges the row at once if it has no placements.
fn mark_deleting(
    conn: &Connection,
    template: TemplateId,
    lease_until: Timestamp,
    now: Timestamp,
) -> Result<Vec<Deletion>> {
    conn.prepare_cached("UPDATE templates SET state = 'deleting', updated_at = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![template, now.unix_millis()]))?;
    // A pending overwrite of this template now holds the name itself, so
    // nobody else can take it before the overwrite finishes.
    conn.prepare_cached(
        "UPDATE templates SET replaces = NULL WHERE replaces = ?1 AND state = 'creating'",
    )
    .and_then(|mut s| s.execute([template]))?;
    conn.prepare_cached(
        "UPDATE placements SET state = 'deleting', attempts = 0, next_attempt = ?3,
                               lease_until = ?2, updated_at = ?3
         WHERE template_id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            template,
            lease_until.unix_millis(),
            now.unix_millis()
        ])
    })?;
    let mut stmt = conn.prepare_cached(
        "SELECT p.template_id, p.team_id, p.host_id, h.address, p.attempts
             FROM placements p JOIN hosts h ON h.id = p.host_id
             WHERE p.template_id = ?1",
    )?;
    let targets = stmt
        .query_map([template], deletion_row)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    purge_if_done(conn, template)?;
    Ok(targets)
}

fn deletion_row(row: &Row<'_>) -> rusqlite::Result<Deletion> {
    Ok(Deletion {
        template_id: row.get(0)?,
        team: row.get(1)?,
        host: HostTarget {
            id: row.get(2)?,
            address: row.get(3)?,
        },
        attempts: u32_col(row, 4)?,
    })
}

fn purge_if_done(conn: &Connection, template: TemplateId) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM templates WHERE id = ?1 AND state = 'deleting'
           AND NOT EXISTS (SELECT 1 FROM placements WHERE template_id = ?1)",
    )
    .and_then(|mut s| s.execute([template]))?;
    Ok(())
}

/// Whether the journal entry of `template` is open in `phase`.
fn operation_in_phase(conn: &Connection, template: TemplateId, phase: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM operations WHERE template_id = ?1 AND phase = ?2)",
        )
        .and_then(|mut s| s.query_row(params![template, phase], |r| r.get(0)))?)
}

/// The last step of a successful create, in one transaction: the template
/// becomes `ready` with its placement, an overwritten template gives up its
/// name and is queued for deletion, the sandbox is `paused`, the journal
/// entry is closed, and the audit entry written. Only applies while the
/// journal entry is open in phase `started`.
pub(crate) fn finish_create(
    conn: &Connection,
    op: &CreateOp,
    size_bytes: u64,
    lease_until: Timestamp,
    now: Timestamp,
) -> Result<Finish> {
    if !operation_in_phase(conn, op.template_id, "started")? {
        return Ok(Finish::AlreadyResolved);
    }
    // When the replaced template was deleted meanwhile, its name was handed
    // to this row (see `mark_deleting`), so the only holder can be us or
    // the template we replace.
    if let Some((holder, _)) = name_holder(conn, op.team, &op.name)?
        && holder != op.template_id
        && Some(holder) != op.replaces
    {
        return Ok(Finish::NameTaken);
    }
    delete_operation(conn, op.template_id)?;
    let mut replaced = Vec::new();
    let mut replaced_id = None;
    if let Some(old) = op.replaces {
        let still_ready: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM templates WHERE id = ?1 AND state = 'ready')",
            )
            .and_then(|mut s| s.query_row([old], |r| r.get(0)))?;
        if still_ready {
            replaced = mark_deleting(conn, old, lease_until, now)?;
            replaced_id = Some(old.to_string());
        }
    }
    let updated = conn
        .prepare_cached(
            "UPDATE templates SET state = 'ready', replaces = NULL, size_bytes = ?2,
                                  created_at = ?3, updated_at = ?3
             WHERE id = ?1 AND state = 'creating'",
        )
        .and_then(|mut s| {
            s.execute(params![
                op.template_id,
                clamp_i64(size_bytes),
                now.unix_millis()
            ])
        })?;
    if updated != 1 {
        // The journal entry was open, so the row must be `creating`; a
        // mismatch is damage, and the whole transaction is rolled back.
        return Err(StoreError::corrupt(format!(
            "template {} has an open journal entry but is not being created",
            op.template_id
        ))
        .into());
    }
    insert_placement(conn, op.template_id, op.host.id, op.team, "present", now)?;
    release_sandbox(conn, op.sandbox_id, SandboxStatus::Paused, now)?;
    let template = conn
        .prepare_cached(&format!(
            "SELECT {TEMPLATE_COLS} FROM templates WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([op.template_id], template_row))?;
    insert_audit(
        conn,
        &NewAuditEntry {
            team: op.team,
            actor: op.actor.clone(),
            action: crate::audit::actions::SNAPSHOT_CREATE,
            resource_id: op.template_id.to_string(),
            outcome: AuditOutcome::Success,
            error_code: None,
            metadata: serde_json::json!({
                "name": op.name.as_str(),
                "sandbox_id": op.sandbox_id.to_string(),
                "host_id": op.host.id.to_string(),
                "size_bytes": size_bytes,
                "replaced": replaced_id,
            }),
        },
        now,
    )?;
    Ok(Finish::Done(CreateDone { template, replaced }))
}

/// Rolls back a failed create in one transaction: the template row goes,
/// the key is queued for deletion from `first_attempt` on (it may be half
/// written, or still being written by an agent that has not noticed the
/// deadline) unless the request provably never reached the agent
/// (`first_attempt` is `None`), the sandbox gets its status (or stays owned
/// until its host answers), the failure is audited. Only applies while the
/// journal entry is open in phase `started`; returns whether it did.
///
/// While the entry stays open (phase `resolving`) the queued key is not
/// tried: the host may still be writing it, and a NotFound then would not
/// mean it is gone (SPEC §4a "Half-written keys").
pub(crate) fn fail_create(
    conn: &Connection,
    op: &CreateOp,
    sandbox: SandboxOutcome,
    error_code: &'static str,
    detail: &str,
    first_attempt: Option<Timestamp>,
    now: Timestamp,
) -> Result<bool> {
    let claimed = match sandbox {
        SandboxOutcome::Known(_) => conn
            .prepare_cached("DELETE FROM operations WHERE template_id = ?1 AND phase = 'started'")
            .and_then(|mut s| s.execute([op.template_id]))?,
        SandboxOutcome::Unknown { retry_at } => conn
            .prepare_cached(
                "UPDATE operations SET phase = 'resolving', next_attempt = ?2, last_error = ?3,
                                       updated_at = ?4
                 WHERE template_id = ?1 AND phase = 'started'",
            )
            .and_then(|mut s| {
                s.execute(params![
                    op.template_id,
                    retry_at.unix_millis(),
                    detail,
                    now.unix_millis()
                ])
            })?,
    };
    if claimed != 1 {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM templates WHERE id = ?1 AND state = 'creating'")
        .and_then(|mut s| s.execute([op.template_id]))?;
    if let Some(first_attempt) = first_attempt {
        conn.prepare_cached(
            "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'deleting', ?4, ?5, ?5)
             ON CONFLICT (template_id, host_id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                op.template_id,
                op.host.id,
                op.team,
                first_attempt.unix_millis(),
                now.unix_millis()
            ])
        })?;
    }
    if let SandboxOutcome::Known(status) = sandbox {
        release_sandbox(conn, op.sandbox_id, status, now)?;
    }
    insert_audit(
        conn,
        &NewAuditEntry {
            team: op.team,
            actor: op.actor.clone(),
            action: crate::audit::actions::SNAPSHOT_CREATE,
            resource_id: op.template_id.to_string(),
            outcome: AuditOutcome::Failure,
            error_code: Some(error_code),
            metadata: serde_json::json!({
                "name": op.name.as_str(),
                "sandbox_id": op.sandbox_id.to_string(),
                "host_id": op.host.id.to_string(),
            }),
        },
        now,
    )?;
    Ok(true)
}

/// Closes a `resolving` operation once the host reported the sandbox.
/// Returns whether it was still open.
pub(crate) fn resolve_operation(
    conn: &Connection,
    op: &CreateOp,
    status: SandboxStatus,
    now: Timestamp,
) -> Result<bool> {
    let closed = conn
        .prepare_cached("DELETE FROM operations WHERE template_id = ?1 AND phase = 'resolving'")
        .and_then(|mut s| s.execute([op.template_id]))?;
    if closed == 1 {
        release_sandbox(conn, op.sandbox_id, status, now)?;
    }
    Ok(closed == 1)
}

/// Resolves the open operation `id` now, without the host's answer: the
/// sandbox gets `status`; a create still in phase `started` is rolled back
/// with its key queued for deletion from `first_attempt` (the agent may
/// still be writing it). Audited in the operation's team's log. Returns the
/// operation as it was, or `None` when it is not open (any more).
pub(crate) fn resolve_open_operation(
    conn: &Connection,
    id: OperationId,
    status: SandboxStatus,
    actor: &Actor,
    reason: ResolveReason,
    first_attempt: Timestamp,
    now: Timestamp,
) -> Result<Option<CreateOp>> {
    if status == SandboxStatus::Snapshotting {
        return Err(Error::invalid_request(
            "an operation cannot be resolved to snapshotting",
        ));
    }
    let Some(op) = get_operation(conn, id)? else {
        return Ok(None);
    };
    let phase = operation_phase(conn, op.template_id)?;
    let closed = match phase.as_deref() {
        Some("started") => fail_create(
            conn,
            &op,
            SandboxOutcome::Known(status),
            "unresolved",
            reason.as_str(),
            Some(first_attempt),
            now,
        )?,
        Some("resolving") => resolve_operation(conn, &op, status, now)?,
        _ => false,
    };
    if !closed {
        return Ok(None);
    }
    insert_audit(
        conn,
        &NewAuditEntry {
            team: op.team,
            actor: actor.clone(),
            action: crate::audit::actions::OPERATION_RESOLVE,
            resource_id: op.template_id.to_string(),
            outcome: AuditOutcome::Success,
            error_code: None,
            metadata: serde_json::json!({
                "operation_id": op.id.to_string(),
                "name": op.name.as_str(),
                "sandbox_id": op.sandbox_id.to_string(),
                "host_id": op.host.id.to_string(),
                "sandbox_status": status.as_str(),
                "phase": phase,
                "reason": reason.as_str(),
            }),
        },
        now,
    )?;
    Ok(Some(op))
}

// --------------------------------------------------------------- delete

/// Deletes the template `team` sees as `name`, in one transaction: it
/// leaves get/list and frees its name, each placement is queued for
/// deletion, and the deletion is audited.
pub(crate) fn begin_delete(
    conn: &Connection,
    actor: &Actor,
    team: TeamId,
    is_admin: bool,
    name: &TemplateName,
    lease_until: Timestamp,
    now: Timestamp,
) -> Result<(Template, Vec<Deletion>)> {
    let template =
        find_visible(conn, team, name)?.ok_or_else(|| Error::not_found("template not found"))?;
    if template.is_platform() && !(team.is_platform() && is_admin) {
        return Err(Error::forbidden(
            "platform templates cannot be deleted here",
        ));
    }
    let targets = mark_deleting(conn, template.id, lease_until, now)?;
    let hosts: Vec<String> = targets.iter().map(|d| d.host.id.to_string()).collect();
    insert_audit(
        conn,
        &NewAuditEntry {
            team: template.team,
            actor: actor.clone(),
            action: crate::audit::actions::SNAPSHOT_DELETE,
            resource_id: template.id.to_string(),
            outcome: AuditOutcome::Success,
            error_code: None,
            metadata: serde_json::json!({ "name": template.name.as_str(), "hosts": hosts }),
        },
        now,
    )?;
    Ok((template, targets))
}

/// The host confirmed the files are gone: drop the placement, and the
/// template row with its last one.
pub(crate) fn deletion_confirmed(conn: &Connection, d: &Deletion) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM placements WHERE template_id = ?1 AND host_id = ?2 AND state = 'deleting'",
    )
    .and_then(|mut s| s.execute(params![d.template_id, d.host.id]))?;
    purge_if_done(conn, d.template_id)
}

/// The host did not confirm: count the attempt and schedule the next.
pub(crate) fn deletion_failed(
    conn: &Connection,
    d: &Deletion,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE placements SET attempts = attempts + 1, next_attempt = ?3, last_error = ?4,
                               lease_until = NULL,
                               updated_at = ?5
         WHERE template_id = ?1 AND host_id = ?2 AND state = 'deleting'",
    )
    .and_then(|mut s| {
        s.execute(params![
            d.template_id,
            d.host.id,
            next_attempt.unix_millis(),
            error,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

/// Most deletions claimed for one host in one batch.
const PER_HOST: u32 = 16;

/// Takes up to `limit` due deletions (skipping hosts marked offline and
/// the hosts in `skip_hosts`, whose work is in hand) and leases them until
/// `lease_until` so nobody else tries them meanwhile. A key whose create is
/// still unresolved is not due: its host may still be writing it.
pub(crate) fn claim_due_deletions(
    conn: &Connection,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
    skip_hosts: &[HostId],
) -> Result<Vec<Deletion>> {
    // At most `PER_HOST` per host, so that one slow host cannot fill a
    // batch that every other host then waits on.
    let mut stmt = conn.prepare_cached(
        "SELECT template_id, team_id, host_id, address, attempts FROM (
             SELECT p.template_id, p.team_id, p.host_id, h.address, p.attempts, p.next_attempt,
                    row_number() OVER (PARTITION BY p.host_id ORDER BY p.next_attempt) AS n
             FROM placements p JOIN hosts h ON h.id = p.host_id
             WHERE p.state = 'deleting' AND p.next_attempt <= ?1
               AND coalesce(p.lease_until, 0) <= ?1 AND h.status <> 'offline'
               AND p.host_id NOT IN (SELECT unhex(value) FROM json_each(?4))
               AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.template_id = p.template_id))
         WHERE n <= ?3 ORDER BY next_attempt LIMIT ?2",
    )?;
    let due = stmt
        .query_map(
            params![
                now.unix_millis(),
                limit,
                PER_HOST,
                hex_blobs(skip_hosts.iter().map(HostId::as_blob))
            ],
            deletion_row,
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    let mut lease = conn.prepare_cached(
        "UPDATE placements SET lease_until = ?3 WHERE template_id = ?1 AND host_id = ?2",
    )?;
    for d in &due {
        lease.execute(params![d.template_id, d.host.id, lease_until.unix_millis()])?;
    }
    Ok(due)
}

fn hex_blobs<'a>(blobs: impl Iterator<Item = &'a [u8; 16]>) -> String {
    let items: Vec<String> = blobs
        .map(|b| {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("\"{hex}\"")
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// The earliest time any queued work not in hand becomes due, if any.
pub(crate) fn next_due(conn: &Connection, in_hand: &InHand) -> Result<Option<Timestamp>> {
    let at: Option<i64> = conn
        .prepare_cached(
            "SELECT min(t) FROM (
                 SELECT min(max(p.next_attempt, coalesce(p.lease_until, 0))) AS t
                 FROM placements p JOIN hosts h ON h.id = p.host_id
                 WHERE p.state = 'deleting' AND h.status <> 'offline'
                   AND p.host_id NOT IN (SELECT unhex(value) FROM json_each(?1))
                   AND NOT EXISTS (SELECT 1 FROM operations o
                                   WHERE o.template_id = p.template_id)
                 UNION ALL
                 SELECT min(o.next_attempt) FROM operations o
                 WHERE o.host_id NOT IN (SELECT unhex(value) FROM json_each(?1))
                   AND o.template_id NOT IN (SELECT unhex(value) FROM json_each(?2))
                   AND coalesce(o.id, x'') NOT IN (SELECT unhex(value) FROM json_each(?3)))",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    hex_blobs(in_hand.hosts.iter().map(HostId::as_blob)),
                    hex_blobs(in_hand.creates.iter().map(TemplateId::as_blob)),
                    hex_blobs(in_hand.operations.iter().map(OperationId::as_blob)),
                ],
                |r| r.get(0),
            )
        })?;
    Ok(at.map(Timestamp::from_unix_millis))
}

/// Voids the leases of attempts in flight: called at open, when no attempt
/// of ours can be in flight (one manager per file), so that work a crashed
/// process had claimed — deletions, and creates its tasks were driving —
/// is retried at once instead of when its lease ends.
pub(crate) fn void_leases(conn: &Connection) -> Result<()> {
    conn.execute(
        "UPDATE placements SET lease_until = NULL WHERE lease_until IS NOT NULL",
        [],
    )?;
    conn.execute(
        "UPDATE operations SET next_attempt = 0 WHERE phase = 'started'",
        [],
    )?;
    Ok(())
}

pub(crate) fn pending_deletions(conn: &Connection) -> Result<Vec<PendingDeletion>> {
    let mut stmt = conn.prepare_cached(
        "SELECT template_id, host_id, attempts, last_error, next_attempt FROM placements
             WHERE state = 'deleting' ORDER BY host_id, next_attempt",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(PendingDeletion {
                template_id: r.get(0)?,
                host: r.get(1)?,
                attempts: u32_col(r, 2)?,
                last_error: r.get(3)?,
                next_attempt: Timestamp::from_unix_millis(r.get(4)?),
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

// ---------------------------------------------------------------- audit

pub(crate) fn insert_audit(conn: &Connection, e: &NewAuditEntry, now: Timestamp) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit_log (id, team_id, actor_type, actor_id, actor_name, action,
                                resource_type, resource_id, outcome, error_code, metadata, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut s| {
        s.execute(params![
            AuditLogId::new(),
            e.team,
            e.actor.kind(),
            e.actor.id_text(),
            e.actor.name_text(),
            e.action,
            RESOURCE_TEMPLATE,
            e.resource_id,
            e.outcome.as_str(),
            e.error_code,
            e.metadata.to_string(),
            now.unix_millis()
        ])
    })?;
    Ok(())
}

/// A team's audit entries, newest first, below `before` (a sequence number).
pub(crate) fn list_audit(
    conn: &Connection,
    team: TeamId,
    before: Option<i64>,
    resource_type: Option<&str>,
    action: Option<&str>,
    limit: Option<u32>,
) -> Result<Vec<(i64, AuditEntry)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, team_id, actor_type, actor_id, actor_name, action, resource_type,
                    resource_id, outcome, error_code, metadata, created_at
             FROM audit_log
             WHERE team_id = ?1 AND (?2 IS NULL OR seq < ?2)
               AND (?3 IS NULL OR resource_type = ?3) AND (?4 IS NULL OR action = ?4)
             ORDER BY seq DESC LIMIT ?5",
    )?;
    let rows = stmt
        .query_map(
            params![
                team,
                before,
                resource_type,
                action,
                limit.map_or(-1, i64::from)
            ],
            |r| {
                let metadata: String = r.get(11)?;
                let outcome: String = r.get(9)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    AuditEntry {
                        id: r.get(1)?,
                        team: r.get(2)?,
                        actor: actor_from_columns(&r.get::<_, String>(3)?, r.get(4)?, r.get(5)?),
                        action: r.get(6)?,
                        resource_type: r.get(7)?,
                        resource_id: r.get(8)?,
                        outcome: if outcome == "success" {
                            AuditOutcome::Success
                        } else {
                            AuditOutcome::Failure
                        },
                        error_code: r.get(10)?,
                        metadata: serde_json::from_str(&metadata)
                            .unwrap_or(serde_json::Value::Null),
                        created_at: Timestamp::from_unix_millis(r.get(12)?),
                    },
                ))
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

// ---------------------------------------------------------- visibility

pub(crate) fn list_open_operations(conn: &Connection) -> Result<Vec<OpenOperation>> {
    let mut stmt = conn.prepare_cached(
        "SELECT template_id, team_id, template_name, sandbox_id, host_id, phase, attempts,
                last_error, created_at, id
         FROM operations ORDER BY created_at, template_id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(OpenOperation {
                id: r.get(9)?,
                template_id: r.get(0)?,
                team: r.get(1)?,
                name: TemplateName::from_trusted(r.get(2)?),
                sandbox: r.get(3)?,
                host: r.get(4)?,
                phase: r.get(5)?,
                attempts: u32_col(r, 6)?,
                last_error: r.get(7)?,
                started_at: Timestamp::from_unix_millis(r.get(8)?),
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

// ---------------------------------------------------------------- sweep

/// Whether the key of `template` is accounted for anywhere: a template row
/// in any state, a placement on any host (present, or queued for deletion),
/// or an open operation. Deliberately not per host: one agent registered
/// under two host ids, or shared by two records of the same host, must
/// never lose a live template's files to the sweep. A stray copy of a live
/// template on a host that does not record it is left alone until the
/// template is purged, and swept after that.
pub(crate) fn key_is_owned(conn: &Connection, template: TemplateId) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM templates WHERE id = ?1)
                 OR EXISTS (SELECT 1 FROM placements WHERE template_id = ?1)
                 OR EXISTS (SELECT 1 FROM operations WHERE template_id = ?1)",
        )
        .and_then(|mut s| s.query_row(params![template], |r| r.get(0)))?)
}

/// A template by id, if it is ready.
pub(crate) fn get_ready_template(conn: &Connection, id: TemplateId) -> Result<Option<Template>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {TEMPLATE_COLS} FROM templates WHERE id = ?1 AND state = 'ready'"
        ))
        .and_then(|mut s| s.query_row([id], template_row).optional())?)
}

/// Queues an orphaned key for deletion and audits it as a system action,
/// unless something owns it by now. Returns whether it was queued.
pub(crate) fn queue_orphan(
    conn: &Connection,
    template: TemplateId,
    host: HostId,
    size_bytes: u64,
    now: Timestamp,
) -> Result<bool> {
    if key_is_owned(conn, template)? {
        return Ok(false);
    }
    conn.prepare_cached(
        "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'deleting', ?4, ?4, ?4)",
    )
    .and_then(|mut s| s.execute(params![template, host, TeamId::PLATFORM, now.unix_millis()]))?;
    insert_audit(
        conn,
        &NewAuditEntry {
            team: TeamId::PLATFORM,
            actor: Actor::System,
            action: crate::audit::actions::ORPHAN_SWEEP,
            resource_id: template.to_string(),
            outcome: AuditOutcome::Success,
            error_code: None,
            metadata: serde_json::json!({
                "host_id": host.to_string(),
                "size_bytes": size_bytes,
            }),
        },
        now,
    )?;
    Ok(true)
}

// ----------------------------------------------------------------- keys

pub(crate) fn create_team(conn: &Connection, id: TeamId, name: &str, now: Timestamp) -> Result<()> {
    conn.prepare_cached("INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute(params![id, name, now.unix_millis()]))?;
    Ok(())
}

pub(crate) fn create_key(conn: &Connection, key: &KeyRecord, now: Timestamp) -> Result<()> {
    let known: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM teams WHERE id = ?1)")
        .and_then(|mut s| s.query_row([key.team], |r| r.get(0)))?;
    if !known {
        return Err(Error::not_found(format!("team {} not found", key.team)));
    }
    conn.prepare_cached(
        "INSERT INTO api_keys (id, team_id, name, secret_hash, admin, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            key.id,
            key.team,
            key.name,
            &key.secret_hash[..],
            key.admin,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

pub(crate) fn revoke_key(conn: &Connection, id: ApiKeyId, now: Timestamp) -> Result<bool> {
    let changed = conn
        .prepare_cached("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
        .and_then(|mut s| s.execute(params![id, now.unix_millis()]))?;
    Ok(changed == 1)
}

pub(crate) fn find_key(conn: &Connection, id: ApiKeyId) -> Result<Option<KeyRecord>> {
    let row = conn
        .prepare_cached(
            "SELECT team_id, name, secret_hash, admin FROM api_keys
             WHERE id = ?1 AND revoked_at IS NULL",
        )
        .and_then(|mut s| {
            s.query_row([id], |r| {
                Ok((
                    r.get::<_, TeamId>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })
            .optional()
        })?;
    Ok(row.and_then(|(team, name, hash, admin)| {
        // A hash of the wrong length matches no key.
        let secret_hash: [u8; 32] = hash.try_into().ok()?;
        Some(KeyRecord {
            id,
            team,
            name,
            secret_hash,
            admin,
        })
    }))
}
