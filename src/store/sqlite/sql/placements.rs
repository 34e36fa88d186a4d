//! Placements and the deletion queue: a delete's transaction, the hosts'
//! answers, claims with leases, and the orphan sweep's queueing.

#[allow(clippy::wildcard_imports)]
use super::*;

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
                               lease_until = NULL, claim = NULL,
                               updated_at = ?5
         WHERE template_id = ?1 AND host_id = ?2 AND state = 'deleting' AND claim IS ?6",
    )
    .and_then(|mut s| {
        s.execute(params![
            d.template_id,
            d.host.id,
            next_attempt.unix_millis(),
            error,
            now.unix_millis(),
            d.claim.as_ref().map(|c| c.as_bytes().to_vec())
        ])
    })?;
    Ok(())
}

/// Takes up to `limit` due deletions (skipping hosts marked offline and
/// the hosts in `skip_hosts`, whose work is in hand; with `only`, that
/// host's alone) and leases them until `lease_until` so nobody else tries
/// them meanwhile. A key whose create is still unresolved is not due: its
/// host may still be writing it; nor are a template's files on a host a
/// restore from it is in flight on.
///
/// At most [`DELETIONS_PER_HOST`] per host, so that one slow host cannot
/// fill a batch that every other host then waits on; each host's share is
/// read from the front of its own queue (`placements_due_by_host`), so a
/// claim costs the rows it takes, however long a host's queue has grown.
pub(crate) fn claim_due_deletions(
    conn: &Connection,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
    skip_hosts: &[HostId],
    only: Option<HostId>,
) -> Result<Vec<Deletion>> {
    let hosts: Vec<HostId> = conn
        .prepare_cached(
            "SELECT id FROM hosts
             WHERE status <> 'offline' AND (?2 IS NULL OR id = ?2)
               AND id NOT IN (SELECT unhex(value) FROM json_each(?1))",
        )
        .and_then(|mut s| {
            s.query_map(
                params![hex_blobs(skip_hosts.iter().map(HostId::as_blob)), only],
                |r| r.get(0),
            )
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        })?;
    let mut front = conn.prepare_cached(
        "SELECT p.template_id, p.team_id, p.host_id, h.address, p.attempts, p.next_attempt
         FROM placements p INDEXED BY placements_due_by_host JOIN hosts h ON h.id = p.host_id
         WHERE p.host_id = ?1 AND p.state = 'deleting' AND p.next_attempt <= ?2
           AND coalesce(p.lease_until, 0) <= ?2
           AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.template_id = p.template_id)
           AND NOT EXISTS (SELECT 1 FROM restores r
                           WHERE r.template_id = p.template_id AND r.host_id = p.host_id)
         ORDER BY p.next_attempt LIMIT ?3",
    )?;
    let mut due: Vec<(i64, Deletion)> = Vec::new();
    for host in hosts {
        let rows = front
            .query_map(params![host, now.unix_millis(), DELETIONS_PER_HOST], |r| {
                Ok((r.get::<_, i64>(5)?, deletion_row(r)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
        due.extend(rows);
    }
    // The earliest due first, across hosts.
    due.sort_by_key(|(at, _)| *at);
    due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let claim = uuid::Uuid::new_v4();
    let mut lease = conn.prepare_cached(
        "UPDATE placements SET lease_until = ?3, claim = ?4 WHERE template_id = ?1 AND host_id = ?2",
    )?;
    let mut claimed = Vec::with_capacity(due.len());
    for (_, mut d) in due {
        lease.execute(params![
            d.template_id,
            d.host.id,
            lease_until.unix_millis(),
            &claim.as_bytes()[..]
        ])?;
        d.claim = Some(claim);
        claimed.push(d);
    }
    Ok(claimed)
}

pub(super) fn hex_blobs<'a>(blobs: impl Iterator<Item = &'a [u8; 16]>) -> String {
    let items: Vec<String> = blobs
        .map(|b| {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("\"{hex}\"")
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// The earliest time any queued work not in hand becomes due, if any.
/// Deletions are looked for per host: the front of each host's queue that
/// no attempt holds, and the leases of those attempts (when they lapse).
pub(crate) fn next_due(conn: &Connection, in_hand: &InHand) -> Result<Option<Timestamp>> {
    let at: Option<i64> = conn
        .prepare_cached(
            "SELECT min(t) FROM (
                 SELECT (SELECT p.next_attempt
                         FROM placements p INDEXED BY placements_due_by_host
                         WHERE p.host_id = h.id AND p.state = 'deleting'
                           AND p.lease_until IS NULL
                           AND NOT EXISTS (SELECT 1 FROM operations o
                                           WHERE o.template_id = p.template_id)
                           AND NOT EXISTS (SELECT 1 FROM restores r
                                           WHERE r.template_id = p.template_id
                                             AND r.host_id = p.host_id)
                         ORDER BY p.next_attempt LIMIT 1) AS t
                 FROM hosts h
                 WHERE h.status <> 'offline'
                   AND h.id NOT IN (SELECT unhex(value) FROM json_each(?1))
                 UNION ALL
                 SELECT min(max(p.next_attempt, p.lease_until))
                 FROM placements p INDEXED BY placements_leased JOIN hosts h ON h.id = p.host_id
                 WHERE p.state = 'deleting' AND p.lease_until IS NOT NULL
                   AND h.status <> 'offline'
                   AND p.host_id NOT IN (SELECT unhex(value) FROM json_each(?1))
                   AND NOT EXISTS (SELECT 1 FROM operations o
                                   WHERE o.template_id = p.template_id)
                   AND NOT EXISTS (SELECT 1 FROM restores r
                                   WHERE r.template_id = p.template_id AND r.host_id = p.host_id)
                 UNION ALL
                 SELECT min(o.next_attempt) FROM operations o
                 WHERE o.host_id NOT IN (SELECT unhex(value) FROM json_each(?1))
                   AND o.template_id NOT IN (SELECT unhex(value) FROM json_each(?2))
                   AND coalesce(o.id, x'') NOT IN (SELECT unhex(value) FROM json_each(?3))
                 UNION ALL
                 SELECT min(r.next_attempt) FROM restores r
                 WHERE r.host_id NOT IN (SELECT unhex(value) FROM json_each(?1))
                   AND r.id NOT IN (SELECT unhex(value) FROM json_each(?4))
                   AND r.id NOT IN (SELECT unhex(value) FROM json_each(?3))
                 UNION ALL
                 SELECT min(max(d.next_attempt, coalesce(d.lease_until, 0)))
                 FROM sandbox_destroys d JOIN hosts h ON h.id = d.host_id
                 WHERE d.state = 'queued' AND h.status <> 'offline'
                   AND d.host_id NOT IN (SELECT unhex(value) FROM json_each(?1)))",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    hex_blobs(in_hand.hosts.iter().map(HostId::as_blob)),
                    hex_blobs(in_hand.creates.iter().map(TemplateId::as_blob)),
                    hex_blobs(in_hand.operations.iter().map(OperationId::as_blob)),
                    hex_blobs(in_hand.restores.iter().map(OperationId::as_blob)),
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
        "UPDATE placements SET lease_until = NULL, claim = NULL WHERE lease_until IS NOT NULL",
        [],
    )?;
    conn.execute(
        "UPDATE operations SET next_attempt = 0 WHERE phase = 'started'",
        [],
    )?;
    conn.execute(
        "UPDATE restores SET next_attempt = 0 WHERE attempts = 0",
        [],
    )?;
    conn.execute(
        "UPDATE sandbox_destroys SET lease_until = NULL, claim = NULL WHERE lease_until IS NOT NULL",
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
                 OR EXISTS (SELECT 1 FROM operations WHERE template_id = ?1)
                 OR EXISTS (SELECT 1 FROM restores WHERE template_id = ?1)",
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
