//! What a Redis server keeps of what the RedisStore writes, read with `INFO` (managed services,
//! ElastiCache and Memorystore among them, refuse `CONFIG`): its `maxmemory-policy` and its
//! append-only file, on every master of a cluster. A policy that evicts is refused at open
//! unless the operator accepts it by name ([`RedisOptions::accept_eviction`]), the refusal
//! saying what it would evict; and the rows a tenant's limits live in carry no time to live, so
//! that a `volatile-*` policy never evicts them (docs/redis.md, "Memory and eviction").

use super::{connect, connect_cluster, Conn, RedisOptions, RedisStore};
#[cfg(test)]
use crate::config::redis_policy_refused as acceptable;
use crate::store::StoreError;

/// What one server (a cluster's master) says it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kept {
    /// The master's address, on a cluster.
    node: Option<String>,
    /// `maxmemory_policy` (`None`: not told).
    policy: Option<String>,
    /// `aof_enabled` (`None`: not told).
    aof: Option<bool>,
}

/// One `INFO` section's `field`.
fn field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

/// Each server's answer to `INFO section`, by node on a cluster (every master; `None` for the
/// text of a master that did not answer, or a server that refuses `INFO`).
async fn info(conn: &Conn, section: &str) -> Vec<(Option<String>, Option<String>)> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg(section);
    match conn.clone() {
        Conn::One(mut c) => vec![(None, cmd.query_async::<String>(&mut c).await.ok())],
        Conn::Cluster(cluster) => {
            let mut c = cluster.client;
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            match c.route_command(cmd, all).await {
                Ok(redis::Value::Map(by_node)) => by_node
                    .into_iter()
                    .map(|(node, v)| {
                        (redis::from_redis_value::<String>(node).ok(), redis::from_redis_value::<String>(v).ok())
                    })
                    .collect(),
                Ok(_) | Err(_) => vec![(None, None)],
            }
        }
    }
}

/// What each server (every master of a cluster) says it keeps, read with `INFO` (never
/// `CONFIG`, which managed services refuse).
pub(super) async fn kept(conn: &Conn) -> Vec<Kept> {
    let memory = info(conn, "memory").await;
    let persistence = info(conn, "persistence").await;
    memory
        .into_iter()
        .map(|(node, memory)| {
            let aof = persistence
                .iter()
                .find(|(n, _)| *n == node)
                .and_then(|(_, p)| p.as_deref())
                .and_then(|p| field(p, "aof_enabled"))
                .map(|v| v == "1");
            let policy = memory.as_deref().and_then(|m| field(m, "maxmemory_policy")).map(str::to_owned);
            Kept { node, policy, aof }
        })
        .collect()
}

/// " (node ADDRESS)" on a cluster.
fn of(node: &Option<String>) -> String {
    node.as_ref().map(|n| format!(" (node {n})")).unwrap_or_default()
}

/// What `policy` evicts of what the store keeps, when the server is full.
fn evicts(policy: &str) -> &'static str {
    if policy.starts_with("volatile-") {
        "when full, the server evicts keys with a time to live: shared rates and places in flight (a rate or a \
         concurrency admitted past its limit for a moment), Idempotency-Key bindings (a request sent again served, \
         and counted, again), payments' hints (a dispute or refund naming only its payment, its hint evicted, \
         finds no tenant and takes nothing back) and counters of ended periods; a tenant's quota row and its \
         current periods' counters carry none, and are never evicted"
    } else {
        "when full, the server evicts any key, tenants' quotas among them: a counter evicted starts again from zero \
         (its units admitted again) and a prepaid balance evicted is lost, besides shared rates, places in flight \
         and Idempotency-Key bindings"
    }
}

/// The refusal at open of the first server that evicts by a policy other than `accepted`.
pub(super) fn refusal(kept: &[Kept], accepted: Option<&str>) -> Option<String> {
    let (node, policy) = kept.iter().find_map(|k| {
        let p = k.policy.as_deref().filter(|p| *p != "noeviction" && Some(*p) != accepted)?;
        Some((&k.node, p))
    })?;
    Some(format!(
        "redis: maxmemory-policy is {policy}{}: {}. Set maxmemory-policy noeviction (a full server then refuses \
         writes, and the engine answers as its store_errors policy says), or accept it by name: accept_eviction = \
         \"{policy}\" under [store] (RedisOptions::accept_eviction) (docs/redis.md, \"Memory and eviction\")",
        of(node),
        evicts(policy)
    ))
}

/// What the servers may lose or evict, as `open` warns and `tollgate check` says (`accepted`:
/// the eviction policy accepted). A policy open refuses is said as such.
pub(super) fn warnings(kept: &[Kept], accepted: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if kept.iter().any(|k| k.policy.is_none() || k.aof.is_none()) {
        out.push(
            "redis: a server (or a master of the cluster) did not answer INFO memory and INFO persistence: what \
             it keeps is not known (docs/redis.md)"
                .to_owned(),
        );
    }
    for k in kept.iter().filter(|k| k.aof == Some(false)) {
        out.push(format!(
            "redis: appendonly is no{}: a server restart loses what was written since its last snapshot (quotas, \
             shared rates, places, idempotency keys); set appendonly yes, or run replicas (docs/redis.md)",
            of(&k.node)
        ));
    }
    for k in kept {
        let Some(policy) = k.policy.as_deref().filter(|p| *p != "noeviction") else { continue };
        out.push(match Some(policy) == accepted {
            true => format!(
                "redis: maxmemory-policy is {policy}{}, accepted (accept_eviction): {} (docs/redis.md)",
                of(&k.node),
                evicts(policy)
            ),
            false => format!(
                "redis: maxmemory-policy is {policy}{}, not noeviction: the store refuses to open unless \
                 accept_eviction = \"{policy}\"; {} (docs/redis.md)",
                of(&k.node),
                evicts(policy)
            ),
        });
    }
    out.sort();
    out.dedup();
    out
}

impl RedisStore {
    /// As [`durability_warnings`](Self::durability_warnings), opened as `options` say (one
    /// server or a cluster, the eviction policy accepted).
    ///
    /// # Errors
    /// As [`durability_warnings`](Self::durability_warnings).
    pub async fn durability(url: &str, options: &RedisOptions) -> Result<Vec<String>, StoreError> {
        let conn = match options.cluster {
            true => connect_cluster(url, options.timeout).await?,
            false => connect(url, options.timeout).await?,
        };
        Ok(warnings(&kept(&conn).await, options.accept_eviction.as_deref()))
    }

    /// What the server keeps, checked at open: a refusal when it evicts by a policy other than
    /// `accepted`, else the warnings to log.
    pub(super) async fn server_keeps(&self, accepted: Option<&str>) -> Result<Vec<String>, StoreError> {
        let kept = kept(&self.conn).await;
        match refusal(&kept, accepted) {
            Some(refused) => Err(StoreError::Backend(refused.into())),
            None => Ok(warnings(&kept, accepted)),
        }
    }

    /// What the servers' replicas mean for money writes, warned at open: replicas that money
    /// writes do not wait for (a failover may lose what a webhook was answered 200 for), or
    /// fewer replicas than they wait for (each would fail).
    pub(super) async fn replicas_kept(&self) -> Vec<String> {
        let wanted = self.money.as_ref().map_or(0, |m| m.replicas);
        let mut out = Vec::new();
        for (node, text) in info(&self.conn, "replication").await {
            let Some(replicas) = text.as_deref().and_then(|t| field(t, "connected_slaves")?.parse::<u32>().ok()) else {
                continue;
            };
            if wanted == 0 && replicas > 0 {
                out.push(format!(
                    "redis: the server{} has {replicas} replica(s), which money writes do not wait for: a failover \
                     may lose a grant or a refund whose webhook was answered 200; set wait_replicas (docs/redis.md)",
                    of(&node)
                ));
            } else if replicas < wanted {
                out.push(format!(
                    "redis: the server{} has {replicas} replica(s) connected, and money writes wait for {wanted}: \
                     each fails (its webhook answers 500) until they connect (docs/redis.md)",
                    of(&node)
                ));
            }
        }
        out
    }

    /// Takes the time to live off the rows a tenant's limits live in, as tollgate versions
    /// before layout 3 wrote them: every tenant's quota row, and the counters of periods not
    /// ended by `now` (Unix seconds). One pass of `SCAN` over the prefix's keys on each server
    /// (every master of a cluster), 1,000 keys a command. Nothing else is written.
    ///
    /// # Errors
    /// A server that did not answer, or that refused `SCAN` (some proxies do). A key whose slot
    /// moves between two masters while the pass runs may be missed on a cluster (neither
    /// master holds it when it is scanned).
    pub(super) async fn persist_live_rows(&self, now: i64) -> Result<u64, StoreError> {
        let failed = |e: redis::RedisError| {
            StoreError::Backend(
                format!("redis: upgrading the keys' layout (their time to live taken off) failed: {e}; open again")
                    .into(),
            )
        };
        let pattern = format!("{}:{}:*", glob_escaped(self.keys().prefix()), super::keys::NAMES_VERSION);
        match &self.conn {
            Conn::One(c) => scan_persisting(&mut c.clone(), &pattern, now).await.map_err(failed),
            Conn::Cluster(c) => {
                let mut persisted = 0;
                for (node, _) in info(&self.conn, "server").await {
                    let Some((host, port)) = node.as_deref().and_then(|n| n.rsplit_once(':')) else {
                        return Err(StoreError::Backend(
                            "redis: upgrading the keys' layout needs every master of the cluster, and one did not \
                             answer; open again"
                                .into(),
                        ));
                    };
                    let port = port.parse().map_err(|_| StoreError::Backend("redis: a master's port".into()))?;
                    let mut conn = c.asked(host, port).await.map_err(failed)?;
                    persisted += scan_persisting(&mut conn, &pattern, now).await.map_err(failed)?;
                }
                Ok(persisted)
            }
        }
    }
}

/// [`RedisStore::persist_live_rows`] on one server: how many rows it took the time to live off.
async fn scan_persisting<C: redis::aio::ConnectionLike + Send>(
    server: &mut C,
    pattern: &str,
    now: i64,
) -> redis::RedisResult<u64> {
    let mut persisted = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(server).await?;
        let live: Vec<&String> = keys.iter().filter(|k| live_row(k, now)).collect();
        if !live.is_empty() {
            let mut pipe = redis::pipe();
            for key in &live {
                pipe.cmd("PERSIST").arg(key.as_str());
            }
            let done: Vec<i64> = pipe.query_async(server).await?;
            persisted += done.iter().filter(|d| **d == 1).count() as u64;
        }
        if next == 0 {
            return Ok(persisted);
        }
        cursor = next;
    }
}

/// Whether `key` is a row a tenant's limits live in at `now`: its quota row, or the counter of
/// a period that has not ended.
fn live_row(key: &str, now: i64) -> bool {
    if key.ends_with("}:quota") {
        return true;
    }
    key.contains("}:counter:")
        && key.rsplit(':').next().and_then(|end| end.parse::<i64>().ok()).is_some_and(|end| end > now)
}

/// `text` with the characters of a `SCAN MATCH` pattern escaped.
fn glob_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_name() {
        let memory = "# Memory\r\nused_memory:1000\r\nmaxmemory_policy:volatile-lru\r\n";
        assert_eq!(field(memory, "maxmemory_policy"), Some("volatile-lru"));
        assert_eq!(field(memory, "maxmemory"), None, "a field is its whole name");
    }

    #[test]
    fn an_evicting_policy_is_refused_unless_it_is_the_one_accepted() {
        let kept = |policy: &str| Kept { node: None, policy: Some(policy.to_owned()), aof: Some(true) };
        assert_eq!(refusal(&[kept("noeviction")], None), None);
        let refused = refusal(&[kept("volatile-lru")], None).unwrap();
        assert!(refused.contains("accept_eviction = \"volatile-lru\""), "{refused}");
        assert!(refused.contains("never evicted"), "{refused}");
        assert_eq!(refusal(&[kept("volatile-lru")], Some("volatile-lru")), None);
        let other = refusal(&[kept("allkeys-lru")], Some("volatile-lru")).unwrap();
        assert!(other.contains("starts again from zero"), "{other}");
        assert_eq!(acceptable("volatile-ttl"), None);
        assert!(acceptable("noeviction").is_some());
        assert!(acceptable("lru").unwrap().contains("volatile-lru"));
    }

    #[test]
    fn the_rows_of_current_limits_are_told_by_their_names() {
        assert!(live_row("p:1:{t}:quota", 100));
        assert!(live_row("p:1:{t}:counter:requests:day:0:86400", 100));
        assert!(!live_row("p:1:{t}:counter:requests:day:0:86400", 86_400), "ended");
        assert!(!live_row("p:1:{t}:rate", 100));
        assert!(!live_row("p:1:{pi_1}:payment", 100));
        assert_eq!(glob_escaped("a*b[c]"), "a\\*b\\[c\\]");
    }
}
