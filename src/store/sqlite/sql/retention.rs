//! Team policies (SPEC §8): retention. A team's policy row, and the
//! sweep's batches: what the policies select, each read from an index of
//! its own (`templates_expiry`, `templates_unused`, `templates_by_source`),
//! deleted by id as a delete does. The writer runs one batch at a time, so
//! what a batch reads is what it deletes.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::model::RetentionPolicy;
use crate::store::{policy, retention_audit, retention_from_columns, retention_secs};

pub(crate) fn set_team_retention(
    conn: &Connection,
    team: TeamId,
    p: &RetentionPolicy,
    now: Timestamp,
) -> Result<()> {
    if p.is_off() {
        conn.prepare_cached("DELETE FROM team_retention WHERE team_id = ?1")
            .and_then(|mut s| s.execute([team]))?;
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO team_retention (team_id, default_ttl, delete_unused_after,
                                     keep_last_per_sandbox, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (team_id) DO UPDATE SET default_ttl = excluded.default_ttl,
             delete_unused_after = excluded.delete_unused_after,
             keep_last_per_sandbox = excluded.keep_last_per_sandbox,
             updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(params![
            team,
            retention_secs(p.default_ttl),
            retention_secs(p.delete_unused_after),
            p.keep_last_per_sandbox.map(i64::from),
            now.unix_millis()
        ])
    })?;
    Ok(())
}

pub(crate) fn team_retention(conn: &Connection, team: TeamId) -> Result<RetentionPolicy> {
    Ok(conn
        .prepare_cached(
            "SELECT default_ttl, delete_unused_after, keep_last_per_sandbox
             FROM team_retention WHERE team_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([team], |r| {
                Ok(retention_from_columns(r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })?
        .unwrap_or_default())
}

/// Expired snapshots, soonest first (the platform's excluded).
pub(super) const EXPIRED: &str = "SELECT id, team_id, name, expires_at
     FROM templates INDEXED BY templates_expiry
     WHERE state = 'ready' AND expires_at IS NOT NULL AND expires_at <= ?1
       AND type = 'snapshot' AND team_id <> ?2
     ORDER BY expires_at LIMIT ?3";

/// A team's snapshots last used (or, never restored, created) at or
/// before a time, oldest first.
pub(super) const UNUSED: &str = "SELECT id, team_id, name, last_used_at
     FROM templates INDEXED BY templates_unused
     WHERE team_id = ?1 AND type = 'snapshot' AND state = 'ready'
       AND coalesce(last_used_at, created_at) <= ?2
     ORDER BY coalesce(last_used_at, created_at) LIMIT ?3";

/// A team's snapshots beyond the newest N of their source sandbox,
/// oldest first.
pub(super) const BEYOND_LAST: &str = "SELECT id, team_id, name, source_sandbox_id FROM (
         SELECT id, team_id, name, source_sandbox_id, created_at,
                row_number() OVER (PARTITION BY source_sandbox_id
                                   ORDER BY created_at DESC, id DESC) AS newer
         FROM templates INDEXED BY templates_by_source
         WHERE team_id = ?1 AND type = 'snapshot' AND state = 'ready'
           AND source_sandbox_id IS NOT NULL
     ) WHERE newer > ?2 ORDER BY created_at LIMIT ?3";

/// One candidate: id, team, name, and the metadata its policy adds.
type Candidate = (TemplateId, TeamId, String, serde_json::Value);

fn candidates(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    policy: &'static str,
    extra: impl Fn(&Row<'_>) -> rusqlite::Result<serde_json::Value>,
) -> Result<Vec<Candidate>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt
        .query_map(params, |r| {
            let mut metadata = extra(r)?;
            metadata["policy"] = serde_json::json!(policy);
            Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, metadata))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// One batch of the sweep (see `Store::sweep_retention`).
pub(crate) fn sweep_retention(conn: &Connection, now: Timestamp, limit: u32) -> Result<u32> {
    let now_ms = now.unix_millis();
    let mut left = limit;
    let ms = |v: Option<i64>| v.map(|v| Timestamp::from_unix_millis(v).to_rfc3339());
    let found = candidates(
        conn,
        EXPIRED,
        params![now_ms, TeamId::PLATFORM, left],
        policy::TTL,
        |r| Ok(serde_json::json!({ "expires_at": ms(r.get(3)?) })),
    )?;
    left -= delete_all(conn, found, now)?;
    if left > 0 {
        let teams = policy_teams(
            conn,
            "SELECT team_id, delete_unused_after FROM team_retention
             WHERE delete_unused_after IS NOT NULL AND team_id <> ?1",
        )?;
        for (team, after_secs) in teams {
            if left == 0 {
                break;
            }
            let cutoff = now_ms.saturating_sub(after_secs.saturating_mul(1000));
            let found = candidates(
                conn,
                UNUSED,
                params![team, cutoff, left],
                policy::UNUSED,
                |r| {
                    Ok(serde_json::json!({
                        "delete_unused_after": after_secs,
                        "last_used_at": ms(r.get(3)?),
                    }))
                },
            )?;
            left -= delete_all(conn, found, now)?;
        }
    }
    if left > 0 {
        let teams = policy_teams(
            conn,
            "SELECT team_id, keep_last_per_sandbox FROM team_retention
             WHERE keep_last_per_sandbox IS NOT NULL AND team_id <> ?1",
        )?;
        for (team, keep) in teams {
            if left == 0 {
                break;
            }
            let found = candidates(
                conn,
                BEYOND_LAST,
                params![team, keep, left],
                policy::KEEP_LAST,
                |r| {
                    let source: Option<SandboxId> = r.get(3)?;
                    Ok(serde_json::json!({
                        "keep_last_per_sandbox": keep,
                        "source_sandbox_id": source.map(|s| s.to_string()),
                    }))
                },
            )?;
            left -= delete_all(conn, found, now)?;
        }
    }
    Ok(limit - left)
}

/// The teams (not the platform) with a policy's column set, and its value.
fn policy_teams(conn: &Connection, sql: &str) -> Result<Vec<(TeamId, i64)>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt
        .query_map([TeamId::PLATFORM], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}

/// Deletes each candidate by id as `begin_delete` does (its placements
/// due at once, unleased: the worker claims them), audited as the system;
/// returns how many.
fn delete_all(conn: &Connection, found: Vec<Candidate>, now: Timestamp) -> Result<u32> {
    let mut n = 0;
    for (id, team, name, mut metadata) in found {
        let targets = mark_deleting(conn, id, now, now)?;
        metadata["name"] = serde_json::json!(name);
        insert_audit(conn, &retention_audit(id, team, metadata, &targets), now)?;
        tracing::info!(template = %id, %team, name, "retention: snapshot deleted");
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    /// The sweep's queries read from their indexes, never a scan of
    /// `templates`: the plan names the index (and `INDEXED BY` makes a
    /// query the index cannot answer fail to prepare).
    #[test]
    fn the_sweep_queries_use_their_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = Connection::open(dir.path().join("t.db")).expect("open");
        crate::store::sqlite::migrate::migrate(&mut conn).expect("migrate");
        let team = || Value::Blob(TeamId::new().as_blob().to_vec());
        for (sql, index, params) in [
            (
                EXPIRED,
                "templates_expiry",
                [Value::Integer(0), team(), Value::Integer(100)],
            ),
            (
                UNUSED,
                "templates_unused",
                [team(), Value::Integer(0), Value::Integer(100)],
            ),
            (
                BEYOND_LAST,
                "templates_by_source",
                [team(), Value::Integer(2), Value::Integer(100)],
            ),
        ] {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("prepare");
            let plan = stmt
                .query_map(rusqlite::params_from_iter(params), |r| {
                    r.get::<_, String>(3)
                })
                .expect("query")
                .collect::<rusqlite::Result<Vec<_>>>()
                .expect("rows");
            assert!(
                plan.iter().any(|line| line.contains(index))
                    && !plan.iter().any(|line| line == "SCAN templates"),
                "{index}: {plan:?}"
            );
        }
    }
}
