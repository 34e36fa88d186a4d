//! The audit log, written in the same transactions as what it records.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) fn insert_audit(conn: &Connection, e: &NewAuditEntry, now: Timestamp) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit_log (id, team_id, actor_type, actor_id, actor_name, action,
                                resource_type, resource_id, outcome, error_code, metadata, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut s| {
        s.execute(params![
            AuditLogId::new(),
            e.team,
            e.actor.kind(),
            e.actor.id_text(),
            e.actor.name_text(),
            e.action,
            e.resource_type(),
            e.resource_id,
            e.outcome.as_str(),
            e.error_code,
            e.metadata.to_string(),
            now.unix_millis()
        ])
    })?;
    Ok(())
}

/// A team's audit entries, newest first, below `before` (a sequence number).
pub(crate) fn list_audit(
    conn: &Connection,
    team: TeamId,
    before: Option<i64>,
    resource_type: Option<&str>,
    action: Option<&str>,
    limit: Option<u32>,
) -> Result<Vec<(i64, AuditEntry)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, team_id, actor_type, actor_id, actor_name, action, resource_type,
                    resource_id, outcome, error_code, metadata, created_at
             FROM audit_log
             WHERE team_id = ?1 AND (?2 IS NULL OR seq < ?2)
               AND (?3 IS NULL OR resource_type = ?3) AND (?4 IS NULL OR action = ?4)
             ORDER BY seq DESC LIMIT ?5",
    )?;
    let rows = stmt
        .query_map(
            params![
                team,
                before,
                resource_type,
                action,
                limit.map_or(-1, i64::from)
            ],
            |r| {
                let metadata: String = r.get(11)?;
                let outcome: String = r.get(9)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    AuditEntry {
                        id: r.get(1)?,
                        team: r.get(2)?,
                        actor: actor_from_columns(&r.get::<_, String>(3)?, r.get(4)?, r.get(5)?),
                        action: r.get(6)?,
                        resource_type: r.get(7)?,
                        resource_id: r.get(8)?,
                        outcome: if outcome == "success" {
                            AuditOutcome::Success
                        } else {
                            AuditOutcome::Failure
                        },
                        error_code: r.get(10)?,
                        metadata: serde_json::from_str(&metadata)
                            .unwrap_or(serde_json::Value::Null),
                        created_at: Timestamp::from_unix_millis(r.get(12)?),
                    },
                ))
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())?;
    Ok(rows)
}
