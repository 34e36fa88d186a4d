//! Hosts, sandboxes, and ready templates registered from outside. A row
//! that is read and then written is locked first (`FOR UPDATE`), so that a
//! concurrent snapshot of a sandbox, or a change of a host by another
//! replica, waits instead of being overwritten.

use deadpool_postgres::GenericClient;

use super::placements::insert_placement;
use super::rows::{
    BlobId, HOST_COLS, Param, SANDBOX_COLS, all, big, execute, get, get_enum, host_info_json,
    host_row, opt_bytes, prepare_all, query, query_one, query_opt, sandbox_row,
};
use super::templates::{check_name_free, name_race_error, overwrite_in_progress};
use super::{TxError, TxResult};
use crate::error::{Error, ErrorCode};
use crate::ids::{HostId, SandboxId};
use crate::model::{Host, HostStatus, Sandbox, SandboxStatus, Template, Timestamp};
use crate::names::TemplateName;
use crate::store::HostChange;

// ---------------------------------------------------------------- hosts

pub(super) async fn get_host(db: &impl GenericClient, id: HostId) -> TxResult<Option<Host>> {
    let row = query_opt(
        db,
        "SELECT id, address, status, last_heartbeat FROM hosts WHERE id = $1",
        &[&id.bytes()],
    )
    .await?;
    Ok(row.as_ref().map(host_row).transpose()?)
}

/// The host's current status, locked until the transaction ends.
async fn lock_host_status(db: &impl GenericClient, id: HostId) -> TxResult<Option<HostStatus>> {
    let row = query_opt(
        db,
        &format!("SELECT {HOST_COLS} FROM hosts WHERE id = $1 FOR UPDATE"),
        &[&id.bytes()],
    )
    .await?;
    Ok(row.as_ref().map(host_row).transpose()?.map(|h| h.status))
}

pub(super) async fn list_hosts(db: &impl GenericClient) -> TxResult<Vec<Host>> {
    let rows = query(
        db,
        &format!("SELECT {HOST_COLS} FROM hosts ORDER BY created_at, id"),
        &[],
    )
    .await?;
    Ok(all(&rows, host_row)?)
}

/// Registers a host or replaces its address and status. Returns the host
/// and whether it just came online (its queued work is then due now).
///
/// Two replicas registering one new host at the same moment may both
/// report it as just come online (neither saw the other's row): its work
/// is then made due twice, which is harmless.
pub(super) async fn upsert_host(
    db: &impl GenericClient,
    id: HostId,
    address: &str,
    status: HostStatus,
    now: Timestamp,
) -> TxResult<(Host, bool)> {
    let previous = lock_host_status(db, id).await?;
    execute(
        db,
        "INSERT INTO hosts (id, address, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (id) DO UPDATE SET address = excluded.address, status = excluded.status,
                                        updated_at = excluded.updated_at",
        &[&id.bytes(), &address, &status.as_str(), &now.unix_millis()],
    )
    .await?;
    let came_online = status == HostStatus::Online && previous != Some(HostStatus::Online);
    if came_online {
        make_host_work_due(db, id, now).await?;
    }
    let host = get_host(db, id)
        .await?
        .ok_or_else(|| Error::not_found("host not found"))?;
    Ok((host, came_online))
}

/// Applies `change` to a host. When the host becomes online, its queued
/// work is made due now. Returns whether it just came online.
pub(super) async fn update_host(
    db: &impl GenericClient,
    id: HostId,
    change: &HostChange,
    now: Timestamp,
) -> TxResult<bool> {
    let previous = lock_host_status(db, id)
        .await?
        .ok_or_else(|| Error::not_found(format!("host {id} not found")))?;
    let mut status = change.status.unwrap_or(previous);
    if change.heartbeat && matches!(status, HostStatus::Pending | HostStatus::Unreachable) {
        status = HostStatus::Online;
    }
    execute(
        db,
        "UPDATE hosts SET status = $2, address = coalesce($3, address),
                          last_heartbeat = CASE WHEN $4 THEN $5 ELSE last_heartbeat END,
                          updated_at = $5
         WHERE id = $1",
        &[
            &id.bytes(),
            &status.as_str(),
            &change.address,
            &change.heartbeat,
            &now.unix_millis(),
        ],
    )
    .await?;
    let came_online = status == HostStatus::Online && previous != HostStatus::Online;
    if came_online {
        make_host_work_due(db, id, now).await?;
    }
    Ok(came_online)
}

async fn make_host_work_due(db: &impl GenericClient, host: HostId, now: Timestamp) -> TxResult<()> {
    execute(
        db,
        "UPDATE placements SET next_attempt = $2 WHERE host_id = $1 AND state = 'deleting'",
        &[&host.bytes(), &now.unix_millis()],
    )
    .await?;
    // Creates still driven by their task (phase `started`, never postponed)
    // keep their lease: they are not the worker's to retry.
    execute(
        db,
        "UPDATE operations SET next_attempt = $2
         WHERE host_id = $1 AND (phase = 'resolving' OR attempts > 0)",
        &[&host.bytes(), &now.unix_millis()],
    )
    .await?;
    execute(
        db,
        "UPDATE sandbox_destroys SET next_attempt = $2
         WHERE host_id = $1 AND state = 'queued' AND attempts > 0",
        &[&host.bytes(), &now.unix_millis()],
    )
    .await?;
    // Likewise restores: only those the worker backed off.
    execute(
        db,
        "UPDATE restores SET next_attempt = $2 WHERE host_id = $1 AND attempts > 0",
        &[&host.bytes(), &now.unix_millis()],
    )
    .await?;
    // What it runs may have changed while it was away: ask again.
    execute(
        db,
        "UPDATE hosts SET host_info_at = NULL WHERE id = $1",
        &[&host.bytes()],
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------ sandboxes

pub(super) async fn get_sandbox(
    db: &impl GenericClient,
    id: SandboxId,
) -> TxResult<Option<Sandbox>> {
    let row = query_opt(
        db,
        &format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = $1"),
        &[&id.bytes()],
    )
    .await?;
    Ok(row.as_ref().map(sandbox_row).transpose()?)
}

static LOCK_SANDBOX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = $1 FOR UPDATE")
});

/// Whether a restore of the sandbox is in flight (it owns the sandbox).
const RESTORE_OPEN: &str = "SELECT EXISTS (SELECT 1 FROM restores WHERE sandbox_id = $1)";

/// The sandbox, locked until the transaction ends (a snapshot of it, or
/// any other change, by another transaction waits), and whether a restore
/// of it is open. One round trip: the second statement runs once the lock
/// is had, on a snapshot of its own, so it sees what a restore that held
/// the row committed meanwhile (`begin_restore` writes the sandbox row and
/// the journal entry together; `end_restore` closes the entry and changes
/// the row together).
async fn lock_sandbox(db: &impl GenericClient, id: SandboxId) -> TxResult<(Option<Sandbox>, bool)> {
    prepare_all(db, &[LOCK_SANDBOX.as_str(), RESTORE_OPEN]).await?;
    let id_bytes = id.bytes();
    let params: [Param<'_>; 1] = [&id_bytes];
    let (row, open) = tokio::join!(
        query_opt(db, &LOCK_SANDBOX, &params),
        query_one(db, RESTORE_OPEN, &params)
    );
    let sandbox = row?.as_ref().map(sandbox_row).transpose()?;
    let open: bool = get(&open?, 0)?;
    Ok((sandbox, open))
}

pub(super) fn sandbox_busy(id: SandboxId) -> Error {
    Error::conflict(format!(
        "sandbox {id} is being snapshotted or restored; try again when that finishes"
    ))
}

/// Registers or replaces a sandbox. A sandbox owned by an operation
/// (`snapshotting`) cannot be changed here.
pub(super) async fn upsert_sandbox(
    db: &impl GenericClient,
    sandbox: &Sandbox,
    now: Timestamp,
) -> TxResult<()> {
    let (existing, restoring) = lock_sandbox(db, sandbox.id).await?;
    if let Some(existing) = &existing
        && (existing.status == SandboxStatus::Snapshotting || restoring)
    {
        return Err(sandbox_busy(sandbox.id).into());
    }
    if sandbox.status == SandboxStatus::Snapshotting {
        return Err(Error::invalid_request(
            "only a snapshot operation may set a sandbox to snapshotting",
        )
        .into());
    }
    if let Some(host) = sandbox.host
        && get_host(db, host).await?.is_none()
    {
        return Err(Error::not_found(format!("host {host} not found")).into());
    }
    let template_name = sandbox.template.as_ref().map(TemplateName::as_str);
    let params: [Param<'_>; 9] = [
        &sandbox.id.bytes(),
        &sandbox.team.bytes(),
        &opt_bytes(&sandbox.host),
        &sandbox.status.as_str(),
        &i64::from(sandbox.vcpus),
        &i64::from(sandbox.memory_mb),
        &now.unix_millis(),
        &opt_bytes(&sandbox.template_id),
        &template_name,
    ];
    if existing.is_some() {
        // Locked above: nobody changed or removed it since.
        execute(
            db,
            "UPDATE sandboxes SET team_id = $2, host_id = $3, status = $4, vcpus = $5,
                                  memory_mb = $6, updated_at = $7
             WHERE id = $1",
            &params[..7],
        )
        .await?;
        return Ok(());
    }
    // New: a row inserted meanwhile by another transaction (a restore of
    // this id, or another registration) was not checked above. Then run
    // again: the check sees it (a restore in flight answers 409).
    let inserted = execute(
        db,
        "INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at,
                                updated_at, template_id, template_name)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9)
         ON CONFLICT (id) DO NOTHING",
        &params,
    )
    .await?;
    if inserted == 0 {
        return Err(TxError::Retry(sandbox_busy(sandbox.id)));
    }
    Ok(())
}

/// Changes a sandbox's status, optionally only from `expected`. A sandbox
/// owned by a snapshot operation answers 409.
pub(super) async fn set_sandbox_status(
    db: &impl GenericClient,
    id: SandboxId,
    expected: Option<SandboxStatus>,
    status: SandboxStatus,
    now: Timestamp,
) -> TxResult<Sandbox> {
    let (current, restoring) = lock_sandbox(db, id).await?;
    let current = current.ok_or_else(|| Error::not_found("sandbox not found"))?;
    if current.status == SandboxStatus::Snapshotting
        || status == SandboxStatus::Snapshotting
        || restoring
    {
        return Err(sandbox_busy(id).into());
    }
    if let Some(expected) = expected
        && current.status != expected
    {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!("sandbox {id} is {}, not {expected}", current.status),
        )
        .into());
    }
    execute(
        db,
        "UPDATE sandboxes SET status = $2, updated_at = $3 WHERE id = $1",
        &[&id.bytes(), &status.as_str(), &now.unix_millis()],
    )
    .await?;
    Ok(Sandbox { status, ..current })
}

pub(super) async fn remove_sandbox(db: &impl GenericClient, id: SandboxId) -> TxResult<()> {
    let (current, restoring) = lock_sandbox(db, id).await?;
    let current = current.ok_or_else(|| Error::not_found("sandbox not found"))?;
    if current.status == SandboxStatus::Snapshotting || restoring {
        return Err(sandbox_busy(id).into());
    }
    execute(db, "DELETE FROM sandboxes WHERE id = $1", &[&id.bytes()]).await?;
    Ok(())
}

/// Sets the status an operation decided on, only if the operation still
/// owns the sandbox.
const RELEASE_SANDBOX: &str =
    "UPDATE sandboxes SET status = $2, updated_at = $3 WHERE id = $1 AND status = 'snapshotting'";

pub(super) async fn release_sandbox(
    db: &impl GenericClient,
    id: SandboxId,
    status: SandboxStatus,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        RELEASE_SANDBOX,
        &[&id.bytes(), &status.as_str(), &now.unix_millis()],
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------ templates

/// Registers a ready template whose files already exist on `hosts` (base
/// images, or templates copied by other means).
pub(super) async fn insert_ready_template(
    db: &impl GenericClient,
    template: &Template,
    hosts: &[HostId],
    now: Timestamp,
) -> TxResult<()> {
    check_name_free(db, template.team, &template.name, false).await?;
    let inserted = execute(
        db,
        "INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                source_sandbox_id, created_at, updated_at, compat)
         VALUES ($1, $2, $3, $4, 'ready', $5, $6, $7, $8, $9, $9, $10)",
        &[
            &template.id.bytes(),
            &template.team.bytes(),
            &template.name.as_str(),
            &template.template_type.as_str(),
            &i64::from(template.vcpus),
            &i64::from(template.memory_mb),
            &big(template.size_bytes),
            &opt_bytes(&template.source_sandbox),
            &template.created_at.unix_millis(),
            &host_info_json(template.compat.as_ref()),
        ],
    )
    .await;
    if let Err(err) = inserted {
        return Err(lost_name_race(err, false));
    }
    for host in hosts {
        if get_host(db, *host).await?.is_none() {
            return Err(Error::not_found(format!("host {host} not found")).into());
        }
        insert_placement(db, template.id, *host, template.team, "present", now).await?;
    }
    Ok(())
}

/// A failed insert of a template row: a unique violation of a name index
/// means a concurrent transaction took the name since the check (its row
/// is now committed, or it still waits): the transaction is run again,
/// and its check then gives exactly the error SQLite's would.
pub(super) fn lost_name_race(err: tokio_postgres::Error, overwrite: bool) -> TxError {
    if super::rows::violates(&err, "templates_name_per_team") {
        TxError::Retry(name_race_error(overwrite))
    } else if super::rows::violates(&err, "templates_one_overwrite") {
        TxError::Retry(overwrite_in_progress())
    } else {
        err.into()
    }
}

/// The team's sandbox `id`, locked for the transaction (`FOR UPDATE`),
/// with its host's address and status (`None` when it has no host
/// record): one round trip.
pub(super) const SANDBOX_WITH_HOST: &str =
    "SELECT s.id, s.team_id, s.host_id, s.status, s.vcpus, s.memory_mb, s.template_id,
            s.template_name, s.created_at, h.address, h.status
     FROM sandboxes s LEFT JOIN hosts h ON h.id = s.host_id
     WHERE s.id = $1 AND s.team_id = $2 FOR UPDATE OF s";

pub(super) async fn lock_team_sandbox_with_host(
    db: &impl GenericClient,
    id: SandboxId,
    team: crate::ids::TeamId,
) -> TxResult<Option<(Sandbox, Option<(String, HostStatus)>)>> {
    let row = query_opt(db, SANDBOX_WITH_HOST, &[&id.bytes(), &team.bytes()]).await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let sandbox = sandbox_row(&row)?;
    let address: Option<String> = get(&row, 9)?;
    let host = match address {
        None => None,
        Some(address) => Some((address, get_enum(&row, 10)?)),
    };
    Ok(Some((sandbox, host)))
}
