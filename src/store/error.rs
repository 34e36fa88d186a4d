//! Store errors. `rusqlite::Error` and `r2d2::Error` are converted here and
//! nowhere else.

use std::fmt;

/// What kind of store failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Another connection held a lock for longer than the busy timeout.
    Busy,
    /// The file is not an SQLite database (or is encrypted or damaged).
    NotADatabase,
    /// The file was written by a newer schema version than this build knows.
    NewerSchema,
    /// A constraint was violated (a bug or a lost race we did not expect).
    Constraint,
    /// A stored value did not decode (damaged or hand-edited data).
    Corrupt,
    /// The writer thread has stopped.
    WriterGone,
    /// Any other SQLite, pool or I/O failure.
    Other,
}

/// A store failure. Cloneable so that one failed commit can be reported to
/// every job of its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

impl StoreError {
    pub(crate) fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Other, message)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Corrupt, message)
    }

    pub(crate) fn writer_gone() -> Self {
        Self::new(
            StoreErrorKind::WriterGone,
            "the store's writer thread has stopped",
        )
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let kind = match err.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => StoreErrorKind::Busy,
            Some(C::NotADatabase) => StoreErrorKind::NotADatabase,
            Some(C::ConstraintViolation) => StoreErrorKind::Constraint,
            _ => match err {
                rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..) => StoreErrorKind::Corrupt,
                _ => StoreErrorKind::Other,
            },
        };
        Self::new(kind, format!("sqlite: {err}"))
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(err: r2d2::Error) -> Self {
        let text = err.to_string();
        let kind = if text.contains("not a database") {
            StoreErrorKind::NotADatabase
        } else if text.contains("locked") || text.contains("busy") {
            StoreErrorKind::Busy
        } else {
            StoreErrorKind::Other
        };
        Self::new(kind, format!("read pool: {text}"))
    }
}
