//! The PostgreSQL store shared by a fleet: tokio-postgres with a deadpool pool, over rustls.
//!
//! Every statement is unnamed (`query_typed`: parse, bind and execute in one round trip) or a
//! simple query, so it runs behind PgBouncer in transaction mode (PgBouncer before 1.21 keeps
//! no named prepared statement across transactions). Nothing is set on a session: a call's
//! statement timeout is `SET LOCAL` inside its transaction, and every table is named with its
//! schema.

use std::{
    future::Future,
    ops::{Deref, DerefMut},
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{error::SqlState, types::ToSql, types::Type, Row};

use super::contract::{self, EVENT_IDS_KEPT_SECS, FLUSH_IDS_KEPT_SECS, RETENTION_SECS, USAGE_KEPT_SECS};
use super::{
    unix_now, ApiKeyRecord, CommitOutcome, DeadLetter, Deferral, DirectoryStore, EventOutcome, ExportClaim, ExportKey,
    ExportSend, ExportStore, Grant, IdempotencyClaim, IdempotencySettle, IdempotencyState, IdempotencyStore,
    LedgerEntry, LedgerStore, PlanChange, PlanChangeOutcome, QuotaKey, QuotaStore, Reservation, ReserveToken,
    StoreError, Tally, TallyQuery, TallyRead, TallyScope, TenantRecord, TenantUpdate, UpdateWhen, UsageAggregate,
    UsageBatch, UsageEvent, UsageRecord, UsageStore,
};
use crate::base::{KeyHash, KeyScopes, TenantId};

mod audit;
mod directory;
mod export;
mod idempotency;
mod ledger;
mod outbox;
mod place;
mod quota;
mod rate;
mod schema;
mod sql;
mod usage;
mod values;

use sql::MAX_INT;

pub use schema::SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION;

/// The most usage records one flush transaction writes (one `INSERT … SELECT FROM unnest`).
const MAX_BATCH_RECORDS: usize = 4096;
/// Old rows are pruned at most this often by one store (and by one store of the fleet at a
/// time: the pruner holds an advisory lock).
const PRUNE_EVERY_SECS: i64 = 3600;
/// How many times a transaction that lost to another (a serialization failure, a deadlock, a
/// unique key taken meanwhile) is run again before the call fails.
const ATTEMPTS: u32 = 6;

/// How long a call on a row every node of a busy tenant writes (a shared rate bucket, places)
/// waits for the row's lock before it answers busy ([`StoreError::Conflict`]): a call holds
/// it for a few round trips, so a wait this long means other nodes queue on the row, and the
/// call would otherwise wait into its caller's time limit and be taken for a store down.
const LOCK_WAIT: Duration = Duration::from_millis(100);

use crate::config::Migrate;

/// How to reach the database: what `[store] kind = "postgres"` holds. Its `Debug` form never
/// shows the URL (it may hold a password).
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// A libpq connection string or URL (`postgres://user:password@host:5432/db`).
    pub url: String,
    /// The schema holding tollgate's tables (default `tollgate`): several deployments may
    /// share a database, each in a schema of its own.
    pub schema: String,
    /// The most connections the pool opens.
    pub pool_size: usize,
    /// How long one statement of a transaction may run on the server (`SET LOCAL
    /// statement_timeout`; a call that is one statement outside a transaction is bounded by
    /// the caller's time limit, or by the role's `statement_timeout`), and how long a call
    /// waits for a connection of the pool or for a new connection.
    pub statement_timeout: Duration,
    /// Apply migrations at open, or only verify the schema's version.
    pub migrate: Migrate,
    /// A PEM file of certificate authorities to trust besides the public ones (Amazon RDS's
    /// bundle, for `sslmode=require` on RDS and Aurora).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate", &self.migrate)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PostgresOptions {
    /// The defaults for `url`: schema `tollgate`, 16 connections, a 5 s statement timeout,
    /// migrations applied at open.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "tollgate".to_owned(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(5),
            migrate: Migrate::Auto,
            ca_file: None,
        }
    }

    /// The schema holding tollgate's tables.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the pool opens.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long one statement may run.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Apply migrations at open, or only verify.
    #[must_use]
    pub fn migrate(mut self, migrate: Migrate) -> Self {
        self.migrate = migrate;
        self
    }

    /// A PEM file of certificate authorities to trust besides the public ones.
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
}

/// The PostgreSQL store shared by a fleet: quotas, usage and its export state, flush ids, the
/// tenant directory (key hashes only), idempotency bindings and dead letters in one schema.
///
/// - Each guarantee is one statement or one transaction: a reserve is one conditional
///   `UPDATE … RETURNING` (the counter's senders kept in the same row, so a re-sent token is
///   applied once); a flush is one transaction with its flush id; an export claim is a
///   conditional update with an expiry; a plan change is applied with its event id in one
///   transaction. Transactions are `READ COMMITTED` with the rows they read locked; one that
///   loses a race (a deadlock, a serialization failure, a key inserted meanwhile) is run
///   again.
/// - It works behind PgBouncer in transaction mode (and RDS Proxy): statements are never
///   prepared by name, nothing is set on a session, tables are named with their schema.
/// - TLS through rustls, with the public roots and, for RDS, [`PostgresOptions::ca_file`];
///   `sslmode` is read from the URL (`prefer` by default, `require`, `disable`).
/// - The schema is versioned and migrated at open under `pg_advisory_xact_lock`
///   ([`Migrate::Auto`]), or only checked ([`Migrate::Verify`]); a schema of a newer tollgate,
///   or a schema holding tables that are not tollgate's, is refused with
///   [`StoreError::Unusable`].
/// - Old rows are pruned as in the SQLite store (aggregates 63 days after their window, quota
///   periods 35 days after they ended, flush ids, usage and webhook event ids, idempotency
///   bindings), by one node of the fleet at a time, at most hourly.
///
/// See the [PostgreSQL guide](crate::guide::postgres).
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The connector of the pool's connections, for the cancel requests of calls given up.
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    schema: String,
    /// The schema as statements name it: `"name"`.
    quoted: String,
    timeout: Duration,
    /// `BEGIN`'s companion: `SET LOCAL statement_timeout = …`.
    set_timeout: String,
    /// The same, and the short lock wait of [`PostgresStore::begin_contended`].
    set_contended: String,
    /// The reserve statement (built once: it is long).
    reserve_sql: String,
    /// The same rule over many releases at once (`sql::release_batch_sql`).
    release_batch_sql: String,
    /// The newest usage window committed through this store (or found at open), and when rows
    /// were last pruned (wall clock).
    newest_window: AtomicI64,
    pruned: Mutex<Option<Instant>>,
    /// The most usage event ids and webhook event ids kept (each).
    id_cap: AtomicI64,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("schema", &self.inner.schema).finish_non_exhaustive()
    }
}

/// A failure inside a call: the server's, or the store's own answer (refused, full).
#[derive(Debug)]
enum Fail {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

type Pg<T> = Result<T, Fail>;

impl Fail {
    /// Lost a race with another transaction (or found a row changed between two statements):
    /// running it again may succeed.
    fn is_retryable(&self) -> bool {
        match self {
            Fail::Pg(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::UNIQUE_VIOLATION
            }),
            Fail::Store(StoreError::Conflict(_)) => true,
            Fail::Store(_) => false,
        }
    }

    /// The server the connection leads to refuses writes (a failover demoted it) or is
    /// shutting down: the pool's idle connections are of no more use.
    fn is_stale_server(&self) -> bool {
        matches!(self, Fail::Pg(e) if e.code().is_some_and(|c| {
            *c == SqlState::READ_ONLY_SQL_TRANSACTION || *c == SqlState::ADMIN_SHUTDOWN || *c == SqlState::CANNOT_CONNECT_NOW
        }))
    }

    fn describe(&self) -> String {
        match self {
            Fail::Pg(e) => e.to_string(),
            Fail::Store(e) => e.to_string(),
        }
    }

    fn into_store(self, timeout: Duration) -> StoreError {
        match self {
            Fail::Store(e) => e,
            Fail::Pg(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => StoreError::Timeout(timeout),
            // A row lock not granted within the call's lock wait: other nodes' calls hold it.
            Fail::Pg(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                StoreError::Conflict("a row locked by other calls past the lock wait: busy")
            }
            // The connection closed under the call (a restart, a failover, a network fault), or
            // the server ended the session: the call may or may not have been applied. As a
            // call with no answer in time, its caller sends it again with its token (a lease),
            // its flush id (a flush), its claim (an export), which each apply once.
            Fail::Pg(e)
                if e.is_closed()
                    || e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
                    || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) =>
            {
                StoreError::Timeout(timeout)
            }
            Fail::Pg(e) => StoreError::Backend(Box::new(e)),
        }
    }
}

tokio::task_local! {
    /// The connections the running attempt of a [`PostgresStore::retrying`] call took.
    static CALL: Arc<CallConns>;
}

/// A pooled connection taken by a call. Dropped inside a call of
/// [`retrying`](PostgresStore::retrying), it waits in the call's [`CallConns`] until the call's
/// attempt has ended; elsewhere it goes back to the pool at once.
struct Conn(Option<deadpool_postgres::Object>);

impl Deref for Conn {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a connection until dropped")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.0.take() else { return };
        match CALL.try_with(Arc::clone) {
            Ok(call) => call.parked.lock().unwrap_or_else(|e| e.into_inner()).push(object),
            Err(_) => drop(object),
        }
    }
}

/// The connections one attempt of a call took. Once the attempt has ended (answered, or
/// failed with the server's answer) no statement runs on them, and they go back to the pool.
/// When the caller gave up first (its time limit: the attempt's future dropped), a statement
/// may still run on one (waiting for a row's lock, say): the server is asked to cancel it, and
/// the connection is closed rather than handed to the next caller, who would wait behind it
/// (one locked row would otherwise take every pooled connection in turn).
struct CallConns {
    parked: Mutex<Vec<deadpool_postgres::Object>>,
    ended: AtomicBool,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl CallConns {
    fn new(tls: tokio_postgres_rustls::MakeRustlsConnect) -> Self {
        Self { parked: Mutex::new(Vec::new()), ended: AtomicBool::new(false), tls }
    }

    /// The attempt has ended: its connections are idle, back to the pool.
    fn ended(&self) {
        self.ended.store(true, Ordering::Release);
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        drop(parked);
    }
}

impl Drop for CallConns {
    fn drop(&mut self) {
        let parked = std::mem::take(self.parked.get_mut().unwrap_or_else(|e| e.into_inner()));
        if self.ended.load(Ordering::Acquire) || parked.is_empty() {
            return;
        }
        let rt = tokio::runtime::Handle::try_current().ok();
        for object in parked {
            // Out of the pool: it makes room for a new connection at once.
            let client = deadpool_postgres::Object::take(object);
            let token = client.cancel_token();
            let tls = self.tls.clone();
            // No runtime to send the cancel on: the connection is closed all the same.
            let Some(rt) = &rt else { continue };
            // Out of the pool at once (its socket closes once the cancelled statement answers);
            // the cancel goes on a connection of its own, within a bound (a stalled server would
            // hold it).
            drop(client);
            rt.spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), token.cancel_query(tls)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "a statement given up on could not be cancelled"),
                    Err(_) => tracing::debug!("the cancel of a statement given up on did not land in 5 s"),
                }
            });
        }
    }
}

/// A value with the PostgreSQL type it is sent as (`query_typed` names every parameter's type:
/// no round trip to ask the server).
trait Typed: ToSql + Sync {
    const TYPE: Type;
}

macro_rules! typed {
    ($($t:ty => $ty:ident),* $(,)?) => { $( impl Typed for $t { const TYPE: Type = Type::$ty; } )* };
}

typed!(
    i64 => INT8, Option<i64> => INT8, bool => BOOL, String => TEXT, &str => TEXT, Option<String> => TEXT,
    Option<&str> => TEXT, Vec<u8> => BYTEA, &[u8] => BYTEA, Option<Vec<u8>> => BYTEA, Vec<String> => TEXT_ARRAY,
    Vec<i64> => INT8_ARRAY, Vec<bool> => BOOL_ARRAY,
);

fn typed<T: Typed>(v: &T) -> (&(dyn ToSql + Sync), Type) {
    (v as &(dyn ToSql + Sync), T::TYPE)
}

/// The parameters of one statement, each with its type.
macro_rules! args {
    ($($e:expr),* $(,)?) => { &[$( typed(&$e) ),*] };
}
use args;

/// A u64 as a `bigint` (values past `i64::MAX` saturate).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A count read back (never negative in a sound schema).
fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A node or sender id (any u64) as a `bigint`, bit for bit.
fn node_int(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn small(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Whether `name` may name a schema as it is written in statements (unquoted, lower case).
fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
        && !name.starts_with("pg_")
}

/// The TLS connector: rustls on aws-lc-rs, the public roots and the given extra authorities.
fn tls(ca_file: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| StoreError::Unusable(format!("{}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| StoreError::Unusable(format!("{}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| StoreError::Unusable(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(Box::new(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PostgresStore {
    /// The options of `[store] kind = "postgres"` (`url`, or the `DATABASE_URL` environment
    /// variable without it).
    ///
    /// # Errors
    /// [`StoreError::Unusable`] when neither `url` nor `DATABASE_URL` is set.
    pub fn options_of(settings: &crate::config::PostgresSettings) -> Result<PostgresOptions, StoreError> {
        let url = match &settings.url {
            Some(url) => url.clone(),
            None => std::env::var("DATABASE_URL").map_err(|_| {
                StoreError::Unusable(
                    "[store] kind = \"postgres\" needs the database: `url` in [store], or the DATABASE_URL \
                     environment variable"
                        .to_owned(),
                )
            })?,
        };
        Ok(PostgresOptions {
            url,
            schema: settings.schema.clone(),
            pool_size: settings.pool_size,
            statement_timeout: settings.statement_timeout,
            migrate: settings.migrate,
            ca_file: settings.ca_file.clone(),
        })
    }

    /// Connects with the defaults of [`PostgresOptions::new`] (schema `tollgate`, migrations
    /// applied).
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(&PostgresOptions::new(url)).await
    }

    /// Opens the store: a pool of connections, the schema migrated or verified.
    ///
    /// # Errors
    /// [`StoreError::Unusable`] for a URL that does not parse, a schema name that is not a
    /// plain lower-case identifier, a schema of a newer tollgate or not tollgate's, or (with
    /// [`Migrate::Verify`]) a schema missing or older; [`StoreError::Backend`] when the server
    /// cannot be reached.
    pub async fn open(options: &PostgresOptions) -> Result<Self, StoreError> {
        let store = Self::pool_only(options)?;
        match options.migrate {
            Migrate::Auto => {
                store.apply_migrations().await?;
            }
            Migrate::Verify => store.verify_schema().await?,
        }
        store.inner.newest_window.store(store.newest_window().await?, Ordering::Relaxed);
        Ok(store)
    }

    /// Applies the schema's missing migrations (what `tollgate migrate` runs, as the schema's
    /// owner). Returns the versions before and after.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn migrate(options: &PostgresOptions) -> Result<(u32, u32), StoreError> {
        Self::pool_only(options)?.apply_migrations().await
    }

    /// The schema holding the tables.
    #[must_use]
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    fn pool_only(options: &PostgresOptions) -> Result<Self, StoreError> {
        // PostgreSQL's statement_timeout is an int of milliseconds.
        if options.statement_timeout.as_millis() > i32::MAX as u128 || options.statement_timeout.is_zero() {
            return Err(StoreError::Unusable("statement_timeout: longer than zero, at most 24 days".to_owned()));
        }
        if !valid_schema(&options.schema) {
            return Err(StoreError::Unusable(format!(
                "schema `{}`: a schema name is lower-case letters, digits and `_`, starting with a letter or `_` \
                 (not `pg_`), at most 63 bytes",
                options.schema
            )));
        }
        let mut config: tokio_postgres::Config =
            options.url.parse().map_err(|e| StoreError::Unusable(format!("the PostgreSQL URL does not parse: {e}")))?;
        // A server that vanishes without closing its connections (a host gone, a network
        // partition) is noticed within about half a minute, not the kernel's two hours: the
        // pool then drops those connections and opens new ones. What the URL sets is kept.
        if config.get_keepalives() && config.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
            config.keepalives_idle(Duration::from_secs(15));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(5));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.statement_timeout);
        }
        #[cfg(target_os = "linux")]
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        let tls = tls(options.ca_file.as_deref())?;
        let manager = Manager::from_config(
            config,
            tls.clone(),
            // Fast: a connection back in the pool is reused as it is (a broken one is dropped).
            // No statement cache, nothing on the session to reset; and none comes back with a
            // statement still running (a call given up on closes its connections: `CallConns`).
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.statement_timeout))
            .create_timeout(Some(options.statement_timeout))
            .build()
            .map_err(|e| StoreError::Unusable(format!("the connection pool: {e}")))?;
        let schema = options.schema.clone();
        let millis = options.statement_timeout.as_millis().max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                tls,
                reserve_sql: sql::reserve_sql(&format!("\"{schema}\"")),
                release_batch_sql: sql::release_batch_sql(&format!("\"{schema}\"")),
                quoted: format!("\"{schema}\""),
                schema,
                timeout: options.statement_timeout,
                set_timeout: format!("SET LOCAL statement_timeout = {millis}"),
                set_contended: format!(
                    "SET LOCAL statement_timeout = {millis}; SET LOCAL lock_timeout = {}",
                    LOCK_WAIT.as_millis().min(millis).max(1)
                ),
                newest_window: AtomicI64::new(i64::MIN / 2),
                pruned: Mutex::new(None),
                id_cap: AtomicI64::new(i64::try_from(contract::EVENT_IDS_MAX).unwrap_or(i64::MAX)),
            }),
        })
    }

    /// `sql` with `{s}` replaced by the schema, quoted (a validated name may still be a
    /// reserved word: `user`, `order`).
    fn sql(&self, sql: &str) -> String {
        sql.replace("{s}", &self.inner.quoted)
    }

    async fn client(&self) -> Result<Conn, Fail> {
        let object = self.inner.pool.get().await.map_err(|e| match e {
            // No connection: nothing was sent.
            deadpool_postgres::PoolError::Backend(e) => Fail::Store(StoreError::Backend(Box::new(e))),
            deadpool_postgres::PoolError::Timeout(_) => Fail::Store(StoreError::Timeout(self.inner.timeout)),
            other => Fail::Store(StoreError::Backend(Box::new(other))),
        })?;
        Ok(Conn(Some(object)))
    }

    /// Runs `f` (one transaction or one statement) again while it loses races, and maps its
    /// failure.
    async fn retrying<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Pg<T>>,
    {
        let mut tries = 0;
        loop {
            // The attempt's connections go back to the pool once it has ended (each idle
            // then); given up on before (this future dropped), they are cancelled and closed.
            let attempt = self.scoped(f()).await;
            match attempt {
                Err(e) if e.is_retryable() && tries + 1 < ATTEMPTS => {
                    tries += 1;
                    tracing::debug!(tries, error = ?e, "a PostgreSQL transaction lost a race; running it again");
                    tokio::time::sleep(Duration::from_millis(2 << tries)).await;
                }
                Err(e) => {
                    if e.is_stale_server() {
                        // After a failover the pool's idle connections may lead to the old
                        // writer (now read-only) or to a server shutting down: they go, and
                        // the next calls connect anew (to where DNS now points).
                        let dropped = self.inner.pool.retain(|_, _| false).removed.len();
                        tracing::warn!(dropped, error = %e.describe(), "the server refuses writes or is shutting down: idle connections dropped");
                    }
                    return Err(e.into_store(self.inner.timeout));
                }
                Ok(v) => return Ok(v),
            }
        }
    }

    /// Runs `fut` (one attempt of a call) with its connections in a [`CallConns`]: back to the
    /// pool once it has ended; cancelled and closed when it is dropped first.
    async fn scoped<T>(&self, fut: impl Future<Output = T>) -> T {
        let call = Arc::new(CallConns::new(self.inner.tls.clone()));
        let out = CALL.scope(call.clone(), fut).await;
        call.ended();
        out
    }

    /// Begins a transaction on `client`, with the statement timeout.
    async fn begin<'c>(&self, client: &'c mut deadpool_postgres::Object) -> Pg<deadpool_postgres::Transaction<'c>> {
        let tx = client.transaction().await?;
        tx.batch_execute(&self.inner.set_timeout).await?;
        Ok(tx)
    }

    /// [`begin`](Self::begin) for a call on a row every node of a busy tenant writes (its
    /// shared rate bucket, its places): a row lock not granted within [`LOCK_WAIT`] fails the
    /// call as [`StoreError::Conflict`] (busy), not as a timeout taken for a store down.
    async fn begin_contended<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Pg<deadpool_postgres::Transaction<'c>> {
        let tx = client.transaction().await?;
        tx.batch_execute(&self.inner.set_contended).await?;
        Ok(tx)
    }

    async fn newest_window(&self) -> Result<i64, StoreError> {
        let sql = self.sql("SELECT max(window_start) FROM {s}.usage");
        self.retrying(|| async {
            let client = self.client().await?;
            let row = client.query_typed_one(&sql, &[]).await?;
            Ok(row.get::<_, Option<i64>>(0).unwrap_or(i64::MIN / 2))
        })
        .await
    }

    /// Notes that usage up to `window` was committed, and prunes old rows when due (at most
    /// hourly per store; one store of the fleet at a time), as the SQLite store does after a
    /// commit. The prune runs on a task of its own, waited for at most half a second: a long
    /// one (a backlog) goes on in the background, so the caller's call (a flush, under its
    /// time limit) is not held by it, and a caller that gives up never cuts it short.
    async fn progressed(&self, window: Option<i64>) {
        if let Some(w) = window {
            self.inner.newest_window.fetch_max(w, Ordering::Relaxed);
        }
        {
            let mut pruned = self.inner.pruned.lock().unwrap_or_else(|e| e.into_inner());
            if pruned.is_some_and(|at| at.elapsed() < Duration::from_secs(PRUNE_EVERY_SECS as u64)) {
                return;
            }
            // Marked at the start: one prune at a time.
            *pruned = Some(Instant::now());
        }
        let store = self.clone();
        let prune = tokio::spawn(async move {
            if let Err(e) = store.prune().await {
                tracing::warn!(error = %e, "pruning old rows failed; it is tried again in a minute");
                let again = Instant::now().checked_sub(Duration::from_secs(PRUNE_EVERY_SECS as u64 - 60));
                *store.inner.pruned.lock().unwrap_or_else(|e| e.into_inner()) = again;
            }
        });
        let _ = tokio::time::timeout(Duration::from_millis(500), prune).await;
    }

    /// Drops the rows past their use (see [`PostgresStore`]). Now in usage time is the newest
    /// window committed, but never later than the wall clock.
    async fn prune(&self) -> Result<(), StoreError> {
        let newest = self.inner.newest_window.load(Ordering::Relaxed);
        let wall = unix_now();
        let horizon = newest.min(wall).saturating_sub(RETENTION_SECS);
        // Usage is kept longer: the previous billing period's, whole (`USAGE_KEPT_SECS`).
        let usage_horizon = newest.min(wall).saturating_sub(USAGE_KEPT_SECS);
        let usage = self.sql("DELETE FROM {s}.usage WHERE window_start < $1 AND dead IS NULL");
        let statements =
            ["DELETE FROM {s}.quota WHERE end_at < $1", "DELETE FROM {s}.quota_floor WHERE dropped_before < $1"]
                .map(|s| self.sql(s));
        let lock = "SELECT pg_try_advisory_xact_lock(hashtext('tollgate-prune:' || $1))";
        let unexported = self.sql(
            "SELECT coalesce(sum(quantity::numeric - exported) FILTER (WHERE billable), 0)::float8 \
             FROM {s}.usage WHERE window_start < $1 AND dead IS NULL",
        );
        let flush = self.sql("DELETE FROM {s}.flush WHERE seen_at < $1");
        // Each kind's count row is locked before its ids are deleted and counted (a commit adding
        // ids holds it until it commits, so the count includes them), and last in the
        // transaction, so commits of events wait for the prune no longer than these statements.
        let ids = ["usage_event", "webhook_event"].map(|t| {
            (
                self.sql(&format!("SELECT 1 FROM {{s}}.id_count WHERE kind = '{t}' FOR UPDATE")),
                self.sql(&format!(
                    "DELETE FROM {{s}}.{t} WHERE seen_at < LEAST((SELECT max(seen_at) FROM {{s}}.{t}), $2) - $1"
                )),
                self.sql(&format!("UPDATE {{s}}.id_count SET n = (SELECT count(*) FROM {{s}}.{t}) WHERE kind = '{t}'")),
            )
        });
        // Deletes of a backlog may take longer than a call's statement timeout.
        let long = format!("SET LOCAL statement_timeout = {}", self.inner.timeout.as_millis().max(300_000));
        let ledger = self.sql("DELETE FROM {s}.ledger WHERE kept_from < $1");
        // Only bindings past their window: a live binding is never deleted (past
        // `limits.idempotency_keys_max` a new key is not bound instead). Then each shard is
        // counted again: nodes of an earlier version (during an upgrade) bind and delete keys
        // without counting them, and a count that drifted would refuse keys for good. (A
        // claim committing meanwhile may be missed: off by it until the next prune.)
        let idem = self.sql("DELETE FROM {s}.idempotency WHERE expires_at <= $1");
        // Shared rates whose bucket has been full for a day.
        let rates = self.sql("DELETE FROM {s}.rate_cells WHERE tat < $1");
        // Rows of places that all expired a day ago (a row emptied by its last release keeps
        // its latest expiry).
        let places = self.sql("DELETE FROM {s}.place_leases WHERE expires < $1");
        // Open dimensions' values of months kept long enough.
        let values = self.sql("DELETE FROM {s}.dimension_values WHERE expires < $1");
        let tallies = self.sql("DELETE FROM {s}.tally WHERE start < $1");
        let idem_recount = self.sql(
            "UPDATE {s}.idempotency_count c SET n = coalesce(k.n, 0) \
             FROM {s}.idempotency_count s LEFT JOIN (SELECT hashtext(idem_key) & 15 AS shard, count(*) AS n \
             FROM {s}.idempotency GROUP BY 1) k ON k.shard = s.shard WHERE c.shard = s.shard AND c.n <> coalesce(k.n, 0)",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            tx.batch_execute(&long).await?;
            if !tx.query_typed_one(lock, args![self.inner.schema.as_str()]).await?.get::<_, bool>(0) {
                return Ok(());
            }
            let lost: f64 = tx.query_typed_one(&unexported, args![usage_horizon]).await?.get(0);
            if lost > 0.0 {
                tracing::warn!(units = lost, "usage older than 63 days was never exported and is dropped");
            }
            tx.query_typed(&usage, args![usage_horizon]).await?;
            for s in &statements {
                tx.query_typed(s, args![horizon]).await?;
            }
            tx.query_typed(&flush, args![wall.saturating_sub(FLUSH_IDS_KEPT_SECS)]).await?;
            tx.query_typed(&ledger, args![newest.min(wall).saturating_sub(crate::store::LEDGER_KEPT_SECS)]).await?;
            tx.query_typed(&idem, args![wall]).await?;
            tx.query_typed(&idem_recount, &[]).await?;

            for (lock, delete, recount) in &ids {
                tx.query_typed(lock, &[]).await?;
                tx.query_typed(delete, args![EVENT_IDS_KEPT_SECS, wall]).await?;
                tx.query_typed(recount, &[]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await?;
        // Fleet rates' and places' rows, in a short transaction of their own: a request's call
        // on a row being deleted waits for the deleting transaction, which must not be the long
        // prune above.
        let day_ago = wall.saturating_sub(86_400).saturating_mul(1_000_000_000);
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            tx.query_typed(&rates, args![day_ago]).await?;
            tx.query_typed(&places, args![day_ago]).await?;
            // In usage time, as the usage.
            tx.query_typed(&values, args![newest.min(wall)]).await?;
            // By the wall clock.
            tx.query_typed(&tallies, args![crate::store::TallyQuery::horizon(wall)]).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Lowers the most usage event ids and webhook event ids the schema keeps (each; by
    /// default [`EVENT_IDS_MAX`](crate::store::contract::EVENT_IDS_MAX)), to reach the cap in
    /// a test. Feature `test-util`.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn set_event_id_cap(&self, cap: usize) {
        self.inner.id_cap.store(i64::try_from(cap).unwrap_or(i64::MAX), Ordering::Relaxed);
    }
}

/// Counts `added` new ids of `kind` (`usage_event`, `webhook_event`) in `tx`; at the cap, ids
/// past their horizon (counted from `at` too) go first, and if none may go the call is refused
/// with [`StoreError::Full`] (its transaction rolls back).
async fn count_ids(
    store: &PostgresStore,
    tx: &deadpool_postgres::Transaction<'_>,
    kind: &'static str,
    added: i64,
    at: i64,
) -> Pg<()> {
    if added == 0 {
        return Ok(());
    }
    let cap = store.inner.id_cap.load(Ordering::Relaxed);
    let n: i64 = tx
        .query_typed_one(
            &store.sql("UPDATE {s}.id_count SET n = n + $2 WHERE kind = $1 RETURNING n"),
            args![kind, added],
        )
        .await?
        .get(0);
    if n <= cap {
        return Ok(());
    }
    let delete = store.sql(&format!(
        "DELETE FROM {{s}}.{kind} WHERE seen_at < LEAST(GREATEST($1, coalesce((SELECT max(seen_at) FROM {{s}}.{kind}), $1)), $2) - $3"
    ));
    tx.query_typed(&delete, args![at, unix_now(), EVENT_IDS_KEPT_SECS]).await?;
    let recount = store.sql(&format!(
        "UPDATE {{s}}.id_count SET n = (SELECT count(*) FROM {{s}}.{kind}) WHERE kind = '{kind}' RETURNING n"
    ));
    let n: i64 = tx.query_typed_one(&recount, &[]).await?.get(0);
    if n > cap {
        return Err(Fail::Store(StoreError::Full(match kind {
            "usage_event" => "usage event ids",
            _ => "webhook event ids",
        })));
    }
    Ok(())
}

// ---- usage aggregates ----

const AGGREGATE_COLUMNS: &str = "u.tenant, u.meter, u.window_start, u.quantity, u.exported, u.revision, u.in_flight, \
     u.attempts, u.first_attempt_at, u.claim_until, u.send, u.unknown_failures";

fn aggregate(r: &Row) -> UsageAggregate {
    let tenant: String = r.get(0);
    let meter: String = r.get(1);
    let mut a = UsageAggregate::new(ExportKey::new(tenant.into(), meter.into(), r.get(2)), uint(r.get(3)));
    a.exported = uint(r.get(4));
    a.revision = small(r.get(5));
    a.in_flight = r.get::<_, Option<i64>>(6).map(uint);
    a.attempts = small(r.get(7));
    a.first_attempt_at = r.get(8);
    a.claimed_until = r.get(9);
    a.send = r.get::<_, Option<String>>(10).as_deref().and_then(ExportSend::from_json);
    a.unknown_failures = small(r.get(11));
    a
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for PostgresStore {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        let sql = self.sql(
            "SELECT reserved FROM {s}.quota \
             WHERE tenant = $1 AND meter = $2 AND period = $3 AND start_at = $4 AND end_at = $5",
        );
        let period = key.period_tag();
        self.retrying(|| async {
            let client = self.client().await?;
            let row = client
                .query_typed_opt(
                    &sql,
                    args![key.tenant.as_str(), key.meter.as_str(), period.as_str(), key.start, key.end],
                )
                .await?;
            Ok(row.map_or(0, |r| uint(r.get(0))))
        })
        .await
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::UsageInspect for PostgresStore {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let sql = self.sql(&format!(
            "SELECT {AGGREGATE_COLUMNS} FROM {{s}}.usage u WHERE u.tenant = $1 AND u.meter = $2 AND u.window_start = $3"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let row =
                client.query_typed_opt(&sql, args![key.tenant.as_str(), key.meter.as_str(), key.window_start]).await?;
            Ok(row.as_ref().map(aggregate))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// Every statement is unnamed (`query_typed*`) or a simple query (`batch_execute`): the
    /// calls of tokio-postgres that prepare a named statement (`prepare*`, and `query`,
    /// `execute`, `query_one`, `query_opt` with a string, which prepare one first) appear
    /// nowhere in the store, so it keeps working behind PgBouncer in transaction mode.
    #[test]
    fn no_statement_is_ever_prepared_by_name() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("schema.rs", include_str!("schema.rs")),
            ("quota.rs", include_str!("quota.rs")),
            ("usage.rs", include_str!("usage.rs")),
            ("export.rs", include_str!("export.rs")),
            ("directory.rs", include_str!("directory.rs")),
            ("idempotency.rs", include_str!("idempotency.rs")),
        ];
        let forbidden =
            [".prepare", ".query(", ".execute(", ".query_one(", ".query_opt(", ".query_raw(", "SET search_path"];
        for (name, text) in files {
            // This test names them: the scan stops at its module.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            for word in forbidden {
                assert!(!code.contains(word), "{name} calls `{word}`: use query_typed or batch_execute");
            }
        }
    }
}
