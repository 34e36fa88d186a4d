//! The SQLite store: one writer thread that owns the only write connection,
//! and an r2d2 pool of read-only connections used from `spawn_blocking`.
//! `transactions.rs` implements the [`Store`](super::Store) trait over the
//! statements of `sql.rs`.
//!
//! No SQLite call runs on an async worker thread. Writes are closures sent
//! to the writer thread; it runs each in its own savepoint and commits the
//! jobs that arrived together in one transaction (group commit), replying
//! only after the commit is durable.
//!
//! A job may be *relaxed* ([`SqliteStore::write_relaxed`]): one whose loss
//! in a power cut is harmless, because replaying what came before it
//! repeats it. A batch of relaxed jobs only commits with
//! `synchronous=NORMAL` (in WAL mode: no fsync at commit; the frames become
//! durable with the next synced commit or checkpoint, and the WAL is only
//! ever recovered as a prefix, so nothing written after them can survive
//! without them). Any batch holding one ordinary job commits at the
//! configured level.

pub(crate) mod lock;
mod migrate;
mod sql;
mod transactions;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::StoreError;
pub use migrate::SCHEMA_VERSION;

/// SQLite's `synchronous` setting for the write connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// Sync the WAL on every commit: survives power loss (the default).
    Full,
    /// Sync at checkpoints only: survives a process crash, may lose the last
    /// commits on power loss.
    Normal,
    /// Never sync (tests and benchmarks only).
    Off,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
            Self::Off => "OFF",
        }
    }
}

/// How the store opens its SQLite file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock held by another connection
    /// (or process) before failing with `db_error`. Default 5 s.
    pub busy_timeout: Duration,
    /// Read connections in the pool. Default 4.
    pub read_connections: u32,
    /// Most write jobs committed in one transaction. Default 64.
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            max_batch: 64,
        }
    }
}

type ReadPool = r2d2::Pool<SqliteConnectionManager>;

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 256;

/// A finished job's reply, sent once the batch's commit is known.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A write job: runs inside its savepoint (or is told why it cannot run) and
/// says whether it succeeded, plus how to reply once the commit is known.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Option<(bool, Completion)> + Send>;

/// What the writer thread is asked to do.
enum Msg {
    /// A write, batched with the others that arrive together; `relaxed`
    /// when losing its commit in a power cut is harmless (see the module
    /// docs).
    Write { job: Job, relaxed: bool },
    /// Move everything in the WAL into the database file and empty the WAL,
    /// outside any transaction, after the writes before it.
    Checkpoint(oneshot::Sender<Result<(), StoreError>>),
}

/// A handle to the store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: mpsc::Sender<Msg>,
    readers: ReadPool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the SQLite file at `path`, applies the
    /// schema, and starts the writer thread.
    ///
    /// A file that is not an SQLite database, or whose schema is newer than
    /// this build knows, is refused without being changed.
    pub(crate) async fn open(
        path: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let opened = {
            let path = path.clone();
            let options = options.clone();
            tokio::task::spawn_blocking(move || open_blocking(&path, &options))
                .await
                .map_err(|e| StoreError::internal(format!("open task failed: {e}")))??
        };
        let (writer, readers) = opened;
        let (tx, rx) = mpsc::channel::<Msg>();
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || writer_loop(writer, rx, max_batch, options.synchronous))
            .map_err(|e| StoreError::internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer: tx,
                readers,
            }),
        })
    }

    /// Runs `f` on the writer thread inside a transaction. When `f` returns
    /// `Err`, everything it wrote is rolled back; `Ok` is returned only after
    /// the commit. The job runs to the end even if this future is dropped.
    pub(crate) async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// Like [`write`](Self::write), for a job whose commit may be lost in a
    /// power cut without harm: replaying the state before it repeats it
    /// (a confirmed deletion's record: the deletion is retried and the host
    /// answers NotFound, which counts as confirmed). When every job of a
    /// batch is relaxed, the batch commits without fsync (`synchronous =
    /// NORMAL`) under a store configured [`Synchronous::Full`]; it is still
    /// atomic, and survives a process crash. Nothing else may use this:
    /// creates, failures, the journal and the audit of user actions must
    /// survive power loss once acknowledged.
    pub(crate) async fn write_relaxed<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        self.submit(f, true).await
    }

    async fn submit<T, E, F>(&self, f: F, relaxed: bool) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |conn| {
            let conn = match conn {
                Ok(conn) => conn,
                Err(err) => {
                    let _ = reply_tx.send(Err(E::from(err)));
                    return None;
                }
            };
            let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn))) {
                Ok(result) => result,
                Err(_) => Err(E::from(StoreError::internal("a write job panicked"))),
            };
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                let reply = match (result, commit) {
                    (Ok(value), Ok(())) => Ok(value),
                    (Ok(_), Err(err)) => Err(E::from(err)),
                    (Err(err), _) => Err(err),
                };
                let _ = reply_tx.send(reply);
            });
            Some((ok, completion))
        });
        self.inner
            .writer
            .send(Msg::Write { job, relaxed })
            .map_err(|_| E::from(StoreError::writer_gone()))?;
        reply_rx
            .await
            .unwrap_or_else(|_| Err(E::from(StoreError::writer_gone())))
    }

    /// Checkpoints the WAL into the database file and truncates it, after
    /// every write sent before. A manager does this when it shuts down, so
    /// that the file is whole on its own: opened next under another name (a
    /// hard link, a bind mount), whose WAL is another file, nothing
    /// committed is missed.
    pub(crate) async fn checkpoint(&self) -> Result<(), StoreError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.inner
            .writer
            .send(Msg::Checkpoint(reply_tx))
            .map_err(|_| StoreError::writer_gone())?;
        reply_rx
            .await
            .unwrap_or_else(|_| Err(StoreError::writer_gone()))
    }

    /// Runs `f` on a pooled read-only connection on a blocking thread.
    pub(crate) async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let pool = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.get().map_err(StoreError::from)?;
            f(&conn)
        })
        .await
        .unwrap_or_else(|e| {
            Err(E::from(StoreError::internal(format!(
                "read task failed: {e}"
            ))))
        })
    }
}

fn open_blocking(
    path: &Path,
    options: &StoreOptions,
) -> Result<(Connection, ReadPool), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::internal(format!("cannot create directory {}: {e}", parent.display()))
        })?;
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(options.busy_timeout)?;
    // Every statement the library runs stays prepared (the default cache of
    // 16 is smaller than our set of statements, and re-preparing dominated
    // the cost of an operation).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Check what the file is before changing anything in it.
    migrate::check_version(&conn, path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::internal(format!(
            "cannot switch {} to WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA foreign_keys = ON;",
        options.synchronous.pragma()
    ))?;
    migrate::migrate(&mut conn)?;

    let busy = options.busy_timeout;
    let manager = SqliteConnectionManager::file(path)
        .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_init(move |c| {
            c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            c.busy_timeout(busy)?;
            c.execute_batch("PRAGMA foreign_keys = ON;")
        });
    let readers = r2d2::Pool::builder()
        .max_size(options.read_connections.max(1))
        .min_idle(Some(1))
        // A reader that cannot be had within the busy timeout (the file
        // gone, say) is a store failure, not r2d2's 30 s stall.
        .connection_timeout(busy.max(Duration::from_secs(1)))
        .build(manager)?;
    Ok((conn, readers))
}

/// Takes jobs in batches, runs each in a savepoint of one transaction,
/// commits, then replies to every job of the batch. `configured` is the
/// connection's `synchronous` level as opened.
fn writer_loop(
    conn: Connection,
    jobs: mpsc::Receiver<Msg>,
    max_batch: usize,
    configured: Synchronous,
) {
    let mut level = Level::new(configured);
    let mut pending: Option<Msg> = None;
    while let Some(first) = pending.take().or_else(|| next_job(&jobs)) {
        let (first, mut relaxed) = match first {
            Msg::Write { job, relaxed } => (job, relaxed),
            Msg::Checkpoint(reply) => {
                let _ = reply.send(checkpoint(&conn));
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(Msg::Write { job, relaxed: r }) => {
                    relaxed &= r;
                    batch.push(job);
                }
                // After this batch, in order.
                Ok(checkpoint) => {
                    pending = Some(checkpoint);
                    break;
                }
                Err(_) => break,
            }
        }
        // One ordinary job makes the whole batch ordinary: they share the
        // commit, and its fsync.
        if let Err(err) = level.prepare(&conn, relaxed) {
            for job in batch {
                job(Err(err.clone()));
            }
            continue;
        }
        run_batch(&conn, batch);
    }
}

/// The write connection's `synchronous` level, switched between batches
/// (SQLite does not change it inside a transaction).
struct Level {
    configured: Synchronous,
    current: Synchronous,
}

impl Level {
    fn new(configured: Synchronous) -> Self {
        Self {
            configured,
            current: configured,
        }
    }

    /// Sets the level for the next batch: `NORMAL` for a batch of relaxed
    /// jobs when the store is configured `FULL`, the configured level
    /// otherwise. A store opened `NORMAL` or `OFF` is never changed.
    ///
    /// Failing to relax only leaves the batch stricter, so it runs anyway;
    /// failing to restore the configured level fails the batch, which must
    /// not commit less durably than it was promised.
    fn prepare(&mut self, conn: &Connection, relaxed: bool) -> Result<(), StoreError> {
        let want = if relaxed && self.configured == Synchronous::Full {
            Synchronous::Normal
        } else {
            self.configured
        };
        if want == self.current {
            return Ok(());
        }
        match exec(conn, synchronous_statement(want)) {
            Ok(()) => {
                self.current = want;
                Ok(())
            }
            Err(err) if relaxed => {
                tracing::warn!(error = %err, "cannot relax synchronous for a batch; it commits at the configured level");
                Ok(())
            }
            Err(err) => Err(err),
        }
    }
}

/// The statement that sets `level` (static, for the statement cache).
fn synchronous_statement(level: Synchronous) -> &'static str {
    match level {
        Synchronous::Full => "PRAGMA synchronous = FULL",
        Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        Synchronous::Off => "PRAGMA synchronous = OFF",
    }
}

fn checkpoint(conn: &Connection) -> Result<(), StoreError> {
    // (busy, frames in the WAL, frames checkpointed): busy means a reader
    // kept it from finishing, which is not an error of the store.
    let (busy, _, _): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    if busy != 0 {
        return Err(StoreError::internal(
            "the WAL checkpoint was blocked by a reader",
        ));
    }
    Ok(())
}

/// How long the writer keeps looking for the next job before it sleeps
/// (yielding the CPU between looks).
/// Operations come in bursts of dependent writes (a create's two
/// transactions, a delete's two); waking a sleeping thread costs tens of
/// microseconds on small VMs, more than a whole commit without fsync.
const WRITER_LINGER: Duration = Duration::from_micros(1000);

fn next_job(jobs: &mpsc::Receiver<Msg>) -> Option<Msg> {
    let until = std::time::Instant::now() + WRITER_LINGER;
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < until => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return jobs.recv().ok(),
        }
    }
}

/// Runs one statement from the statement cache (transaction control runs
/// for every write; parsing it each time showed in profiles).
fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(StoreError::from)
}

fn run_batch(conn: &Connection, batch: Vec<Job>) {
    // A rollback that failed earlier would leave the connection inside a
    // transaction and every later BEGIN failing: clear it first.
    if !conn.is_autocommit()
        && let Err(err) = exec(conn, "ROLLBACK")
    {
        tracing::error!(error = %err, "cannot leave a stale transaction");
    }
    if let Err(err) = exec(conn, "BEGIN IMMEDIATE") {
        for job in batch {
            job(Err(err.clone()));
        }
        return;
    }
    // A lone job needs no savepoint: if it fails, the whole transaction is
    // rolled back instead.
    let savepoints = batch.len() > 1;
    let mut completions = Vec::with_capacity(batch.len());
    let mut broken: Option<StoreError> = None;
    let mut lone_failed = false;
    for job in batch {
        if let Some(err) = &broken {
            job(Err(err.clone()));
            continue;
        }
        if savepoints && let Err(err) = exec(conn, "SAVEPOINT job") {
            job(Err(err.clone()));
            broken = Some(err);
            continue;
        }
        let Some((ok, completion)) = job(Ok(conn)) else {
            continue;
        };
        completions.push(completion);
        if !savepoints {
            lone_failed = !ok;
            continue;
        }
        let end = if ok {
            exec(conn, "RELEASE job")
        } else {
            exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
        };
        if let Err(err) = end {
            broken = Some(err);
        }
    }
    let outcome = match broken {
        Some(err) => Err(err),
        // The failed job's own error is its answer; nothing to commit.
        None if lone_failed => Ok(()),
        None => exec(conn, "COMMIT"),
    };
    if (outcome.is_err() || lone_failed)
        && !conn.is_autocommit()
        && let Err(err) = exec(conn, "ROLLBACK")
    {
        tracing::error!(error = %err, "rollback after a failed batch failed");
    }
    for completion in completions {
        completion(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The `synchronous` level a write job runs under (2 FULL, 1 NORMAL).
    fn level(c: &Connection) -> Result<i64, StoreError> {
        Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
    }

    async fn store(dir: &Path) -> SqliteStore {
        SqliteStore::open(dir.join("t.db"), StoreOptions::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_lone_relaxed_job_commits_at_normal_and_full_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        store
            .write(|c| Ok::<_, StoreError>(c.execute_batch("CREATE TABLE t (v INTEGER)")?))
            .await
            .unwrap();
        let seen = store
            .write_relaxed(|c| {
                c.execute("INSERT INTO t (v) VALUES (1)", [])?;
                level(c)
            })
            .await
            .unwrap();
        assert_eq!(seen, 1, "a batch of relaxed jobs runs at NORMAL");
        assert_eq!(store.write(level).await.unwrap(), 2, "FULL is restored");
        // The relaxed commit applied: a reader sees it.
        let n: i64 = store
            .read(|c| Ok::<_, StoreError>(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn an_ordinary_job_keeps_its_batch_at_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        // Hold the writer in a first batch until both jobs below are
        // queued, so that they are taken together as the next batch.
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(move |_| {
                        let _ = started_tx.send(());
                        let _ = go_rx.recv();
                        Ok::<_, StoreError>(())
                    })
                    .await
            }
        });
        started_rx.await.unwrap();
        // `join!` polls in order on its first poll: both jobs are sent
        // before the writer is let go.
        let (ordinary, relaxed, ()) =
            tokio::join!(store.write(level), store.write_relaxed(level), async {
                go_tx.send(()).unwrap();
            });
        blocker.await.unwrap().unwrap();
        assert_eq!(ordinary.unwrap(), 2);
        assert_eq!(relaxed.unwrap(), 2, "sharing a commit with an ordinary job");
    }

    #[tokio::test]
    async fn a_store_opened_normal_or_off_is_never_changed() {
        for (sync, expected) in [(Synchronous::Normal, 1), (Synchronous::Off, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions {
                synchronous: sync,
                ..StoreOptions::default()
            };
            let store = SqliteStore::open(dir.path().join("t.db"), options)
                .await
                .unwrap();
            assert_eq!(
                store.write_relaxed(level).await.unwrap(),
                expected,
                "{sync:?}"
            );
            assert_eq!(store.write(level).await.unwrap(), expected, "{sync:?}");
        }
    }
}
