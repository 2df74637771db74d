//! The schema of the SqliteStore: its tables, their migrations, and opening a file (checked,
//! created or migrated).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use super::conn::{backend, rand_u64, unusable, Conn, IdCounts, Sql, BUSY_TIMEOUT, CACHE_KIB};
use crate::{config::Synchronous, store::StoreError};

/// `PRAGMA application_id` of a tollgate database ("TGL1"): a SQLite file without it is not
/// ours, and is refused rather than written to.
pub(super) const APPLICATION_ID: i32 = 0x5447_4C31;

/// The schema version this build writes (`PRAGMA user_version`); see [`MIGRATIONS`].
pub(super) const SCHEMA_VERSION: i32 = 25;

/// The schema, one step per version: step `i` takes a database from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
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
    r"
ALTER TABLE idempotency ADD COLUMN response BLOB;
CREATE TABLE idempotency_bytes (
    bucket INTEGER PRIMARY KEY,
    bytes  INTEGER NOT NULL
);
",
    // The identifier namespace is written only in a new file (see `migrate`): a file made
    // before has none, and keeps its identifiers until asked to change.
    r"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
",
    // Aggregates are export candidates while billable usage is unexported (every row before
    // was one).
    r"
ALTER TABLE usage ADD COLUMN billable INTEGER NOT NULL DEFAULT 1;
DROP INDEX usage_pending;
CREATE INDEX usage_pending ON usage (tenant, meter, window_start)
    WHERE dead IS NULL AND billable = 1 AND (quantity > exported OR in_flight IS NOT NULL);
",
    // The export ledger that reconciliation compares with the billing system: one row per
    // exported revision (and per dead letter under observation), by the hour of its timestamp,
    // kept 35 days from `kept_from`.
    r"
CREATE TABLE ledger (
    hour          INTEGER NOT NULL,
    tenant        TEXT NOT NULL,
    meter         TEXT NOT NULL,
    window_start  INTEGER NOT NULL,
    revision      INTEGER NOT NULL,
    send          TEXT NOT NULL,
    exported_at   INTEGER,
    lacking_since INTEGER,
    superseded    INTEGER NOT NULL DEFAULT 0,
    kept_from     INTEGER NOT NULL,
    PRIMARY KEY (hour, tenant, meter, window_start, revision)
) WITHOUT ROWID;
CREATE INDEX ledger_kept ON ledger (kept_from);
",
    // Each tenant's subscriptions as the webhooks last saw them (JSON): events are ordered per
    // subscription.
    r"
ALTER TABLE tenant ADD COLUMN subscriptions TEXT;
",
    // Each tenant's Metronome customer id or ingest alias, beside its Stripe customer.
    r"
ALTER TABLE tenant ADD COLUMN metronome_customer TEXT;
",
    // Prepaid credits: a prepaid counter's granted units (its limit) beside its reserved
    // count, and the grants, open and recently closed.
    r"
ALTER TABLE quota ADD COLUMN granted INTEGER;
CREATE TABLE credit (
    tenant      TEXT NOT NULL,
    meter       TEXT NOT NULL,
    id          TEXT NOT NULL,
    units       INTEGER NOT NULL,
    granted_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    payment     TEXT,
    refunded    INTEGER NOT NULL DEFAULT 0,
    closed_at   INTEGER,
    revoked     INTEGER,
    lost        INTEGER,
    PRIMARY KEY (tenant, meter, id)
) WITHOUT ROWID;
CREATE INDEX credit_due ON credit (expires_at) WHERE closed_at IS NULL AND expires_at IS NOT NULL;
",
    // Senders forgotten by the time of their last call (0: written before it was recorded,
    // the oldest); a prepaid balance's forgiven units (per sender); a grant's cost, units bought and units
    // its refunds took back; one grant per payment (duplicates made before are kept, marked);
    // refunds kept until their grant lands. Every new column has a default, so nodes of the
    // previous version keep writing valid rows during an upgrade.
    r"
ALTER TABLE quota_sender ADD COLUMN at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota ADD COLUMN forgiven INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota ADD COLUMN forgiven_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota ADD COLUMN forgiven_by TEXT NOT NULL DEFAULT '{}';
ALTER TABLE quota ADD COLUMN senders_forgotten_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE credit ADD COLUMN paid INTEGER;
ALTER TABLE credit ADD COLUMN bought INTEGER;
UPDATE credit SET bought = units;
ALTER TABLE credit ADD COLUMN taken INTEGER NOT NULL DEFAULT 0;
ALTER TABLE credit ADD COLUMN duplicate INTEGER NOT NULL DEFAULT 0;
UPDATE credit SET duplicate = 1 WHERE payment IS NOT NULL AND EXISTS (
    SELECT 1 FROM credit c WHERE c.tenant = credit.tenant AND c.payment = credit.payment
    AND (c.granted_at, c.meter, c.id) < (credit.granted_at, credit.meter, credit.id));
CREATE UNIQUE INDEX credit_payment ON credit (tenant, payment) WHERE payment IS NOT NULL AND duplicate = 0;
CREATE INDEX credit_by_payment ON credit (payment) WHERE payment IS NOT NULL;
CREATE INDEX credit_id ON credit (id);
CREATE TABLE credit_refund_kept (
    payment TEXT PRIMARY KEY,
    invoice TEXT,
    refund  TEXT NOT NULL,
    at      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX credit_refund_kept_invoice ON credit_refund_kept (invoice) WHERE invoice IS NOT NULL;
CREATE INDEX credit_refund_kept_at ON credit_refund_kept (at);
CREATE TABLE idempotency_count (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    n  INTEGER NOT NULL
);
INSERT INTO idempotency_count (id, n) SELECT 0, count(*) FROM idempotency;
",
    // 12 -> 13: tenants' shared rates (the rate role).
    r"
CREATE TABLE rate_cells (
    tenant  TEXT PRIMARY KEY,
    tat     INTEGER NOT NULL,
    senders TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX rate_cells_tat ON rate_cells (tat);
",
    // 13 -> 14: tenants' places (the places role).
    r"
CREATE TABLE place_leases (
    tenant  TEXT PRIMARY KEY,
    holders TEXT NOT NULL,
    expires INTEGER NOT NULL
) WITHOUT ROWID;
",
    // 14 -> 15: the alerts outbox (the alerts role), and a tenant's own alert endpoint.
    r"
CREATE TABLE alert_outbox (
    id           TEXT NOT NULL,
    destination  TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    event        TEXT NOT NULL,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    keep_until   INTEGER NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    next_at      INTEGER NOT NULL,
    claim_owner  INTEGER NOT NULL,
    claim_until  INTEGER NOT NULL,
    last_error   TEXT,
    delivered_at INTEGER,
    PRIMARY KEY (id, destination)
) WITHOUT ROWID;
CREATE INDEX alert_outbox_due ON alert_outbox (state, next_at);
CREATE INDEX alert_outbox_kept ON alert_outbox (keep_until) WHERE state != 'pending';
ALTER TABLE tenant ADD COLUMN alert_endpoint TEXT;
",
    // 15 -> 16: a tenant's own cap on a meter (its spend cap), beside the meter's counters.
    r"
CREATE TABLE quota_cap (
    tenant TEXT NOT NULL,
    meter  TEXT NOT NULL,
    cap    INTEGER NOT NULL,
    hard   INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter)
) WITHOUT ROWID;
",
    // 16 -> 17: what each sender keeps of a counter (its lease, holds and jobs), until when,
    // and what its expiry gave back (`store::quota::Keeping`). Defaults keep rows of the
    // previous version valid: they keep nothing and never expire.
    r"
ALTER TABLE quota_sender ADD COLUMN lease INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota_sender ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota_sender ADD COLUMN jobs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota_sender ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quota_sender ADD COLUMN gone INTEGER NOT NULL DEFAULT 0;
",
    // 17 -> 18: a credit grant's takes apart from its payment's refunds (disputes, proration
    // credits), once per id, as JSON (`store::quota::takes_json`); none by default.
    r"
ALTER TABLE credit ADD COLUMN takes TEXT NOT NULL DEFAULT '[]';
",
    // 18 -> 19: a tenant's recharge of a prepaid meter, beside its balance
    // (`store::RechargeState`, as JSON).
    r"
CREATE TABLE quota_recharge (
    tenant TEXT NOT NULL,
    meter  TEXT NOT NULL,
    state  TEXT NOT NULL,
    PRIMARY KEY (tenant, meter)
) WITHOUT ROWID;
",
    // 19 -> 20: an API key's scopes (`KeyScopes::bits`); NULL, a key of the previous version,
    // has the default scopes.
    r"
ALTER TABLE api_key ADD COLUMN scopes INTEGER;
",
    // 20 -> 21: the values of a meter's open dimension a tenant used in a month
    // (`store::ValueRow`, as JSON), kept until `expires` (Unix seconds).
    r"
CREATE TABLE dimension_values (
    tenant    TEXT NOT NULL,
    meter     TEXT NOT NULL,
    dimension TEXT NOT NULL,
    period    INTEGER NOT NULL,
    row       TEXT NOT NULL,
    expires   INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter, dimension, period)
) WITHOUT ROWID;
CREATE INDEX dimension_values_expires ON dimension_values (expires);
",
    // 21 -> 22: the feed of tenants changed (`store::Changes`): each tenant's last change, at
    // most `CHANGES_KEPT`; the row of the empty tenant id holds the feed's floor in `stamp`.
    r"
CREATE TABLE tenant_change (
    tenant TEXT PRIMARY KEY,
    at     INTEGER NOT NULL,
    stamp  INTEGER NOT NULL
) WITHOUT ROWID;
",
    // 22 -> 23: each tenant's payments (`store::PaymentRow`, as JSON): what it has paid, net,
    // and since when, for tiers.
    r"
CREATE TABLE tenant_payment (
    tenant TEXT PRIMARY KEY,
    row    TEXT NOT NULL
) WITHOUT ROWID;
",
    // 23 -> 24: the audit of tenants' settings (`store::AuditRecord`): each tenant's records
    // numbered by `audit_head`, at most `AUDIT_PER_TENANT` kept per tenant of those it made
    // itself (`own` = 1) and of the others'.
    r"
CREATE TABLE audit_head (
    tenant TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE audit_log (
    tenant  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    setting TEXT NOT NULL,
    before  TEXT,
    after   TEXT,
    own     INTEGER NOT NULL,
    PRIMARY KEY (tenant, seq)
) WITHOUT ROWID;
CREATE INDEX audit_log_at ON audit_log (at, tenant, seq);
CREATE INDEX audit_log_own ON audit_log (tenant, own, seq);
",
    // 24 -> 25: the tallies of requests admitted and refused (`store::Tally`): the fleet's per
    // minute (`tenant` = ''), each tenant's per day, each outcome's count; kept
    // `TALLY_KEPT_SECS`.
    r"
CREATE TABLE tally (
    start   INTEGER NOT NULL,
    tenant  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (start, tenant, outcome)
) WITHOUT ROWID;
CREATE INDEX tally_tenant ON tally (tenant, start);
",
];

/// Opens the file, checks it is a sound tollgate database of a schema this build knows, and
/// migrates it to [`SCHEMA_VERSION`]; returns the writing connection and a reading one.
/// `log_pages` is kept at the number of pages in the write-ahead log after each of the
/// writer's commits.
pub(super) fn open_blocking(
    path: &Path,
    synchronous: Synchronous,
    log_pages: &Arc<AtomicU32>,
) -> Result<(Conn, Connection, Connection), StoreError> {
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
    // The writer commits without checkpointing (SQLite's automatic checkpoint runs in the
    // committing call, fsyncs included, past 1,000 pages of log): the checkpoints run on a
    // connection of their own, off every caller's path (see `Inner::checkpoint`).
    // (The pragma replaces the commit hook: set first.) The log's file is cut back to 16 MiB
    // when the log starts afresh, so a burst does not leave it large on disk.
    db.pragma_update(None, "wal_autocheckpoint", 0).map_err(backend)?;
    db.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024).map_err(backend)?;
    let pages = Arc::clone(log_pages);
    db.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
        pages.store(u32::try_from(n).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }))
    .map_err(backend)?;
    let checkpointer = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE, synchronous).map_err(not_ours)?;
    checkpointer.pragma_update(None, "wal_autocheckpoint", 0).map_err(backend)?;
    let newest_window: Option<i64> =
        db.query_row("SELECT max(window_start) FROM usage", [], |r| r.get(0)).map_err(backend)?;
    let newest_window = newest_window.unwrap_or(i64::MIN / 2);
    Ok((
        Conn { db, newest_window, pruned_window: newest_window, pruned_at: None, ids: IdCounts::default() },
        reader,
        checkpointer,
    ))
}

/// A connection to a tollgate database, set up for this store.
pub(super) fn connect(path: &Path, flags: OpenFlags, synchronous: Synchronous) -> Sql<Connection> {
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
pub(super) fn create(path: &Path) -> Result<(), StoreError> {
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
pub(super) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub(super) fn check_version(path: &Path, version: i32) -> Result<(), StoreError> {
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

pub(super) enum QuickCheck {
    Failed(String),
    Sql(rusqlite::Error),
}

/// `PRAGMA quick_check`: reads every page of the file once (linear in its size).
pub(super) fn quick_check(db: &Connection) -> Result<(), QuickCheck> {
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
pub(super) fn migrate(path: &Path, db: &mut Connection) -> Result<(), StoreError> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
    let version: i32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
    check_version(path, version)?;
    let from = usize::try_from(version).unwrap_or(0);
    for step in &MIGRATIONS[from..] {
        tx.execute_batch(step).map_err(backend)?;
    }
    if from == 0 {
        // A new file draws its meter event identifier namespace.
        tx.execute("INSERT INTO meta (key, value) VALUES ('namespace', ?1)", [crate::store::draw_namespace()])
            .map_err(backend)?;
    }
    if from < MIGRATIONS.len() {
        tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"))
            .map_err(backend)?;
        if (1..12).contains(&from) {
            // Grants of one payment made twice before one grant per payment was enforced:
            // kept as they were (their units may be spent), marked, and named for a person.
            let mut dup = tx
                .prepare("SELECT tenant, meter, id, payment FROM credit WHERE duplicate = 1 LIMIT 100")
                .map_err(backend)?;
            let rows = dup
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                })
                .map_err(backend)?;
            for row in rows {
                let (tenant, meter, id, payment) = row.map_err(backend)?;
                tracing::warn!(path = %path.display(), %tenant, %meter, grant = %id, %payment,
                    "a second credit grant of one payment, made before one grant per payment was enforced: kept, \
                     marked duplicate (tollgate credits list); revoke it if it was not paid for twice");
            }
        }
        tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "database schema migrated");
    }
    tx.commit().map_err(backend)
}
