//! Teams and API keys. A key is `sk-<key id digits>-<64 hex secret>`; the
//! store keeps only the SHA-256 of the secret, and the id lets us find the
//! row without scanning. Keys are shown once, when created.

use std::fmt;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode, Result};
use crate::ids::{ApiKeyId, ID_DIGITS, TeamId};
use crate::manager::Manager;
use crate::model::{Actor, Caller, Timestamp};
use crate::store::{Database, KeyRecord, Store, StoreError};

const KEY_PREFIX: &str = "sk-";
const SECRET_HEX: usize = 64;

/// A newly created API key. The text is shown once and never stored.
pub struct NewApiKey {
    /// The key's id (not secret).
    pub id: ApiKeyId,
    /// The team it acts for.
    pub team: TeamId,
    /// Whether it may use the admin endpoints.
    pub admin: bool,
    secret: String,
}

impl NewApiKey {
    /// The full key to give to the client, `sk-…`.
    pub fn reveal(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewApiKey")
            .field("id", &self.id)
            .field("team", &self.team)
            .field("admin", &self.admin)
            .field("secret", &"[redacted]")
            .finish()
    }
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_hex() -> Result<String> {
    let mut bytes = [0u8; SECRET_HEX / 2];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::new(ErrorCode::DbError, "cannot draw random bytes for a key")
            .with_source(StoreError::internal(format!("getrandom: {e}")))
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Splits a presented key into its id and secret; `None` if it is not one
/// of ours.
fn parse_key(presented: &str) -> Option<(ApiKeyId, &str)> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let digits = rest.get(..ID_DIGITS)?;
    let secret = rest.get(ID_DIGITS..)?.strip_prefix('-')?;
    if secret.len() != SECRET_HEX || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = ApiKeyId::parse(&format!("{}{digits}", ApiKeyId::PREFIX)).ok()?;
    Some((id, secret))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Teams and their API keys, in the manager's store.
#[derive(Clone, Debug)]
pub struct ApiKeys {
    store: Arc<dyn Store>,
}

impl ApiKeys {
    /// The keys in `manager`'s store.
    pub fn for_manager(manager: &Manager) -> Self {
        Self {
            store: manager.store().clone(),
        }
    }

    /// The keys in the database `url` names (`sqlite:PATH`, a plain path,
    /// or `postgres://…`, opened with `options`' store settings), without
    /// starting a manager: for the key commands of `snapshots-server`.
    pub async fn open(url: &str, options: &crate::ManagerOptions) -> Result<Self> {
        let store: Arc<dyn Store> = match Database::parse(url)? {
            Database::Sqlite(path) => {
                Arc::new(crate::store::SqliteStore::open(path, options.store.clone()).await?)
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(url) => Arc::new(
                crate::store::postgres::PostgresStore::open(&url, options.postgres.clone()).await?,
            ),
        };
        Ok(Self { store })
    }

    /// Creates a team.
    pub async fn create_team(&self, name: &str) -> Result<TeamId> {
        let name = name.trim().to_owned();
        if name.is_empty() || name.len() > 200 {
            return Err(Error::invalid_request("team name must be 1-200 characters"));
        }
        let id = TeamId::new();
        self.store.create_team(id, name, Timestamp::now()).await?;
        Ok(id)
    }

    /// Creates a key for `team`. Admin keys must belong to the platform
    /// team, and only they may use the admin endpoints.
    pub async fn create_key(&self, team: TeamId, name: &str, admin: bool) -> Result<NewApiKey> {
        if admin && !team.is_platform() {
            return Err(Error::invalid_request(
                "admin keys belong to the platform team",
            ));
        }
        let id = ApiKeyId::new();
        let digits = id.to_string()[ApiKeyId::PREFIX.len()..].to_owned();
        let secret = format!("{KEY_PREFIX}{digits}-{}", random_hex()?);
        let secret_hash = sha256(&secret[KEY_PREFIX.len() + ID_DIGITS + 1..]);
        let record = KeyRecord {
            id,
            team,
            name: name.trim().to_owned(),
            secret_hash,
            admin,
        };
        self.store.create_key(record, Timestamp::now()).await?;
        Ok(NewApiKey {
            id,
            team,
            admin,
            secret,
        })
    }

    /// Revokes a key: it stops working at once.
    pub async fn revoke(&self, id: ApiKeyId) -> Result<()> {
        if !self.store.revoke_key(id, Timestamp::now()).await? {
            return Err(Error::not_found(format!("api key {id} not found")));
        }
        Ok(())
    }

    /// The caller a presented key stands for; `None` for anything that is
    /// not a live key of ours.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Caller>> {
        let Some((id, secret)) = parse_key(presented) else {
            return Ok(None);
        };
        let presented_hash = sha256(secret);
        let Some(key) = self.store.find_key(id).await? else {
            return Ok(None);
        };
        if !constant_time_eq(&key.secret_hash, &presented_hash) {
            return Ok(None);
        }
        let actor = Actor::ApiKey { id, name: key.name };
        Ok(Some(if key.admin {
            Caller::admin(key.team, actor)
        } else {
            Caller::new(key.team, actor)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_parses_only_in_its_exact_shape() {
        let id = ApiKeyId::new();
        let digits = &id.to_string()[4..];
        let secret = "a".repeat(64);
        let good = format!("sk-{digits}-{secret}");
        assert_eq!(parse_key(&good), Some((id, secret.as_str())));
        for bad in [
            String::new(),
            "sk-".into(),
            format!("sk-{digits}"),
            format!("sk-{digits}-{}", "a".repeat(63)),
            format!("sk-{digits}-{}", "g".repeat(64)),
            format!("pk-{digits}-{secret}"),
            format!("sk-{}-{secret}", "é".repeat(13)),
        ] {
            assert_eq!(parse_key(&bad), None, "{bad}");
        }
    }
}
