//! Hosts and sandboxes: the registry the embedding application feeds,
//! and the sandbox compare-and-swap every operation goes through.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) const HOST_COLS: &str = "id, address, status, last_heartbeat";

pub(super) fn host_row(row: &Row<'_>) -> rusqlite::Result<Host> {
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

pub(super) fn make_host_work_due(conn: &Connection, host: HostId, now: Timestamp) -> Result<()> {
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
    // Destroys never tried keep their first attempt's time: the grace a
    // late-booting VM gets before a NotFound may be believed.
    conn.prepare_cached(
        "UPDATE sandbox_destroys SET next_attempt = ?2
         WHERE host_id = ?1 AND state = 'queued' AND attempts > 0",
    )
    .and_then(|mut s| s.execute(params![host, now.unix_millis()]))?;
    conn.prepare_cached(
        "UPDATE restores SET next_attempt = ?2 WHERE host_id = ?1 AND attempts > 0",
    )
    .and_then(|mut s| s.execute(params![host, now.unix_millis()]))?;
    // What it runs may have changed while it was away: ask again.
    conn.prepare_cached("UPDATE hosts SET host_info_at = NULL WHERE id = ?1")
        .and_then(|mut s| s.execute([host]))?;
    Ok(())
}

pub(super) const SANDBOX_COLS: &str =
    "id, team_id, host_id, status, vcpus, memory_mb, template_id, template_name, created_at";

pub(super) fn sandbox_row(row: &Row<'_>) -> rusqlite::Result<Sandbox> {
    Ok(Sandbox {
        id: row.get(0)?,
        team: row.get(1)?,
        host: row.get(2)?,
        status: row.get(3)?,
        vcpus: u32_col(row, 4)?,
        memory_mb: u32_col(row, 5)?,
        template_id: row.get(6)?,
        template: row
            .get::<_, Option<String>>(7)?
            .map(TemplateName::from_trusted),
        created_at: Timestamp::from_unix_millis(row.get(8)?),
    })
}

pub(crate) fn get_sandbox(conn: &Connection, id: SandboxId) -> Result<Option<Sandbox>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], sandbox_row).optional())?)
}

pub(super) fn sandbox_busy(id: SandboxId) -> Error {
    Error::conflict(format!(
        "sandbox {id} is being snapshotted or restored; try again when that finishes"
    ))
}

/// Whether a restore of sandbox `id` is in flight (it owns the sandbox).
pub(super) fn restore_open(conn: &Connection, id: SandboxId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM restores WHERE sandbox_id = ?1)")
        .and_then(|mut s| s.query_row([id], |r| r.get(0)))?)
}

/// Registers or replaces a sandbox. A sandbox owned by an operation
/// (`snapshotting`) cannot be changed here.
pub(crate) fn upsert_sandbox(conn: &Connection, sandbox: &Sandbox, now: Timestamp) -> Result<()> {
    if let Some(existing) = get_sandbox(conn, sandbox.id)?
        && (existing.status == SandboxStatus::Snapshotting || restore_open(conn, sandbox.id)?)
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
        "INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at,
                                updated_at, template_id, template_name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)
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
            now.unix_millis(),
            sandbox.template_id,
            sandbox.template.as_ref().map(TemplateName::as_str),
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
    if current.status == SandboxStatus::Snapshotting
        || status == SandboxStatus::Snapshotting
        || restore_open(conn, id)?
    {
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
    if current.status == SandboxStatus::Snapshotting || restore_open(conn, id)? {
        return Err(sandbox_busy(id));
    }
    conn.prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
        .and_then(|mut s| s.execute([id]))?;
    Ok(())
}

/// Sets the status an operation decided on, only if the operation still
/// owns the sandbox.
pub(super) fn release_sandbox(
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
