//! A small migrator over the sections of `schema/postgres.sql`: the table
//! `schema_version` records each section applied, and every pending
//! section runs in one transaction that first takes an advisory lock, so
//! that replicas starting together migrate once (the others wait, then
//! find nothing to do). The wait has a bound of its own (`MIGRATION_WAIT`).

use deadpool_postgres::Object;

use crate::model::Timestamp;
use crate::store::{StoreError, StoreErrorKind};

const SCHEMA: &str = include_str!("../../../schema/postgres.sql");

/// The schema version this build writes (the last section of
/// `schema/postgres.sql`).
pub(crate) const SCHEMA_VERSION: i64 = crate::store::sections::count(SCHEMA);

/// The advisory lock every migrating process holds: this seed ("snapshot"
/// in ASCII) hashed with the schema migrated, since advisory locks are per
/// database and deployments on other schemas of it need not wait.
const MIGRATION_LOCK: i64 = 0x736e_6170_7368_6f74;

/// How long a migration waits for another process's migration of the same
/// schema (replicas starting together): longer than the store's
/// `lock_timeout`, which is tuned for the row locks of ordinary requests.
const MIGRATION_WAIT: &str = "60s";

/// Applies every section newer than the database's version, all in one
/// transaction. A database with a newer version than this build is
/// refused with [`StoreErrorKind::NewerSchema`], unchanged. Re-running on
/// an up-to-date database writes nothing.
pub(super) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{MIGRATION_WAIT}'"))
        .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(current_schema(), $1))",
        &[&MIGRATION_LOCK],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    BIGINT NOT NULL PRIMARY KEY,
             applied_at BIGINT NOT NULL
         )",
    )
    .await?;
    let current: i64 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::new(
            StoreErrorKind::NewerSchema,
            format!(
                "postgres: the database has schema version {current}, newer than this build \
                 supports ({SCHEMA_VERSION}); upgrade sandbox-snapshots to open it"
            ),
        ));
    }
    for (version, sql) in crate::store::sections::parse("schema/postgres.sql", SCHEMA)? {
        if version <= current {
            continue;
        }
        tx.batch_execute(&sql).await?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            &[&version, &Timestamp::now().unix_millis()],
        )
        .await?;
        tracing::info!(version, "applied postgres schema migration");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_numbered_in_order_from_one() {
        let versions: Vec<i64> = crate::store::sections::parse("schema/postgres.sql", SCHEMA)
            .into_iter()
            .flatten()
            .map(|(v, _)| v)
            .collect();
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
