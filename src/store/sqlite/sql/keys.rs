//! Teams and API keys (only the SHA-256 of a secret is stored).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) fn create_team(conn: &Connection, id: TeamId, name: &str, now: Timestamp) -> Result<()> {
    conn.prepare_cached("INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute(params![id, name, now.unix_millis()]))?;
    Ok(())
}

pub(crate) fn create_key(conn: &Connection, key: &KeyRecord, now: Timestamp) -> Result<()> {
    let known: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM teams WHERE id = ?1)")
        .and_then(|mut s| s.query_row([key.team], |r| r.get(0)))?;
    if !known {
        return Err(Error::not_found(format!("team {} not found", key.team)));
    }
    conn.prepare_cached(
        "INSERT INTO api_keys (id, team_id, name, secret_hash, admin, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            key.id,
            key.team,
            key.name,
            &key.secret_hash[..],
            key.admin,
            now.unix_millis()
        ])
    })?;
    Ok(())
}

pub(crate) fn revoke_key(conn: &Connection, id: ApiKeyId, now: Timestamp) -> Result<bool> {
    let changed = conn
        .prepare_cached("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
        .and_then(|mut s| s.execute(params![id, now.unix_millis()]))?;
    Ok(changed == 1)
}

pub(crate) fn find_key(conn: &Connection, id: ApiKeyId) -> Result<Option<KeyRecord>> {
    let row = conn
        .prepare_cached(
            "SELECT team_id, name, secret_hash, admin FROM api_keys
             WHERE id = ?1 AND revoked_at IS NULL",
        )
        .and_then(|mut s| {
            s.query_row([id], |r| {
                Ok((
                    r.get::<_, TeamId>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })
            .optional()
        })?;
    Ok(row.and_then(|(team, name, hash, admin)| {
        // A hash of the wrong length matches no key.
        let secret_hash: [u8; 32] = hash.try_into().ok()?;
        Some(KeyRecord {
            id,
            team,
            name,
            secret_hash,
            admin,
        })
    }))
}
