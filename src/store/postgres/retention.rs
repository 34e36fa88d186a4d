//! Team policies (SPEC §8): retention, as `sqlite/sql/retention.rs`. Every
//! replica's worker sweeps: each batch locks what it selects with `FOR
//! UPDATE SKIP LOCKED`, and the `state = 'ready'` check is part of that
//! locking read (re-checked on the newest row version once the lock is
//! had), so that of two replicas sweeping at once each template is
//! selected by one, deleted once and audited once. The lock on the
//! template's row is also what `mark_deleting` requires of its caller.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::TxResult;
use super::audit::insert_audit;
use super::placements::mark_deleting;
use super::rows::{BlobId, Param, execute, get, get_id, get_opt_id, query, query_opt};
use crate::ids::{SandboxId, TeamId, TemplateId};
use crate::model::{RetentionPolicy, Timestamp};
use crate::store::{StoreError, policy, retention_audit, retention_from_columns, retention_secs};

pub(super) async fn set_team_retention(
    db: &impl GenericClient,
    team: TeamId,
    p: &RetentionPolicy,
    now: Timestamp,
) -> TxResult<()> {
    if p.is_off() {
        execute(
            db,
            "DELETE FROM team_retention WHERE team_id = $1",
            &[&team.bytes()],
        )
        .await?;
        return Ok(());
    }
    let (ttl, unused) = (
        retention_secs(p.default_ttl),
        retention_secs(p.delete_unused_after),
    );
    let keep = p.keep_last_per_sandbox.map(i64::from);
    execute(
        db,
        "INSERT INTO team_retention (team_id, default_ttl, delete_unused_after,
                                     keep_last_per_sandbox, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (team_id) DO UPDATE SET default_ttl = excluded.default_ttl,
             delete_unused_after = excluded.delete_unused_after,
             keep_last_per_sandbox = excluded.keep_last_per_sandbox,
             updated_at = excluded.updated_at",
        &[&team.bytes(), &ttl, &unused, &keep, &now.unix_millis()],
    )
    .await?;
    Ok(())
}

pub(super) async fn team_retention(
    db: &impl GenericClient,
    team: TeamId,
) -> TxResult<RetentionPolicy> {
    let row = query_opt(
        db,
        "SELECT default_ttl, delete_unused_after, keep_last_per_sandbox
         FROM team_retention WHERE team_id = $1",
        &[&team.bytes()],
    )
    .await?;
    Ok(match row {
        Some(row) => retention_from_columns(get(&row, 0)?, get(&row, 1)?, get(&row, 2)?),
        None => RetentionPolicy::default(),
    })
}

/// Expired snapshots, soonest first (the platform's excluded), locked.
const EXPIRED: &str = "SELECT id, team_id, name, expires_at FROM templates
     WHERE state = 'ready' AND expires_at IS NOT NULL AND expires_at <= $1
       AND type = 'snapshot' AND team_id <> $2
     ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED";

/// A team's snapshots last used (or, never restored, created) at or
/// before a time, oldest first, locked.
const UNUSED: &str = "SELECT id, team_id, name, last_used_at FROM templates
     WHERE team_id = $1 AND type = 'snapshot' AND state = 'ready'
       AND coalesce(last_used_at, created_at) <= $2
     ORDER BY coalesce(last_used_at, created_at) LIMIT $3 FOR UPDATE SKIP LOCKED";

/// A team's snapshots beyond the newest N of their source sandbox, oldest
/// first, locked. (A locking read cannot hold the window function: the
/// ranking is a subquery, and the outer read locks and re-checks.)
const BEYOND_LAST: &str = "SELECT id, team_id, name, source_sandbox_id FROM templates
     WHERE id IN (
         SELECT id FROM (
             SELECT id, row_number() OVER (PARTITION BY source_sandbox_id
                                           ORDER BY created_at DESC, id DESC) AS newer
             FROM templates
             WHERE team_id = $1 AND type = 'snapshot' AND state = 'ready'
               AND source_sandbox_id IS NOT NULL
         ) ranked WHERE newer > $2
     ) AND state = 'ready'
     ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED";

/// One candidate: id, team, name, and the metadata its policy adds.
type Candidate = (TemplateId, TeamId, String, serde_json::Value);

async fn candidates(
    db: &impl GenericClient,
    sql: &str,
    params: &[Param<'_>],
    policy: &'static str,
    extra: impl Fn(&Row) -> Result<serde_json::Value, StoreError>,
) -> TxResult<Vec<Candidate>> {
    let rows = query(db, sql, params).await?;
    let mut found = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut metadata = extra(row)?;
        metadata["policy"] = serde_json::json!(policy);
        found.push((
            get_id(row, 0)?,
            get_id(row, 1)?,
            get::<String>(row, 2)?,
            metadata,
        ));
    }
    Ok(found)
}

fn rfc3339(v: Option<i64>) -> Option<String> {
    v.map(|v| Timestamp::from_unix_millis(v).to_rfc3339())
}

/// One batch of the sweep (see `Store::sweep_retention`).
pub(super) async fn sweep_retention(
    db: &impl GenericClient,
    now: Timestamp,
    limit: u32,
) -> TxResult<u32> {
    let now_ms = now.unix_millis();
    let mut left = i64::from(limit);
    let found = candidates(
        db,
        EXPIRED,
        &[&now_ms, &TeamId::PLATFORM.bytes(), &left],
        policy::TTL,
        |r| Ok(serde_json::json!({ "expires_at": rfc3339(get(r, 3)?) })),
    )
    .await?;
    left -= delete_all(db, found, now).await?;
    if left > 0 {
        let teams = policy_teams(
            db,
            "SELECT team_id, delete_unused_after FROM team_retention
             WHERE delete_unused_after IS NOT NULL AND team_id <> $1",
        )
        .await?;
        for (team, after_secs) in teams {
            if left == 0 {
                break;
            }
            let cutoff = now_ms.saturating_sub(after_secs.saturating_mul(1000));
            let found = candidates(
                db,
                UNUSED,
                &[&team.bytes(), &cutoff, &left],
                policy::UNUSED,
                |r| {
                    Ok(serde_json::json!({
                        "delete_unused_after": after_secs,
                        "last_used_at": rfc3339(get(r, 3)?),
                    }))
                },
            )
            .await?;
            left -= delete_all(db, found, now).await?;
        }
    }
    if left > 0 {
        let teams = policy_teams(
            db,
            "SELECT team_id, keep_last_per_sandbox FROM team_retention
             WHERE keep_last_per_sandbox IS NOT NULL AND team_id <> $1",
        )
        .await?;
        for (team, keep) in teams {
            if left == 0 {
                break;
            }
            let found = candidates(
                db,
                BEYOND_LAST,
                &[&team.bytes(), &keep, &left],
                policy::KEEP_LAST,
                |r| {
                    let source: Option<SandboxId> = get_opt_id(r, 3)?;
                    Ok(serde_json::json!({
                        "keep_last_per_sandbox": keep,
                        "source_sandbox_id": source.map(|s| s.to_string()),
                    }))
                },
            )
            .await?;
            left -= delete_all(db, found, now).await?;
        }
    }
    Ok(limit - u32::try_from(left).unwrap_or(0))
}

/// The teams (not the platform) with a policy's column set, and its value.
async fn policy_teams(db: &impl GenericClient, sql: &str) -> TxResult<Vec<(TeamId, i64)>> {
    let rows = query(db, sql, &[&TeamId::PLATFORM.bytes()]).await?;
    let mut teams = Vec::with_capacity(rows.len());
    for row in &rows {
        teams.push((get_id(row, 0)?, get(row, 1)?));
    }
    Ok(teams)
}

/// Deletes each (locked) candidate by id as `begin_delete` does (its
/// placements due at once, unleased: the worker claims them), audited as
/// the system; returns how many.
async fn delete_all(
    db: &impl GenericClient,
    found: Vec<Candidate>,
    now: Timestamp,
) -> TxResult<i64> {
    let mut n = 0;
    for (id, team, name, mut metadata) in found {
        let targets = mark_deleting(db, id, now, now).await?;
        metadata["name"] = serde_json::json!(name);
        insert_audit(db, &retention_audit(id, team, metadata, &targets), now).await?;
        tracing::info!(template = %id, %team, name, "retention: snapshot deleted");
        n += 1;
    }
    Ok(n)
}
