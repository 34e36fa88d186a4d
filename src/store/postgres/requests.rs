//! Remembered requests (SPEC §8): idempotency keys and asynchronous
//! operations. See [`crate::operation`]. Two replicas that record the
//! same key at once are ordered by the unique index: the second waits for
//! the first's transaction and then inserts nothing (409
//! `idempotency_in_progress`), or takes the key if the first rolled back.

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::rows::{BlobId, execute, get, get_id, get_time, query_opt};
use crate::ids::{OperationId, TeamId};
use crate::model::Timestamp;
use crate::operation::{OperationKind, OperationState, RequestRecord, StoredRequest, in_progress};
use crate::store::StoreError;

const REQUEST_COLS: &str =
    "id, kind, fingerprint, respond_async, state, result, created_at, finished_at";

fn request_row(row: &tokio_postgres::Row) -> Result<StoredRequest, StoreError> {
    let corrupt =
        |what: &str| StoreError::corrupt(format!("a remembered request has an unknown {what}"));
    let kind: String = get(row, 1)?;
    let state: String = get(row, 4)?;
    Ok(StoredRequest {
        id: get_id(row, 0)?,
        kind: OperationKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        fingerprint: get(row, 2)?,
        respond_async: get(row, 3)?,
        state: OperationState::parse(&state).ok_or_else(|| corrupt("state"))?,
        result: get(row, 5)?,
        created_at: get_time(row, 6)?,
        finished_at: get::<Option<i64>>(row, 7)?.map(Timestamp::from_unix_millis),
    })
}

/// Records a request in the transaction that opens its operation `id` (see
/// `sqlite::sql::insert_request`).
pub(super) async fn insert_request(
    db: &impl GenericClient,
    id: OperationId,
    team: TeamId,
    record: &RequestRecord,
    now: Timestamp,
) -> TxResult<()> {
    let key = record.key.as_ref().map(|k| k.as_str());
    let (id_bytes, team_bytes, now_ms) = (id.bytes(), team.bytes(), now.unix_millis());
    if let Some(key) = key {
        execute(
            db,
            "DELETE FROM requests WHERE team_id = $1 AND idem_key = $2 AND expires_at <= $3",
            &[&team_bytes, &key, &now_ms],
        )
        .await?;
    }
    let (kind, expires_ms) = (record.kind.as_str(), record.expires_at.unix_millis());
    let inserted = execute(
        db,
        "INSERT INTO requests (id, team_id, kind, idem_key, fingerprint, respond_async, state,
                               created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8)
         ON CONFLICT (team_id, idem_key) WHERE idem_key IS NOT NULL DO NOTHING",
        &[
            &id_bytes,
            &team_bytes,
            &kind,
            &key,
            &record.fingerprint,
            &record.respond_async,
            &now_ms,
            &expires_ms,
        ],
    )
    .await?;
    if inserted != 1 {
        return Err(in_progress().into());
    }
    Ok(())
}

/// Gives the request of operation `id` its outcome (see
/// `sqlite::sql::end_request`).
pub(super) async fn end_request(
    db: &impl GenericClient,
    id: OperationId,
    state: OperationState,
    result: &str,
    now: Timestamp,
) -> TxResult<()> {
    let (id_bytes, state, now_ms) = (id.bytes(), state.as_str(), now.unix_millis());
    execute(
        db,
        "UPDATE requests SET state = $2, result = $3, finished_at = $4,
                             expires_at = expires_at + greatest($4 - created_at, 0)
         WHERE id = $1 AND state = 'running'",
        &[&id_bytes, &state, &result, &now_ms],
    )
    .await?;
    Ok(())
}

/// A team's live request under `key`.
pub(super) async fn find_request(
    db: &impl GenericClient,
    team: TeamId,
    key: &str,
    now: Timestamp,
) -> TxResult<Option<StoredRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLS} FROM requests
         WHERE team_id = $1 AND idem_key = $2 AND expires_at > $3"
    );
    let row = query_opt(db, &sql, &[&team.bytes(), &key, &now.unix_millis()]).await?;
    Ok(row.as_ref().map(request_row).transpose()?)
}

/// A team's live request by operation id.
pub(super) async fn get_request(
    db: &impl GenericClient,
    team: TeamId,
    id: OperationId,
    now: Timestamp,
) -> TxResult<Option<StoredRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLS} FROM requests
         WHERE id = $1 AND team_id = $2 AND expires_at > $3"
    );
    let row = query_opt(db, &sql, &[&id.bytes(), &team.bytes(), &now.unix_millis()]).await?;
    Ok(row.as_ref().map(request_row).transpose()?)
}

/// Purges up to `limit` expired requests, oldest first; returns how many.
/// Rows another replica is purging are skipped.
pub(super) async fn purge_requests(
    db: &impl GenericClient,
    now: Timestamp,
    limit: u32,
) -> TxResult<u64> {
    Ok(execute(
        db,
        "DELETE FROM requests WHERE id IN
             (SELECT id FROM requests WHERE expires_at <= $1 ORDER BY expires_at
              LIMIT $2 FOR UPDATE SKIP LOCKED)",
        &[&now.unix_millis(), &i64::from(limit)],
    )
    .await?)
}
