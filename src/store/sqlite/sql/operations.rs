//! The operations journal: a create's transactions (begin, finish, fail,
//! resolve), the worker's view of open entries, and what is due.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) const OP_COLS: &str =
    "o.template_id, o.team_id, o.template_name, o.sandbox_id, o.host_id,
    coalesce(h.address, ''), o.prev_status, o.replaces, o.actor_type, o.actor_id, o.actor_name,
    o.attempts, o.id, o.created_at";

pub(super) fn op_row(row: &Row<'_>) -> rusqlite::Result<CreateOp> {
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
        .prepare_cached(
            "SELECT sum(n), min(m) FROM (
                 SELECT count(*) AS n, min(created_at) AS m FROM operations
                 UNION ALL SELECT count(*), min(created_at) FROM restores)",
        )
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
pub(super) fn operation_phase(conn: &Connection, template: TemplateId) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT phase FROM operations WHERE template_id = ?1")
        .and_then(|mut s| s.query_row([template], |r| r.get(0)).optional())?)
}

pub(super) fn delete_operation(conn: &Connection, template: TemplateId) -> Result<bool> {
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
        owner,
        request,
        expires_at,
    } = input;
    let (team, sandbox_id, overwrite, template_id) = (*team, *sandbox_id, *overwrite, *template_id);
    // First: a request with the same key that began meanwhile is 409
    // `idempotency_in_progress`, not whatever its writes make of ours.
    if let Some(request) = request {
        insert_request(conn, *operation_id, team, request, now)?;
    }
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
    check_quota(conn, team, replaces.is_some())?;
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
                                source_sandbox_id, replaces, created_at, updated_at, expires_at)
         VALUES (?1, ?2, ?3, 'snapshot', 'creating', ?4, ?5, 0, ?6, ?7, ?8, ?8,
                 coalesce(?9, ?8 + 1000 * (SELECT default_ttl FROM team_retention
                                           WHERE team_id = ?2)))",
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
            now_ms,
            expires_at.map(Timestamp::unix_millis)
        ])
    })?;
    conn.prepare_cached(
        "INSERT INTO operations (kind, phase, template_id, team_id, template_name, sandbox_id,
                                 host_id, prev_status, replaces, actor_type, actor_id, actor_name,
                                 created_at, updated_at, id, next_attempt, owner)
         VALUES ('create', 'started', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12, ?13,
                 ?14)",
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
            lease_until.unix_millis(),
            owner
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
pub(super) fn mark_deleting(
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
    let claim = uuid::Uuid::new_v4();
    // Files a restore in flight starts from are not leased to the caller:
    // the worker deletes them once that restore is over.
    conn.prepare_cached(
        "UPDATE placements SET state = 'deleting', attempts = 0, next_attempt = ?3,
                               lease_until = CASE WHEN EXISTS (
                                   SELECT 1 FROM restores r WHERE r.template_id = ?1
                                   AND r.host_id = placements.host_id) THEN NULL ELSE ?2 END,
                               claim = ?4, updated_at = ?3
         WHERE template_id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            template,
            lease_until.unix_millis(),
            now.unix_millis(),
            &claim.as_bytes()[..]
        ])
    })?;
    let mut stmt = conn.prepare_cached(
        "SELECT p.template_id, p.team_id, p.host_id, h.address, p.attempts,
                p.lease_until IS NOT NULL
             FROM placements p JOIN hosts h ON h.id = p.host_id
             WHERE p.template_id = ?1",
    )?;
    // The caller tries the leased ones now; those an open restore holds
    // (no claim) are only reported, and the worker deletes them later.
    let targets = stmt
        .query_map([template], |r| {
            let mut d = deletion_row(r)?;
            if r.get::<_, bool>(5)? {
                d.claim = Some(claim);
            }
            Ok(d)
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    purge_if_done(conn, template)?;
    Ok(targets)
}

pub(super) fn deletion_row(row: &Row<'_>) -> rusqlite::Result<Deletion> {
    Ok(Deletion {
        template_id: row.get(0)?,
        team: row.get(1)?,
        host: HostTarget {
            id: row.get(2)?,
            address: row.get(3)?,
        },
        attempts: u32_col(row, 4)?,
        claim: None,
    })
}

pub(super) fn purge_if_done(conn: &Connection, template: TemplateId) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM templates WHERE id = ?1 AND state = 'deleting'
           AND NOT EXISTS (SELECT 1 FROM placements WHERE template_id = ?1)",
    )
    .and_then(|mut s| s.execute([template]))?;
    Ok(())
}

/// Whether the journal entry of `template` is open in `phase`.
pub(super) fn operation_in_phase(
    conn: &Connection,
    template: TemplateId,
    phase: &str,
) -> Result<bool> {
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
    compat: Option<&crate::agent::HostInfo>,
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
                                  created_at = ?3, updated_at = ?3,
                                  compat = coalesce(?4, (SELECT host_info FROM hosts
                                                         WHERE id = ?5))
             WHERE id = ?1 AND state = 'creating'",
        )
        .and_then(|mut s| {
            s.execute(params![
                op.template_id,
                clamp_i64(size_bytes),
                now.unix_millis(),
                host_info_json(compat),
                op.host.id,
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
    let result = crate::operation::encode_template(&template);
    end_request(
        conn,
        op.id,
        crate::operation::OperationState::Succeeded,
        &result,
        now,
    )?;
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
    failure: &Failure,
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
                    failure.detail,
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
    let result = crate::operation::encode_error(failure.code, &failure.message);
    end_request(
        conn,
        op.id,
        crate::operation::OperationState::Failed,
        &result,
        now,
    )?;
    insert_audit(
        conn,
        &NewAuditEntry {
            team: op.team,
            actor: op.actor.clone(),
            action: crate::audit::actions::SNAPSHOT_CREATE,
            resource_id: op.template_id.to_string(),
            outcome: AuditOutcome::Failure,
            error_code: Some(failure.code),
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
            &Failure::unresolved(reason),
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

pub(crate) fn list_open_operations(conn: &Connection) -> Result<Vec<OpenOperation>> {
    let mut stmt = conn.prepare_cached(
        "SELECT template_id, team_id, template_name, sandbox_id, host_id, phase, attempts,
                last_error, created_at, id, owner
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
                owner: r.get(10)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}
