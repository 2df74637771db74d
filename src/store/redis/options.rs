//! How a [`RedisStore`](super::RedisStore) is opened.

use std::time::Duration;

/// How a [`RedisStore`](super::RedisStore) is opened ([`RedisStore::open_with`](super::RedisStore::open_with)): how long connecting and each
/// command may take, whether the URL names a node of a Redis Cluster, and the eviction policy
/// the operator accepts, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long connecting, and each command, may take (the engine bounds the calls of each
    /// path tighter).
    pub timeout: Duration,
    /// Whether the URL names a node of a Redis Cluster ([`RedisStore::open_cluster`](super::RedisStore::open_cluster)).
    pub cluster: bool,
    /// The `maxmemory-policy` other than `noeviction` the store opens under (`None`: it opens
    /// under `noeviction` only): [`accept_eviction`](Self::accept_eviction).
    pub accept_eviction: Option<String>,
    /// The replicas a money write (a credit grant, a refund, a grant closed) waits for before
    /// it is answered (0: none, the primary's acknowledgement alone):
    /// [`wait_for_replicas`](Self::wait_for_replicas).
    pub wait_replicas: u32,
    /// How long a money write waits for them.
    pub wait_timeout: Duration,
    /// The rules that read time (a fleet rate's TAT, a reservation's expiry, an
    /// `Idempotency-Key`'s time in flight, places' expiry) read each call's own time, not the
    /// server's: [`callers_clock`](Self::callers_clock) (tests that drive a clock).
    pub(crate) callers_clock: bool,
}

impl RedisOptions {
    /// One server, no eviction accepted, each command bounded by `timeout`.
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            cluster: false,
            accept_eviction: None,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            callers_clock: false,
        }
    }

    /// The rules that read time apply at each call's own time (the caller's clock, as the
    /// other stores do), not at the server's (`TIME`, the default): for tests whose clock is
    /// driven, and which check those rules by moving it. Never for a fleet: nodes whose clocks
    /// disagree then admit a shared rate, expire reservations and judge keys in flight as far
    /// apart as their clocks (docs/redis.md, "Clocks").
    #[cfg(feature = "test-util")]
    #[must_use]
    pub fn callers_clock(mut self) -> Self {
        self.callers_clock = true;
        self
    }

    /// The URL names a node of a Redis Cluster (its slots are followed).
    #[must_use]
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Opens under `policy` (a `maxmemory-policy`, `volatile-lru` say), which a server that
    /// does not use it still refuses. What each policy evicts when the server is full:
    ///
    /// - `volatile-*`: keys with a time to live. Shared rates and places in flight (a rate or
    ///   a concurrency admitted past its limit for a moment), `Idempotency-Key` bindings (a
    ///   request sent again served, and counted, again), payments' hints (a dispute naming
    ///   only its payment, its hint evicted, finds no tenant and takes nothing back), counters
    ///   of ended periods. A tenant's quota row and the
    ///   counters of its current periods carry none: never evicted.
    /// - `allkeys-*`: any key. A tenant's quota among them: a counter evicted starts again from
    ///   zero (its units admitted again), a prepaid balance evicted is lost.
    #[must_use]
    pub fn accept_eviction(mut self, policy: impl Into<String>) -> Self {
        self.accept_eviction = Some(policy.into());
        self
    }
}

impl RedisOptions {
    /// Each money write (a credit grant, a refund or a dispute, a grant closed or revoked)
    /// waits, once written, until `replicas` replicas have it (Redis's `WAIT`, on every master
    /// of a cluster), at most `timeout`; short of them, it answers an error, though the primary
    /// keeps the write: its caller sends it again (a Stripe webhook answers 500 and is
    /// delivered again; every money write is applied once however often it is sent). Without
    /// it, a money write is acknowledged by the primary alone, and a failover to a replica
    /// that had not received it loses it, after its webhook was answered 200.
    ///
    /// Money writes go on a connection of their own, so that a wait holds up no request.
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout = timeout;
        self
    }
}

impl Default for RedisOptions {
    /// 5 s a command, one server, no eviction accepted.
    fn default() -> Self {
        Self::new(Duration::from_secs(5))
    }
}
