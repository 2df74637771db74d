//! The embedded durable store: one SQLite file (WAL), through rusqlite's bundled SQLite.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::contract::{self, EVENT_IDS_KEPT_SECS, FLUSH_IDS_KEPT_SECS, RETENTION_SECS, USAGE_KEPT_SECS};
use super::{
    unix_now, ApiKeyRecord, CommitOutcome, DeadLetter, Deferral, DirectoryStore, EventOutcome, ExportClaim, ExportKey,
    ExportSend, ExportStore, Grant, IdempotencyClaim, IdempotencySettle, IdempotencyState, IdempotencyStore,
    LedgerEntry, LedgerStore, PlanChange, PlanChangeOutcome, QuotaKey, QuotaStore, Reservation, ReserveToken,
    StoreError, Tally, TallyQuery, TallyRead, TallyScope, TenantRecord, TenantUpdate, UpdateWhen, UsageAggregate,
    UsageBatch, UsageEvent, UsageRecord, UsageStore,
};
use crate::{
    base::{KeyHash, KeyScopes, TenantId},
    config::Synchronous,
};

mod audit;
mod conn;
mod directory;
mod export;
mod idempotency;
mod ledger;
mod outbox;
mod place;
mod quota;
mod rate;
mod schema;
mod usage;
mod values;

use conn::{backend, int, is_busy, node_int, uint, unusable, AtCapacity, Conn, Sql};
use schema::open_blocking;

/// How many times a call that still finds the database busy is retried, with backoff, before
/// it fails as a store error (about 30 s in all, with the busy timeout).
const BUSY_RETRIES: u32 = 5;
/// The most usage records one transaction writes: bounds how long a flush holds the write lock
/// that the other connections (another engine, another process) wait for.
const MAX_BATCH_RECORDS: usize = 4096;
/// Old rows are pruned at most this often (in window time or in wall-clock time).
const PRUNE_EVERY_SECS: i64 = 3600;

/// The embedded durable store: quotas, usage and its export state, flush ids, the tenant
/// directory (key hashes only) and dead letters in one SQLite file, so that a restarted
/// service keeps its spent quotas and its unexported usage.
///
/// - The file is in WAL mode; `synchronous` is `FULL` by default (every committed call is on
///   disk before it returns, through a power cut too), or `NORMAL` (a process crash loses
///   nothing committed; a power cut may lose the last calls). See the [SQLite guide](crate::guide::sqlite).
/// - Every trait call is one transaction. Writers take the lock at the start (`BEGIN
///   IMMEDIATE`); a busy database is waited for (busy timeout) and the call retried, so
///   several engines and processes can share one file.
/// - Calls run on tokio's blocking pool (`spawn_blocking`), never on the runtime's worker
///   threads; the store starts no thread of its own. One store holds three connections, one
///   that writes and one that reads, with at most two calls of each on the pool at once, and
///   one that checkpoints the log into the file once it holds 1,000 pages, on the pool too,
///   one checkpoint at a time, which no call waits for (the writer's automatic checkpoint is
///   off); the first write after it copies the few pages written meanwhile (at most 64, and
///   those since), so that the log starts afresh.
/// - The schema is versioned (`user_version`) and migrated on open; a file of a newer
///   tollgate, a file that is not a tollgate database (an empty or foreign file included) and
///   a file that fails `PRAGMA quick_check` are refused with [`StoreError::Unusable`].
/// - Old rows are pruned as the calls go: aggregates 63 days after their window, quota
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
    /// The connection that checkpoints the log into the file, on the blocking pool once the
    /// log holds [`CHECKPOINT_PAGES`], never waited for by a call: the writer commits with
    /// `wal_autocheckpoint = 0`, so no call (a request's lease among them) pays for copying
    /// the log and its fsyncs, which grow with the file. Dropped before `conn`, as `reader`.
    checkpointer: Mutex<Connection>,
    /// The pages in the log after the writer's last commit (its commit hook keeps it).
    log_pages: Arc<AtomicU32>,
    /// A checkpoint is under way (one at a time).
    checkpointing: AtomicBool,
    /// A checkpoint left at most [`CATCH_UP_PAGES`] to copy: the next write copies them, then
    /// starts the log afresh.
    catch_up: AtomicBool,
    /// The writing connection (every write is one `BEGIN IMMEDIATE` transaction on it).
    conn: Mutex<Conn>,
    /// Bound the calls of each kind on the blocking pool at once (a permit is held until the
    /// blocking call ends, even when its caller gave up); the others wait here, as futures
    /// their callers can drop (a request's store timeout), rather than as queued threads.
    reads: Arc<tokio::sync::Semaphore>,
    writes: Arc<tokio::sync::Semaphore>,
}

/// The log's size, in pages, that starts a checkpoint: SQLite's own automatic checkpoint's.
const CHECKPOINT_PAGES: u32 = 1000;
/// What a checkpoint may leave for the next write to copy before that write starts the log
/// afresh: the checkpointer passes over the log again while more was written meanwhile.
const CATCH_UP_PAGES: i64 = 64;
/// The most passes of one checkpoint (a log written faster than it is copied ends it).
const CHECKPOINT_PASSES: u32 = 8;

/// The most calls of one kind (reads, writes) of one store on the blocking pool at once: each
/// kind has one connection, so more would only wait for it.
const CALLS_AT_ONCE: usize = 2;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
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

    /// The identifier namespace of the file at `path`, read without changing anything (no
    /// migration, no file made): what `tollgate check` shows. `None` when there is no file;
    /// the empty namespace for a file made before namespaces.
    ///
    /// # Errors
    /// The file cannot be read, or is not a tollgate database.
    pub async fn read_identifier_namespace(path: impl Into<PathBuf>) -> Result<Option<String>, StoreError> {
        let path = path.into();
        tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Ok(None);
            }
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let db = Connection::open_with_flags(&path, flags).map_err(|e| unusable(&path, e))?;
            let id: i32 = db.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(|e| unusable(&path, e))?;
            if id != schema::APPLICATION_ID {
                return Err(unusable(&path, "not a tollgate database"));
            }
            let version: i32 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
            if version < 6 {
                return Ok(Some(String::new()));
            }
            let ns: Option<String> = db
                .query_row("SELECT value FROM meta WHERE key = 'namespace'", [], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            Ok(Some(ns.unwrap_or_default()))
        })
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))?
    }

    /// Opens (or creates) the database at `path` with the given `synchronous` setting.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn open_with(path: impl Into<PathBuf>, synchronous: Synchronous) -> Result<Self, StoreError> {
        let path = path.into();
        let opened = tokio::task::spawn_blocking(move || {
            // Openers of one new file at once contend for its locks while it is set up (its
            // switch to WAL, its migration); one that finds it busy past the busy timeout (or
            // at once, where SQLite does not wait) tries again.
            let mut tries = 0;
            let log_pages = Arc::new(AtomicU32::new(0));
            let (conn, reader, checkpointer) = loop {
                match open_blocking(&path, synchronous, &log_pages) {
                    Err(StoreError::Backend(e))
                        if tries < BUSY_RETRIES && e.downcast_ref::<rusqlite::Error>().is_some_and(is_busy) =>
                    {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20 * u64::from(tries)));
                    }
                    opened => break opened?,
                }
            };
            let (reads, writes) =
                (tokio::sync::Semaphore::new(CALLS_AT_ONCE), tokio::sync::Semaphore::new(CALLS_AT_ONCE));
            let inner = Inner {
                path,
                reader: Mutex::new(reader),
                checkpointer: Mutex::new(checkpointer),
                log_pages,
                checkpointing: AtomicBool::new(false),
                catch_up: AtomicBool::new(false),
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
    #[must_use]
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
            let out = inner.write(f);
            if inner.log_pages.load(Ordering::Relaxed) >= CHECKPOINT_PAGES
                && !inner.checkpointing.swap(true, Ordering::AcqRel)
            {
                // Started, not awaited: this call returns now. The blocking pool's threads
                // carry the runtime's handle. The guard ends it whatever happens: run,
                // panicked, or dropped unrun by a runtime shutting down.
                let running = Checkpointing(Arc::clone(&inner));
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    drop(runtime.spawn_blocking(move || running.0.checkpoint()));
                }
            }
            out
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
    /// New usage event ids and webhook event ids the call may add, and those it added.
    room: (usize, usize),
    added: (usize, usize),
    /// Ids were deleted: the counts are taken again.
    recount: bool,
}

/// Deletes the ids of `table` past their horizon, counted from the newest id's time or `at`
/// (never later than the wall clock). Returns how many went.
fn prune_ids(tx: &Transaction<'_>, table: &str, at: i64) -> Sql<usize> {
    tx.execute(
        &format!("DELETE FROM {table} WHERE at < min(max(?1, coalesce((SELECT max(at) FROM {table}), ?1)), ?2) - ?3"),
        params![at, unix_now(), EVENT_IDS_KEPT_SECS],
    )
}

impl Progress {
    /// Whether the call has no room left for a new (usage event id, webhook event id).
    fn at_cap(&self) -> (bool, bool) {
        (self.added.0 >= self.room.0, self.added.1 >= self.room.1)
    }

    /// Ids deleted by [`prune_ids`] in this call: room for as many.
    fn freed(&mut self, events: usize, webhooks: usize) {
        self.room.0 += events;
        self.room.1 += webhooks;
        // The count the connection keeps was taken before: it is taken again after the call.
        self.recount = true;
    }

    /// Counts a new usage event id, or refuses it at the cap.
    fn add_event_id(&mut self) -> Sql<()> {
        if self.added.0 >= self.room.0 {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(AtCapacity("usage event ids"))));
        }
        self.added.0 += 1;
        Ok(())
    }

    /// Counts a new webhook event id, or refuses it at the cap.
    fn add_webhook_id(&mut self) -> Sql<()> {
        if self.added.1 >= self.room.1 {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(AtCapacity("webhook event ids"))));
        }
        self.added.1 += 1;
        Ok(())
    }
}

/// Copies what it can of the log into the file without waiting for any reader or writer:
/// `(busy, pages in the log, pages copied)`, as SQLite answers `wal_checkpoint(PASSIVE)`.
fn passive_checkpoint(db: &rusqlite::Connection) -> rusqlite::Result<(i64, i64, i64)> {
    db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
}

/// A checkpoint under way: dropped, it lets the next one start.
struct Checkpointing(Arc<Inner>);

impl Drop for Checkpointing {
    fn drop(&mut self) {
        self.0.checkpointing.store(false, Ordering::Release);
    }
}

impl Inner {
    /// Copies the log's committed pages into the file: passive checkpoints, which wait for no
    /// reader or writer (the writer goes on committing meanwhile), again while more than
    /// [`CATCH_UP_PAGES`] were written during the last one (at most [`CHECKPOINT_PASSES`]).
    /// Then the next write copies the rest and starts the log afresh. A failure is logged; the
    /// log keeps everything, and the next commit past [`CHECKPOINT_PAGES`] starts another.
    fn checkpoint(&self) {
        // A panic inside a checkpoint leaves nothing half-done: poisoning is ignored.
        let db = self.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
        let mut copied_some = false;
        for _ in 0..CHECKPOINT_PASSES {
            match passive_checkpoint(&db) {
                Ok((0, log, copied)) if log - copied <= CATCH_UP_PAGES => {
                    copied_some = true;
                    break;
                }
                // More was written meanwhile: another pass.
                Ok((0, _, _)) => copied_some = true,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "checkpoint failed; the log keeps everything until the next");
                    break;
                }
            }
        }
        // Even when writes outran every pass, the next write copies what the last pass left
        // (what was written during it), so that the log starts afresh under any write rate.
        if copied_some {
            self.catch_up.store(true, Ordering::Release);
        }
    }

    fn write<T>(&self, mut f: impl FnMut(&Transaction<'_>, &mut Progress) -> Sql<T>) -> Result<T, StoreError> {
        // A panic inside a call rolls its transaction back (the transaction is dropped), so
        // the connection is still consistent: poisoning is ignored.
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if self.catch_up.swap(false, Ordering::AcqRel) {
            // The log starts afresh only from a write that finds every page of it copied,
            // which writes made while the checkpointer ran prevent: those few pages (at most
            // `CATCH_UP_PAGES`, and what came since) are copied here, so that this write starts
            // the log again (it would grow without bound under steady writes). A log that did
            // not start afresh (a reader still on an old snapshot) stays past
            // `CHECKPOINT_PAGES`, and the next commit starts another checkpoint.
            if let Err(e) = passive_checkpoint(&conn.db) {
                tracing::debug!(path = %self.path.display(), error = %e, "checkpoint failed; the next one tries again");
            }
        }
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
        let tx = self.db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let count = |table: &str| -> Sql<usize> {
            tx.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map(|n| n as usize)
        };
        let events = match self.ids.events {
            Some(n) => n,
            None => count("usage_event")?,
        };
        let webhooks = match self.ids.webhooks {
            Some(n) => n,
            None => count("webhook_event")?,
        };
        let mut progress = Progress {
            room: (self.ids.cap.saturating_sub(events), self.ids.cap.saturating_sub(webhooks)),
            ..Progress::default()
        };
        let out = f(&tx, &mut progress)?;
        let newest = progress.newest_window.map_or(self.newest_window, |w| self.newest_window.max(w));
        let due = newest.saturating_sub(self.pruned_window) >= PRUNE_EVERY_SECS
            || self.pruned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(PRUNE_EVERY_SECS as u64));
        if progress.prune && due {
            prune(&tx, newest)?;
        }
        tx.commit()?;
        self.newest_window = newest;
        self.ids.events = Some(events + progress.added.0);
        self.ids.webhooks = Some(webhooks + progress.added.1);
        if progress.recount || (progress.prune && due) {
            // Counted again at the next call.
            self.ids.events = None;
            self.ids.webhooks = None;
        }
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
    // Usage is kept longer: the previous billing period's, whole.
    let usage_horizon = newest_window.min(wall).saturating_sub(USAGE_KEPT_SECS);
    // total(), not sum(): a sum of saturated aggregates must not fail (sum() raises on overflow).
    // Dead letters are kept until requeued or confirmed: never dropped unseen.
    let unexported: f64 = tx.query_row(
        "SELECT total(CASE WHEN billable = 1 THEN quantity - exported END) FROM usage \
         WHERE window_start < ?1 AND dead IS NULL",
        [usage_horizon],
        |r| r.get(0),
    )?;
    let dropped = tx.execute("DELETE FROM usage WHERE window_start < ?1 AND dead IS NULL", [usage_horizon])?;
    if unexported > 0.0 {
        tracing::warn!(units = unexported, "usage older than 63 days was never exported and is dropped");
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
    }
    tx.execute(
        "DELETE FROM ledger WHERE kept_from < ?1",
        [newest_window.min(wall).saturating_sub(crate::store::LEDGER_KEPT_SECS)],
    )?;
    // Only bindings past their window: a live one is never forgotten (a claim past the cap
    // finds no room instead). The count is taken again, which also mends any drift.
    tx.execute("DELETE FROM idempotency WHERE expires_at <= ?1", [wall])?;
    // Shared rates whose bucket has been full for a day (a tenant's row comes back, empty,
    // at its next lease; its senders, quiet that long, are not needed).
    tx.execute("DELETE FROM rate_cells WHERE tat < ?1", [wall.saturating_sub(86_400).saturating_mul(1_000_000_000)])?;
    // Places rows whose every node's places expired (a node that died while holding some).
    tx.execute("DELETE FROM place_leases WHERE expires < ?1", [wall.saturating_mul(1_000_000_000)])?;
    // Open dimensions' values of months kept long enough (in usage time, as the usage).
    tx.execute("DELETE FROM dimension_values WHERE expires < ?1", [newest_window.min(wall)])?;
    // Tallies past their time, by the wall clock.
    tx.execute("DELETE FROM tally WHERE start < ?1", [crate::store::TallyQuery::horizon(wall)])?;
    tx.execute("UPDATE idempotency_count SET n = (SELECT count(*) FROM idempotency) WHERE id = 0", [])?;
    tracing::debug!(aggregates = dropped, flushes, "pruned old rows");
    Ok(())
}

// ---- quota counters ----

// ---- usage aggregates ----

const AGGREGATE_COLUMNS: &str = "u.tenant, u.meter, u.window_start, u.quantity, u.exported, u.revision, u.in_flight, \
     u.attempts, u.first_attempt_at, u.claim_until, u.send, u.unknown_failures";

fn aggregate(r: &Row<'_>) -> Sql<UsageAggregate> {
    let tenant: String = r.get(0)?;
    let meter: String = r.get(1)?;
    let mut a = UsageAggregate::new(ExportKey::new(tenant.into(), meter.into(), r.get(2)?), uint(r.get(3)?));
    a.exported = uint(r.get(4)?);
    a.revision = u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX);
    a.in_flight = r.get::<_, Option<i64>>(6)?.map(uint);
    a.attempts = u32::try_from(r.get::<_, i64>(7)?).unwrap_or(u32::MAX);
    a.first_attempt_at = r.get(8)?;
    a.claimed_until = r.get(9)?;
    a.send = r.get::<_, Option<String>>(10)?.as_deref().and_then(ExportSend::from_json);
    a.unknown_failures = u32::try_from(r.get::<_, i64>(11)?).unwrap_or(u32::MAX);
    Ok(a)
}

fn usage_of(tx: &Transaction<'_>, key: &ExportKey) -> Sql<Option<UsageAggregate>> {
    tx.prepare_cached(&format!(
        "SELECT {AGGREGATE_COLUMNS} FROM usage u \
         WHERE u.tenant = ?1 AND u.meter = ?2 AND u.window_start = ?3"
    ))?
    .query_row(params![key.tenant.as_str(), key.meter.as_str(), key.window_start], aggregate)
    .optional()
}

// ---- the directory ----

impl SqliteStore {
    /// Lowers the most usage event ids and webhook event ids the file keeps (each; by default
    /// [`EVENT_IDS_MAX`](crate::store::contract::EVENT_IDS_MAX)), to reach the cap in a test.
    /// Feature `test-util`.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn set_event_id_cap(&self, cap: usize) {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()).ids.cap = cap;
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for SqliteStore {
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
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::UsageInspect for SqliteStore {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let key = key.clone();
        self.read(move |tx| usage_of(tx, &key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(i: u32) -> (TenantRecord, [KeyHash; 1]) {
        (TenantRecord::new(format!("t{i}").into(), "p".into()), [KeyHash::of(format!("key-{i}").as_bytes())])
    }

    /// No commit checkpoints (SQLite's automatic checkpoint would run inside a request's lease
    /// write, fsyncs included); a checkpoint of the checkpointer's connection copies the log,
    /// and the first write after it copies what came meanwhile and starts the log afresh, so
    /// that it stays bounded under steady writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn commits_never_checkpoint_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let auto: i64 = {
            let conn = store.inner.conn.lock().unwrap();
            conn.db.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap()
        };
        assert_eq!(auto, 0, "the writer commits without checkpointing");
        let pages = || store.inner.log_pages.load(Ordering::Relaxed);
        // Fewer pages than start a checkpoint on their own: the test runs it.
        let mut i = 0;
        while pages() < CHECKPOINT_PAGES / 2 {
            let (record, keys) = put(i);
            store.put_tenant(&record, &keys).await.unwrap();
            i += 1;
        }
        let written = pages();
        let inner = Arc::clone(&store.inner);
        tokio::task::spawn_blocking(move || inner.checkpoint()).await.unwrap();
        assert!(store.inner.catch_up.load(Ordering::Acquire), "the checkpoint left little for the next write");
        // The next write starts the log again: it holds that write's pages only.
        let (record, keys) = put(i);
        store.put_tenant(&record, &keys).await.unwrap();
        let one = pages();
        assert!(one * 10 < written, "the log started afresh: {one} pages after the write, {written} before");
        // Pages written after a checkpoint's pass (here: with no pass since the log started
        // again) keep the log from starting afresh, unless the write that catches up copies
        // them first.
        let mut j = i + 1;
        while pages() < CHECKPOINT_PAGES / 4 {
            let (record, keys) = put(j);
            store.put_tenant(&record, &keys).await.unwrap();
            j += 1;
        }
        let between = pages();
        store.inner.catch_up.store(true, Ordering::Release);
        let (record, keys) = put(j);
        store.put_tenant(&record, &keys).await.unwrap();
        let after = pages();
        assert!(
            after * 10 < between,
            "the write that caught up started the log afresh: {after} pages, {between} before"
        );
        // The write that takes the log past `CHECKPOINT_PAGES` starts a checkpoint: under way,
        // or done (it left the next write to catch up).
        while pages() < CHECKPOINT_PAGES {
            j += 1;
            let (record, keys) = put(j);
            store.put_tenant(&record, &keys).await.unwrap();
        }
        let started = store.inner.checkpointing.load(Ordering::Acquire) || store.inner.catch_up.load(Ordering::Acquire);
        assert!(started, "a checkpoint started at {} pages", pages());
    }
}
