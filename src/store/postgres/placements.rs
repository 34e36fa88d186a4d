//! Deletes and the deletion queue: a template leaves get/list at once, its
//! placements are queued, and every replica's worker claims due deletions
//! with `FOR UPDATE SKIP LOCKED`, so that no deletion runs twice at once.

use deadpool_postgres::GenericClient;

use super::audit::insert_audit;
use super::rows::{
    BlobId, all, deletion_row, execute, get, get_id, get_time, get_u32, id_array, query, query_one,
};
use super::templates::{Lock, find_visible};
use super::{TxError, TxResult};
use crate::audit::{AuditOutcome, NewAuditEntry};
use crate::error::Error;
use crate::ids::{HostId, TeamId, TemplateId};
use crate::model::{Actor, Template, Timestamp};
use crate::names::TemplateName;
use crate::store::{DELETIONS_PER_HOST, Deletion, PendingDeletion, StoreError};

const INSERT_PLACEMENT: &str = "INSERT INTO placements
         (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $5, $5)
     ON CONFLICT (template_id, host_id) DO UPDATE SET state = excluded.state,
         next_attempt = excluded.next_attempt, updated_at = excluded.updated_at";

pub(super) async fn insert_placement(
    db: &impl GenericClient,
    template: TemplateId,
    host: HostId,
    team: TeamId,
    state: &str,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        INSERT_PLACEMENT,
        &[
            &template.bytes(),
            &host.bytes(),
            &team.bytes(),
            &state,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

/// Marks a template deleted and its placements queued for deletion (with
/// a lease of `lease_until` for the caller's own immediate attempt).
/// Purges the row at once if it has no placements. The caller holds the
/// template's row lock (`FOR UPDATE`), so that no restore from it begins
/// meanwhile (`begin_restore` takes a share lock on it): a placement a
/// restore in flight starts from is queued but not leased, nor returned
/// for the caller's attempt; the worker deletes it once that restore is
/// over.
pub(super) async fn mark_deleting(
    db: &impl GenericClient,
    template: TemplateId,
    lease_until: Timestamp,
    now: Timestamp,
) -> TxResult<Vec<Deletion>> {
    execute(
        db,
        "UPDATE templates SET state = 'deleting', updated_at = $2 WHERE id = $1",
        &[&template.bytes(), &now.unix_millis()],
    )
    .await?;
    // A pending overwrite of this template now holds the name itself, so
    // nobody else can take it before the overwrite finishes. (One begun
    // concurrently waits for this transaction on the lock it holds on this
    // template's row, and then sees it deleting: see `name_holder`.)
    execute(
        db,
        "UPDATE templates SET replaces = NULL WHERE replaces = $1 AND state = 'creating'",
        &[&template.bytes()],
    )
    .await?;
    let claim = uuid::Uuid::new_v4();
    execute(
        db,
        "UPDATE placements SET state = 'deleting', attempts = 0, next_attempt = $3,
                               lease_until = CASE WHEN EXISTS (
                                   SELECT 1 FROM restores r WHERE r.template_id = $1
                                   AND r.host_id = placements.host_id) THEN NULL ELSE $2::bigint END,
                               claim = $4, updated_at = $3
         WHERE template_id = $1",
        &[
            &template.bytes(),
            &lease_until.unix_millis(),
            &now.unix_millis(),
            &&claim.as_bytes()[..],
        ],
    )
    .await?;
    let rows = query(
        db,
        "SELECT p.template_id, p.team_id, p.host_id, h.address, p.attempts,
                p.lease_until IS NOT NULL
         FROM placements p JOIN hosts h ON h.id = p.host_id
         WHERE p.template_id = $1",
        &[&template.bytes()],
    )
    .await?;
    let mut targets = all(&rows, deletion_row)?;
    // The caller tries the leased ones now; those an open restore holds
    // (no claim) are only reported, and the worker deletes them later.
    for (t, row) in targets.iter_mut().zip(&rows) {
        if get::<bool>(row, 5)? {
            t.claim = Some(claim);
        }
    }
    purge_if_done(db, template).await?;
    Ok(targets)
}

/// Drops the row of a deleted template without placements. Callers that
/// remove a placement hold the template's row lock, so that of two
/// replicas confirming its last two placements at once, the second sees
/// the first's removal and purges.
async fn purge_if_done(db: &impl GenericClient, template: TemplateId) -> TxResult<()> {
    execute(
        db,
        "DELETE FROM templates WHERE id = $1 AND state = 'deleting'
           AND NOT EXISTS (SELECT 1 FROM placements WHERE template_id = $1)",
        &[&template.bytes()],
    )
    .await?;
    Ok(())
}

/// Deletes the template `team` sees as `name`, in one transaction: it
/// leaves get/list and frees its name, each placement is queued for
/// deletion, and the deletion is audited. The template's row is locked
/// first: of two concurrent deletes, the second finds it gone.
pub(super) async fn begin_delete(
    db: &impl GenericClient,
    actor: &Actor,
    team: TeamId,
    is_admin: bool,
    name: &TemplateName,
    lease_until: Timestamp,
    now: Timestamp,
) -> TxResult<(Template, Vec<Deletion>)> {
    let Some(template) = find_visible(db, team, name, Lock::ForUpdate).await? else {
        // The row the locking read found may have changed while it waited
        // (an overwrite's finish: the old template is deleting and the new
        // one, not in that read's snapshot, holds the name). A fresh read
        // sees what now holds the name: then run the transaction again.
        let now_visible = find_visible(db, team, name, Lock::None).await?.is_some();
        let not_found = Error::not_found("template not found");
        return Err(if now_visible {
            TxError::Retry(not_found)
        } else {
            TxError::Fail(not_found)
        });
    };
    if template.is_platform() && !(team.is_platform() && is_admin) {
        return Err(Error::forbidden("platform templates cannot be deleted here").into());
    }
    let targets = mark_deleting(db, template.id, lease_until, now).await?;
    let hosts: Vec<String> = targets.iter().map(|d| d.host.id.to_string()).collect();
    insert_audit(
        db,
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
    )
    .await?;
    Ok((template, targets))
}

/// The host confirmed the files are gone: drop the placement, and the
/// template row with its last one.
pub(super) async fn deletion_confirmed(db: &impl GenericClient, d: &Deletion) -> TxResult<()> {
    // See `purge_if_done`. (No row: a tombstone, nothing to purge.)
    query(
        db,
        "SELECT 1 FROM templates WHERE id = $1 FOR UPDATE",
        &[&d.template_id.bytes()],
    )
    .await?;
    execute(
        db,
        "DELETE FROM placements WHERE template_id = $1 AND host_id = $2 AND state = 'deleting'",
        &[&d.template_id.bytes(), &d.host.id.bytes()],
    )
    .await?;
    purge_if_done(db, d.template_id).await
}

/// The host did not confirm: count the attempt and schedule the next.
pub(super) async fn deletion_failed(
    db: &impl GenericClient,
    d: &Deletion,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        "UPDATE placements SET attempts = attempts + 1, next_attempt = $3, last_error = $4,
                               lease_until = NULL, claim = NULL,
                               updated_at = $5
         WHERE template_id = $1 AND host_id = $2 AND state = 'deleting'
           AND claim IS NOT DISTINCT FROM $6",
        &[
            &d.template_id.bytes(),
            &d.host.id.bytes(),
            &next_attempt.unix_millis(),
            &error,
            &now.unix_millis(),
            &d.claim.as_ref().map(|c| c.as_bytes().to_vec()),
        ],
    )
    .await?;
    Ok(())
}

/// Takes up to `limit` due deletions (skipping hosts marked offline and
/// the hosts in `skip_hosts`, whose work is in hand; with `only`, that
/// host's alone) and leases them until `lease_until` so nobody else tries
/// them meanwhile. A key whose create is still unresolved is not due: its
/// host may still be writing it; nor are a template's files on a host a
/// restore from it is in flight on.
///
/// At most [`DELETIONS_PER_HOST`] per host, read from the front of each
/// host's own queue (`placements_due_by_host`, a `LATERAL` per host), so a
/// claim costs the rows it takes, however long a queue has grown. Those
/// rows are locked `SKIP LOCKED` (another replica claiming at the same
/// moment gets the next ones) and leased, all in one statement; a row
/// another replica leased after this statement's snapshot is read again
/// once locked and left out.
pub(super) async fn claim_due_deletions(
    db: &impl GenericClient,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
    skip_hosts: &[HostId],
    only: Option<HostId>,
) -> TxResult<Vec<Deletion>> {
    let claim = uuid::Uuid::new_v4();
    let rows = query(
        db,
        "WITH chosen AS (
             SELECT d.template_id, d.host_id
             FROM hosts h CROSS JOIN LATERAL (
                 SELECT p.template_id, p.host_id, p.next_attempt FROM placements p
                 WHERE p.host_id = h.id AND p.state = 'deleting' AND p.next_attempt <= $1
                   AND coalesce(p.lease_until, 0) <= $1
                   AND NOT EXISTS (SELECT 1 FROM operations o
                                   WHERE o.template_id = p.template_id)
                   AND NOT EXISTS (SELECT 1 FROM restores r
                                   WHERE r.template_id = p.template_id AND r.host_id = p.host_id)
                 ORDER BY p.next_attempt LIMIT $3
                 FOR UPDATE OF p SKIP LOCKED
             ) d
             WHERE h.status <> 'offline' AND h.id <> ALL ($4::bytea[])
               AND ($7::bytea IS NULL OR h.id = $7)
             ORDER BY d.next_attempt LIMIT $2
         )
         UPDATE placements p SET lease_until = $5, claim = $6
         FROM chosen c, hosts h
         WHERE p.template_id = c.template_id AND p.host_id = c.host_id AND h.id = p.host_id
         RETURNING p.template_id, p.team_id, p.host_id, h.address, p.attempts, p.next_attempt",
        &[
            &now.unix_millis(),
            &i64::from(limit),
            &i64::from(DELETIONS_PER_HOST),
            &id_array(skip_hosts),
            &lease_until.unix_millis(),
            &&claim.as_bytes()[..],
            &only.map(|h| h.bytes().to_vec()),
        ],
    )
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut d = deletion_row(r)?;
        d.claim = Some(claim);
        due.push((get::<i64>(r, 5)?, d));
    }
    // RETURNING has no order: the earliest due first, as SQLite returns them.
    due.sort_by_key(|(at, _)| *at);
    Ok(due.into_iter().map(|(_, d)| d).collect())
}

pub(super) async fn pending_deletions(db: &impl GenericClient) -> TxResult<Vec<PendingDeletion>> {
    let rows = query(
        db,
        "SELECT template_id, host_id, attempts, last_error, next_attempt FROM placements
         WHERE state = 'deleting' ORDER BY host_id, next_attempt",
        &[],
    )
    .await?;
    Ok(all(&rows, |r| {
        Ok(PendingDeletion {
            template_id: get_id(r, 0)?,
            host: get_id(r, 1)?,
            attempts: get_u32(r, 2)?,
            last_error: get(r, 3)?,
            next_attempt: get_time(r, 4)?,
        })
    })?)
}

/// Whether the key of `template` is accounted for anywhere: a template row
/// in any state, a placement on any host (present, or queued for deletion),
/// an open operation (see `sqlite/sql.rs` for why not per host), or an
/// open restore from it.
pub(super) async fn key_is_owned(db: &impl GenericClient, template: TemplateId) -> TxResult<bool> {
    let row = query_one(
        db,
        "SELECT EXISTS (SELECT 1 FROM templates WHERE id = $1)
             OR EXISTS (SELECT 1 FROM placements WHERE template_id = $1)
             OR EXISTS (SELECT 1 FROM operations WHERE template_id = $1)
             OR EXISTS (SELECT 1 FROM restores WHERE template_id = $1)",
        &[&template.bytes()],
    )
    .await?;
    Ok(get(&row, 0)?)
}

/// Queues an orphaned key for deletion and audits it as a system action,
/// unless something owns it by now. Returns whether it was queued. Two
/// replicas sweeping one key at once: the second insert waits for the
/// first and violates the key; run again, it finds the key owned.
pub(super) async fn queue_orphan(
    db: &impl GenericClient,
    template: TemplateId,
    host: HostId,
    size_bytes: u64,
    now: Timestamp,
) -> TxResult<bool> {
    if key_is_owned(db, template).await? {
        return Ok(false);
    }
    let inserted = execute(
        db,
        "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
         VALUES ($1, $2, $3, 'deleting', $4, $4, $4)",
        &[
            &template.bytes(),
            &host.bytes(),
            &TeamId::PLATFORM.bytes(),
            &now.unix_millis(),
        ],
    )
    .await;
    match inserted {
        Ok(_) => {}
        Err(err) if super::rows::violates(&err, "placements_pkey") => {
            return Err(TxError::Retry(StoreError::from(err).into()));
        }
        Err(err) => return Err(err.into()),
    }
    insert_audit(
        db,
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
    )
    .await?;
    Ok(true)
}
