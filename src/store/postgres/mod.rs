//! The PostgreSQL store (feature `postgres`): `tokio-postgres` over a
//! `deadpool-postgres` pool, schema in `schema/postgres.sql`. Any number of
//! manager processes (control-plane replicas, SPEC §9) share one database.
//!
//! - `migrate.rs`: the section migrator, under an advisory lock.
//! - `registry.rs`, `templates.rs`, `operations.rs`, `placements.rs`,
//!   `restores.rs`, `audit.rs`, `keys.rs`: the statements and the domain
//!   logic of each transaction, function for function those of
//!   `sqlite/sql/`.
//! - `transactions.rs`: the [`Store`](super::Store) implementation, which
//!   runs each of them as one transaction (retried on a lost race).
//! - `rows.rs`: decoding rows, encoding ids, running cached statements.
//!
//! SQLite serialises every write; here transactions run concurrently under
//! READ COMMITTED. Each one is made race-free by locking the rows it reads
//! and then writes (`SELECT … FOR UPDATE`), by the unique indexes (a lost
//! name race is retried, and then sees the winner exactly as SQLite's
//! check would), by `FOR UPDATE SKIP LOCKED` for claims, and by retrying a
//! whole transaction on a serialization failure or a deadlock.

mod audit;
mod keys;
mod migrate;
mod operations;
mod placements;
mod policies;
mod registry;
mod requests;
mod restores;
mod retention;
mod rows;
mod templates;
mod transactions;

#[cfg(test)]
mod tests;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::error::Error;
use crate::store::{StoreError, StoreErrorKind};

/// How [`Manager::open_postgres`](crate::Manager::open_postgres) sets up
/// its PostgreSQL connection pool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Most connections the pool opens. Default 16.
    pub max_connections: usize,
    /// How long opening one connection may take (unless the URL sets
    /// `connect_timeout` itself). Default 5 s.
    pub connect_timeout: Duration,
    /// How long a caller waits for a pooled connection when all of them
    /// are in use before failing with `db_error`. Default 5 s.
    pub wait_timeout: Duration,
    /// How long a statement waits for a row lock another session holds
    /// (PostgreSQL's `lock_timeout`) before the transaction fails with
    /// `db_error`, like SQLite's busy timeout: a stuck session elsewhere
    /// cannot hold a request for ever. Default 5 s; zero waits for ever.
    pub lock_timeout: Duration,
    /// TLS to the database (rustls), verified against the CA given (the
    /// system's roots are never trusted), with an optional client identity.
    /// The URL's `sslmode` decides whether it is used: `require` insists,
    /// `prefer` (the default) falls back to plain text only when the server
    /// offers no TLS, `disable` never uses it. `None` (the default): plain
    /// text, and a URL that says `sslmode=require` fails to connect.
    pub tls: Option<crate::agent::TlsConfig>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// A handle to the store: a connection pool. Cheap to clone.
#[derive(Clone)]
pub(crate) struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("max_connections", &status.max_size)
            .field("connections", &status.size)
            .finish()
    }
}

impl PostgresStore {
    /// Connects to the database `url` names (`postgres://…`, parsed by
    /// `tokio_postgres::Config`, so `?options=-csearch_path%3Dname` picks
    /// the schema) and migrates its schema.
    ///
    /// Connections use TLS when [`PostgresOptions::tls`] is set (and the
    /// URL's `sslmode` allows it), plain text otherwise.
    ///
    /// A database whose schema is newer than this build is refused
    /// ([`StoreErrorKind::NewerSchema`]) without being changed.
    pub(crate) async fn open(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::new(
                StoreErrorKind::Other,
                format!("postgres: invalid database URL: {e}"),
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        // After the URL's own options, so that this setting wins.
        let session = format!(
            "{} -c lock_timeout={}",
            config.get_options().unwrap_or_default(),
            options.lock_timeout.as_millis()
        );
        config.options(session.trim_start());
        // A connection whose transaction failed is rolled back as the
        // transaction is dropped; nothing else to clean.
        let recycling = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &options.tls {
            None => Manager::from_config(config, NoTls, recycling()),
            Some(tls) => {
                let rustls = crate::agent::connect::rustls_config(tls).map_err(|e| {
                    StoreError::new(StoreErrorKind::Other, format!("postgres: {e}"))
                })?;
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls);
                Manager::from_config(config, tls, recycling())
            }
        };
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::internal(format!("postgres: cannot build the pool: {e}")))?;
        let store = Self { pool };
        let mut client = store.client().await?;
        migrate::migrate(&mut client).await?;
        Ok(store)
    }

    /// A pooled connection, waiting at most the wait timeout.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Why a transaction failed: whether running it again may succeed.
#[derive(Debug)]
pub(super) enum TxError {
    /// It lost a race with a concurrent transaction (a serialization
    /// failure, a deadlock, a unique index that another transaction's row
    /// now holds): run the whole transaction again, which then sees the
    /// winner. The error is what the caller gets once the retries run out.
    Retry(Error),
    /// It failed for good.
    Fail(Error),
}

/// A step of a transaction.
pub(super) type TxResult<T> = std::result::Result<T, TxError>;

impl From<Error> for TxError {
    fn from(err: Error) -> Self {
        Self::Fail(err)
    }
}

impl From<StoreError> for TxError {
    fn from(err: StoreError) -> Self {
        Self::Fail(err.into())
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(err: tokio_postgres::Error) -> Self {
        // A lock timeout already waited its whole `lock_timeout`: running
        // the transaction again would only multiply the wait.
        let timed_out = err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        let err = StoreError::from(err);
        if err.kind() == StoreErrorKind::Busy && !timed_out {
            Self::Retry(err.into())
        } else {
            Self::Fail(err.into())
        }
    }
}

impl From<TxError> for Error {
    fn from(err: TxError) -> Self {
        match err {
            TxError::Retry(err) | TxError::Fail(err) => err,
        }
    }
}
