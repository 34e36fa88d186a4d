//! Remembered requests (SPEC §8): idempotency keys and asynchronous
//! operations. See [`crate::operation`].

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::operation::{OperationKind, OperationState, RequestRecord, StoredRequest, in_progress};

const REQUEST_COLS: &str =
    "id, kind, fingerprint, respond_async, state, result, created_at, finished_at";

fn request_row(row: &Row<'_>) -> rusqlite::Result<StoredRequest> {
    let corrupt = |what: &str| {
        FromSqlError::Other(Box::new(StoreError::corrupt(format!(
            "a remembered request has an unknown {what}"
        ))))
    };
    let kind: String = row.get(1)?;
    let state: String = row.get(4)?;
    let column = |idx, err| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(err))
    };
    Ok(StoredRequest {
        id: row.get(0)?,
        kind: OperationKind::parse(&kind).ok_or_else(|| column(1, corrupt("kind")))?,
        fingerprint: row.get(2)?,
        respond_async: row.get(3)?,
        state: OperationState::parse(&state).ok_or_else(|| column(4, corrupt("state")))?,
        result: row.get(5)?,
        created_at: Timestamp::from_unix_millis(row.get(6)?),
        finished_at: row
            .get::<_, Option<i64>>(7)?
            .map(Timestamp::from_unix_millis),
    })
}

/// Records a request in the transaction that opens its operation `id`.
/// An expired row under the same key is replaced; a live one (a request
/// with the same key that began meanwhile) is 409 `idempotency_in_progress`
/// and the whole transaction is rolled back.
pub(crate) fn insert_request(
    conn: &Connection,
    id: OperationId,
    team: TeamId,
    record: &RequestRecord,
    now: Timestamp,
) -> Result<()> {
    let key = record.key.as_ref().map(|k| k.as_str());
    if let Some(key) = key {
        conn.prepare_cached(
            "DELETE FROM requests WHERE team_id = ?1 AND idem_key = ?2 AND expires_at <= ?3",
        )
        .and_then(|mut s| s.execute(params![team, key, now.unix_millis()]))?;
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO requests (id, team_id, kind, idem_key, fingerprint, respond_async, state,
                                   created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?8)
             ON CONFLICT (team_id, idem_key) WHERE idem_key IS NOT NULL DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                id,
                team,
                record.kind.as_str(),
                key,
                record.fingerprint,
                record.respond_async,
                now.unix_millis(),
                record.expires_at.unix_millis()
            ])
        })?;
    if inserted != 1 {
        return Err(in_progress());
    }
    Ok(())
}

/// Gives the request of operation `id` its outcome (a no-op when the
/// operation is not remembered, or already has one). Its expiry moves on
/// by the operation's duration.
pub(crate) fn end_request(
    conn: &Connection,
    id: OperationId,
    state: OperationState,
    result: &str,
    now: Timestamp,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE requests SET state = ?2, result = ?3, finished_at = ?4,
                             expires_at = expires_at + max(?4 - created_at, 0)
         WHERE id = ?1 AND state = 'running'",
    )
    .and_then(|mut s| s.execute(params![id, state.as_str(), result, now.unix_millis()]))?;
    Ok(())
}

/// A team's live request under `key`.
pub(crate) fn find_request(
    conn: &Connection,
    team: TeamId,
    key: &str,
    now: Timestamp,
) -> Result<Option<StoredRequest>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {REQUEST_COLS} FROM requests
             WHERE team_id = ?1 AND idem_key = ?2 AND expires_at > ?3"
        ))
        .and_then(|mut s| {
            s.query_row(params![team, key, now.unix_millis()], request_row)
                .optional()
        })?)
}

/// A team's live request by operation id.
pub(crate) fn get_request(
    conn: &Connection,
    team: TeamId,
    id: OperationId,
    now: Timestamp,
) -> Result<Option<StoredRequest>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {REQUEST_COLS} FROM requests
             WHERE id = ?1 AND team_id = ?2 AND expires_at > ?3"
        ))
        .and_then(|mut s| {
            s.query_row(params![id, team, now.unix_millis()], request_row)
                .optional()
        })?)
}

/// Purges up to `limit` expired requests, oldest first; returns how many.
pub(crate) fn purge_requests(conn: &Connection, now: Timestamp, limit: u32) -> Result<u64> {
    let purged = conn
        .prepare_cached(
            "DELETE FROM requests WHERE id IN
                 (SELECT id FROM requests WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![now.unix_millis(), limit]))?;
    Ok(purged as u64)
}
