//! Creates and the operations journal, and the replicas' instances: each
//! journal entry names its owner (the instance driving it); a replica
//! adopts the entries whose owner's heartbeat lease has ended (SPEC §9).
//!
//! Each step that reads and then writes locks what it reads: the sandbox
//! in `begin_create` (two snapshots of one sandbox: the second waits, then
//! sees it `snapshotting`), the journal row in `finish_create` and
//! `resolve_open_operation` (a concurrent finish, failure or resolution
//! then finds it closed). `fail_create` and `resolve_operation` claim the
//! journal row with their first statement, which is atomic by itself.

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::audit::insert_audit;
use super::placements::mark_deleting;
use super::registry::{
    SANDBOX_WITH_HOST, lock_team_sandbox_with_host, lost_name_race, release_sandbox,
};
use super::rows::{
    BlobId, OP_COLS, Param, all, big, execute, get, get_id, get_opt_id, get_time, get_u32,
    host_info_json, id_array, op_row, opt_bytes, prepare_all, query, query_one, query_opt,
    template_row,
};
use super::templates::{NAME_CHECKS, NAME_HOLDER, check_name_free, name_holder};
use crate::agent::{HostInfo, HostTarget};
use crate::audit::{AuditOutcome, NewAuditEntry};
use crate::error::{Error, ErrorCode};
use crate::ids::{InstanceId, OperationId, TemplateId};
use crate::model::{Actor, Sandbox, SandboxStatus, Timestamp};
use crate::names::TemplateName;
use crate::store::{
    Backlog, CreateDone, CreateInput, CreateOp, Failure, Finish, InHand, OpenOperation,
    ResolveReason, SandboxOutcome, StoreError,
};

// ------------------------------------------------------------ instances

/// Instance rows whose lease ended longer ago than this are deleted by
/// the next adoption (their entries were adopted long before).
const FORGET_INSTANCES_AFTER_MS: i64 = 3_600_000;

pub(super) async fn register_instance(
    db: &impl GenericClient,
    me: InstanceId,
    lease_until: Timestamp,
    now: Timestamp,
) -> TxResult<()> {
    // Other instances are left alone: unlike SQLite's one process, they may
    // be alive. Their entries are adopted only once their leases end.
    execute(
        db,
        "INSERT INTO instances (id, lease_until, started_at) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
        &[&me.bytes(), &lease_until.unix_millis(), &now.unix_millis()],
    )
    .await?;
    Ok(())
}

/// Extends `me`'s lease, writing the row again if it is gone (deleted
/// after a long pause): entries adopted by others meanwhile stay theirs.
pub(super) async fn heartbeat(
    db: &impl GenericClient,
    me: InstanceId,
    lease_until: Timestamp,
) -> TxResult<()> {
    // `started_at` of a row written again: this process's clock now (the
    // trait passes no `now` here); nothing reads it but operators.
    execute(
        db,
        "INSERT INTO instances (id, lease_until, started_at) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
        &[
            &me.bytes(),
            &lease_until.unix_millis(),
            &Timestamp::now().unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

/// Takes over every journal entry (operations and restores) that names no
/// owner, or whose owner has no instance with a lease beyond `now`. The
/// dead driver's lease of a `started` entry, or of a restore its task
/// drove (never postponed), is void: it is due at once. `me`'s own entries
/// are never taken again (its tasks may still drive them). Also forgets
/// instances whose lease ended more than an hour ago. Returns how many
/// entries it took.
pub(super) async fn adopt_operations(
    db: &impl GenericClient,
    me: InstanceId,
    now: Timestamp,
) -> TxResult<u64> {
    let adopted = execute(
        db,
        "UPDATE operations o
         SET owner = $1,
             next_attempt = CASE WHEN o.phase = 'started' THEN 0 ELSE o.next_attempt END
         WHERE o.owner IS DISTINCT FROM $1
           AND NOT EXISTS (SELECT 1 FROM instances i
                           WHERE i.id = o.owner AND i.lease_until > $2)",
        &[&me.bytes(), &now.unix_millis()],
    )
    .await?;
    let restores = execute(
        db,
        "UPDATE restores r
         SET owner = $1,
             next_attempt = CASE WHEN r.attempts = 0 THEN 0 ELSE r.next_attempt END
         WHERE r.owner IS DISTINCT FROM $1
           AND NOT EXISTS (SELECT 1 FROM instances i
                           WHERE i.id = r.owner AND i.lease_until > $2)",
        &[&me.bytes(), &now.unix_millis()],
    )
    .await?;
    execute(
        db,
        "DELETE FROM instances WHERE lease_until < $1 AND id <> $2",
        &[
            &now.unix_millis().saturating_sub(FORGET_INSTANCES_AFTER_MS),
            &me.bytes(),
        ],
    )
    .await?;
    Ok(adopted + restores)
}

pub(super) async fn close(db: &impl GenericClient, me: InstanceId) -> TxResult<()> {
    execute(db, "DELETE FROM instances WHERE id = $1", &[&me.bytes()]).await?;
    Ok(())
}

// -------------------------------------------------------------- journal

/// `me`'s open operations in `phase`, only those due at `due_before` if
/// given.
pub(super) async fn open_operations(
    db: &impl GenericClient,
    me: InstanceId,
    phase: &str,
    due_before: Option<Timestamp>,
) -> TxResult<Vec<CreateOp>> {
    let rows = query(
        db,
        &format!(
            "SELECT {OP_COLS} FROM operations o LEFT JOIN hosts h ON h.id = o.host_id
             WHERE o.phase = $1 AND o.owner = $3
               AND ($2::bigint IS NULL OR o.next_attempt <= $2)
             ORDER BY o.created_at, o.template_id"
        ),
        &[&phase, &due_before.map(Timestamp::unix_millis), &me.bytes()],
    )
    .await?;
    Ok(all(&rows, op_row)?)
}

pub(super) async fn list_open_operations(db: &impl GenericClient) -> TxResult<Vec<OpenOperation>> {
    let rows = query(
        db,
        "SELECT template_id, team_id, template_name, sandbox_id, host_id, phase, attempts,
                last_error, created_at, id, owner
         FROM operations ORDER BY created_at, template_id",
        &[],
    )
    .await?;
    Ok(all(&rows, |r| {
        Ok(OpenOperation {
            id: get_id(r, 9)?,
            template_id: get_id(r, 0)?,
            team: get_id(r, 1)?,
            name: TemplateName::from_trusted(get(r, 2)?),
            sandbox: get_id(r, 3)?,
            host: get_id(r, 4)?,
            phase: get(r, 5)?,
            attempts: get_u32(r, 6)?,
            last_error: get(r, 7)?,
            started_at: get_time(r, 8)?,
            owner: get_opt_id(r, 10)?,
        })
    })?)
}

/// The backlogs the worker reports as gauges: queued deletions and open
/// operations, restores included (of every replica), each as (count,
/// oldest start).
pub(super) async fn backlogs(db: &impl GenericClient) -> TxResult<(Backlog, Backlog)> {
    let deletions = query_one(
        db,
        "SELECT count(*), min(CASE WHEN t.state = 'deleting' THEN t.updated_at
                                   ELSE p.created_at END)
         FROM placements p LEFT JOIN templates t ON t.id = p.template_id
         WHERE p.state = 'deleting'",
        &[],
    )
    .await?;
    let operations = query_one(
        db,
        "SELECT sum(n)::bigint, min(m) FROM (
             SELECT count(*) AS n, min(created_at) AS m FROM operations
             UNION ALL SELECT count(*), min(created_at) FROM restores) open",
        &[],
    )
    .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((
        (count(get(&deletions, 0)?), get(&deletions, 1)?),
        (count(get(&operations, 0)?), get(&operations, 1)?),
    ))
}

/// The earliest time any of `me`'s queued work not in hand becomes due:
/// deletions and destroys (claimed by any replica), `me`'s own journal
/// entries (operations and restores), and the moment another instance's
/// entries become adoptable (its lease's end; now, for entries whose owner
/// has no instance row or is none). Deletions of files a restore in flight
/// starts from wait for that restore (its end wakes the worker).
pub(super) async fn next_due(
    db: &impl GenericClient,
    me: InstanceId,
    in_hand: &InHand,
) -> TxResult<Option<Timestamp>> {
    let row = query_one(
        db,
        "SELECT min(t) FROM (
             SELECT (SELECT p.next_attempt FROM placements p
                     WHERE p.host_id = h.id AND p.state = 'deleting' AND p.lease_until IS NULL
                       AND NOT EXISTS (SELECT 1 FROM operations o
                                       WHERE o.template_id = p.template_id)
                       AND NOT EXISTS (SELECT 1 FROM restores r
                                       WHERE r.template_id = p.template_id
                                         AND r.host_id = p.host_id)
                     ORDER BY p.next_attempt LIMIT 1) AS t
             FROM hosts h
             WHERE h.status <> 'offline' AND h.id <> ALL ($1::bytea[])
             UNION ALL
             SELECT min(greatest(p.next_attempt, p.lease_until))
             FROM placements p JOIN hosts h ON h.id = p.host_id
             WHERE p.state = 'deleting' AND p.lease_until IS NOT NULL
               AND h.status <> 'offline' AND p.host_id <> ALL ($1::bytea[])
               AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.template_id = p.template_id)
               AND NOT EXISTS (SELECT 1 FROM restores r
                               WHERE r.template_id = p.template_id AND r.host_id = p.host_id)
             UNION ALL
             SELECT min(o.next_attempt) FROM operations o
             WHERE o.owner = $4
               AND o.host_id <> ALL ($1::bytea[])
               AND o.template_id <> ALL ($2::bytea[])
               AND o.id <> ALL ($3::bytea[])
             UNION ALL
             SELECT min(coalesce(i.lease_until, 0)) FROM operations o
             LEFT JOIN instances i ON i.id = o.owner
             WHERE o.owner IS DISTINCT FROM $4
             UNION ALL
             SELECT min(r.next_attempt) FROM restores r
             WHERE r.owner = $4
               AND r.host_id <> ALL ($1::bytea[])
               AND r.id <> ALL ($5::bytea[])
               AND r.id <> ALL ($3::bytea[])
             UNION ALL
             SELECT min(coalesce(i.lease_until, 0)) FROM restores r
             LEFT JOIN instances i ON i.id = r.owner
             WHERE r.owner IS DISTINCT FROM $4
             UNION ALL
             SELECT min(greatest(d.next_attempt, coalesce(d.lease_until, 0)))
             FROM sandbox_destroys d JOIN hosts h ON h.id = d.host_id
             WHERE d.state = 'queued' AND h.status <> 'offline'
               AND d.host_id <> ALL ($1::bytea[])
         ) due",
        &[
            &id_array(&in_hand.hosts),
            &id_array(&in_hand.creates),
            &id_array(&in_hand.operations),
            &me.bytes(),
            &id_array(&in_hand.restores),
        ],
    )
    .await?;
    Ok(get::<Option<i64>>(&row, 0)?.map(Timestamp::from_unix_millis))
}

/// The open operation `id`, locked, with its phase.
async fn lock_operation(
    db: &impl GenericClient,
    id: OperationId,
) -> TxResult<Option<(CreateOp, String)>> {
    let row = query_opt(
        db,
        &format!(
            "SELECT {OP_COLS}, o.phase FROM operations o LEFT JOIN hosts h ON h.id = o.host_id
             WHERE o.id = $1 FOR UPDATE OF o"
        ),
        &[&id.bytes()],
    )
    .await?;
    match row {
        None => Ok(None),
        Some(r) => Ok(Some((op_row(&r)?, get(&r, 14)?))),
    }
}

/// Backs off an operation that could not be resolved yet.
pub(super) async fn postpone_operation(
    db: &impl GenericClient,
    template: TemplateId,
    error: &str,
    next_attempt: Timestamp,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        "UPDATE operations SET attempts = attempts + 1, next_attempt = $2, last_error = $3,
                               updated_at = $4
         WHERE template_id = $1",
        &[
            &template.bytes(),
            &next_attempt.unix_millis(),
            &error,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

// --------------------------------------------------------------- create

/// Step one of a create, in one transaction: name checks, team-scoped
/// sandbox lookup, status and host checks, sandbox → `snapshotting` (CAS),
/// the `creating` template row, and the journal entry owned by
/// `input.owner`.
///
/// The sandbox row is locked before the name is checked (the checks still
/// answer in SQLite's order): a second create on the same sandbox waits,
/// then checks the name with the first one's template visible, exactly as
/// if the two had run one after the other. Creates of one name on two
/// sandboxes meet at the name index instead (see `lost_name_race`).
pub(super) async fn begin_create(
    db: &impl GenericClient,
    input: &CreateInput,
    now: Timestamp,
) -> TxResult<(CreateOp, Sandbox)> {
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
    // First: a request with the same key on another connection makes this
    // one wait for it on the unique index, then answer 409
    // `idempotency_in_progress` (not whatever its writes make of ours).
    if let Some(request) = request {
        super::requests::insert_request(db, *operation_id, team, request, now).await?;
    }
    // The reads go out together (pipelined on the connection, run in this
    // order): the sandbox (locked) with its host, then the name checks.
    prepare_all(db, &[SANDBOX_WITH_HOST]).await?;
    prepare_all(db, &NAME_CHECKS).await?;
    let (sandbox, replaces) = tokio::join!(
        lock_team_sandbox_with_host(db, sandbox_id, team),
        check_name_free(db, team, name, overwrite)
    );
    // A failure of the first statement fails the ones after it: it is the
    // answer. Otherwise SQLite's order: the name first, then the sandbox.
    let sandbox = sandbox?;
    let replaces = replaces?;
    let (sandbox, host) = sandbox.ok_or_else(|| Error::not_found("sandbox not found"))?;
    if !matches!(
        sandbox.status,
        SandboxStatus::Running | SandboxStatus::Paused
    ) {
        return Err(
            Error::new(ErrorCode::InvalidState, "sandbox must be running or paused").into(),
        );
    }
    let unreachable = || Error::new(ErrorCode::HostUnavailable, "sandbox host is not reachable");
    let host_id = sandbox.host.ok_or_else(unreachable)?;
    let (address, host_status) = host.ok_or_else(unreachable)?;
    if address.is_empty() || !host_status.accepts_snapshots() {
        return Err(unreachable().into());
    }
    let usage = super::policies::team_usage(db, team, true).await?;
    crate::store::quota_check(&usage, replaces.is_some())?;
    let now_ms = now.unix_millis();
    let actor_id = actor.id_text();
    let (sandbox_bytes, team_bytes, template_bytes) =
        (sandbox_id.bytes(), team.bytes(), template_id.bytes());
    let (host_bytes, operation_bytes, owner_bytes) =
        (host_id.bytes(), operation_id.bytes(), owner.bytes());
    let (status, name_text, replaces_bytes) =
        (sandbox.status.as_str(), name.as_str(), opt_bytes(&replaces));
    let (vcpus, memory_mb) = (i64::from(sandbox.vcpus), i64::from(sandbox.memory_mb));
    let (kind, actor_name, lease_ms) = (actor.kind(), actor.name_text(), lease_until.unix_millis());
    let expires_ms = expires_at.map(Timestamp::unix_millis);
    let params: [Param<'_>; 17] = [
        &template_bytes,
        &team_bytes,
        &name_text,
        &sandbox_bytes,
        &host_bytes,
        &status,
        &replaces_bytes,
        &kind,
        &actor_id,
        &actor_name,
        &now_ms,
        &operation_bytes,
        &lease_ms,
        &owner_bytes,
        &vcpus,
        &memory_mb,
        &expires_ms,
    ];
    // The three writes are one statement: the sandbox CAS, and only if it
    // took, the `creating` row and the journal entry.
    match execute(db, BEGIN_CREATE_WRITES, &params).await {
        Ok(1) => {}
        Ok(_) => {
            return Err(
                Error::new(ErrorCode::InvalidState, "sandbox must be running or paused").into(),
            );
        }
        Err(err) => return Err(lost_name_race(err, overwrite)),
    }
    let host = HostTarget {
        id: host_id,
        address,
    };
    let op = CreateOp {
        id: *operation_id,
        template_id,
        team,
        name: name.clone(),
        sandbox_id,
        host,
        prev_status: sandbox.status,
        replaces,
        actor: actor.clone(),
        attempts: 0,
        created_at: now,
    };
    Ok((op, sandbox))
}

/// The writes of [`begin_create`], as one statement: sandbox →
/// `snapshotting` (CAS on its status), then — only if that took — the
/// `creating` template row and the journal entry. Changes one row when it
/// applied, none when the CAS failed; a name taken meanwhile is a unique
/// violation of `templates_name_per_team`.
const BEGIN_CREATE_WRITES: &str = "WITH cas AS (
         UPDATE sandboxes SET status = 'snapshotting', updated_at = $11
         WHERE id = $4 AND status = $6
         RETURNING id
     ), creating AS (
         INSERT INTO templates (id, team_id, name, type, state, vcpus, memory_mb, size_bytes,
                                source_sandbox_id, replaces, created_at, updated_at, expires_at)
         SELECT $1::bytea, $2::bytea, $3::text, 'snapshot', 'creating', $15::bigint,
                $16::bigint, 0, $4::bytea, $7::bytea, $11::bigint, $11::bigint,
                coalesce($17::bigint, $11::bigint + 1000 * (SELECT default_ttl FROM team_retention
                                                            WHERE team_id = $2::bytea))
         FROM cas
         RETURNING id
     )
     INSERT INTO operations (kind, phase, template_id, team_id, template_name, sandbox_id,
                             host_id, prev_status, replaces, actor_type, actor_id, actor_name,
                             created_at, updated_at, id, next_attempt, owner)
     SELECT 'create', 'started', $1::bytea, $2::bytea, $3::text, $4::bytea, $5::bytea,
            $6::text, $7::bytea, $8::text, $9::text, $10::text, $11::bigint, $11::bigint,
            $12::bytea, $13::bigint, $14::bytea
     FROM creating";
/// The writes that end a successful create (after the journal row is
/// locked and the name checked), as one statement: the journal entry
/// closed, the placement `present`, the sandbox `paused`, the audit entry,
/// and the template `ready` with what produced it (`$14`, else what its
/// host said of itself; returned; no row when it was not `creating`). The
/// statement's own writes are invisible to its subqueries, so the count of
/// present placements it returns adds the one it writes.
static FINISH_CREATE_WRITES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH closed AS (
             DELETE FROM operations WHERE template_id = $1
         ), placed AS (
             INSERT INTO placements (template_id, host_id, team_id, state, next_attempt,
                                     created_at, updated_at)
             VALUES ($1, $4, $5, 'present', $3, $3, $3)
             ON CONFLICT (template_id, host_id) DO UPDATE SET state = excluded.state,
                 next_attempt = excluded.next_attempt, updated_at = excluded.updated_at
         ), released AS (
             UPDATE sandboxes SET status = 'paused', updated_at = $3
             WHERE id = $6 AND status = 'snapshotting'
         ), audited AS (
             INSERT INTO audit_log (id, team_id, actor_type, actor_id, actor_name, action,
                                    resource_type, resource_id, outcome, error_code, metadata,
                                    created_at)
             VALUES ($7, $5, $8, $9, $10, $11, '{}', $12, 'success', NULL, $13, $3)
         )
         UPDATE templates SET state = 'ready', replaces = NULL, size_bytes = $2,
                              created_at = $3, updated_at = $3,
                              compat = coalesce($14, (SELECT host_info FROM hosts WHERE id = $4))
         WHERE id = $1 AND state = 'creating'
         RETURNING {FINISHED_COLS}",
        crate::audit::RESOURCE_TEMPLATE
    )
});

/// `rows::TEMPLATE_COLS` as [`FINISH_CREATE_WRITES`] returns them.
const FINISHED_COLS: &str =
    "id, team_id, name, type, vcpus, memory_mb, size_bytes, created_at, source_sandbox_id,
     state, (SELECT count(*) FROM placements p
             WHERE p.template_id = templates.id AND p.state = 'present' AND p.host_id <> $4) + 1,
     compat, last_used_at, expires_at";

const JOURNAL_FOR_UPDATE: &str = "SELECT phase FROM operations WHERE template_id = $1 FOR UPDATE";

/// The last step of a successful create, in one transaction: the template
/// becomes `ready` with its placement, an overwritten template gives up its
/// name and is queued for deletion, the sandbox is `paused`, the journal
/// entry is closed, and the audit entry written. Only applies while the
/// journal entry is open in phase `started` (its row is locked first).
pub(super) async fn finish_create(
    db: &impl GenericClient,
    op: &CreateOp,
    size_bytes: u64,
    compat: Option<&HostInfo>,
    lease_until: Timestamp,
    now: Timestamp,
) -> TxResult<Finish> {
    // The journal row (locked) and the name's holder, in one round trip.
    let template_bytes = op.template_id.bytes();
    let phase_params: [Param<'_>; 1] = [&template_bytes];
    prepare_all(db, &[JOURNAL_FOR_UPDATE, NAME_HOLDER]).await?;
    let (phase, holder) = tokio::join!(
        query_opt(db, JOURNAL_FOR_UPDATE, &phase_params),
        name_holder(db, op.team, &op.name)
    );
    let phase: Option<String> = phase?.as_ref().map(|r| get(r, 0)).transpose()?;
    if phase.as_deref() != Some("started") {
        return Ok(Finish::AlreadyResolved);
    }
    // When the replaced template was deleted meanwhile, its name was handed
    // to this row (see `mark_deleting`), so the only holder can be us or
    // the template we replace.
    if let Some((holder, _)) = holder?
        && holder != op.template_id
        && Some(holder) != op.replaces
    {
        return Ok(Finish::NameTaken);
    }
    let mut replaced = Vec::new();
    let mut replaced_id = None;
    if let Some(old) = op.replaces {
        // Locked: a concurrent delete of the old template waits, then
        // finds it deleting.
        let still_ready = query_opt(
            db,
            "SELECT state = 'ready' FROM templates WHERE id = $1 FOR UPDATE",
            &[&old.bytes()],
        )
        .await?;
        let still_ready = match still_ready {
            Some(r) => get::<bool>(&r, 0)?,
            None => false,
        };
        if still_ready {
            replaced = mark_deleting(db, old, lease_until, now).await?;
            replaced_id = Some(old.to_string());
        }
    }
    // The remaining writes are one statement (see `FINISH_CREATE_WRITES`).
    let (size, now_ms) = (big(size_bytes), now.unix_millis());
    let (host_bytes, team_bytes, sandbox_bytes) =
        (op.host.id.bytes(), op.team.bytes(), op.sandbox_id.bytes());
    let (audit_id, actor_id, actor_kind, actor_name) = (
        crate::ids::AuditLogId::new(),
        op.actor.id_text(),
        op.actor.kind(),
        op.actor.name_text(),
    );
    let audit_bytes = audit_id.bytes();
    let resource_id = op.template_id.to_string();
    let metadata = serde_json::json!({
        "name": op.name.as_str(),
        "sandbox_id": op.sandbox_id.to_string(),
        "host_id": op.host.id.to_string(),
        "size_bytes": size_bytes,
        "replaced": replaced_id,
    })
    .to_string();
    let action = crate::audit::actions::SNAPSHOT_CREATE;
    let compat = host_info_json(compat);
    let params: [Param<'_>; 14] = [
        &template_bytes,
        &size,
        &now_ms,
        &host_bytes,
        &team_bytes,
        &sandbox_bytes,
        &audit_bytes,
        &actor_kind,
        &actor_id,
        &actor_name,
        &action,
        &resource_id,
        &metadata,
        &compat,
    ];
    let ready = query(db, &FINISH_CREATE_WRITES, &params).await?;
    let Some(row) = ready.first() else {
        // The journal entry was open, so the row must be `creating`; a
        // mismatch is damage, and the whole transaction is rolled back.
        return Err(StoreError::corrupt(format!(
            "template {} has an open journal entry but is not being created",
            op.template_id
        ))
        .into());
    };
    let template = template_row(row)?;
    let result = crate::operation::encode_template(&template);
    let succeeded = crate::operation::OperationState::Succeeded;
    super::requests::end_request(db, op.id, succeeded, &result, now).await?;
    Ok(Finish::Done(CreateDone { template, replaced }))
}

/// Rolls back a failed create in one transaction (see `sqlite/sql.rs`'s
/// `fail_create` for what and why): the template row goes, the key is
/// queued for deletion from `first_attempt` on unless the request provably
/// never reached the agent, the sandbox gets its status (or stays owned
/// until its host answers), the failure is audited. Only applies while the
/// journal entry is open in phase `started`; returns whether it did.
pub(super) async fn fail_create(
    db: &impl GenericClient,
    op: &CreateOp,
    sandbox: SandboxOutcome,
    failure: &Failure,
    first_attempt: Option<Timestamp>,
    now: Timestamp,
) -> TxResult<bool> {
    // The claim: one statement, so a concurrent finish or failure of the
    // same entry waits for this one and then finds it closed (or the other
    // way round).
    let claimed = match sandbox {
        SandboxOutcome::Known(_) => {
            execute(
                db,
                "DELETE FROM operations WHERE template_id = $1 AND phase = 'started'",
                &[&op.template_id.bytes()],
            )
            .await?
        }
        SandboxOutcome::Unknown { retry_at } => {
            execute(
                db,
                "UPDATE operations SET phase = 'resolving', next_attempt = $2, last_error = $3,
                                       updated_at = $4
                 WHERE template_id = $1 AND phase = 'started'",
                &[
                    &op.template_id.bytes(),
                    &retry_at.unix_millis(),
                    &failure.detail,
                    &now.unix_millis(),
                ],
            )
            .await?
        }
    };
    if claimed != 1 {
        return Ok(false);
    }
    execute(
        db,
        "DELETE FROM templates WHERE id = $1 AND state = 'creating'",
        &[&op.template_id.bytes()],
    )
    .await?;
    if let Some(first_attempt) = first_attempt {
        execute(
            db,
            "INSERT INTO placements (template_id, host_id, team_id, state, next_attempt, created_at, updated_at)
             VALUES ($1, $2, $3, 'deleting', $4, $5, $5)
             ON CONFLICT (template_id, host_id) DO NOTHING",
            &[
                &op.template_id.bytes(),
                &op.host.id.bytes(),
                &op.team.bytes(),
                &first_attempt.unix_millis(),
                &now.unix_millis(),
            ],
        )
        .await?;
    }
    if let SandboxOutcome::Known(status) = sandbox {
        release_sandbox(db, op.sandbox_id, status, now).await?;
    }
    let result = crate::operation::encode_error(failure.code, &failure.message);
    let failed = crate::operation::OperationState::Failed;
    super::requests::end_request(db, op.id, failed, &result, now).await?;
    insert_audit(
        db,
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
    )
    .await?;
    Ok(true)
}

/// Closes a `resolving` operation once the host reported the sandbox.
/// Returns whether it was still open.
pub(super) async fn resolve_operation(
    db: &impl GenericClient,
    op: &CreateOp,
    status: SandboxStatus,
    now: Timestamp,
) -> TxResult<bool> {
    let closed = execute(
        db,
        "DELETE FROM operations WHERE template_id = $1 AND phase = 'resolving'",
        &[&op.template_id.bytes()],
    )
    .await?;
    if closed == 1 {
        release_sandbox(db, op.sandbox_id, status, now).await?;
    }
    Ok(closed == 1)
}

/// Resolves the open operation `id` now, without the host's answer (see
/// `sqlite/sql.rs`). Audited in the operation's team's log. Returns the
/// operation as it was, or `None` when it is not open (any more).
pub(super) async fn resolve_open_operation(
    db: &impl GenericClient,
    id: OperationId,
    status: SandboxStatus,
    actor: &Actor,
    reason: ResolveReason,
    first_attempt: Timestamp,
    now: Timestamp,
) -> TxResult<Option<CreateOp>> {
    if status == SandboxStatus::Snapshotting {
        return Err(
            Error::invalid_request("an operation cannot be resolved to snapshotting").into(),
        );
    }
    let Some((op, phase)) = lock_operation(db, id).await? else {
        return Ok(None);
    };
    let closed = match phase.as_str() {
        "started" => {
            fail_create(
                db,
                &op,
                SandboxOutcome::Known(status),
                &Failure::unresolved(reason),
                Some(first_attempt),
                now,
            )
            .await?
        }
        "resolving" => resolve_operation(db, &op, status, now).await?,
        _ => false,
    };
    if !closed {
        return Ok(None);
    }
    insert_audit(
        db,
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
                "phase": Some(phase),
                "reason": reason.as_str(),
            }),
        },
        now,
    )
    .await?;
    Ok(Some(op))
}
