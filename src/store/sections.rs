//! The migration sections of a schema file (`schema.sql`,
//! `schema/postgres.sql`): each starts at a line `-- migration: N` and runs
//! to the next. Both stores' migrators read them the same way.

use crate::store::StoreError;

const MARKER: &str = "-- migration: ";

/// How many sections `text` has: the schema version a build writes.
/// `const` so that the version is a compile-time fact of the embedded
/// schema.
pub(crate) const fn count(text: &str) -> i64 {
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

/// The sections of `text` (the file `name`) in order: `(version, sql)`.
pub(crate) fn parse(name: &str, text: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut out: Vec<(i64, String)> = Vec::new();
    for line in text.lines() {
        if let Some(header) = line.strip_prefix(MARKER) {
            let version: i64 = header.trim().parse().map_err(|_| {
                StoreError::internal(format!("{name}: bad migration header {line:?}"))
            })?;
            out.push((version, String::new()));
        } else if let Some((_, sql)) = out.last_mut() {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    Ok(out)
}
