//! A small `PRAGMA user_version` migrator over the sections of `schema.sql`.

use std::path::Path;

use rusqlite::Connection;

use crate::store::{StoreError, StoreErrorKind};

const SCHEMA: &str = include_str!("../../../schema.sql");

/// The schema version this build writes (the last section of `schema.sql`).
pub const SCHEMA_VERSION: i64 = crate::store::sections::count(SCHEMA);

fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Refuses a file that is not a database or has a newer schema, before
/// anything is written to it.
pub(super) fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // Reading the header is what makes SQLite notice a file that is not a
    // database; `sqlite_master` forces the read.
    let check = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(StoreError::from)
        .and_then(|_| user_version(conn));
    let found = match check {
        Ok(v) => v,
        Err(err) if err.kind() == StoreErrorKind::NotADatabase => {
            return Err(StoreError::new(
                StoreErrorKind::NotADatabase,
                format!("{} is not an SQLite database", path.display()),
            ));
        }
        Err(err) => return Err(err),
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::new(
            StoreErrorKind::NewerSchema,
            format!(
                "{} has schema version {found}, newer than this build supports ({SCHEMA_VERSION}); \
                 upgrade sandbox-snapshots to open it",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Applies every section newer than the file's `user_version`, each with its
/// version bump in one transaction. Re-running on an up-to-date file is a
/// no-op (not even a write).
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current = user_version(conn)?;
    for (version, sql) in crate::store::sections::parse("schema.sql", SCHEMA)? {
        if version <= current {
            continue;
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        if user_version(&tx)? >= version {
            continue;
        }
        tx.execute_batch(&sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_numbered_in_order_from_one() {
        let versions: Vec<i64> = crate::store::sections::parse("schema.sql", SCHEMA)
            .into_iter()
            .flatten()
            .map(|(v, _)| v)
            .collect();
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
