//! [`RedisStore`]: the roles a fleet shares on a Redis (or Valkey) server it already runs,
//! beside a durable store for the rest (docs/redis.md).
//!
//! The rules stay in Rust, written once beside each role's trait (the quota rules applied to a
//! tenant's whole quota, [`TenantQuota`](super::tenant_quota), [`RateRow`](super::RateRow),
//! [`PlaceRow`](super::PlaceRow), the idempotency rules): a call reads its row (one hash, with
//! a version field `v`), applies them, and writes the row back with one small Lua script that
//! compares the version and writes (a compare-and-set; EVALSHA, loaded again on NOSCRIPT),
//! read again when another node wrote in between ([`race`](super::race)). Lua carries no rule
//! of a role. Every row is one tenant's (or one `Idempotency-Key`'s, one payment's), hash-tagged
//! by it, and every script touches one key.

mod idempotency;
mod keys;
mod place;
mod quota;
mod rate;

use std::{collections::HashMap, fmt, time::Duration};

use redis::{aio::ConnectionManager, AsyncCommands as _};

use super::StoreError;

pub use keys::LAYOUT_VERSION;

/// The compare-and-set every write runs: the row's version (`v`) must be the one read
/// (`ARGV[1]`, empty when the row was absent); the row is then replaced by the fields given
/// (`ARGV[4..]`, name and value pairs; none: the row is deleted), its version `ARGV[3]` (a
/// token drawn by the caller: a row deleted and made again never takes a version a stale read
/// could match), and expires `ARGV[2]` milliseconds later (0: never; -1: when it would have).
/// 1 when written, 0 when another write came first. The shebang gives it no flag: a server out
/// of memory refuses it whole (a script's later writes would pass `maxmemory`).
const CAS: &str = r"#!lua
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '') ~= ARGV[1] then return 0 end
local ttl = ARGV[2]
if ttl == '-1' then
  local left = redis.call('PTTL', KEYS[1])
  if left == -2 then return 0 end
  if left == 0 then left = 1 end
  ttl = tostring(left)
end
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  redis.call('HSET', KEYS[1], 'v', ARGV[3], unpack(ARGV, 4))
  if tonumber(ttl) > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return 1
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
/// places in flight and `Idempotency-Key` bindings. Cheap to clone (one multiplexed connection, re-established by
/// redis-rs's connection manager).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: keys::Keys,
    cas: redis::Script,
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
#[derive(Debug, Default)]
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
    /// any), its keys under `prefix`, each call bounded by `timeout` (connecting too); checks
    /// that the server runs Lua scripts and that the keys' layout is this version's (writing
    /// the version when the prefix is empty), and warns when the server may lose or evict
    /// counters (`appendonly no`, a `maxmemory-policy` other than `noeviction`).
    ///
    /// # Errors
    /// An unreadable URL, an unreachable server (within `timeout`), a refused password (the
    /// error never holds the URL), a server that refuses scripts, keys of a newer layout.
    pub async fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let conn = connect(url, timeout).await?;
        let store = Self { conn, keys: keys::Keys::new(prefix), cas: redis::Script::new(CAS) };
        store.check().await?;
        Ok(store)
    }

    /// What the server at `url` may lose or evict of what the store keeps, as `open` warns
    /// and `tollgate check` says: `appendonly no`, a `maxmemory-policy` other than
    /// `noeviction`; nothing for a setting the server will not tell (managed services refuse
    /// `CONFIG`). Reads only.
    ///
    /// # Errors
    /// An unreadable URL, an unreachable server (within `timeout`), a refused password (the
    /// error never holds the URL).
    pub async fn durability_warnings(url: &str, timeout: Duration) -> Result<Vec<String>, StoreError> {
        Ok(warnings(&connect(url, timeout).await?).await)
    }

    /// The checks at open: scripts run, the layout is this version's, the server keeps what
    /// it is told (warned).
    async fn check(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // A compare-and-set of a key nobody writes: refused when the server (or a proxy) does
        // not run scripts.
        let probe = self.keys.probe();
        let _: i64 = self.cas.key(&probe).arg("").arg(0).invoke_async(&mut conn).await.map_err(|e| {
            StoreError::Backend(format!("redis: the server does not run tollgate's Lua scripts (EVALSHA): {e}").into())
        })?;
        let layout = self.keys.layout();
        let _: bool = conn.set_nx(&layout, LAYOUT_VERSION).await.map_err(|e| backend(&e))?;
        let found: Option<String> = conn.get(&layout).await.map_err(|e| backend(&e))?;
        match found.as_deref().map(str::parse::<u32>) {
            Some(Ok(LAYOUT_VERSION)) => {}
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
        for warning in warnings(&self.conn).await {
            tracing::warn!("{warning}");
        }
        Ok(())
    }

    /// The row at `key`.
    pub(super) async fn row(&self, key: &str) -> Result<Row, StoreError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, Vec<u8>> = conn.hgetall(key).await.map_err(|e| backend(&e))?;
        Ok(Row(fields))
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
        let mut conn = self.conn.clone();
        let mut call = self.cas.key(key);
        let ms = match kept {
            Ttl::For(t) => t.as_millis().clamp(1, i64::MAX as u128) as i64,
            Ttl::AsItWas => -1,
            Ttl::Never => 0,
        };
        // A fresh version each write: 64 random bits (a stale read never matches it again).
        call.arg(read).arg(ms).arg(format!("{:016x}", crate::base::draw_u64()));
        for (name, value) in fields {
            call.arg(*name).arg(*value);
        }
        let written: i64 = call.invoke_async(&mut conn).await.map_err(|e| backend(&e))?;
        Ok(written == 1)
    }

    /// The key layout and prefix this store writes.
    pub(super) fn keys(&self) -> &keys::Keys {
        &self.keys
    }
}

/// A connection to the server at `url`, within `timeout`, each call bounded by it too.
async fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url)
        .map_err(|e| StoreError::Backend(format!("redis: the URL does not read ({:?})", e.kind()).into()))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| StoreError::Backend(format!("redis: no connection within {timeout:?}").into()))?
        .map_err(|e| backend(&e))
}

/// What the server says of its settings that may lose or evict what the store keeps (nothing
/// of a setting it will not tell: managed services refuse `CONFIG`).
async fn warnings(conn: &ConnectionManager) -> Vec<String> {
    let config = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            let got: redis::RedisResult<Vec<String>> =
                redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await;
            got.ok().and_then(|v| v.get(1).cloned())
        }
    };
    let mut out = Vec::new();
    if config("appendonly").await.as_deref() == Some("no") {
        out.push(
            "redis: appendonly is no: a server restart loses what was written since its last snapshot (quotas, \
             shared rates, places, idempotency keys); set appendonly yes (docs/redis.md)"
                .to_owned(),
        );
    }
    if let Some(policy) = config("maxmemory-policy").await.filter(|p| p != "noeviction") {
        out.push(format!(
            "redis: maxmemory-policy is {policy}, not noeviction: a full server may evict counters; set noeviction \
             (docs/redis.md)"
        ));
    }
    out
}

/// A duration of `secs` seconds from a caller's `now` to an instant `until` (both its clock):
/// how long a row is kept, at least a second. Rows expire on the server's clock by this
/// duration, never at the caller's instant (the two clocks may differ).
pub(super) fn kept_for(now_secs: i64, until_secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(until_secs.saturating_sub(now_secs)).unwrap_or(0).max(1))
}
