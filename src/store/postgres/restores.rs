//! Restores (SPEC §7, §4a "Restore"): where a template can run, the
//! restore journal's transactions, and the queue of sandboxes to destroy;
//! function for function those of `sqlite/sql/restores.rs`.
//!
//! Across replicas: two restores of one sandbox id meet at the sandboxes
//! key (and `restores_one_per_sandbox`): the loser waits for the winner's
//! commit, violates the key and is run again, and its check then answers
//! `already_exists`. A restore takes a share lock on its template's row,
//! so that a delete (which locks it `FOR UPDATE` before it queues the
//! files) either sees the restore's journal entry or finds no ready
//! template. Destroys are claimed with leases (`FOR UPDATE SKIP LOCKED`)
//! like deletions.

use deadpool_postgres::GenericClient;

use super::audit::insert_audit;
use super::registry::get_sandbox;
use super::rows::{
    BlobId, Param, SANDBOX_COLS, all, execute, get, get_host_info, get_id, get_time, get_u32,
    get_u64, host_info_json, host_row, id_array, prepare_all, query, query_one, query_opt,
    sandbox_row,
};
use super::{TxError, TxResult};
use crate::agent::{HostInfo, HostTarget};
use crate::error::{Error, ErrorCode};
use crate::ids::{HostId, InstanceId, OperationId, TeamId, TemplateId};
use crate::model::{HostStatus, Sandbox, Timestamp};
use crate::names::TemplateName;
use crate::store::{
    DeletionResult, Destroy, PendingDestroy, RestoreCandidate, RestoreEnd, RestoreInput, RestoreOp,
    StoreError, actor_from_columns,
};

/// The hosts `template` can be restored on (see `Store::restore_candidates`):
/// those with a `present` placement, or every host when it has none at all.
/// One statement, so both sides of that choice read one snapshot.
pub(super) async fn restore_candidates(
    db: &impl GenericClient,
    template: TemplateId,
) -> TxResult<Vec<RestoreCandidate>> {
    let rows = query(
        db,
        "SELECT h.id, h.address, h.status, h.last_heartbeat, h.host_info, h.host_info_at,
                (SELECT count(*) FROM sandboxes s
                 WHERE s.host_id = h.id AND s.status IN ('running', 'starting'))
         FROM hosts h
         WHERE h.id IN (SELECT host_id FROM placements WHERE template_id = $1
                        AND state = 'present')
            OR NOT EXISTS (SELECT 1 FROM placements WHERE template_id = $1)
         ORDER BY h.id",
        &[&template.bytes()],
    )
    .await?;
    Ok(all(&rows, |r| {
        Ok(RestoreCandidate {
            host: host_row(r)?,
            info: get_host_info(r, 4)?,
            info_known: get::<Option<i64>>(r, 5)?.is_some(),
            load: get_u64(r, 6)?,
        })
    })?)
}

pub(super) async fn set_host_info(
    db: &impl GenericClient,
    host: HostId,
    info: Option<&HostInfo>,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        "UPDATE hosts SET host_info = $2, host_info_at = $3 WHERE id = $1",
        &[&host.bytes(), &host_info_json(info), &now.unix_millis()],
    )
    .await?;
    Ok(())
}

/// The template, ready and visible to the team, share-locked until the
/// transaction ends. `KEY SHARE`: concurrent restores do not wait for each
/// other, nor for `end_restore`'s `last_used_at` (a no-key update), but a
/// delete's `FOR UPDATE` waits for this transaction, and this one for a
/// delete's (then finding the row no longer ready).
const LOCK_TEMPLATE: &str = "SELECT 1 FROM templates
     WHERE id = $1 AND state = 'ready' AND team_id IN ($2, $3) FOR KEY SHARE";

/// Whether the sandbox id was ever used (registered, being restored,
/// queued for or done with destruction), the host's status and address,
/// and whether it holds a `present` placement of the template.
const RESTORE_CHECKS: &str = "SELECT EXISTS (SELECT 1 FROM sandboxes WHERE id = $1)
         OR EXISTS (SELECT 1 FROM restores WHERE sandbox_id = $1)
         OR EXISTS (SELECT 1 FROM sandbox_destroys WHERE sandbox_id = $1),
     (SELECT status FROM hosts WHERE id = $2),
     (SELECT address FROM hosts WHERE id = $2),
     EXISTS (SELECT 1 FROM placements WHERE template_id = $3 AND host_id = $2
             AND state = 'present')";

/// The writes of [`begin_restore`], as one statement: the sandbox row
/// `starting` (returned) and the journal entry.
static BEGIN_RESTORE_WRITES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH started AS (
             INSERT INTO sandboxes (id, team_id, host_id, status, vcpus, memory_mb, created_at,
                                    updated_at, template_id, template_name)
             VALUES ($1, $2, $3, 'starting', $4, $5, $6, $6, $7, $8)
             RETURNING {SANDBOX_COLS}
         ), journal AS (
             INSERT INTO restores (id, sandbox_id, team_id, template_id, template_name, host_id,
                                   vcpus, memory_mb, timeout_sec, disk_size_mb, actor_type,
                                   actor_id, actor_name, owner, next_attempt, created_at,
                                   updated_at)
             VALUES ($9, $1, $2, $7, $8, $3, $4, $5, $10, $11, $12, $13, $14, $15, $16, $6, $6)
         )
         SELECT * FROM started"
    )
});

fn id_in_use(op: &RestoreOp) -> Error {
    Error::new(
        ErrorCode::AlreadyExists,
        format!("sandbox id {} is already in use", op.sandbox_id),
    )
}

/// Step one of a restore, in one transaction (see `Store::begin_restore`):
/// the checks in SQLite's order, then the sandbox row and the journal
/// entry. The template lock and the checks go out together (pipelined;
/// the checks run once the lock is had, on a snapshot of their own).
pub(super) async fn begin_restore(
    db: &impl GenericClient,
    input: &RestoreInput,
    now: Timestamp,
) -> TxResult<Sandbox> {
    let op = &input.op;
    // First, as for a create (see `begin_create`).
    if let Some(request) = &input.request {
        super::requests::insert_request(db, op.id, op.team, request, now).await?;
    }
    let (template_bytes, team_bytes, platform_bytes) = (
        op.template_id.bytes(),
        op.team.bytes(),
        TeamId::PLATFORM.bytes(),
    );
    let (sandbox_bytes, host_bytes) = (op.sandbox_id.bytes(), op.host.id.bytes());
    prepare_all(db, &[LOCK_TEMPLATE, RESTORE_CHECKS]).await?;
    let lock_params: [Param<'_>; 3] = [&template_bytes, &team_bytes, &platform_bytes];
    let check_params: [Param<'_>; 3] = [&sandbox_bytes, &host_bytes, &template_bytes];
    let (visible, checks) = tokio::join!(
        query_opt(db, LOCK_TEMPLATE, &lock_params),
        query_one(db, RESTORE_CHECKS, &check_params)
    );
    // A failure of the first statement fails the second: it is the answer.
    if visible?.is_none() {
        return Err(Error::not_found("template not found").into());
    }
    let checks = checks?;
    if get::<bool>(&checks, 0)? {
        return Err(id_in_use(op).into());
    }
    let gone = || {
        Error::new(
            ErrorCode::HostUnavailable,
            "the chosen host is no longer online",
        )
    };
    let status: Option<&str> = get(&checks, 1)?;
    let address: Option<&str> = get(&checks, 2)?;
    let online = status
        .map(str::parse::<HostStatus>)
        .transpose()
        .map_err(|e| {
            StoreError::corrupt(format!("postgres: host {}: {}", op.host.id, e.message()))
        })?
        == Some(HostStatus::Online);
    if !online || address.is_none_or(str::is_empty) {
        return Err(gone().into());
    }
    if input.placed && !get::<bool>(&checks, 3)? {
        return Err(Error::new(
            ErrorCode::HostUnavailable,
            "the chosen host no longer holds the template",
        )
        .into());
    }
    let now_ms = now.unix_millis();
    let (op_bytes, owner_bytes) = (op.id.bytes(), input.owner.bytes());
    let (vcpus, memory_mb) = (i64::from(op.vcpus), i64::from(op.memory_mb));
    let (timeout_sec, disk_size_mb) = (i64::from(op.timeout_sec), i64::from(op.disk_size_mb));
    let (kind, actor_id, actor_name) = (op.actor.kind(), op.actor.id_text(), op.actor.name_text());
    let (name, lease_ms) = (op.template_name.as_str(), input.lease_until.unix_millis());
    let params: [Param<'_>; 16] = [
        &sandbox_bytes,
        &team_bytes,
        &host_bytes,
        &vcpus,
        &memory_mb,
        &now_ms,
        &template_bytes,
        &name,
        &op_bytes,
        &timeout_sec,
        &disk_size_mb,
        &kind,
        &actor_id,
        &actor_name,
        &owner_bytes,
        &lease_ms,
    ];
    match query_opt(db, &BEGIN_RESTORE_WRITES, &params).await {
        Ok(Some(row)) => Ok(sandbox_row(&row)?),
        Ok(None) => Err(StoreError::corrupt(format!(
            "sandbox {} vanished in its transaction",
            op.sandbox_id
        ))
        .into()),
        // A restore (or registration) of the same id on another
        // connection took it since the check: run again, and the check
        // then sees it.
        Err(err)
            if super::rows::violates(&err, "sandboxes_pkey")
                || super::rows::violates(&err, "restores_one_per_sandbox") =>
        {
            Err(TxError::Retry(id_in_use(op)))
        }
        Err(err) => Err(err.into()),
    }
}

/// The last step of a restore (see `Store::end_restore`). The journal
/// entry is claimed by its first statement, which is atomic by itself: a
/// concurrent end of the same restore (its own task, and another replica's
/// recovery) waits for this one and then finds it closed.
pub(super) async fn end_restore(
    db: &impl GenericClient,
    op: &RestoreOp,
    end: &RestoreEnd,
    now: Timestamp,
) -> TxResult<Option<Sandbox>> {
    let closed = execute(db, "DELETE FROM restores WHERE id = $1", &[&op.id.bytes()]).await?;
    if closed != 1 {
        return Ok(None);
    }
    let now_ms = now.unix_millis();
    let sandbox_bytes = op.sandbox_id.bytes();
    match end {
        RestoreEnd::Running => {
            execute(
                db,
                "UPDATE sandboxes SET status = 'running', updated_at = $2
                 WHERE id = $1 AND status = 'starting'",
                &[&sandbox_bytes, &now_ms],
            )
            .await?;
            execute(
                db,
                "UPDATE templates SET last_used_at = $2 WHERE id = $1",
                &[&op.template_id.bytes(), &now_ms],
            )
            .await?;
        }
        RestoreEnd::Failed { destroy_from, .. } => {
            execute(
                db,
                "DELETE FROM sandboxes WHERE id = $1 AND status = 'starting'",
                &[&sandbox_bytes],
            )
            .await?;
            if let Some(from) = destroy_from {
                execute(
                    db,
                    "INSERT INTO sandbox_destroys (sandbox_id, host_id, team_id, state,
                                                   next_attempt, created_at, updated_at)
                     VALUES ($1, $2, $3, 'queued', $4, $5, $5)
                     ON CONFLICT (sandbox_id) DO UPDATE SET state = 'queued',
                         next_attempt = excluded.next_attempt, updated_at = excluded.updated_at",
                    &[
                        &sandbox_bytes,
                        &op.host.id.bytes(),
                        &op.team.bytes(),
                        &from.unix_millis(),
                        &now_ms,
                    ],
                )
                .await?;
            }
        }
    };
    insert_audit(db, &op.audit(end), now).await?;
    let sandbox = match end {
        RestoreEnd::Running => get_sandbox(db, op.sandbox_id).await?,
        RestoreEnd::Failed { .. } => Some(op.failed_sandbox()),
    };
    let (state, result) = op.request_outcome(end, sandbox.as_ref());
    super::requests::end_request(db, op.id, state, &result, now).await?;
    Ok(sandbox)
}

/// See `Store::requeue_destroy`.
pub(super) async fn requeue_destroy(
    db: &impl GenericClient,
    op: &RestoreOp,
    from: Timestamp,
    now: Timestamp,
) -> TxResult<bool> {
    let queued = execute(
        db,
        "INSERT INTO sandbox_destroys (sandbox_id, host_id, team_id, state,
                                       next_attempt, created_at, updated_at)
         SELECT $1, $2, $3, 'queued', $4, $5, $5
         WHERE NOT EXISTS (SELECT 1 FROM sandboxes WHERE id = $1)
           AND NOT EXISTS (SELECT 1 FROM restores WHERE sandbox_id = $1)
         ON CONFLICT (sandbox_id) DO UPDATE SET state = 'queued',
             next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,
             lease_until = NULL, claim = NULL",
        &[
            &op.sandbox_id.bytes(),
            &op.host.id.bytes(),
            &op.team.bytes(),
            &from.unix_millis(),
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(queued == 1)
}

pub(super) async fn postpone_restore(
    db: &impl GenericClient,
    id: OperationId,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        "UPDATE restores SET attempts = attempts + 1, next_attempt = $2, last_error = $3,
                             updated_at = $4
         WHERE id = $1",
        &[
            &id.bytes(),
            &next_attempt.unix_millis(),
            &error,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

fn restore_row(r: &tokio_postgres::Row) -> Result<RestoreOp, StoreError> {
    Ok(RestoreOp {
        id: get_id(r, 0)?,
        sandbox_id: get_id(r, 1)?,
        team: get_id(r, 2)?,
        template_id: get_id(r, 3)?,
        template_name: TemplateName::from_trusted(get(r, 4)?),
        host: HostTarget {
            id: get_id(r, 5)?,
            address: get(r, 6)?,
        },
        vcpus: get_u32(r, 7)?,
        memory_mb: get_u32(r, 8)?,
        timeout_sec: get_u32(r, 9)?,
        disk_size_mb: get_u32(r, 10)?,
        actor: actor_from_columns(get(r, 11)?, get(r, 12)?, get(r, 13)?),
        attempts: get_u32(r, 14)?,
        created_at: get_time(r, 15)?,
    })
}

/// `me`'s open restores (as `open_operations`: another instance's are
/// its own until adopted), only those due at `due_before` if given.
pub(super) async fn open_restores(
    db: &impl GenericClient,
    me: InstanceId,
    due_before: Option<Timestamp>,
) -> TxResult<Vec<RestoreOp>> {
    let rows = query(
        db,
        "SELECT r.id, r.sandbox_id, r.team_id, r.template_id, r.template_name, r.host_id,
                coalesce(h.address, ''), r.vcpus, r.memory_mb, r.timeout_sec, r.disk_size_mb,
                r.actor_type, r.actor_id, r.actor_name, r.attempts, r.created_at
         FROM restores r LEFT JOIN hosts h ON h.id = r.host_id
         WHERE r.owner = $2 AND ($1::bigint IS NULL OR r.next_attempt <= $1)
         ORDER BY r.created_at, r.id",
        &[&due_before.map(Timestamp::unix_millis), &me.bytes()],
    )
    .await?;
    Ok(all(&rows, restore_row)?)
}

/// Takes up to `limit` due destroys (not on `skip_hosts`, not on offline
/// hosts) and leases them until `lease_until` with a fresh claim token.
/// The due rows are locked `SKIP LOCKED` (another replica claiming at the
/// same moment gets the others) and leased in one statement; a row
/// another replica leased after this statement's snapshot is read again
/// once locked and left out (its lease is no longer over).
pub(super) async fn claim_due_destroys(
    db: &impl GenericClient,
    now: Timestamp,
    lease_until: Timestamp,
    limit: u32,
    skip_hosts: &[HostId],
) -> TxResult<Vec<Destroy>> {
    let claim = uuid::Uuid::new_v4();
    let rows = query(
        db,
        "WITH due AS (
             SELECT d.sandbox_id
             FROM sandbox_destroys d JOIN hosts h ON h.id = d.host_id
             WHERE d.state = 'queued' AND d.next_attempt <= $1
               AND coalesce(d.lease_until, 0) <= $1 AND h.status <> 'offline'
               AND d.host_id <> ALL ($3::bytea[])
             ORDER BY d.next_attempt LIMIT $2
             FOR UPDATE OF d SKIP LOCKED
         )
         UPDATE sandbox_destroys d SET lease_until = $4, claim = $5
         FROM due, hosts h
         WHERE d.sandbox_id = due.sandbox_id AND h.id = d.host_id
         RETURNING d.sandbox_id, d.team_id, d.host_id, h.address, d.attempts, d.next_attempt",
        &[
            &now.unix_millis(),
            &i64::from(limit),
            &id_array(skip_hosts),
            &lease_until.unix_millis(),
            &&claim.as_bytes()[..],
        ],
    )
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for r in &rows {
        let destroy = Destroy {
            sandbox_id: get_id(r, 0)?,
            team: get_id(r, 1)?,
            host: HostTarget {
                id: get_id(r, 2)?,
                address: get(r, 3)?,
            },
            attempts: get_u32(r, 4)?,
            claim: Some(claim),
        };
        due.push((get::<i64>(r, 5)?, destroy));
    }
    // RETURNING has no order: the earliest due first, as SQLite returns them.
    due.sort_by_key(|(at, _)| *at);
    Ok(due.into_iter().map(|(_, d)| d).collect())
}

/// Records a host's answer to a destroy, only while the claim is still
/// this attempt's: a late answer of a lapsed attempt cannot end the lease
/// of the next claimer, nor confirm a destroy queued again since (a
/// NotFound from before a late VM booted proves nothing).
pub(super) async fn record_destroy(
    db: &impl GenericClient,
    d: &Destroy,
    result: &DeletionResult,
    now: Timestamp,
) -> TxResult<()> {
    match result {
        DeletionResult::Confirmed => {
            execute(
                db,
                "UPDATE sandbox_destroys SET state = 'destroyed', lease_until = NULL,
                        claim = NULL, last_error = NULL, updated_at = $2
                 WHERE sandbox_id = $1 AND state = 'queued'
                   AND claim IS NOT DISTINCT FROM $3",
                &[
                    &d.sandbox_id.bytes(),
                    &now.unix_millis(),
                    &d.claim.as_ref().map(|c| c.as_bytes().to_vec()),
                ],
            )
            .await?;
        }
        DeletionResult::Failed { error, retry_at } => {
            execute(
                db,
                "UPDATE sandbox_destroys SET attempts = attempts + 1, next_attempt = $2,
                        last_error = $3, lease_until = NULL, claim = NULL, updated_at = $4
                 WHERE sandbox_id = $1 AND state = 'queued' AND claim IS NOT DISTINCT FROM $5",
                &[
                    &d.sandbox_id.bytes(),
                    &retry_at.unix_millis(),
                    error,
                    &now.unix_millis(),
                    &d.claim.as_ref().map(|c| c.as_bytes().to_vec()),
                ],
            )
            .await?;
        }
    }
    Ok(())
}

pub(super) async fn pending_destroys(db: &impl GenericClient) -> TxResult<Vec<PendingDestroy>> {
    let rows = query(
        db,
        "SELECT sandbox_id, team_id, host_id, attempts, last_error, next_attempt
         FROM sandbox_destroys WHERE state = 'queued' ORDER BY host_id, next_attempt",
        &[],
    )
    .await?;
    Ok(all(&rows, |r| {
        Ok(PendingDestroy {
            sandbox: get_id(r, 0)?,
            team: get_id(r, 1)?,
            host: get_id(r, 2)?,
            attempts: get_u32(r, 3)?,
            last_error: get(r, 4)?,
            next_attempt: get_time(r, 5)?,
        })
    })?)
}
