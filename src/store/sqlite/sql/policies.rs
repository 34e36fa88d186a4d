//! Team policies (SPEC §8): quotas.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) fn set_team_limits(
    conn: &Connection,
    team: TeamId,
    limits: &TeamLimits,
    now: Timestamp,
) -> Result<()> {
    let limit = |v: Option<u64>| v.map(clamp_i64);
    conn.prepare_cached(
        "INSERT INTO team_limits (team_id, max_snapshots, max_bytes, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (team_id) DO UPDATE SET max_snapshots = excluded.max_snapshots,
             max_bytes = excluded.max_bytes, updated_at = excluded.updated_at",
    )
    .and_then(|mut s| {
        s.execute(params![
            team,
            limit(limits.max_snapshots),
            limit(limits.max_bytes),
            now.unix_millis()
        ])
    })?;
    Ok(())
}

/// A create's quota check (see `Store::begin_create`): a team without
/// limits is not counted at all, so that creates of the many teams
/// without quotas pay one primary-key lookup for them.
pub(crate) fn check_quota(conn: &Connection, team: TeamId, overwrite: bool) -> Result<()> {
    let limited: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM team_limits WHERE team_id = ?1)")
        .and_then(|mut s| s.query_row([team], |r| r.get(0)))?;
    if !limited {
        return Ok(());
    }
    crate::store::quota_check(&team_usage(conn, team)?, overwrite)
}

/// A team's usage: its templates of type snapshot being created or ready,
/// and their bytes; with its limits.
pub(crate) fn team_usage(conn: &Connection, team: TeamId) -> Result<Usage> {
    let limits = conn
        .prepare_cached("SELECT max_snapshots, max_bytes FROM team_limits WHERE team_id = ?1")
        .and_then(|mut s| {
            s.query_row([team], |r| {
                let limit = |v: Option<i64>| v.map(|v| u64::try_from(v).unwrap_or(0));
                Ok(TeamLimits::new(limit(r.get(0)?), limit(r.get(1)?)))
            })
            .optional()
        })?
        .unwrap_or_default();
    let (snapshots, bytes) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM templates
             WHERE team_id = ?1 AND type = 'snapshot' AND state <> 'deleting'",
        )
        .and_then(|mut s| s.query_row([team], |r| Ok((u64_col(r, 0)?, u64_col(r, 1)?))))?;
    Ok(Usage {
        snapshots,
        bytes,
        limits,
    })
}
