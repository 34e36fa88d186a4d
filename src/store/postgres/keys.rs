//! Teams and API keys (only the SHA-256 of a key's secret is stored).

use deadpool_postgres::GenericClient;

use super::TxResult;
use super::rows::{BlobId, execute, get, get_id, query_one, query_opt};
use crate::error::Error;
use crate::ids::{ApiKeyId, TeamId};
use crate::model::Timestamp;
use crate::store::KeyRecord;

pub(super) async fn create_team(
    db: &impl GenericClient,
    id: TeamId,
    name: &str,
    now: Timestamp,
) -> TxResult<()> {
    execute(
        db,
        "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)",
        &[&id.bytes(), &name, &now.unix_millis()],
    )
    .await?;
    Ok(())
}

pub(super) async fn create_key(
    db: &impl GenericClient,
    key: &KeyRecord,
    now: Timestamp,
) -> TxResult<()> {
    // Teams are never deleted, so the check cannot go stale before the
    // insert (and the foreign key would catch it if it did).
    let known: bool = get(
        &query_one(
            db,
            "SELECT EXISTS (SELECT 1 FROM teams WHERE id = $1)",
            &[&key.team.bytes()],
        )
        .await?,
        0,
    )?;
    if !known {
        return Err(Error::not_found(format!("team {} not found", key.team)).into());
    }
    execute(
        db,
        "INSERT INTO api_keys (id, team_id, name, secret_hash, admin, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &key.id.bytes(),
            &key.team.bytes(),
            &key.name,
            &&key.secret_hash[..],
            &key.admin,
            &now.unix_millis(),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn revoke_key(
    db: &impl GenericClient,
    id: ApiKeyId,
    now: Timestamp,
) -> TxResult<bool> {
    let changed = execute(
        db,
        "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        &[&id.bytes(), &now.unix_millis()],
    )
    .await?;
    Ok(changed == 1)
}

pub(super) async fn find_key(db: &impl GenericClient, id: ApiKeyId) -> TxResult<Option<KeyRecord>> {
    let Some(row) = query_opt(
        db,
        "SELECT team_id, name, secret_hash, admin FROM api_keys
         WHERE id = $1 AND revoked_at IS NULL",
        &[&id.bytes()],
    )
    .await?
    else {
        return Ok(None);
    };
    let team: TeamId = get_id(&row, 0)?;
    let name: String = get(&row, 1)?;
    let hash: &[u8] = get(&row, 2)?;
    let admin: bool = get(&row, 3)?;
    // A hash of the wrong length matches no key.
    let Ok(secret_hash) = <[u8; 32]>::try_from(hash) else {
        return Ok(None);
    };
    Ok(Some(KeyRecord {
        id,
        team,
        name,
        secret_hash,
        admin,
    }))
}
