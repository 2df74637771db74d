//! The embedded durable store: one SQLite file (WAL), through rusqlite's bundled SQLite.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{
    unix_now, ApiKeyRecord, CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, ExportSend, Grant,
    IdempotencyClaim, IdempotencySettle, IdempotencyState, PlanChange, PlanChangeOutcome, QuotaKey, Reservation,
    ReserveToken, Store, StoreError, StoreInspect, TenantRecord, UsageAggregate, UsageBatch, UsageEvent,
};
use crate::{
    config::{Synchronous, TenantId},
    tenant::KeyHash,
};

/// `PRAGMA application_id` of a tollgate database ("TGL1"): a SQLite file without it is not
/// ours, and is refused rather than written to.
const APPLICATION_ID: i32 = 0x5447_4C31;
/// The schema version this build writes (`PRAGMA user_version`); see [`MIGRATIONS`].
pub(crate) const SCHEMA_VERSION: i32 = 4;
/// How long a call waits for another connection's write lock (SQLite's busy handler) before
/// the call is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a call that still finds the database busy is retried, with backoff, before
/// it fails as a store error (about 30 s in all, with the busy timeout).
const BUSY_RETRIES: u32 = 5;
/// The most usage records one transaction writes: bounds how long a flush holds the write lock
/// that the other connections (another engine, another process) wait for.
const MAX_BATCH_RECORDS: usize = 4096;
/// The connection's page cache, in KiB: a flush touches a page per tenant of the batch, and a
/// page read from the cache costs no system call.
const CACHE_KIB: u32 = 32 * 1024;
/// Flush ids are kept this long after their commit (wall-clock time): a batch is retried only
/// by the process that made it, while it holds it, so a week is far beyond any retry.
const FLUSH_IDS_KEPT_SECS: i64 = 7 * 86_400;
/// Aggregates (exported or not) are dropped this long after their window started: a billing
/// system no longer takes usage that old (Stripe: 35 days). Quota periods that ended this long
/// before the newest window are dropped too.
const RETENTION_SECS: i64 = 35 * 86_400;
/// Usage event and webhook event ids are kept this long after their time.
const EVENT_IDS_KEPT_SECS: i64 = 35 * 86_400;
/// The most usage event ids (and, apart, webhook event ids) kept at once.
const EVENT_IDS_MAX: i64 = 1 << 20;
/// The senders whose last quota call a counter remembers (as the memory store).
const SENDERS_KEPT: i64 = 64;
/// The most `Idempotency-Key` bindings kept past the hourly prune (those expiring first go).
const IDEMPOTENCY_KEYS_MAX: i64 = 1 << 20;
/// Old rows are pruned at most this often (in window time or in wall-clock time).
const PRUNE_EVERY_SECS: i64 = 3600;

/// The schema, one step per version: step `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE quota (
    tenant   TEXT NOT NULL,
    meter    TEXT NOT NULL,
    period   TEXT NOT NULL,
    start    INTEGER NOT NULL,
    end      INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter, period, start, end)
) WITHOUT ROWID;
CREATE INDEX quota_end ON quota (end);
CREATE TABLE quota_floor (
    tenant         TEXT NOT NULL,
    meter          TEXT NOT NULL,
    dropped_before INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter)
) WITHOUT ROWID;
CREATE TABLE quota_sender (
    tenant   TEXT NOT NULL,
    meter    TEXT NOT NULL,
    period   TEXT NOT NULL,
    start    INTEGER NOT NULL,
    end      INTEGER NOT NULL,
    node     INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    granted  INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter, period, start, end, node)
) WITHOUT ROWID;
CREATE TABLE usage (
    tenant           TEXT NOT NULL,
    meter            TEXT NOT NULL,
    window_start     INTEGER NOT NULL,
    quantity         INTEGER NOT NULL,
    exported         INTEGER NOT NULL DEFAULT 0,
    revision         INTEGER NOT NULL DEFAULT 0,
    in_flight        INTEGER,
    dead             TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at INTEGER,
    claim_node       INTEGER,
    claim_until      INTEGER,
    PRIMARY KEY (window_start, tenant, meter)
) WITHOUT ROWID;
CREATE INDEX usage_pending ON usage (tenant, meter, window_start)
    WHERE dead IS NULL AND (quantity > exported OR in_flight IS NOT NULL);
CREATE INDEX usage_dead ON usage (tenant, meter, window_start) WHERE dead IS NOT NULL;
CREATE TABLE flush (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX flush_at ON flush (at);
CREATE TABLE usage_event (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX usage_event_at ON usage_event (at);
CREATE TABLE webhook_event (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_event_at ON webhook_event (at);
CREATE TABLE tenant (
    id            TEXT PRIMARY KEY,
    plan          TEXT NOT NULL,
    customer      TEXT UNIQUE,
    last_event_at INTEGER
) WITHOUT ROWID;
CREATE TABLE api_key (
    hash   BLOB PRIMARY KEY,
    tenant TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX api_key_tenant ON api_key (tenant);
",
    r"
ALTER TABLE api_key ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE api_key ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_key ADD COLUMN expires_at INTEGER;
CREATE TABLE idempotency (
    key             TEXT PRIMARY KEY,
    request         TEXT NOT NULL,
    owner           INTEGER NOT NULL,
    completed       INTEGER NOT NULL,
    in_flight_until INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_expires ON idempotency (expires_at);
",
    r"
ALTER TABLE usage ADD COLUMN send TEXT;
ALTER TABLE usage ADD COLUMN unknown_failures INTEGER NOT NULL DEFAULT 0;
",
    r"
ALTER TABLE tenant ADD COLUMN overrides TEXT;
",
];

/// The embedded durable store: quotas, usage and its export state, flush ids, the tenant
/// directory (key hashes only) and dead letters in one SQLite file, so that a restarted
/// service keeps its spent quotas and its unexported usage.
///
/// - The file is in WAL mode; `synchronous` is `FULL` by default (every committed call is on
///   disk before it returns, through a power cut too), or `NORMAL` (a process crash loses
///   nothing committed; a power cut may lose the last calls). See `docs/sqlite.md`.
/// - Every trait call is one transaction. Writers take the lock at the start (`BEGIN
///   IMMEDIATE`); a busy database is waited for (busy timeout) and the call retried, so
///   several engines and processes can share one file.
/// - Calls run on tokio's blocking pool (`spawn_blocking`), never on the runtime's worker
///   threads; the store starts no thread of its own. One store holds two connections, one
///   that writes and one that reads, and at most two calls of each on the pool at once.
/// - The schema is versioned (`user_version`) and migrated on open; a file of a newer
///   tollgate, a file that is not a tollgate database (an empty or foreign file included) and
///   a file that fails `PRAGMA quick_check` are refused with [`StoreError::Unusable`].
/// - Old rows are pruned as the calls go: aggregates 35 days after their window, quota
///   periods 35 days after they ended, flush ids a week after their commit, usage and webhook
///   event ids 35 days after their time (and past 2^20 of each).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let store = tollgate::store::SqliteStore::open(dir.path().join("tollgate.db")).await.unwrap();
/// let config = tollgate::Config::from_toml_str("[plans.free]\nrate = \"10/s\"").unwrap();
/// let (tollgate, worker) = tollgate::Tollgate::builder(config).store(store).build();
/// # drop((tollgate, worker));
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// A read-only connection: in WAL mode reads see the last commit without waiting for a
    /// write under way on `conn`. Declared (so dropped) before `conn`: the writer, closed
    /// last, checkpoints the log into the file and removes it.
    reader: Mutex<Connection>,
    /// The writing connection (every write is one `BEGIN IMMEDIATE` transaction on it).
    conn: Mutex<Conn>,
    /// Bound the calls of each kind on the blocking pool at once (a permit is held until the
    /// blocking call ends, even when its caller gave up); the others wait here, as futures
    /// their callers can drop (a request's store timeout), rather than as queued threads.
    reads: Arc<tokio::sync::Semaphore>,
    writes: Arc<tokio::sync::Semaphore>,
}

/// The most calls of one kind (reads, writes) of one store on the blocking pool at once: each
/// kind has one connection, so more would only wait for it.
const CALLS_AT_ONCE: usize = 2;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

/// The connection, and what it remembers to prune old rows.
struct Conn {
    db: Connection,
    /// The newest usage window committed through this connection (or found at open).
    newest_window: i64,
    /// The newest window when rows were last pruned, and when (wall clock).
    pruned_window: i64,
    pruned_at: Option<Instant>,
}

/// A failure inside a call: SQLite's, or a value that does not fit.
type Sql<T> = Result<T, rusqlite::Error>;

fn unusable(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Unusable(format!("{}: {what}", path.display()))
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// A u64 as SQLite stores it (values past `i64::MAX` saturate).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A count read back (never negative in a valid file).
fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A node or sender id (any u64) as an SQLite integer, bit for bit.
fn node_int(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` with `synchronous = FULL`.
    ///
    /// # Errors
    /// [`StoreError::Unusable`] for a file that is not a tollgate database (an existing empty
    /// or foreign file included), a file written by a newer tollgate, or a file that fails its
    /// integrity check; [`StoreError::Backend`] when SQLite cannot open or write it.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(path, Synchronous::Full).await
    }

    /// Opens (or creates) the database at `path` with the given `synchronous` setting.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with(path: impl Into<PathBuf>, synchronous: Synchronous) -> Result<Self, StoreError> {
        let path = path.into();
        let opened = tokio::task::spawn_blocking(move || {
            let (conn, reader) = open_blocking(&path, synchronous)?;
            let (reads, writes) =
                (tokio::sync::Semaphore::new(CALLS_AT_ONCE), tokio::sync::Semaphore::new(CALLS_AT_ONCE));
            let inner = Inner {
                path,
                reader: Mutex::new(reader),
                conn: Mutex::new(conn),
                reads: Arc::new(reads),
                writes: Arc::new(writes),
            };
            Ok::<_, StoreError>(Self { inner: Arc::new(inner) })
        })
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))?;
        opened
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in one write transaction on the blocking pool; a busy database is retried.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Transaction<'_>, &mut Progress) -> Sql<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.inner.writes).acquire_owned().await;
        let permit = permit.map_err(|e| StoreError::Backend(Box::new(e)))?;
        let inner = Arc::clone(&self.inner);
        let call = move || {
            let _permit = permit;
            inner.write(f)
        };
        tokio::task::spawn_blocking(call).await.map_err(|e| StoreError::Backend(Box::new(e)))?
    }

    /// Runs `f` in one read transaction on the reading connection.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Transaction<'_>) -> Sql<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.inner.reads).acquire_owned().await;
        let permit = permit.map_err(|e| StoreError::Backend(Box::new(e)))?;
        let inner = Arc::clone(&self.inner);
        let call = move || {
            let _permit = permit;
            inner.read(f)
        };
        tokio::task::spawn_blocking(call).await.map_err(|e| StoreError::Backend(Box::new(e)))?
    }
}

/// What a write call tells the connection after its transaction: the newest window and event
/// time it wrote, for pruning.
#[derive(Default)]
struct Progress {
    newest_window: Option<i64>,
    prune: bool,
}

impl Inner {
    fn write<T>(&self, mut f: impl FnMut(&Transaction<'_>, &mut Progress) -> Sql<T>) -> Result<T, StoreError> {
        // A panic inside a call rolls its transaction back (the transaction is dropped), so
        // the connection is still consistent: poisoning is ignored.
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.retried(|| conn.attempt(&mut f))
    }

    fn read<T>(&self, mut f: impl FnMut(&Transaction<'_>) -> Sql<T>) -> Result<T, StoreError> {
        let mut db = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        self.retried(|| {
            let tx = db.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `attempt` again while the database is busy (past the busy timeout), with backoff.
    fn retried<T>(&self, mut attempt: impl FnMut() -> Sql<T>) -> Result<T, StoreError> {
        let mut delay = Duration::from_millis(20);
        let mut tries = 0;
        loop {
            match attempt() {
                Err(e) if is_busy(&e) && tries < BUSY_RETRIES => {
                    tries += 1;
                    tracing::debug!(path = %self.path.display(), tries, "database busy; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 4).min(Duration::from_secs(2));
                }
                Err(e) => return Err(backend(e)),
                Ok(v) => return Ok(v),
            }
        }
    }
}

impl Conn {
    fn attempt<T>(&mut self, f: &mut impl FnMut(&Transaction<'_>, &mut Progress) -> Sql<T>) -> Sql<T> {
        let mut progress = Progress::default();
        let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx, &mut progress)?;
        let newest = progress.newest_window.map_or(self.newest_window, |w| self.newest_window.max(w));
        let due = newest.saturating_sub(self.pruned_window) >= PRUNE_EVERY_SECS
            || self.pruned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(PRUNE_EVERY_SECS as u64));
        if progress.prune && due {
            prune(&tx, newest)?;
        }
        tx.commit()?;
        self.newest_window = newest;
        if progress.prune && due {
            self.pruned_window = newest;
            self.pruned_at = Some(Instant::now());
        }
        Ok(out)
    }
}

/// Drops the rows past their use (see [`SqliteStore`]). Now in usage time is the newest window
/// committed, but never later than the wall clock: a window or an event stamped in the future
/// (a clock jumping ahead on one node) must not age everything else out.
fn prune(tx: &Transaction<'_>, newest_window: i64) -> Sql<()> {
    let wall = unix_now();
    let horizon = newest_window.min(wall).saturating_sub(RETENTION_SECS);
    // total(), not sum(): a sum of saturated aggregates must not fail (sum() raises on overflow).
    let (unexported, dead): (f64, i64) = tx.query_row(
        "SELECT total(CASE WHEN dead IS NULL THEN quantity - exported END), \
                count(dead) FROM usage WHERE window_start < ?1",
        [horizon],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let dropped = tx.execute("DELETE FROM usage WHERE window_start < ?1", [horizon])?;
    if unexported > 0.0 {
        tracing::warn!(units = unexported, "usage older than 35 days was never exported and is dropped");
    }
    if dead > 0 {
        tracing::warn!(aggregates = dead, "dead letters older than 35 days are dropped (no billing system takes them)");
    }
    // Counters of periods that ended before the horizon: never a current one, since the
    // horizon is at least 35 days before the wall clock.
    tx.execute("DELETE FROM quota WHERE end < ?1", [horizon])?;
    tx.execute("DELETE FROM quota_sender WHERE end < ?1", [horizon])?;
    tx.execute("DELETE FROM quota_floor WHERE dropped_before < ?1", [horizon])?;
    let flushes = tx.execute("DELETE FROM flush WHERE at < ?1", [wall.saturating_sub(FLUSH_IDS_KEPT_SECS)])?;
    for table in ["usage_event", "webhook_event"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE at < min((SELECT max(at) FROM {table}), ?2) - ?1"),
            [EVENT_IDS_KEPT_SECS, wall],
        )?;
        tx.execute(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY at \
                 LIMIT max(0, (SELECT count(*) FROM {table}) - ?1))"
            ),
            [EVENT_IDS_MAX],
        )?;
    }
    tx.execute("DELETE FROM idempotency WHERE expires_at <= ?1", [wall])?;
    tx.execute(
        "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency ORDER BY expires_at \
         LIMIT max(0, (SELECT count(*) FROM idempotency) - ?1))",
        [IDEMPOTENCY_KEYS_MAX],
    )?;
    tracing::debug!(aggregates = dropped, flushes, "pruned old rows");
    Ok(())
}

/// Opens the file, checks it is a sound tollgate database of a schema this build knows, and
/// migrates it to [`SCHEMA_VERSION`]; returns the writing connection and a reading one.
fn open_blocking(path: &Path, synchronous: Synchronous) -> Result<(Conn, Connection), StoreError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => {
            return Err(unusable(
                path,
                "the file exists but is empty, so it is not a tollgate database \
                 (SQLite would take it as a new empty one); remove it to start afresh",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path)?,
        Err(e) => return Err(unusable(path, format!("cannot read the file: {e}"))),
    }
    let not_ours = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => unusable(path, "not a SQLite database (a foreign or damaged file)"),
        Some(ErrorCode::DatabaseCorrupt) => unusable(path, format!("the database is corrupt: {e}")),
        _ => backend(e),
    };
    {
        // Checked on a read-only connection before anything is written, so that a foreign
        // SQLite file (its WAL or rollback journal included) is left as it was.
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let db = Connection::open_with_flags(path, flags).map_err(|e| unusable(path, format!("cannot open: {e}")))?;
        db.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
        let app: i32 = db.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(not_ours)?;
        let version: i32 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(not_ours)?;
        if app != APPLICATION_ID {
            return Err(unusable(
                path,
                "a SQLite database, but not a tollgate one (its application_id is not tollgate's); \
                 point [store] path at another file",
            ));
        }
        check_version(path, version)?;
        quick_check(&db).map_err(|e| match e {
            QuickCheck::Failed(report) => unusable(path, format!("the database failed its integrity check: {report}")),
            QuickCheck::Sql(e) => not_ours(e),
        })?;
    }
    let mut db = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE, synchronous).map_err(not_ours)?;
    migrate(path, &mut db)?;
    let reader = connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY, synchronous).map_err(not_ours)?;
    let newest_window: Option<i64> =
        db.query_row("SELECT max(window_start) FROM usage", [], |r| r.get(0)).map_err(backend)?;
    let newest_window = newest_window.unwrap_or(i64::MIN / 2);
    Ok((Conn { db, newest_window, pruned_window: newest_window, pruned_at: None }, reader))
}

/// A connection to a tollgate database, set up for this store.
fn connect(path: &Path, flags: OpenFlags, synchronous: Synchronous) -> Sql<Connection> {
    let db = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    db.busy_timeout(BUSY_TIMEOUT)?;
    db.set_prepared_statement_cache_capacity(64);
    if flags.contains(OpenFlags::SQLITE_OPEN_READ_WRITE) {
        let mode: String = db.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidQuery);
        }
    }
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    db.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA cache_size = -{CACHE_KIB}"))?;
    Ok(db)
}

/// Creates a new database at `path` whole: the schema is written to a file of its own, which
/// is then linked at `path` only if nothing is there yet. Another process opening the same
/// new path at once never sees a file without the schema, and a crash during creation leaves
/// no half-made database at `path`.
fn create(path: &Path) -> Result<(), StoreError> {
    let wal = sidecar(path, "-wal");
    if wal.exists() && !path.exists() {
        return Err(unusable(
            path,
            format!(
                "the database is missing but its write-ahead log {} is there: restore the database \
                 or remove the log to start afresh",
                wal.display()
            ),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = sidecar(path, &format!(".creating-{}-{:x}", std::process::id(), rand_u64()));
    let made = (|| {
        // In rollback-journal mode, so that the commit itself fails when the disk is full (a
        // WAL file's closing checkpoint fails silently): the file is whole once committed. The
        // first read-write connection switches it to WAL.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let cannot =
            |e: &dyn std::fmt::Display| unusable(path, format!("cannot create the database in {}: {e}", dir.display()));
        let mut db = Connection::open_with_flags(&tmp, flags).map_err(|e| cannot(&e))?;
        db.execute_batch("PRAGMA synchronous = FULL").map_err(|e| cannot(&e))?;
        migrate(path, &mut db)?;
        db.close().map_err(|(_, e)| cannot(&e))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another process created it first: open theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(cannot(&format!(
                "{e} (the new file is linked into place, and this filesystem may not support hard links: \
                 put [store] path on a local filesystem)"
            ))),
        }
    })();
    for leftover in [tmp.clone(), sidecar(&tmp, "-journal"), sidecar(&tmp, "-wal"), sidecar(&tmp, "-shm")] {
        let _ = std::fs::remove_file(leftover);
    }
    made
}

/// `path` with `suffix` appended to its file name.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now().unsigned_abs());
    h.finish()
}

fn check_version(path: &Path, version: i32) -> Result<(), StoreError> {
    if version > SCHEMA_VERSION {
        return Err(unusable(
            path,
            format!(
                "written by a newer tollgate (schema version {version}; this build knows up to \
                 {SCHEMA_VERSION}): upgrade tollgate, or point [store] path at another file"
            ),
        ));
    }
    Ok(())
}

enum QuickCheck {
    Failed(String),
    Sql(rusqlite::Error),
}

/// `PRAGMA quick_check`: reads every page of the file once (linear in its size).
fn quick_check(db: &Connection) -> Result<(), QuickCheck> {
    let mut stmt = db.prepare("PRAGMA quick_check(5)").map_err(QuickCheck::Sql)?;
    let lines: Vec<String> =
        stmt.query_map([], |r| r.get(0)).map_err(QuickCheck::Sql)?.collect::<Sql<_>>().map_err(QuickCheck::Sql)?;
    if lines.len() == 1 && lines[0] == "ok" {
        Ok(())
    } else {
        Err(QuickCheck::Failed(lines.join("; ")))
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction (several processes opening one
/// new file at once apply it once: the version is read again under the write lock).
fn migrate(path: &Path, db: &mut Connection) -> Result<(), StoreError> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
    let version: i32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
    check_version(path, version)?;
    let from = usize::try_from(version).unwrap_or(0);
    for step in &MIGRATIONS[from..] {
        tx.execute_batch(step).map_err(backend)?;
    }
    if from < MIGRATIONS.len() {
        tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"))
            .map_err(backend)?;
        tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "database schema migrated");
    }
    tx.commit().map_err(backend)
}

// ---- quota counters ----

/// The counter of `key`'s reserved units, created if its period is still of use (dropping the
/// periods of the same tenant and meter that ended before it started); `None` for a period
/// already dropped.
fn counter(tx: &Transaction<'_>, key: &QuotaKey, period: &str) -> Sql<Option<i64>> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    let floor: Option<i64> = tx
        .prepare_cached("SELECT dropped_before FROM quota_floor WHERE tenant = ?1 AND meter = ?2")?
        .query_row(params![t, m], |r| r.get(0))
        .optional()?;
    if floor.is_some_and(|f| key.end <= f) {
        return Ok(None);
    }
    let reserved: Option<i64> = tx
        .prepare_cached(
            "SELECT reserved FROM quota WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
        )?
        .query_row(params![t, m, period, key.start, key.end], |r| r.get(0))
        .optional()?;
    if let Some(reserved) = reserved {
        return Ok(Some(reserved));
    }
    let ended: Option<i64> = tx
        .prepare_cached("SELECT max(end) FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
        .query_row(params![t, m, key.start], |r| r.get(0))?;
    if let Some(ended) = ended {
        tx.prepare_cached("DELETE FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .execute(params![t, m, key.start])?;
        tx.prepare_cached("DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .execute(params![t, m, key.start])?;
        tx.prepare_cached(
            "INSERT INTO quota_floor (tenant, meter, dropped_before) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant, meter) DO UPDATE SET dropped_before = max(dropped_before, excluded.dropped_before)",
        )?
        .execute(params![t, m, ended])?;
    }
    tx.prepare_cached(
        "INSERT INTO quota (tenant, meter, period, start, end, reserved) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
    )?
    .execute(params![t, m, period, key.start, key.end])?;
    Ok(Some(0))
}

/// Whether the call with `token` was applied already: `Some(grant)` answers it again.
fn seen(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken, reserved: i64) -> Sql<Option<Grant>> {
    let last: Option<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT seq, granted, reserved FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
        )?
        .query_row(
            params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end, node_int(token.node)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let seq = int(token.seq);
    Ok(match last {
        Some((last, granted, then)) if seq <= last => {
            Some(if seq == last { Grant::new(uint(granted), uint(then)) } else { Grant::new(0, uint(reserved)) })
        }
        _ => None,
    })
}

/// Sets the counter and records the answer to `token`'s call (keeping the newest senders).
fn applied(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken, grant: Grant) -> Sql<()> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    tx.prepare_cached(
        "UPDATE quota SET reserved = ?6 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .execute(params![t, m, period, key.start, key.end, int(grant.reserved)])?;
    tx.prepare_cached(
        "INSERT INTO quota_sender (tenant, meter, period, start, end, node, seq, granted, reserved) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (tenant, meter, period, start, end, node) \
         DO UPDATE SET seq = excluded.seq, granted = excluded.granted, reserved = excluded.reserved",
    )?
    .execute(params![
        t,
        m,
        period,
        key.start,
        key.end,
        node_int(token.node),
        int(token.seq),
        int(grant.granted),
        int(grant.reserved)
    ])?;
    tx.prepare_cached(
        "DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
         AND node NOT IN (SELECT node FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
             ORDER BY seq DESC LIMIT ?6)",
    )?
    .execute(params![t, m, period, key.start, key.end, SENDERS_KEPT])?;
    Ok(())
}

// ---- usage aggregates ----

const AGGREGATE_COLUMNS: &str = "u.tenant, u.meter, u.window_start, u.quantity, u.exported, u.revision, u.in_flight, \
     t.customer, u.attempts, u.first_attempt_at, u.claim_until, u.send, \
     u.unknown_failures";

fn aggregate(r: &Row<'_>) -> Sql<UsageAggregate> {
    let tenant: String = r.get(0)?;
    let meter: String = r.get(1)?;
    let mut a = UsageAggregate::new(ExportKey::new(tenant.into(), meter.into(), r.get(2)?), uint(r.get(3)?));
    a.exported = uint(r.get(4)?);
    a.revision = u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX);
    a.in_flight = r.get::<_, Option<i64>>(6)?.map(uint);
    a.customer = r.get(7)?;
    a.attempts = u32::try_from(r.get::<_, i64>(8)?).unwrap_or(u32::MAX);
    a.first_attempt_at = r.get(9)?;
    a.claimed_until = r.get(10)?;
    a.send = r.get::<_, Option<String>>(11)?.as_deref().and_then(ExportSend::from_json);
    a.unknown_failures = u32::try_from(r.get::<_, i64>(12)?).unwrap_or(u32::MAX);
    Ok(a)
}

fn usage_of(tx: &Transaction<'_>, key: &ExportKey) -> Sql<Option<UsageAggregate>> {
    tx.prepare_cached(&format!(
        "SELECT {AGGREGATE_COLUMNS} FROM usage u LEFT JOIN tenant t ON t.id = u.tenant \
         WHERE u.tenant = ?1 AND u.meter = ?2 AND u.window_start = ?3"
    ))?
    .query_row(params![key.tenant.as_str(), key.meter.as_str(), key.window_start], aggregate)
    .optional()
}

/// Whether `claim` may take (or, `in_flight`, hold) the export of `revision` of `key`: the
/// revision has not moved, it is not dead-lettered, no other node holds an unexpired claim.
fn export_claimable(
    tx: &Transaction<'_>,
    key: &ExportKey,
    revision: u32,
    claim: &ExportClaim,
    in_flight: bool,
) -> Sql<bool> {
    type State = (i64, bool, bool, Option<i64>, Option<i64>);
    let state: Option<State> = tx
        .prepare_cached(
            "SELECT revision, dead IS NOT NULL, in_flight IS NOT NULL, claim_node, claim_until FROM usage \
             WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
        )?
        .query_row(params![key.tenant.as_str(), key.meter.as_str(), key.window_start], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((stored, dead, flying, node, until)) = state else { return Ok(false) };
    let held_by_other = matches!((node, until), (Some(n), Some(u)) if n != node_int(claim.node) && u > claim.now);
    Ok(stored == i64::from(revision) && !dead && (flying || !in_flight) && !held_by_other)
}

fn add_usage(tx: &Transaction<'_>, tenant: &TenantId, meter: &str, window_start: i64, quantity: u64) -> Sql<()> {
    tx.prepare_cached(
        // Saturating: past i64::MAX, SQLite would turn the sum into a float.
        "INSERT INTO usage (tenant, meter, window_start, quantity) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (window_start, tenant, meter) DO UPDATE SET quantity = \
         CASE WHEN quantity > 9223372036854775807 - excluded.quantity THEN 9223372036854775807 \
         ELSE quantity + excluded.quantity END",
    )?
    .execute(params![tenant.as_str(), meter, window_start, int(quantity)])?;
    Ok(())
}

// ---- the directory ----

fn tenant_row(r: &Row<'_>) -> Sql<TenantRecord> {
    let id: String = r.get(0)?;
    let plan: String = r.get(1)?;
    let mut t = TenantRecord::new(id.into(), plan.into());
    t.customer = r.get(2)?;
    t.last_event_at = r.get(3)?;
    t.overrides = r.get(4)?;
    Ok(t)
}

const TENANT_COLUMNS: &str = "t.id, t.plan, t.customer, t.last_event_at, t.overrides";

#[async_trait]
impl Store for SqliteStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let r = r.clone();
        self.write(move |tx, _| {
            let period = r.key.period_tag();
            let Some(reserved) = counter(tx, &r.key, &period)? else {
                // A late call for a period long over: nothing is left to reserve in it.
                return Ok(Grant::new(0, 0));
            };
            if let Some(grant) = seen(tx, &r.key, &period, r.token, reserved)? {
                return Ok(grant);
            }
            let reserved = uint(reserved).saturating_add(r.owed);
            let granted = match r.limit {
                Some(limit) => r.grant_for(limit.saturating_sub(reserved)),
                None => r.units,
            };
            let grant = Grant::new(granted, reserved.saturating_add(granted));
            applied(tx, &r.key, &period, r.token, grant)?;
            Ok(grant)
        })
        .await
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let period = key.period_tag();
            if let Some(reserved) = counter(tx, &key, &period)? {
                if seen(tx, &key, &period, token, reserved)?.is_none() {
                    let grant = Grant::new(0, uint(reserved).saturating_sub(units));
                    applied(tx, &key, &period, token, grant)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        let batch = batch.clone();
        self.write(move |tx, progress| {
            let fresh = tx
                .prepare_cached("INSERT INTO flush (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")?
                .execute(params![batch.id.as_str(), unix_now()])?;
            if fresh == 0 {
                return Ok(CommitOutcome::AlreadyApplied);
            }
            for r in &batch.records {
                add_usage(tx, &r.tenant, r.meter.as_str(), r.window_start, r.quantity)?;
                progress.newest_window = progress.newest_window.max(Some(r.window_start));
            }
            progress.prune = true;
            Ok(CommitOutcome::Applied)
        })
        .await
    }

    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            // The conditions repeat the partial index's, so that SQLite reads only the pending rows.
            let pending = "u.dead IS NULL AND (u.quantity > u.exported OR u.in_flight IS NOT NULL)";
            let rows = match &after {
                None => tx
                    .prepare_cached(&format!(
                        "SELECT {AGGREGATE_COLUMNS} FROM usage u LEFT JOIN tenant t ON t.id = u.tenant \
                         WHERE {pending} AND u.window_start < ?1 \
                         ORDER BY u.tenant, u.meter, u.window_start LIMIT ?2"
                    ))?
                    .query_map(params![window_start_before, limit], aggregate)?
                    .collect::<Sql<Vec<_>>>(),
                Some(k) => tx
                    .prepare_cached(&format!(
                        "SELECT {AGGREGATE_COLUMNS} FROM usage u LEFT JOIN tenant t ON t.id = u.tenant \
                         WHERE {pending} AND u.window_start < ?1 \
                         AND (u.tenant, u.meter, u.window_start) > (?2, ?3, ?4) \
                         ORDER BY u.tenant, u.meter, u.window_start LIMIT ?5"
                    ))?
                    .query_map(
                        params![window_start_before, k.tenant.as_str(), k.meter.as_str(), k.window_start, limit],
                        aggregate,
                    )?
                    .collect::<Sql<Vec<_>>>(),
            };
            rows
        })
        .await
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let (key, revision, claim) = (aggregate.key.clone(), aggregate.revision, *claim);
        let (quantity, send) = (int(aggregate.quantity), send.to_json());
        self.write(move |tx, _| {
            if !export_claimable(tx, &key, revision, &claim, false)? {
                return Ok(None);
            }
            tx.prepare_cached(
                "UPDATE usage SET claim_node = ?4, claim_until = ?5, attempts = attempts + 1, \
                 first_attempt_at = coalesce(first_attempt_at, ?6), \
                 send = CASE WHEN in_flight IS NULL THEN ?8 ELSE send END, \
                 in_flight = coalesce(in_flight, min(quantity, ?7)) \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                node_int(claim.node),
                claim.until,
                claim.now,
                quantity,
                send
            ])?;
            usage_of(tx, &key)
        })
        .await
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        unknown: bool,
    ) -> Result<bool, StoreError> {
        let (key, revision, claim) = (aggregate.key.clone(), aggregate.revision, *claim);
        self.write(move |tx, _| {
            if !export_claimable(tx, &key, revision, &claim, true)? {
                return Ok(false);
            }
            tx.prepare_cached(
                "UPDATE usage SET claim_node = ?4, claim_until = ?5, unknown_failures = unknown_failures + ?6 \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                node_int(claim.node),
                claim.until,
                i64::from(unknown)
            ])?;
            Ok(true)
        })
        .await
    }

    async fn finish_export(&self, aggregate: &UsageAggregate) -> Result<bool, StoreError> {
        let (key, revision) = (aggregate.key.clone(), aggregate.revision);
        self.write(move |tx, _| {
            let changed = tx
                .prepare_cached(
                    "UPDATE usage SET exported = in_flight, in_flight = NULL, send = NULL, dead = NULL, \
                     revision = revision + 1, attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, \
                     claim_until = NULL WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND revision = ?4 \
                     AND in_flight IS NOT NULL",
                )?
                .execute(params![key.tenant.as_str(), key.meter.as_str(), key.window_start, i64::from(revision)])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        let (key, revision, reason) = (aggregate.key.clone(), aggregate.revision, reason.to_owned());
        self.write(move |tx, _| {
            tx.prepare_cached(
                "UPDATE usage SET dead = ?4 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND revision = ?5",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                reason,
                i64::from(revision)
            ])?;
            Ok(())
        })
        .await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            let row = |r: &Row<'_>| {
                let tenant: String = r.get(0)?;
                let meter: String = r.get(1)?;
                let key = ExportKey::new(tenant.into(), meter.into(), r.get(2)?);
                let mut d = DeadLetter::new(key, uint(r.get(3)?), r.get::<_, String>(4)?);
                d.revision = u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX);
                d.send = r.get::<_, Option<String>>(6)?.as_deref().and_then(ExportSend::from_json);
                Ok(d)
            };
            let (sql, cursor) = match &after {
                None => ("", None),
                Some(k) => ("AND (tenant, meter, window_start) > (?2, ?3, ?4)", Some(k)),
            };
            let sql = format!(
                "SELECT tenant, meter, window_start, quantity - exported, dead, revision, send FROM usage \
                 WHERE dead IS NOT NULL {sql} ORDER BY tenant, meter, window_start LIMIT ?1"
            );
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = match cursor {
                None => stmt.query_map(params![limit], row)?.collect::<Sql<Vec<_>>>(),
                Some(k) => stmt
                    .query_map(params![limit, k.tenant.as_str(), k.meter.as_str(), k.window_start], row)?
                    .collect::<Sql<Vec<_>>>(),
            };
            rows
        })
        .await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let changed = tx
                .prepare_cached(
                    "UPDATE usage SET dead = NULL, in_flight = NULL, send = NULL, revision = revision + 1, \
                     attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, claim_until = NULL \
                     WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND dead IS NOT NULL",
                )?
                .execute(params![key.tenant.as_str(), key.meter.as_str(), key.window_start])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let events = events.to_vec();
        self.write(move |tx, progress| {
            let mut out = Vec::with_capacity(events.len());
            for e in &events {
                let fresh = tx
                    .prepare_cached("INSERT INTO usage_event (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")?
                    .execute(params![e.id, e.at])?;
                if fresh == 0 {
                    out.push(EventOutcome::Duplicate);
                    continue;
                }
                let r = &e.record;
                add_usage(tx, &r.tenant, r.meter.as_str(), r.window_start, r.quantity)?;
                progress.newest_window = progress.newest_window.max(Some(r.window_start));
                out.push(EventOutcome::Applied);
            }
            progress.prune = true;
            Ok(out)
        })
        .await
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {AGGREGATE_COLUMNS} FROM usage u LEFT JOIN tenant t ON t.id = u.tenant \
                 WHERE u.tenant = ?1 AND u.window_start >= ?2 AND u.window_start < ?3 \
                 ORDER BY u.tenant, u.meter, u.window_start"
            ))?
            .query_map(params![tenant.as_str(), from, to], aggregate)?
            .collect()
        })
        .await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| match &after {
            None => tx
                .prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t ORDER BY t.id LIMIT ?1"))?
                .query_map(params![limit], tenant_row)?
                .collect(),
            Some(a) => tx
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.id > ?1 ORDER BY t.id LIMIT ?2"
                ))?
                .query_map(params![a.as_str(), limit], tenant_row)?
                .collect(),
        })
        .await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let customer = customer.to_owned();
        self.read(move |tx| {
            tx.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.customer = ?1"))?
                .query_row([&customer], tenant_row)
                .optional()
        })
        .await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        let change = change.clone();
        self.write(move |tx, _| {
            let seen: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM webhook_event WHERE id = ?1)")?
                .query_row([&change.event_id], |r| r.get(0))?;
            if seen {
                return Ok(PlanChangeOutcome::Duplicate);
            }
            let Some(mut record) = tx
                .prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.customer = ?1"))?
                .query_row([&change.customer], tenant_row)
                .optional()?
            else {
                return Ok(PlanChangeOutcome::UnknownCustomer);
            };
            tx.prepare_cached("INSERT INTO webhook_event (id, at) VALUES (?1, ?2)")?
                .execute(params![change.event_id, change.created])?;
            if record.last_event_at.is_some_and(|last| last > change.created) {
                return Ok(PlanChangeOutcome::Stale);
            }
            tx.prepare_cached("UPDATE tenant SET plan = ?2, last_event_at = ?3 WHERE id = ?1")?.execute(params![
                record.id.as_str(),
                change.plan.as_str(),
                change.created
            ])?;
            record.plan = change.plan.clone();
            record.last_event_at = Some(change.created);
            Ok(PlanChangeOutcome::Applied(record))
        })
        .await
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let key = *key;
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {TENANT_COLUMNS} FROM api_key k JOIN tenant t ON t.id = k.tenant \
                 WHERE k.hash = ?1 AND (k.expires_at IS NULL OR k.expires_at > ?2)"
            ))?
            .query_row(params![&key.as_bytes()[..], unix_now()], tenant_row)
            .optional()
        })
        .await
    }

    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let changed = tx
                .prepare_cached(
                    "INSERT INTO api_key (hash, tenant, prefix, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (hash) DO UPDATE SET prefix = excluded.prefix, expires_at = excluded.expires_at \
                     WHERE api_key.tenant = excluded.tenant",
                )?
                .execute(params![
                    &key.hash.as_bytes()[..],
                    key.tenant.as_str(),
                    key.prefix,
                    key.created_at,
                    key.expires_at
                ])?;
            Ok(changed)
        })
        .await
        .and_then(|changed| match changed {
            0 => Err(StoreError::Conflict("the API key, held by another tenant")),
            _ => Ok(()),
        })
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |tx| {
            let mut keys = tx
                .prepare_cached("SELECT hash, prefix, created_at, expires_at FROM api_key WHERE tenant = ?1")?
                .query_map([tenant.as_str()], |r| {
                    let hash: Vec<u8> = r.get(0)?;
                    let hash = KeyHash::from_bytes(&hash).ok_or(rusqlite::Error::InvalidColumnType(
                        0,
                        "hash".into(),
                        rusqlite::types::Type::Blob,
                    ))?;
                    Ok(ApiKeyRecord::new(hash, tenant.clone(), r.get(2)?)
                        .with_prefix(r.get::<_, String>(1)?)
                        .with_expiry(r.get(3)?))
                })?
                .collect::<Sql<Vec<_>>>()?;
            keys.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(keys)
        })
        .await
    }

    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let c = c.clone();
        self.write(move |tx, _| {
            let held: Option<(String, bool, i64, i64)> = tx
                .prepare_cached(
                    "SELECT request, completed, in_flight_until, expires_at FROM idempotency WHERE key = ?1",
                )?
                .query_row([&c.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some((request, completed, until, expires)) = held {
                if c.now < expires && (completed || c.now < until) {
                    return Ok(if request != c.request {
                        IdempotencyState::Mismatch
                    } else if completed {
                        IdempotencyState::Completed
                    } else {
                        IdempotencyState::InFlight
                    });
                }
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO idempotency (key, request, owner, completed, in_flight_until, expires_at) \
                 VALUES (?1, ?2, ?3, 0, ?4, ?5)",
            )?
            .execute(params![c.key, c.request, c.owner as i64, c.in_flight_until, c.expires_at])?;
            Ok(IdempotencyState::Claimed)
        })
        .await
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |tx, _| {
            let sql = match how {
                IdempotencySettle::Completed => {
                    "UPDATE idempotency SET completed = 1 WHERE key = ?1 AND owner = ?2 AND completed = 0"
                }
                _ => "DELETE FROM idempotency WHERE key = ?1 AND owner = ?2 AND completed = 0",
            };
            tx.prepare_cached(sql)?.execute(params![key, owner as i64])?;
            Ok(())
        })
        .await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let id = id.clone();
        self.read(move |tx| {
            tx.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.id = ?1"))?
                .query_row([id.as_str()], tenant_row)
                .optional()
        })
        .await
    }

    async fn set_overrides(&self, tenant: &TenantId, overrides: Option<&str>) -> Result<bool, StoreError> {
        let (tenant, overrides) = (tenant.clone(), overrides.map(str::to_owned));
        self.write(move |tx, _| {
            let changed = tx
                .prepare_cached("UPDATE tenant SET overrides = ?2 WHERE id = ?1")?
                .execute(params![tenant.as_str(), overrides])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let (record, keys) = (record.clone(), keys.to_vec());
        self.write(move |tx, _| {
            let id = record.id.as_str();
            if let Some(c) = &record.customer {
                // A billing customer belongs to one tenant: given to this one, it leaves any other.
                tx.prepare_cached("UPDATE tenant SET customer = NULL WHERE customer = ?1 AND id <> ?2")?
                    .execute(params![c, id])?;
            }
            tx.prepare_cached(
                "INSERT INTO tenant (id, plan, customer, last_event_at, overrides) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, customer = excluded.customer, \
                 last_event_at = excluded.last_event_at, overrides = excluded.overrides",
            )?
            .execute(params![
                id,
                record.plan.as_str(),
                record.customer,
                record.last_event_at,
                record.overrides
            ])?;
            for key in &keys {
                tx.prepare_cached(
                    "INSERT INTO api_key (hash, tenant, created_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (hash) DO UPDATE SET tenant = excluded.tenant",
                )?
                .execute(params![&key.as_bytes()[..], id, unix_now()])?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        let key = *key;
        self.write(move |tx, _| {
            tx.prepare_cached("DELETE FROM api_key WHERE hash = ?1")?.execute([&key.as_bytes()[..]])?;
            Ok(())
        })
        .await
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}

#[async_trait]
impl StoreInspect for SqliteStore {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        let key = key.clone();
        self.read(move |tx| {
            let reserved: Option<i64> = tx
                .prepare_cached(
                    "SELECT reserved FROM quota \
                     WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
                )?
                .query_row(
                    params![key.tenant.as_str(), key.meter.as_str(), key.period_tag(), key.start, key.end],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(reserved.map_or(0, uint))
        })
        .await
    }

    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let key = key.clone();
        self.read(move |tx| usage_of(tx, &key)).await
    }
}
