//! Keys of its own per test (a prefix) on the local Redis server that `scripts/test.sh` starts
//! (`scripts/redis-server.sh`) and names in `TOLLGATE_REDIS_URL`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tollgate::store::RedisStore;

/// The server's URL. Without one a test skips loudly; under CI it fails.
pub fn url() -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => panic!(
            "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_REDIS_URL is not: the Redis tests must run \
             (scripts/test.sh starts a local server)"
        ),
        _ => {
            eprintln!(
                "SKIPPED: no local Redis server (TOLLGATE_REDIS_URL is not set); scripts/test.sh starts one \
                 (scripts/redis-server.sh)"
            );
            None
        }
    }
}

/// The URL of a node of the local Redis Cluster (three masters) that `scripts/test.sh` starts
/// (`scripts/redis-server.sh start-cluster`) and names in `TOLLGATE_REDIS_CLUSTER_URL`. Without
/// one a test skips loudly; under CI it fails.
pub fn cluster_url() -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_CLUSTER_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => panic!(
            "CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_REDIS_CLUSTER_URL is not: the Redis Cluster \
             tests must run (scripts/test.sh starts a local cluster)"
        ),
        _ => {
            eprintln!(
                "SKIPPED: no local Redis Cluster (TOLLGATE_REDIS_CLUSTER_URL is not set); scripts/test.sh starts \
                 one (scripts/redis-server.sh start-cluster)"
            );
            None
        }
    }
}

/// A store on the local cluster under a prefix of its own, or `None` (skipped) without one:
/// the prefix too, to open it again.
pub async fn cluster_store() -> Option<(RedisStore, String)> {
    let url = cluster_url()?;
    let prefix = fresh_prefix();
    let store = RedisStore::open_cluster(&url, &prefix, Duration::from_secs(5)).await.expect("the cluster store opens");
    Some((store, prefix))
}

/// A prefix of the test's own (its keys apart from every other test's).
pub fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), tollgate_draw())
}

fn tollgate_draw() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish() % 1_000_000
}

/// How a test whose clock it drives opens a store: the rules that read time (a fleet rate's
/// TAT, a reservation's expiry, a key in flight, places) follow each call's own time, not the
/// server's (`RedisOptions::callers_clock`), so that moving the test's clock moves them.
pub fn driven(timeout: Duration) -> tollgate::store::RedisOptions {
    tollgate::store::RedisOptions::new(timeout).callers_clock()
}

/// [`store`] on the callers' clock ([`driven`]).
pub async fn store_driven() -> Option<(RedisStore, String)> {
    let url = url()?;
    let prefix = fresh_prefix();
    let store =
        RedisStore::open_with(&url, &prefix, &driven(Duration::from_secs(5))).await.expect("the Redis store opens");
    Some((store, prefix))
}

/// [`cluster_store`] on the callers' clock ([`driven`]).
pub async fn cluster_store_driven() -> Option<(RedisStore, String)> {
    let url = cluster_url()?;
    let prefix = fresh_prefix();
    let options = driven(Duration::from_secs(5)).cluster(true);
    let store = RedisStore::open_with(&url, &prefix, &options).await.expect("the cluster store opens");
    Some((store, prefix))
}

/// A store under a prefix of its own, or `None` (skipped) without a server: the prefix too,
/// to open it again.
pub async fn store() -> Option<(RedisStore, String)> {
    let url = url()?;
    let prefix = fresh_prefix();
    let store = RedisStore::open(&url, &prefix, Duration::from_secs(5)).await.expect("the Redis store opens");
    Some((store, prefix))
}
