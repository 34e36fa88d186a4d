//! The audit log: written inside the transaction it audits, read newest
//! first by sequence number (`BIGSERIAL`: replicas share one sequence).

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::rows::{BlobId, execute, get, get_id, get_time, query};
use crate::audit::{AuditEntry, AuditOutcome, NewAuditEntry};
use crate::ids::{AuditLogId, TeamId};
use crate::model::Timestamp;
use crate::store::actor_from_columns;

const INSERT_AUDIT: &str = "INSERT INTO audit_log
         (id, team_id, actor_type, actor_id, actor_name, action, resource_type, resource_id,
          outcome, error_code, metadata, created_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

pub(super) async fn insert_audit(
    db: &impl GenericClient,
    e: &NewAuditEntry,
    now: Timestamp,
) -> TxResult<()> {
    let id = AuditLogId::new();
    let actor_id = e.actor.id_text();
    let metadata = e.metadata.to_string();
    execute(
        db,
        INSERT_AUDIT,
        &[
            &id.bytes(),
            &e.team.bytes(),
            &e.actor.kind(),
            &actor_id,
            &e.actor.name_text(),
            &e.action,
            &e.resource_type(),
            &e.resource_id,
            &e.outcome.as_str(),
            &e.error_code,
            &metadata,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

/// A team's audit entries, newest first, below `before` (a sequence number).
pub(super) async fn list_audit(
    db: &impl GenericClient,
    team: TeamId,
    before: Option<i64>,
    resource_type: Option<&str>,
    action: Option<&str>,
    limit: Option<u32>,
) -> TxResult<Vec<(i64, AuditEntry)>> {
    let limit = limit.map(i64::from);
    let rows = query(
        db,
        "SELECT seq, id, team_id, actor_type, actor_id, actor_name, action, resource_type,
                resource_id, outcome, error_code, metadata, created_at
         FROM audit_log
         WHERE team_id = $1 AND ($2::bigint IS NULL OR seq < $2)
           AND ($3::text IS NULL OR resource_type = $3) AND ($4::text IS NULL OR action = $4)
         ORDER BY seq DESC LIMIT $5::bigint",
        &[&team.bytes(), &before, &resource_type, &action, &limit],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let metadata: &str = get(r, 11)?;
        let outcome: &str = get(r, 9)?;
        out.push((
            get::<i64>(r, 0)?,
            AuditEntry {
                id: get_id(r, 1)?,
                team: get_id(r, 2)?,
                actor: actor_from_columns(get(r, 3)?, get(r, 4)?, get(r, 5)?),
                action: get(r, 6)?,
                resource_type: get(r, 7)?,
                resource_id: get(r, 8)?,
                outcome: if outcome == "success" {
                    AuditOutcome::Success
                } else {
                    AuditOutcome::Failure
                },
                error_code: get(r, 10)?,
                metadata: serde_json::from_str(metadata).unwrap_or(serde_json::Value::Null),
                created_at: get_time(r, 12)?,
            },
        ));
    }
    Ok(out)
}
