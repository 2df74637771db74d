//! [`RedisStore`]: the roles a fleet shares on a Redis (or Valkey) server it already runs,
//! beside a durable store for the rest (docs/redis.md).
//!
//! The rules stay in Rust, written once beside each role's trait (the quota rules applied to a
//! tenant's quota and its calendar counters, [`TenantQuota`](super::tenant_quota), [`RateRow`](super::RateRow),
//! [`PlaceRow`](super::PlaceRow), the idempotency rules): a call reads its row (one hash, with
//! a version field `v`), applies them, and writes the row back with one small Lua script that
//! compares the version and writes (a compare-and-set; EVALSHA, its text by EVAL on NOSCRIPT),
//! read again when another node wrote in between ([`race`](super::race)). Lua carries no rule
//! of a role. Every row is one tenant's (or one `Idempotency-Key`'s, one payment's), hash-tagged
//! by it, and every script touches one key.

mod idempotency;
mod keys;
mod memory;
mod options;
mod place;
mod quota;
mod rate;
mod values;

use std::{collections::HashMap, fmt, time::Duration};

use redis::{aio::ConnectionManager, cluster_async::ClusterConnection, AsyncCommands as _};

use super::StoreError;

pub use keys::LAYOUT_VERSION;
pub use options::RedisOptions;

/// The compare-and-set every write runs: the row's version (`v`) must be the one read
/// (`ARGV[1]`, empty when the row was absent); the row then holds the fields given (`ARGV[4..]`,
/// name and value pairs; none: the row is deleted) and no other, its version `ARGV[3]` (a
/// token drawn by the caller: a row deleted and made again never takes a version a stale read
/// could match), and expires `ARGV[2]` milliseconds later (0: never; -1: when it would have).
/// 1 when written; when another write came first, the row as it is now (its fields, as
/// `HGETALL` answers): the caller tries again from it without reading it again.
///
/// A row written is changed in place, never deleted and made again: while its slot moves
/// between a cluster's masters, the first master refuses a script that writes a key it no
/// longer holds (the key would belong to the second), and a script refused halfway keeps what
/// it wrote before. The shebang gives it no flag: a server out of memory refuses it whole (a
/// script's later writes would pass `maxmemory`).
const CAS: &str = r"#!lua
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '') ~= ARGV[1] then return redis.call('HGETALL', KEYS[1]) end
if #ARGV <= 3 then
  redis.call('DEL', KEYS[1])
  return 1
end
local ttl = ARGV[2]
if ttl == '-1' and redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local keep = {v = true}
for i = 4, #ARGV, 2 do keep[ARGV[i]] = true end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not keep[f] then redis.call('HDEL', KEYS[1], f) end
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], unpack(ARGV, 4))
if ttl == '0' then
  redis.call('PERSIST', KEYS[1])
elseif ttl ~= '-1' then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

/// A row read with the server's time, in one script (so that the time is the row's: no write
/// of the row comes between them): `{seconds, microseconds, fields}`, `TIME`'s and
/// `HGETALL`'s answers. It writes nothing (`no-writes`: a full server still runs it).
const READ_TIMED: &str = r"#!lua flags=no-writes
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}
";

/// How long a row written is kept.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ttl {
    /// This long from the write (on the server's clock).
    For(Duration),
    /// As long as the row read would have been.
    AsItWas,
    /// Until it is written again or deleted.
    Never,
}

/// A store of the roles a fleet shares in the request path, on Redis: tenants' quotas (hard
/// and soft quotas, prepaid balances and their grants, spend caps, recharges), shared rates,
/// places in flight and `Idempotency-Key` bindings, on one server ([`open`](Self::open)) or a
/// Redis Cluster ([`open_cluster`](Self::open_cluster)). Cheap to clone: one multiplexed
/// connection (re-established by redis-rs's connection manager), or one per node of a cluster
/// (redis-rs's cluster client, which follows the slots as they move).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    keys: keys::Keys,
    cas: redis::Script,
    /// [`READ_TIMED`].
    timed: redis::Script,
    /// One quota call per row at a time on this node ([`RedisStore::turn`]).
    turns: std::sync::Arc<Turns>,
    counts: std::sync::Arc<Counts>,
    /// Money writes' own connection and the replicas they wait for
    /// ([`RedisOptions::wait_for_replicas`]); `None`: they go as every call.
    money: Option<std::sync::Arc<Money>>,
    /// The server's clock as last read, to tell its time now by this process's monotonic clock
    /// ([`RedisStore::server_now`]); `None`: the calls' own times are applied
    /// ([`RedisOptions::callers_clock`]).
    server_clock: Option<std::sync::Arc<ServerClock>>,
}

/// The server's clock as last read (Unix nanoseconds), and when by this process's monotonic
/// clock: its time now is that plus the time passed since, whatever the node's own clock says
/// or is stepped to.
#[derive(Debug, Default)]
struct ServerClock(std::sync::Mutex<Option<(i64, std::time::Instant)>>);

/// How long a reading of the server's clock serves the quota calls that read no row (a
/// monotonic clock and the server's drift apart by milliseconds a day).
const SERVER_CLOCK_KEPT: Duration = Duration::from_secs(60);

/// Where money writes go, and what they wait for.
struct Money {
    conn: Conn,
    replicas: u32,
    timeout: Duration,
}

/// The rows this node's quota calls are on, each with its turn: a call on a row waits for the
/// one ahead of it, and starts from the row as that one left it (read or written; no read of
/// its own unless the row was never seen here). An entry lives while a call holds or waits for
/// its row: at most one per call in flight.
#[derive(Debug, Default)]
pub(super) struct Turns(std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<Option<Row>>>>>);

/// A row's turn, held: the row as the last call left it, to start from (`None`: read it).
pub(super) struct Turn {
    turns: std::sync::Arc<Turns>,
    key: String,
    /// Dropped first, then the entry, if no other call holds or waits for it.
    guard: Option<tokio::sync::OwnedMutexGuard<Option<Row>>>,
    entry: std::sync::Arc<tokio::sync::Mutex<Option<Row>>>,
}

impl Turn {
    /// The row as the call before left it, taken (`None`: to be read).
    pub(super) fn take(&mut self) -> Option<Row> {
        self.guard.as_mut().and_then(|g| g.take())
    }

    /// Leaves `row` (as this call wrote it, or as a lost race answered it) to the next call.
    pub(super) fn leave(&mut self, row: Row) {
        if let Some(g) = self.guard.as_mut() {
            **g = Some(row);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut rows = self.turns.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's and this one's: no other call holds or waits for the row.
        if std::sync::Arc::strong_count(&self.entry) == 2 {
            rows.remove(&self.key);
        }
    }
}

/// What a store's quota calls cost since it opened ([`RedisStore::quota_calls`]).
#[derive(Debug, Default)]
struct Counts {
    /// Times the layout key was found gone.
    losses: std::sync::atomic::AtomicU64,
    /// Quota calls that found the row they keep units of gone.
    lost_rows: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
    attempts: std::sync::atomic::AtomicU64,
    lost: std::sync::atomic::AtomicU64,
    round_trips: std::sync::atomic::AtomicU64,
    waits: std::sync::atomic::AtomicU64,
    waited_us: std::sync::atomic::AtomicU64,
}

/// What a [`RedisStore`]'s quota calls cost since it opened: each call reads the rows it
/// changes and writes them under a compare-and-set of their versions; a write that another
/// node's came before is tried again from the row as that write's answer shows it (no read
/// again). Its figures, summed over the calls: how a hot tenant's rows are shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisCalls {
    /// Quota calls made (a reserve, a batch of releases of one row, a grant, a read...).
    pub calls: u64,
    /// Compare-and-set writes sent: one per call that changed a row, and one more per race
    /// lost to another node.
    pub attempts: u64,
    /// Races lost: writes another node's came before (each tried again from the row it
    /// answered).
    pub lost: u64,
    /// Commands sent to the server in all (reads, writes).
    pub round_trips: u64,
    /// Money writes that waited for replicas ([`RedisOptions::wait_for_replicas`]).
    pub waits: u64,
    /// How long they waited, in all.
    pub waited: Duration,
    /// Times this node found that the server had lost every key of the prefix (the layout key
    /// gone: `FLUSHALL`, a restart without persistence), each also logged as an error.
    pub losses: u64,
    /// Quota calls that found the counter (or balance) they keep units of gone: a row lost
    /// alone (an eviction accepted with `accept_eviction`) or with all the others, each also
    /// logged as an error.
    pub lost_rows: u64,
}

impl RedisCalls {
    /// Races lost (writes sent again), as [`lost`](Self::lost).
    #[must_use]
    pub fn retries(&self) -> u64 {
        self.lost
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisStore").field("prefix", &self.keys.prefix()).finish_non_exhaustive()
    }
}

/// A Redis error as a store error: its kind and message, never the URL (a password).
fn backend(e: &redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}").into())
}

/// One row read: its fields (`v`, the version, among them).
#[derive(Debug, Default, Clone)]
pub(super) struct Row(HashMap<String, Vec<u8>>);

impl Row {
    /// Whether it exists.
    pub(super) fn exists(&self) -> bool {
        !self.0.is_empty()
    }

    /// Its version, as the compare-and-set compares it (empty: absent).
    pub(super) fn version(&self) -> String {
        self.text("v").unwrap_or_default().to_owned()
    }

    /// A field's text.
    pub(super) fn text(&self, field: &str) -> Option<&str> {
        self.0.get(field).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// A field's bytes.
    pub(super) fn bytes(&self, field: &str) -> Option<&[u8]> {
        self.0.get(field).map(Vec::as_slice)
    }

    /// A field's integer (absent: `None`).
    ///
    /// # Errors
    /// A field that is not an integer: the row is not one this store wrote.
    pub(super) fn int(&self, field: &str) -> Result<Option<i64>, StoreError> {
        match self.text(field) {
            None => Ok(None),
            Some(t) => t
                .parse()
                .map(Some)
                .map_err(|_| StoreError::Backend(format!("redis: a row's `{field}` is not an integer").into())),
        }
    }
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://` or `rediss://`, with a user and password if
    /// any), its keys under `prefix`, each call bounded by `timeout` (connecting too), as
    /// [`open_with`](Self::open_with) with no eviction accepted.
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with).
    pub async fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::open_with(url, prefix, &RedisOptions::new(timeout)).await
    }

    /// As [`open`](Self::open), on the Redis Cluster whose node `url` names (any node: the
    /// others and the slots each serves are read from it, and followed as they move between
    /// masters: `MOVED` and `ASK` redirects, docs/redis.md "Redis Cluster"). Every script
    /// touches one key, and a tenant's keys share one slot (a hash tag, docs/redis.md "Keys").
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with); a server that is not in cluster mode.
    pub async fn open_cluster(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::open_with(url, prefix, &RedisOptions::new(timeout).cluster(true)).await
    }

    /// Connects to the server at `url` (`redis://` or `rediss://`, with a user and password if
    /// any; with [`RedisOptions::cluster`], any node of a Redis Cluster), its keys under
    /// `prefix`, and checks, before it writes anything: that the server runs Lua scripts, and
    /// that it evicts nothing the store keeps (its `maxmemory-policy`, read with `INFO` on
    /// every master, is `noeviction` or the one [`RedisOptions::accept_eviction`] names).
    /// It then checks that the keys' layout is this version's (writing the version when the
    /// prefix is empty, and upgrading an earlier one), and warns when the server may lose what
    /// it keeps (no append-only file).
    ///
    /// # Errors
    /// An unreadable URL, an unreachable server (within the timeout), a refused password (the
    /// error never holds the URL), a server that refuses scripts, an eviction policy not
    /// accepted (the error says what it would evict), keys of a newer layout, an accepted
    /// policy that is not an evicting one.
    pub async fn open_with(url: &str, prefix: &str, options: &RedisOptions) -> Result<Self, StoreError> {
        if let Some(why) = options.accept_eviction.as_deref().and_then(crate::config::redis_policy_refused) {
            return Err(StoreError::Backend(format!("redis: accept_eviction: {why}").into()));
        }
        let conn = match options.cluster {
            true => connect_cluster(url, options.timeout).await?,
            false => connect(url, options.timeout).await?,
        };
        let money = match options.wait_replicas {
            0 => None,
            replicas => {
                if options.wait_timeout >= options.timeout {
                    return Err(StoreError::Backend(
                        format!(
                            "redis: wait_timeout ({:?}) must be shorter than a command's timeout ({:?})",
                            options.wait_timeout, options.timeout
                        )
                        .into(),
                    ));
                }
                let conn = match options.cluster {
                    true => connect_cluster(url, options.timeout).await?,
                    false => connect(url, options.timeout).await?,
                };
                // A server (or proxy, or ACL user) that refuses WAIT would apply every money
                // write and then fail it: refused now.
                let probe: redis::RedisResult<i64> =
                    redis::cmd("WAIT").arg(0).arg(0).query_async(&mut conn.clone()).await;
                if let Err(e) = probe {
                    return Err(StoreError::Backend(
                        format!("redis: wait_replicas needs WAIT, which the server refused ({e}) (docs/redis.md)")
                            .into(),
                    ));
                }
                Some(std::sync::Arc::new(Money { conn, replicas, timeout: options.wait_timeout }))
            }
        };
        let store = Self {
            conn,
            keys: keys::Keys::new(prefix),
            cas: redis::Script::new(CAS),
            timed: redis::Script::new(READ_TIMED),
            turns: std::sync::Arc::default(),
            counts: std::sync::Arc::default(),
            money,
            server_clock: (!options.callers_clock).then(std::sync::Arc::default),
        };
        store.check(options.accept_eviction.as_deref()).await?;
        Ok(store)
    }

    /// What the server at `url` may lose or evict of what the store keeps, as `open` warns
    /// and `tollgate check` says: no append-only file, a `maxmemory-policy` other than
    /// `noeviction` (said as a refusal unless accepted), read with `INFO` (which managed
    /// services answer; they refuse `CONFIG`). Reads only.
    ///
    /// # Errors
    /// An unreadable URL, an unreachable server (within `timeout`), a refused password (the
    /// error never holds the URL).
    pub async fn durability_warnings(url: &str, timeout: Duration) -> Result<Vec<String>, StoreError> {
        Self::durability(url, &RedisOptions::new(timeout)).await
    }

    /// As [`durability_warnings`](Self::durability_warnings), of every master of the Redis
    /// Cluster whose node `url` names, each warning naming its node.
    ///
    /// # Errors
    /// As [`durability_warnings`](Self::durability_warnings); a server that is not in cluster
    /// mode.
    pub async fn cluster_durability_warnings(url: &str, timeout: Duration) -> Result<Vec<String>, StoreError> {
        Self::durability(url, &RedisOptions::new(timeout).cluster(true)).await
    }

    /// The checks at open: scripts run, the server evicts nothing but what `accepted` names
    /// (before anything is written), the layout is this version's, the server keeps what it is
    /// told (warned).
    async fn check(&self, accepted: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // A cluster's node opened as one server would answer MOVED for most tenants' keys, and
        // only later: refused now (nothing said when the server will not tell).
        if matches!(self.conn, Conn::One(_)) {
            let info: redis::RedisResult<String> = redis::cmd("INFO").arg("cluster").query_async(&mut conn).await;
            if info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1")) {
                return Err(StoreError::Backend(
                    "redis: the server is a node of a Redis Cluster: set `cluster = true` (RedisStore::open_cluster)"
                        .into(),
                ));
            }
        }
        // A compare-and-set of a key nobody writes: refused when the server (or a proxy) does
        // not run scripts.
        let probe = self.keys.probe();
        let _: i64 = self
            .cas(&probe, |call| {
                call.arg("").arg(0);
            })
            .await
            .map_err(|e| {
                // A server that wants a password answers the first command so (the connection
                // itself is made without one).
                let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
                    || e.code().is_some_and(|c| c == "NOAUTH" || c == "WRONGPASS");
                StoreError::Backend(match auth {
                    true => "redis: the server asks for a password (NOAUTH), and the URL gives none: \
                             redis://USER:PASSWORD@HOST:PORT (docs/redis.md)"
                        .into(),
                    false => format!("redis: the server does not run tollgate's Lua scripts (EVALSHA): {e}").into(),
                })
            })?;
        let mut warnings = self.server_keeps(accepted).await?;
        warnings.extend(self.replicas_kept().await);
        let layout = self.keys.layout();
        let written: bool = conn.set_nx(&layout, LAYOUT_VERSION).await.map_err(|e| backend(&e))?;
        if written {
            // A first start under this prefix, or a server that lost its keys while no node
            // ran (a running node says so as it happens).
            tracing::warn!(
                prefix = self.keys.prefix(),
                "redis: no layout key under this prefix: a new prefix, or one whose keys the server lost \
                 (FLUSHALL, a restart without persistence) while no node of it ran; written now"
            );
        }
        let found: Option<String> = conn.get(&layout).await.map_err(|e| backend(&e))?;
        match found.as_deref().map(str::parse::<u32>) {
            Some(Ok(LAYOUT_VERSION)) => {}
            // An earlier tollgate's keys: read as they are (keys.rs), marked this layout so
            // that the earlier tollgate refuses them from now on (it would not see the
            // calendar counters this one moves into rows of their own).
            Some(Ok(older)) if (keys::NAMES_VERSION..LAYOUT_VERSION).contains(&older) => {
                // Before layout 3, a tenant's rows carried a time to live, which a volatile-*
                // policy evicts by: taken off first (a node that stops halfway leaves the
                // layout as it was, and the next open runs the pass again).
                let persisted = self.persist_live_rows(now_secs()).await?;
                let _: () = conn.set(&layout, LAYOUT_VERSION).await.map_err(|e| backend(&e))?;
                tracing::warn!(
                    prefix = self.keys.prefix(),
                    from = older,
                    to = LAYOUT_VERSION,
                    persisted,
                    "redis: the keys' layout is upgraded; tollgate versions before it refuse them now"
                );
            }
            Some(Ok(newer)) if newer > LAYOUT_VERSION => {
                return Err(StoreError::Backend(
                    format!(
                    "redis: the keys under `{}` are of layout {newer}, newer than this tollgate's ({LAYOUT_VERSION}): \
                         upgrade tollgate, or use another prefix",
                    self.keys.prefix()
                )
                    .into(),
                ))
            }
            other => {
                return Err(StoreError::Backend(
                    format!("redis: `{layout}` holds {other:?}, not a layout version this tollgate wrote").into(),
                ))
            }
        }
        // Said, never refused.
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(())
    }

    /// What this store's quota calls cost since it opened (all its clones together): calls,
    /// writes sent, commands sent. A hot tenant's calls from many nodes lose some races; each
    /// lost race costs one write more, and no read.
    #[must_use]
    pub fn quota_calls(&self) -> RedisCalls {
        use std::sync::atomic::Ordering::Relaxed;
        let (calls, attempts, lost, round_trips) = (
            self.counts.calls.load(Relaxed),
            self.counts.attempts.load(Relaxed),
            self.counts.lost.load(Relaxed),
            self.counts.round_trips.load(Relaxed),
        );
        let waits = self.counts.waits.load(Relaxed);
        let waited = Duration::from_micros(self.counts.waited_us.load(Relaxed));
        let (losses, lost_rows) = (self.counts.losses.load(Relaxed), self.counts.lost_rows.load(Relaxed));
        RedisCalls { calls, attempts, lost, round_trips, waits, waited, losses, lost_rows }
    }

    /// Says that a call of `key`, whose sender keeps units of it, found its row gone.
    pub(super) fn lost_row(&self, key: &crate::store::QuotaKey) {
        self.counts.lost_rows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(
            tenant = %key.tenant,
            meter = %key.meter,
            period = %key.period.name(),
            start = key.start,
            "redis: a counter this node keeps units of is gone from the server (lost: an eviction \
             accepted with accept_eviction, FLUSHALL, a restart without persistence), not expired: \
             it counts from zero again, and this node's lease of it is dropped (docs/redis.md, \
             \"What a lost row costs\")"
        );
    }

    /// Counts a race a quota call lost.
    pub(super) fn lost_race(&self) {
        self.counts.lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a quota call, `attempts` writes and `trips` commands.
    pub(super) fn counted(&self, calls: u64, attempts: u64, trips: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts.calls.fetch_add(calls, Relaxed);
        self.counts.attempts.fetch_add(attempts, Relaxed);
        self.counts.round_trips.fetch_add(trips, Relaxed);
    }

    /// The turn of the row at `key` on this node, held while an attempt of a quota call reads
    /// and writes it (never across a backoff): a node's calls on one row never race each
    /// other. The wait is bounded by the call's deadline, less the time an attempt needs
    /// ([`ATTEMPT_LEAST`](super::race::ATTEMPT_LEAST)): a turn that comes too late to make the
    /// attempt is a conflict (the tenant busy on this node), never a timeout that would feed
    /// the breaker. The wait is not counted as the attempt's time.
    pub(super) async fn turn(&self, key: &str) -> Result<Turn, StoreError> {
        let entry = {
            let mut rows = self.turns.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            rows.entry(key.to_owned()).or_default().clone()
        };
        let mut turn = Turn { turns: self.turns.clone(), key: key.to_owned(), guard: None, entry };
        let locked = turn.entry.clone().lock_owned();
        let busy = StoreError::Conflict("a row's turn on this node, too late for the call's deadline");
        let started = tokio::time::Instant::now();
        let guard = match super::limited::call_deadline() {
            Some(deadline) => {
                let least = super::race::ATTEMPT_LEAST;
                let until = deadline.checked_sub(least).unwrap_or(deadline);
                let guard = tokio::time::timeout_at(until, locked).await.map_err(|_| busy)?;
                super::race::waited_for(started.elapsed());
                guard
            }
            None => {
                let guard = locked.await;
                super::race::waited_for(started.elapsed());
                guard
            }
        };
        turn.guard = Some(guard);
        Ok(turn)
    }

    /// The row at `key`.
    pub(super) async fn row(&self, key: &str) -> Result<Row, StoreError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, Vec<u8>> = conn.hgetall(key).await.map_err(|e| backend(&e))?;
        Ok(Row(fields))
    }

    /// The row at `key` and the server's time as it was read (Unix nanoseconds): the clock
    /// every node's call on it is applied at, however skewed the nodes' own.
    pub(super) async fn row_timed(&self, key: &str) -> Result<(Row, i64), StoreError> {
        let answer: (i64, i64, HashMap<String, Vec<u8>>) =
            self.script(&self.timed, READ_TIMED, key, |_| {}).await.map_err(|e| backend(&e))?;
        let (secs, micros, fields) = answer;
        Ok((Row(fields), secs.saturating_mul(1_000_000_000).saturating_add(micros.saturating_mul(1_000))))
    }

    /// The row at `key` and how far the server's clock is ahead of the caller's, whose call
    /// is at `caller_now` (Unix nanoseconds): the call is applied at `caller_now` plus it, the
    /// server's time as the row was read, so that every node's call on the row is applied by
    /// one clock however skewed the nodes' own (0 under [`RedisOptions::callers_clock`]). The
    /// reading also serves the calls that read no row ([`server_now`](Self::server_now)).
    pub(super) async fn row_at(&self, key: &str, caller_now: i64) -> Result<(Row, i64), StoreError> {
        let Some(clock) = &self.server_clock else { return Ok((self.row(key).await?, 0)) };
        let (row, server) = self.row_timed(key).await?;
        clock.read(server);
        Ok((row, server.saturating_sub(caller_now)))
    }

    /// The server's time now (Unix nanoseconds): its clock as read within
    /// [`SERVER_CLOCK_KEPT`] by any call of this node, plus the time passed since by this
    /// process's monotonic clock; else read with one `TIME` now. `None` under
    /// [`RedisOptions::callers_clock`].
    pub(super) async fn server_now(&self) -> Result<Option<i64>, StoreError> {
        let Some(clock) = &self.server_clock else { return Ok(None) };
        if let Some(now) = clock.now() {
            return Ok(Some(now));
        }
        let mut conn = self.conn.clone();
        self.counts.round_trips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.map_err(|e| backend(&e))?;
        let server = secs.saturating_mul(1_000_000_000).saturating_add(micros.saturating_mul(1_000));
        clock.read(server);
        Ok(Some(server))
    }

    /// How far the server's clock is ahead of a caller's that sends a call at `sent` (Unix
    /// seconds, its clock), in whole seconds: what the call's times move by, onto the server's
    /// clock. A call sent again long after it was made keeps its first time there, as the rule
    /// of senders forgotten needs. 0 under [`RedisOptions::callers_clock`].
    pub(super) async fn ahead_of(&self, sent: i64) -> Result<i64, StoreError> {
        let Some(server) = self.server_now().await? else { return Ok(0) };
        Ok(secs_of(server.saturating_sub(sent.saturating_mul(1_000_000_000))))
    }

    /// Checks that the layout key written at open is still there (a quota call that reads a
    /// row not there asks: a new tenant's or a new period's first call, rarely). Gone, the
    /// server lost every key of the prefix (`FLUSHALL`, a restart without persistence, a
    /// failover to a replica that had none of them), and every tenant's limits count from
    /// zero again: said as such (an error, once per loss: the key is written again), and
    /// counted ([`RedisCalls::losses`]). A check that fails says nothing.
    pub(super) async fn check_layout(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let layout = self.keys.layout();
        let mut conn = self.conn.clone();
        self.counts.round_trips.fetch_add(1, Relaxed);
        let Ok(written) = conn.set_nx::<_, _, bool>(&layout, LAYOUT_VERSION).await else { return };
        if written {
            self.counts.losses.fetch_add(1, Relaxed);
            tracing::error!(
                prefix = self.keys.prefix(),
                "redis: the server lost tollgate's keys (the layout key `{layout}` written at open is gone: \
                 FLUSHALL, a restart without persistence, a failover to a replica without them, or this key \
                 alone evicted under an accepted allkeys-* policy): every tenant's quotas, balances, rates, \
                 places and Idempotency-Key bindings may count from zero again (docs/redis.md, \"What a lost \
                 row costs\")"
            );
        }
    }

    /// Replaces the row at `key` by `fields` (none: deletes it) if its version is still
    /// `read` (the version of the row read; empty: it was absent), kept as `kept` says.
    /// Whether it was written (else another write came first).
    pub(super) async fn put(
        &self,
        key: &str,
        read: &str,
        kept: Ttl,
        fields: &[(&str, &[u8])],
    ) -> Result<bool, StoreError> {
        Ok(self.put_or_read(key, read, kept, fields).await?.is_none())
    }

    /// [`put`](Self::put): `None` when written, else the row as the write found it (another
    /// write came first), to try again from.
    pub(super) async fn put_or_read(
        &self,
        key: &str,
        read: &str,
        kept: Ttl,
        fields: &[(&str, &[u8])],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.put_or_answer(key, read, kept, fields).await?.err())
    }

    /// [`put_or_read`](Self::put_or_read): `Ok(row)` when written (the row as written, its new
    /// version), `Err(row)` the row as the write found it.
    pub(super) async fn put_or_answer(
        &self,
        key: &str,
        read: &str,
        kept: Ttl,
        fields: &[(&str, &[u8])],
    ) -> Result<Result<Row, Row>, StoreError> {
        let ms = match kept {
            Ttl::For(t) => t.as_millis().clamp(1, i64::MAX as u128) as i64,
            Ttl::AsItWas => -1,
            Ttl::Never => 0,
        };
        // A fresh version each write: 64 random bits (a stale read never matches it again).
        let version = format!("{:016x}", crate::base::draw_u64());
        let answer: redis::Value = self
            .cas(key, |call| {
                call.arg(read).arg(ms).arg(&version);
                for (name, value) in fields {
                    call.arg(*name).arg(*value);
                }
            })
            .await
            .map_err(|e| backend(&e))?;
        match answer {
            redis::Value::Int(1) => {
                let mut written: HashMap<String, Vec<u8>> =
                    fields.iter().map(|(name, value)| ((*name).to_owned(), value.to_vec())).collect();
                if !written.is_empty() {
                    written.insert("v".to_owned(), version.into_bytes());
                }
                Ok(Ok(Row(written)))
            }
            found => redis::from_redis_value::<HashMap<String, Vec<u8>>>(found)
                .map(|fields| Err(Row(fields)))
                .map_err(|e| StoreError::Backend(format!("redis: a compare-and-set answered {e}").into())),
        }
    }

    /// The compare-and-set on `key`, its arguments added by `args`: by its digest (`EVALSHA`),
    /// and by its text (`EVAL`, which loads it) on the node that answers `NOSCRIPT` (after a
    /// restart, a failover, a `SCRIPT FLUSH`). Never `SCRIPT LOAD`, which a cluster client
    /// sends to every node and fails while one of them is down.
    async fn cas<T: redis::FromRedisValue>(&self, key: &str, args: impl Fn(&mut redis::Cmd)) -> redis::RedisResult<T> {
        self.script(&self.cas, CAS, key, args).await
    }

    /// Runs `script` (whose text is `text`) on `key` with `args`: by its digest, by its text
    /// when the server does not have it.
    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        text: &str,
        key: &str,
        args: impl Fn(&mut redis::Cmd),
    ) -> redis::RedisResult<T> {
        let mut conn = self.conn.clone();
        let mut by_digest = redis::cmd("EVALSHA");
        by_digest.arg(script.get_hash()).arg(1).arg(key);
        args(&mut by_digest);
        match by_digest.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut by_text = redis::cmd("EVAL");
                by_text.arg(text).arg(1).arg(key);
                args(&mut by_text);
                by_text.query_async(&mut conn).await
            }
            answer => answer,
        }
    }

    /// This store as its money writes go: on their own connection, which a wait for replicas
    /// holds alone (`None`: they go as every call).
    pub(super) fn for_money(&self) -> Option<Self> {
        let money = self.money.as_ref()?;
        Some(Self { conn: money.conn.clone(), money: None, ..self.clone() })
    }

    /// Waits until the replicas money writes ask for have what this store's money connection
    /// wrote (`WAIT`; on a cluster, every master's replicas): an error short of them, the
    /// write kept by the primary (its caller sends it again).
    pub(super) async fn replicated(&self) -> Result<(), StoreError> {
        let Some(money) = &self.money else { return Ok(()) };
        let mut conn = money.conn.clone();
        let ms = u64::try_from(money.timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        let started = std::time::Instant::now();
        let acked: i64 =
            redis::cmd("WAIT").arg(money.replicas).arg(ms).query_async(&mut conn).await.map_err(|e| backend(&e))?;
        self.counts.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.counts.waited_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        if acked < i64::from(money.replicas) {
            return Err(StoreError::Backend(
                format!(
                    "redis: a money write reached {acked} of the {} replicas wait_replicas asks for within {:?}: the \
                     primary keeps it, and a failover may lose it; send it again (a webhook answers 500 and is \
                     delivered again; it is applied once)",
                    money.replicas, money.timeout
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// The key layout and prefix this store writes.
    pub(super) fn keys(&self) -> &keys::Keys {
        &self.keys
    }
}

/// The store's connection: to one server (or a proxy that routes by key), or to a cluster.
/// Every call of the store goes through it as one command (a script, a read) of one key, so
/// the cluster client routes each by its key's slot.
#[derive(Clone)]
enum Conn {
    One(ConnectionManager),
    Cluster(Box<Cluster>),
}

/// A cluster: redis-rs's cluster client, and a connection of the store's own to each node an
/// `ASK` redirect names (the client's connections cannot send `ASKING` with the command; a
/// master added empty has none from the client until it serves a slot). A few nodes at most,
/// the map bounded all the same.
#[derive(Clone)]
struct Cluster {
    client: ClusterConnection,
    /// The URL's connection settings (TLS, user, password), its address replaced per node.
    info: redis::ConnectionInfo,
    timeout: Duration,
    asked: std::sync::Arc<tokio::sync::Mutex<HashMap<(String, u16), redis::aio::MultiplexedConnection>>>,
}

/// The most nodes the store keeps a connection of its own to, for `ASK` redirects.
const ASKED_NODES_MAX: usize = 64;

impl Cluster {
    /// The store's own connection to the node at `host:port`, made on first use (outside the
    /// lock: a node slow to answer holds up no redirect to another).
    async fn asked(&self, host: &str, port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(conn) = self.asked.lock().await.get(&(host.to_owned(), port)) {
            return Ok(conn.clone());
        }
        let addr = match self.info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => redis::ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = redis::Client::open(self.info.clone().set_addr(addr))?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut nodes = self.asked.lock().await;
        if nodes.len() >= ASKED_NODES_MAX {
            nodes.clear();
        }
        Ok(nodes.entry((host.to_owned(), port)).or_insert(conn).clone())
    }

    /// Drops the connection to `host:port` after `e`, when `e` says it is lost (a node
    /// restarted, the server's `timeout`, a network fault: a multiplexed connection does not
    /// reconnect), so that the next redirect there connects again.
    async fn lost(&self, host: &str, port: u16, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
            self.asked.lock().await.remove(&(host.to_owned(), port));
        }
    }
}

/// How many times one command on a cluster is sent, at most: redirected (`MOVED`, `ASK`) or
/// refused unexecuted while the cluster changes (`TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, a
/// master become a replica). A slot moving while a command runs redirects it once or twice;
/// the later attempts wait 40, 80, 160 and 320 ms before they go (600 ms in all), a refusal's
/// first 20 ms.
const CLUSTER_ATTEMPTS: u32 = 6;

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::One(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => Box::pin(routed(c, cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::One(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.client.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(c) => c.get_db(),
            Self::Cluster(c) => c.client.get_db(),
        }
    }
}

/// What to do after a cluster answered a command with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// `ASKING` and the command, as one pipeline, to the node the redirect names.
    Ask,
    /// The command again by its slot, after a pause: the slot moved (`MOVED`; the client
    /// reads the slots again), or the server refused it without running it while the cluster
    /// changes (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, a replica's `READONLY`
    /// after a failover).
    Again,
    /// The answer stands: anything else, a lost connection and a timeout among them (the
    /// command may have run: it is never sent again here).
    Stop,
}

/// How `routed` follows an error: by its kind, never by redis-rs's retry advice (which sends
/// a timed-out command again, and it may have run).
fn next_after(e: &redis::RedisError) -> Next {
    use redis::{ErrorKind, ServerErrorKind as S};
    match e.kind() {
        ErrorKind::Server(S::Ask) => Next::Ask,
        ErrorKind::Server(S::Moved | S::TryAgain | S::ClusterDown | S::MasterDown | S::BusyLoading | S::ReadOnly) => {
            Next::Again
        }
        _ => Next::Stop,
    }
}

/// `cmd` on the cluster, redirected and sent again here rather than by the cluster client
/// (built with no retries of its own), for one reason: the client answers `ASK` (the key's
/// slot moving between masters, the key moved already) by sending `ASKING`, awaiting it, then
/// the command, so on the connection other calls share another command may take the one-time
/// flag in between. The command is then refused (`MOVED` back), again on every retry, until
/// the call times out: every call of a tenant whose slot moves fails. Here `ASKING` and the
/// command go as one pipeline, on the store's own connection to the node the redirect names,
/// nothing between them (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/,
/// "ASK redirection"). Every other command goes by its slot, on the client's connections.
///
/// A command is sent again only when the server refused it without running it ([`Next`]): a
/// timeout or a lost connection is an error, as on one server (the client reconnects in the
/// background, and the store's caller decides).
async fn routed(c: &mut Cluster, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
    use redis::aio::ConnectionLike as _;
    let mut answer = c.client.req_packed_command(cmd).await;
    for attempt in 1..CLUSTER_ATTEMPTS {
        let Err(e) = &answer else { break };
        let next = next_after(e);
        let asked = e.redirect_node().and_then(|(node, _)| {
            let (host, port) = node.rsplit_once(':')?;
            Some((host.to_owned(), port.parse::<u16>().ok()?))
        });
        answer = match (next, asked) {
            // Followed at once the first time.
            (Next::Ask, Some((host, port))) => {
                if attempt > 1 {
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                }
                let mut conn = c.asked(&host, port).await?;
                let mut both = redis::pipe();
                both.cmd("ASKING").ignore().add_command(cmd.clone());
                let answer = both.query_async::<Vec<redis::Value>>(&mut conn).await.and_then(|mut values| {
                    values.pop().map_or_else(|| Err((redis::ErrorKind::Client, "no answer after ASKING").into()), Ok)
                });
                if let Err(e) = &answer {
                    c.lost(&host, port, e).await;
                }
                answer
            }
            // After a pause that doubles each time (the cluster's nodes may disagree for the
            // moment a slot changes hands; the client reads the slots again meanwhile).
            (Next::Again, _) => {
                tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                c.client.req_packed_command(cmd).await
            }
            _ => break,
        };
    }
    answer
}

/// The error of a URL that does not read: its kind only (the URL may hold a password).
fn unreadable(e: &redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: the URL does not read ({:?})", e.kind()).into())
}

/// `connecting` to `url` within `timeout`. With `rediss://`, a server that does not answer the
/// TLS handshake in time, or answers it with something else, is most often one that speaks
/// no TLS: said so.
async fn within<T>(
    url: &str,
    timeout: Duration,
    connecting: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    let tls = url.starts_with("rediss://");
    let no_tls = |what: String| {
        StoreError::Backend(
            format!(
                "redis: {what} over TLS (a rediss:// URL): the server may speak no TLS (redis:// for one that does \
                 not, or its TLS port)"
            )
            .into(),
        )
    };
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) if tls => Err(no_tls(format!("no connection within {timeout:?}"))),
        Err(_) => Err(StoreError::Backend(format!("redis: no connection within {timeout:?}").into())),
        Ok(Err(e)) if tls && (e.is_io_error() || e.kind() == redis::ErrorKind::Io) => {
            Err(no_tls(format!("the connection failed ({:?})", e.kind())))
        }
        Ok(answer) => answer.map_err(|e| backend(&e)),
    }
}

/// A connection to the server at `url`, within `timeout`, each command bounded by it too.
async fn connect(url: &str, timeout: Duration) -> Result<Conn, StoreError> {
    let client = redis::Client::open(url).map_err(|e| unreadable(&e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    within(url, timeout, ConnectionManager::new_with_config(client, config)).await.map(Conn::One)
}

/// A connection to the cluster whose node is at `url`, within `timeout`; each command sent
/// bounded by it too (a call is sent at most [`CLUSTER_ATTEMPTS`] times).
async fn connect_cluster(url: &str, timeout: Duration) -> Result<Conn, StoreError> {
    let client = redis::cluster::ClusterClient::builder([url])
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // Redirects and refusals are followed by `routed`, the ASK redirect with its ASKING.
        .retries(0)
        .build()
        .map_err(|e| unreadable(&e))?;
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| unreadable(&e))?;
    let client = within(url, timeout, client.get_async_connection()).await.map_err(|e| match e {
        // A server not in cluster mode refuses `CLUSTER SLOTS`.
        StoreError::Backend(b) if b.to_string().contains("cluster support disabled") => StoreError::Backend(
            "redis: the server is not a Redis Cluster (it has cluster support disabled): remove `cluster = true` \
             (RedisStore::open)"
                .into(),
        ),
        e => e,
    })?;
    Ok(Conn::Cluster(Box::new(Cluster { client, info, timeout, asked: Default::default() })))
}

/// Now, by this node's clock (Unix seconds): rows expire on the server's clock by durations
/// drawn from it.
pub(super) fn now_secs() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

impl ServerClock {
    /// The server's clock read as `server` (Unix nanoseconds), now.
    fn read(&self, server: i64) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((server, std::time::Instant::now()));
    }

    /// The server's time now, if a reading is fresh.
    fn now(&self) -> Option<i64> {
        let read = *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        read.filter(|(_, at)| at.elapsed() < SERVER_CLOCK_KEPT)
            .map(|(server, at)| server.saturating_add(i64::try_from(at.elapsed().as_nanos()).unwrap_or(i64::MAX)))
    }
}

/// `nanos` in whole seconds, rounded to the nearest.
pub(super) fn secs_of(nanos: i64) -> i64 {
    nanos.saturating_add(500_000_000).div_euclid(1_000_000_000)
}

/// A duration of `secs` seconds from a caller's `now` to an instant `until` (both its clock):
/// how long a row is kept, at least a second. Rows expire on the server's clock by this
/// duration, never at the caller's instant (the two clocks may differ).
pub(super) fn kept_for(now_secs: i64, until_secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(until_secs.saturating_sub(now_secs)).unwrap_or(0).max(1))
}

#[cfg(test)]
mod tests {
    use super::{next_after, Next};

    /// The error a server's reply `line` makes.
    fn replied(line: &str) -> redis::RedisError {
        match redis::parse_redis_value(format!("{line}\r\n").as_bytes()).expect("a reply") {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_cluster_command_is_sent_again_only_when_the_server_did_not_run_it() {
        assert_eq!(next_after(&replied("-ASK 15891 127.0.0.1:7001")), Next::Ask);
        for refused in [
            "-MOVED 15891 127.0.0.1:7001",
            "-TRYAGAIN keys moving",
            "-CLUSTERDOWN down",
            "-MASTERDOWN down",
            "-LOADING loading",
            "-READONLY replica",
        ] {
            assert_eq!(next_after(&replied(refused)), Next::Again, "{refused}");
        }
        // It may have run: never again.
        let timed_out: redis::RedisError = std::io::Error::from(std::io::ErrorKind::TimedOut).into();
        assert_eq!(next_after(&timed_out), Next::Stop);
        let dropped: redis::RedisError = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(next_after(&dropped), Next::Stop);
        assert_eq!(next_after(&replied("-NOSCRIPT no script")), Next::Stop, "answered above, by loading it");
        assert_eq!(next_after(&replied("-ERR something")), Next::Stop);
        let not_connected: redis::RedisError = (redis::ErrorKind::ClusterConnectionNotFound, "not found").into();
        assert_eq!(next_after(&not_connected), Next::Stop, "a refresh's error may fail a command already sent");
    }
}
