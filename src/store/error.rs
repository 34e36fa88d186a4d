//! Store errors. `rusqlite::Error` and `r2d2::Error` are converted here and
//! nowhere else, and so (feature `postgres`) are `tokio_postgres::Error`
//! and `deadpool_postgres::PoolError`.

use std::fmt;

/// What kind of store failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Another connection held a lock for longer than the busy timeout;
    /// on PostgreSQL also a serialization failure or deadlock that
    /// outlasted the store's retries, or no pooled connection free within
    /// the wait timeout.
    Busy,
    /// The file is not an SQLite database (or is encrypted or damaged).
    NotADatabase,
    /// The file (or PostgreSQL database) was written by a newer schema
    /// version than this build knows.
    NewerSchema,
    /// A constraint was violated (a bug or a lost race we did not expect).
    Constraint,
    /// A stored value did not decode (damaged or hand-edited data).
    Corrupt,
    /// The writer thread has stopped.
    WriterGone,
    /// Any other SQLite, PostgreSQL, pool or I/O failure.
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

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let kind = match err.code() {
            Some(c)
                if *c == SqlState::UNIQUE_VIOLATION
                    || *c == SqlState::CHECK_VIOLATION
                    || *c == SqlState::FOREIGN_KEY_VIOLATION =>
            {
                StoreErrorKind::Constraint
            }
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    // `lock_timeout` passed: another session held a row lock.
                    || *c == SqlState::LOCK_NOT_AVAILABLE =>
            {
                StoreErrorKind::Busy
            }
            _ => StoreErrorKind::Other,
        };
        // The driver's own text of a server error is only "db error": the
        // server's message and code are in the `DbError`.
        let message = match (err.as_db_error(), std::error::Error::source(&err)) {
            (Some(db), _) => match db.constraint() {
                Some(constraint) => format!(
                    "postgres: {} ({}, constraint {constraint})",
                    db.message(),
                    db.code().code()
                ),
                None => format!("postgres: {} ({})", db.message(), db.code().code()),
            },
            (None, Some(cause)) => format!("postgres: {err}: {cause}"),
            (None, None) => format!("postgres: {err}"),
        };
        Self::new(kind, message)
    }
}

#[cfg(feature = "postgres")]
impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match err {
            PoolError::Timeout(TimeoutType::Wait) => Self::new(
                StoreErrorKind::Busy,
                "postgres: no pooled connection became free within the wait timeout",
            ),
            PoolError::Timeout(TimeoutType::Create) => Self::new(
                StoreErrorKind::Busy,
                "postgres: connecting to the database timed out",
            ),
            PoolError::Timeout(TimeoutType::Recycle) => Self::new(
                StoreErrorKind::Busy,
                "postgres: checking a pooled connection timed out",
            ),
            PoolError::Backend(err) => Self::from(err),
            other => Self::internal(format!("postgres: connection pool: {other}")),
        }
    }
}
