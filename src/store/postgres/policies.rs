//! Team policies (SPEC §8): quotas. A create of a team with limits locks
//! the team's limits row (`FOR UPDATE`) before it counts, so that creates
//! of one team, on any replica, are counted one after the other: under
//! READ COMMITTED the count after the lock sees every create committed
//! before it.

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::rows::{BlobId, execute, get, query_one, query_opt};
use crate::ids::TeamId;
use crate::model::{TeamLimits, Timestamp, Usage};

pub(super) async fn set_team_limits(
    db: &impl GenericClient,
    team: TeamId,
    limits: &TeamLimits,
    now: Timestamp,
) -> TxResult<()> {
    let limit = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let (max_snapshots, max_bytes) = (limit(limits.max_snapshots), limit(limits.max_bytes));
    execute(
        db,
        "INSERT INTO team_limits (team_id, max_snapshots, max_bytes, updated_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (team_id) DO UPDATE SET max_snapshots = excluded.max_snapshots,
             max_bytes = excluded.max_bytes, updated_at = excluded.updated_at",
        &[
            &team.bytes(),
            &max_snapshots,
            &max_bytes,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

/// A team's usage and limits. With `lock`, the limits row is locked first
/// (a create's check; see the module's comment).
pub(super) async fn team_usage(
    db: &impl GenericClient,
    team: TeamId,
    lock: bool,
) -> TxResult<Usage> {
    let sql = if lock {
        "SELECT max_snapshots, max_bytes FROM team_limits WHERE team_id = $1 FOR UPDATE"
    } else {
        "SELECT max_snapshots, max_bytes FROM team_limits WHERE team_id = $1"
    };
    let limits = match query_opt(db, sql, &[&team.bytes()]).await? {
        Some(row) => {
            let limit = |v: Option<i64>| v.map(|v| u64::try_from(v).unwrap_or(0));
            TeamLimits::new(
                limit(get::<Option<i64>>(&row, 0)?),
                limit(get::<Option<i64>>(&row, 1)?),
            )
        }
        None => TeamLimits::default(),
    };
    if lock && limits == TeamLimits::default() {
        // No limits: nothing to count (and nothing was locked).
        return Ok(Usage {
            limits,
            ..Usage::default()
        });
    }
    let row = query_one(
        db,
        "SELECT count(*), coalesce(sum(size_bytes), 0)::bigint FROM templates
         WHERE team_id = $1 AND type = 'snapshot' AND state <> 'deleting'",
        &[&team.bytes()],
    )
    .await?;
    let count = |i: usize| get::<i64>(&row, i).map(|v| u64::try_from(v).unwrap_or(0));
    Ok(Usage {
        snapshots: count(0)?,
        bytes: count(1)?,
        limits,
    })
}
