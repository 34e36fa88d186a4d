//! A small `PRAGMA user_version` migrator over the sections of `schema.sql`.

use std::path::Path;

use rusqlite::Connection;

use crate::store::{StoreError, StoreErrorKind};

const SCHEMA: &str = include_str!("../../../schema.sql");
const MARKER: &str = "-- migration: ";

/// The schema version this build writes (the last section of `schema.sql`).
pub const SCHEMA_VERSION: i64 = count_sections(SCHEMA);

const fn count_sections(text: &str) -> i64 {
    // Counts lines that start with the marker; `const` so that the version
    // is a compile-time fact of the embedded schema.
    let bytes = text.as_bytes();
    let marker = MARKER.as_bytes();
    let mut count = 0;
    let mut i = 0;
    let mut at_line_start = true;
    while i < bytes.len() {
        if at_line_start && i + marker.len() <= bytes.len() {
            let mut j = 0;
            while j < marker.len() && bytes[i + j] == marker[j] {
                j += 1;
            }
            if j == marker.len() {
                count += 1;
            }
        }
        at_line_start = bytes[i] == b'\n';
        i += 1;
    }
    count
}

/// The migration sections in order: `(version, sql)`. A section starts at a
/// line beginning with the marker and runs to the next such line.
fn sections() -> Result<Vec<(i64, String)>, StoreError> {
    let mut out: Vec<(i64, String)> = Vec::new();
    for line in SCHEMA.lines() {
        if let Some(header) = line.strip_prefix(MARKER) {
            let version: i64 = header.trim().parse().map_err(|_| {
                StoreError::internal(format!("schema.sql: bad migration header {line:?}"))
            })?;
            out.push((version, String::new()));
        } else if let Some((_, sql)) = out.last_mut() {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    Ok(out)
}

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
    for (version, sql) in sections()? {
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
        let versions: Vec<i64> = sections().into_iter().flatten().map(|(v, _)| v).collect();
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
