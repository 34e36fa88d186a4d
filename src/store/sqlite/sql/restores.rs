//! Restores (SPEC §7, §4a "Restore"): where a template can run, the
//! restore journal's transactions, and the queue of sandboxes to destroy.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The hosts `template` can be restored on (see `Store::restore_candidates`).
pub(crate) fn restore_candidates(
    conn: &Connection,
    template: TemplateId,
) -> Result<Vec<RestoreCandidate>> {
    let placed: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM placements WHERE template_id = ?1)")
        .and_then(|mut s| s.query_row([template], |r| r.get(0)))?;
    let filter = if placed {
        "WHERE h.id IN (SELECT host_id FROM placements WHERE template_id = ?1
                        AND state = 'present')"
    } else {
        "WHERE ?1 IS NOT NULL"
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT h.id, h.address, h.status, h.last_heartbeat, h.host_info, h.host_info_at,
                (SELECT count(*) FROM sandboxes s
                 WHERE s.host_id = h.id AND s.status IN ('running', 'starting'))
         FROM hosts h {filter} ORDER BY h.id"
    ))?;
    let rows = stmt
        .query_map([template], |r| {
            Ok(RestoreCandidate {
                host: host_row(r)?,
                info: host_info_col(r, 4)?,
                info_known: r.get::<_, Option<i64>>(5)?.is_some(),
                load: u64_col(r, 6)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

pub(crate) fn set_host_info(
    conn: &Connection,
    host: HostId,
    info: Option<&crate::agent::HostInfo>,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached("UPDATE hosts SET host_info = ?2, host_info_at = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![host, host_info_json(info), now.unix_millis()]))?;
    Ok(())
}

/// Whether the store has ever known sandbox `id`: registered, being
/// restored, or queued for (or done with) destruction.
fn sandbox_id_used(conn: &Connection, id: SandboxId) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)
                 OR EXISTS (SELECT 1 FROM restores WHERE sandbox_id = ?1)
                 OR EXISTS (SELECT 1 FROM sandbox_destroys WHERE sandbox_id = ?1)",
        )
        .and_then(|mut s| s.query_row([id], |r| r.get(0)))?)
}

/// Step one of a restore, in one transaction (see `Store::begin_restore`).
pub(crate) fn begin_restore(
    conn: &Connection,
    input: &RestoreInput,
    now: Timestamp,
) -> Result<Sandbox> {
    let op = &input.op;
    // First, as for a create (see `begin_create`).
    if let Some(request) = &input.request {
        insert_request(conn, op.id, op.team, request, now)?;
    }
    let visible: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM templates WHERE id = ?1 AND state = 'ready'
                            AND team_id IN (?2, ?3))",
        )
        .and_then(|mut s| {
            s.query_row(params![op.template_id, op.team, TeamId::PLATFORM], |r| {
                r.get(0)
            })
        })?;
    if !visible {
        return Err(Error::not_found("template not found"));
    }
    if sandbox_id_used(conn, op.sandbox_id)? {
        return Err(Error::new(
            ErrorCode::AlreadyExists,
            format!("sandbox id {} is already in use", op.sandbox_id),
        ));
    }
    let gone = || {
        Error::new(
            ErrorCode::HostUnavailable,
            "the chosen host is no longer online",
        )
    };
    let host = get_host(conn, op.host.id)?.ok_or_else(gone)?;
    if host.status != HostStatus::Online || host.address.is_empty() {
        return Err(gone());
    }
    if input.placed {
        let present: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM placements WHERE template_id = ?1
                                AND host_id = ?2 AND state = 'present')",
            )
            .and_then(|mut s| s.query_row(params![op.template_id, op.host.id], |r| r.get(0)))?;
        if !present {
            return Err(Error::new(
                ErrorCode::HostUnavailable,
                "the chosen host no longer holds the template",
            ));
        }
    }
    let now_ms = now.unix_millis();
    conn.prepare_cached(
        "INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at,
                                updated_at, template_id, template_name)
         VALUES (?1, ?2, ?3, 'starting', ?4, ?5, ?6, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            op.sandbox_id,
            op.team,
            op.host.id,
            op.vcpus,
            op.memory_mb,
            now_ms,
            op.template_id,
            op.template_name.as_str(),
        ])
    })?;
    conn.prepare_cached(
        "INSERT INTO restores (id, sandbox_id, team_id, template_id, template_name, host_id,
                               vcpus, memory_mb, timeout_sec, disk_size_mb, actor_type, actor_id,
                               actor_name, owner, next_attempt, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16)",
    )
    .and_then(|mut s| {
        s.execute(params![
            op.id,
            op.sandbox_id,
            op.team,
            op.template_id,
            op.template_name.as_str(),
            op.host.id,
            op.vcpus,
            op.memory_mb,
            op.timeout_sec,
            op.disk_size_mb,
            op.actor.kind(),
            op.actor.id_text(),
            op.actor.name_text(),
            input.owner,
            input.lease_until.unix_millis(),
            now_ms,
        ])
    })?;
    get_sandbox(conn, op.sandbox_id)?.ok_or_else(|| {
        StoreError::corrupt(format!(
            "sandbox {} vanished in its transaction",
            op.sandbox_id
        ))
        .into()
    })
}

/// The last step of a restore (see `Store::end_restore`).
pub(crate) fn end_restore(
    conn: &Connection,
    op: &RestoreOp,
    end: &RestoreEnd,
    now: Timestamp,
) -> Result<Option<Sandbox>> {
    let closed = conn
        .prepare_cached("DELETE FROM restores WHERE id = ?1")
        .and_then(|mut s| s.execute([op.id]))?;
    if closed != 1 {
        return Ok(None);
    }
    let now_ms = now.unix_millis();
    match end {
        RestoreEnd::Running => {
            conn.prepare_cached(
                "UPDATE sandboxes SET status = 'running', updated_at = ?2
                 WHERE id = ?1 AND status = 'starting'",
            )
            .and_then(|mut s| s.execute(params![op.sandbox_id, now_ms]))?;
            conn.prepare_cached("UPDATE templates SET last_used_at = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![op.template_id, now_ms]))?;
        }
        RestoreEnd::Failed { destroy_from, .. } => {
            conn.prepare_cached("DELETE FROM sandboxes WHERE id = ?1 AND status = 'starting'")
                .and_then(|mut s| s.execute([op.sandbox_id]))?;
            if let Some(from) = destroy_from {
                conn.prepare_cached(
                    "INSERT INTO sandbox_destroys (sandbox_id, host_id, team_id, state,
                                                   next_attempt, created_at, updated_at)
                     VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?5)
                     ON CONFLICT (sandbox_id) DO UPDATE SET state = 'queued',
                         next_attempt = excluded.next_attempt, updated_at = excluded.updated_at",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        op.sandbox_id,
                        op.host.id,
                        op.team,
                        from.unix_millis(),
                        now_ms
                    ])
                })?;
            }
        }
    };
    insert_audit(conn, &op.audit(end), now)?;
    let sandbox = match end {
        RestoreEnd::Running => get_sandbox(conn, op.sandbox_id)?,
        RestoreEnd::Failed { .. } => Some(op.failed_sandbox()),
    };
    let (state, result) = op.request_outcome(end, sandbox.as_ref());
    end_request(conn, op.id, state, &result, now)?;
    Ok(sandbox)
}

/// See `Store::requeue_destroy`.
pub(crate) fn requeue_destroy(
    conn: &Connection,
    op: &RestoreOp,
    from: Timestamp,
    now: Timestamp,
) -> Result<bool> {
    let queued = conn
        .prepare_cached(
            "INSERT INTO sandbox_destroys (sandbox_id, host_id, team_id, state,
                                           next_attempt, created_at, updated_at)
             SELECT ?1, ?2, ?3, 'queued', ?4, ?5, ?5
             WHERE NOT EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)
               AND NOT EXISTS (SELECT 1 FROM restores WHERE sandbox_id = ?1)
             ON CONFLICT (sandbox_id) DO UPDATE SET state = 'queued',
                 next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,
                 lease_until = NULL, claim = NULL",
        )
        .and_then(|mut s| {
            s.execute(params![
                op.sandbox_id,
                op.host.id,
                op.team,
                from.unix_millis(),
                now.unix_millis()
            ])
        })?;
    Ok(queued == 1)
}

pub(crate) fn postpone_restore(
    conn: &Connection,
    id: OperationId,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE restores SET attempts = attempts + 1, next_attempt = ?2, last_error = ?3,
                             updated_at = ?4
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            next_attempt.unix_millis(),
            error,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

fn restore_row(r: &Row<'_>) -> rusqlite::Result<RestoreOp> {
    Ok(RestoreOp {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        team: r.get(2)?,
        template_id: r.get(3)?,
        template_name: TemplateName::from_trusted(r.get(4)?),
        host: HostTarget {
            id: r.get(5)?,
            address: r.get(6)?,
        },
        vcpus: u32_col(r, 7)?,
        memory_mb: u32_col(r, 8)?,
        timeout_sec: u32_col(r, 9)?,
        disk_size_mb: u32_col(r, 10)?,
        actor: actor_from_columns(&r.get::<_, String>(11)?, r.get(12)?, r.get(13)?),
        attempts: u32_col(r, 14)?,
        created_at: Timestamp::from_unix_millis(r.get(15)?),
    })
}

pub(crate) fn open_restores(
    conn: &Connection,
    due_before: Option<Timestamp>,
) -> Result<Vec<RestoreOp>> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.id, r.sandbox_id, r.team_id, r.template_id, r.template_name, r.host_id,
                coalesce(h.address, ''), r.vcpus, r.memory_mb, r.timeout_sec, r.disk_size_mb,
                r.actor_type, r.actor_id, r.actor_name, r.attempts, r.created_at
         FROM restores r LEFT JOIN hosts h ON h.id = r.host_id
         WHERE ?1 IS NULL OR r.next_attempt <= ?1 ORDER BY r.created_at, r.id",
    )?;
    let rows = stmt
        .query_map([due_before.map(Timestamp::unix_millis)], restore_row)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// Takes up to `limit` due destroys and leases them until `lease_until`.
pub(crate) fn claim_due_destroys(
    conn: &Connection,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
    skip_hosts: &[HostId],
) -> Result<Vec<Destroy>> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.sandbox_id, d.team_id, d.host_id, h.address, d.attempts
         FROM sandbox_destroys d JOIN hosts h ON h.id = d.host_id
         WHERE d.state = 'queued' AND d.next_attempt <= ?1
           AND coalesce(d.lease_until, 0) <= ?1 AND h.status <> 'offline'
           AND d.host_id NOT IN (SELECT unhex(value) FROM json_each(?3))
         ORDER BY d.next_attempt LIMIT ?2",
    )?;
    let mut due = stmt
        .query_map(
            params![
                now.unix_millis(),
                limit,
                hex_blobs(skip_hosts.iter().map(HostId::as_blob))
            ],
            |r| {
                Ok(Destroy {
                    sandbox_id: r.get(0)?,
                    team: r.get(1)?,
                    host: HostTarget {
                        id: r.get(2)?,
                        address: r.get(3)?,
                    },
                    attempts: u32_col(r, 4)?,
                    claim: None,
                })
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    let claim = uuid::Uuid::new_v4();
    let mut lease = conn.prepare_cached(
        "UPDATE sandbox_destroys SET lease_until = ?2, claim = ?3 WHERE sandbox_id = ?1",
    )?;
    for d in &mut due {
        lease.execute(params![
            d.sandbox_id,
            lease_until.unix_millis(),
            &claim.as_bytes()[..]
        ])?;
        d.claim = Some(claim);
    }
    Ok(due)
}

pub(crate) fn record_destroy(
    conn: &Connection,
    d: &Destroy,
    result: &crate::store::DeletionResult,
    now: Timestamp,
) -> Result<()> {
    let claim = d.claim.as_ref().map(|c| c.as_bytes().to_vec());
    match result {
        crate::store::DeletionResult::Confirmed => conn
            .prepare_cached(
                "UPDATE sandbox_destroys SET state = 'destroyed', lease_until = NULL,
                        claim = NULL, last_error = NULL, updated_at = ?2
                 WHERE sandbox_id = ?1 AND state = 'queued' AND claim IS ?3",
            )
            .and_then(|mut s| s.execute(params![d.sandbox_id, now.unix_millis(), claim]))?,
        crate::store::DeletionResult::Failed { error, retry_at } => conn
            .prepare_cached(
                "UPDATE sandbox_destroys SET attempts = attempts + 1, next_attempt = ?2,
                        last_error = ?3, lease_until = NULL, claim = NULL, updated_at = ?4
                 WHERE sandbox_id = ?1 AND state = 'queued' AND claim IS ?5",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.sandbox_id,
                    retry_at.unix_millis(),
                    error,
                    now.unix_millis(),
                    claim
                ])
            })?,
    };
    Ok(())
}

pub(crate) fn pending_destroys(conn: &Connection) -> Result<Vec<PendingDestroy>> {
    let mut stmt = conn.prepare_cached(
        "SELECT sandbox_id, team_id, host_id, attempts, last_error, next_attempt
         FROM sandbox_destroys WHERE state = 'queued' ORDER BY host_id, next_attempt",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(PendingDestroy {
                sandbox: r.get(0)?,
                team: r.get(1)?,
                host: r.get(2)?,
                attempts: u32_col(r, 3)?,
                last_error: r.get(4)?,
                next_attempt: Timestamp::from_unix_millis(r.get(5)?),
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}
