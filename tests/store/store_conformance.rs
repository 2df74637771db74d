//! The store conformance suite (`tollgate::store::conformance`, published behind the
//! `test-util` feature for stores written elsewhere), run against every store of this crate:
//! adding a store is one maker and one `store_conformance!` line.

#[cfg(any(feature = "dynamodb", feature = "postgres", feature = "redis"))]
use crate::common;

use std::sync::Arc;

use tollgate::store::{conformance::StoreUnderTest, MemoryStore, StoreInspect};

type Made = StoreUnderTest<dyn StoreInspect>;

async fn memory_store() -> Option<Made> {
    // A memory store does not outlive the process: its restart keeps the same store.
    Some(Made::new(Arc::new(MemoryStore::new()), |same| async move { same }))
}

tollgate::store_conformance!(memory, memory_store());

/// SQLite on a real file; every restart point closes the store and opens the file again.
#[cfg(feature = "sqlite")]
async fn sqlite_store() -> Option<Made> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.db");
    let open = move || {
        let path = path.clone();
        async move { Arc::new(tollgate::store::SqliteStore::open(&path).await.unwrap()) as Arc<dyn StoreInspect> }
    };
    let store = open().await;
    Some(
        Made::new(store, move |old| {
            drop(old);
            open()
        })
        .keeping(dir),
    )
}
#[cfg(feature = "sqlite")]
tollgate::store_conformance!(sqlite, sqlite_store());

/// DynamoDB: a table of its own per test on the local DynamoDB-compatible server that
/// `scripts/test.sh` starts (`TOLLGATE_DYNAMODB_ENDPOINT`); every restart point makes a new
/// client. Without a server the tests skip loudly, and fail under CI.
#[cfg(feature = "dynamodb")]
async fn dynamo_store() -> Option<Made> {
    let store = common::dynamo::table().await?;
    let (client, table) = (store.client().clone(), store.table().to_owned());
    Some(Made::new(Arc::new(store), move |old| {
        drop(old);
        let store = tollgate::store::DynamoStore::new(common::dynamo::client_like(&client), table.clone());
        async move { Arc::new(store) as Arc<dyn StoreInspect> }
    }))
}
#[cfg(feature = "dynamodb")]
tollgate::store_conformance!(dynamodb, dynamo_store());

/// PostgreSQL: a schema of its own per test on the local server that `scripts/test.sh` starts
/// (`TOLLGATE_POSTGRES_URL`); every restart point closes the pool and opens a new one. Without
/// a server the tests skip loudly, and fail under CI.
#[cfg(feature = "postgres")]
async fn postgres_store() -> Option<Made> {
    let (store, options) = common::postgres::store().await?;
    Some(Made::new(Arc::new(store), move |old| {
        drop(old);
        let options = options.clone();
        async move { Arc::new(tollgate::store::PostgresStore::open(&options).await.unwrap()) as Arc<dyn StoreInspect> }
    }))
}
#[cfg(feature = "postgres")]
tollgate::store_conformance!(postgres, postgres_store());

/// PostgreSQL behind PgBouncer in transaction mode, two server connections shared by every
/// client: the same suite, so that a named prepared statement or a session setting anywhere in
/// the store would fail it.
#[cfg(feature = "postgres")]
async fn pgbouncer_store() -> Option<Made> {
    let options = common::postgres::fresh_behind_bouncer()?;
    let store = tollgate::store::PostgresStore::open(&options).await.expect("the schema is created through PgBouncer");
    Some(Made::new(Arc::new(store), move |old| {
        drop(old);
        let options = options.clone();
        async move { Arc::new(tollgate::store::PostgresStore::open(&options).await.unwrap()) as Arc<dyn StoreInspect> }
    }))
}
#[cfg(feature = "postgres")]
tollgate::store_conformance!(postgres_behind_pgbouncer, pgbouncer_store());

/// Redis: keys under a prefix of its own per test on the local server that `scripts/test.sh`
/// starts (`TOLLGATE_REDIS_URL`), for the roles a Redis store serves; every restart point opens
/// a new connection (what the server holds stays). Without a server the tests skip loudly, and
/// fail under CI.
#[cfg(feature = "redis")]
async fn redis_store() -> Option<StoreUnderTest<tollgate::store::RedisStore>> {
    redis_store_on(false).await
}
#[cfg(feature = "redis")]
tollgate::store_conformance!(redis, redis_store(), quota, idempotency, rate, place);

/// A Redis Cluster of three masters (`TOLLGATE_REDIS_CLUSTER_URL`, started by `scripts/test.sh`):
/// the same roles, each tenant's keys in a slot of its own and the tenants spread over the
/// masters, every call routed by its key's slot; every restart point opens a new connection.
/// Without a cluster the tests skip loudly, and fail under CI.
#[cfg(feature = "redis")]
async fn redis_cluster_store() -> Option<StoreUnderTest<tollgate::store::RedisStore>> {
    redis_store_on(true).await
}

/// A Redis store on the local server, or the local cluster.
#[cfg(feature = "redis")]
async fn redis_store_on(cluster: bool) -> Option<StoreUnderTest<tollgate::store::RedisStore>> {
    use tollgate::store::RedisStore;
    // The suite checks the roles' rules by moving the calls' time: on the callers' clock.
    // What the server's clock changes is checked by tests/store/redis.rs ("Clocks").
    let (store, prefix, url) = match cluster {
        false => common::redis::store_driven().await.zip(common::redis::url()),
        true => common::redis::cluster_store_driven().await.zip(common::redis::cluster_url()),
    }
    .map(|((store, prefix), url)| (store, prefix, url))?;
    Some(StoreUnderTest::new(Arc::new(store), move |old| {
        drop(old);
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            let options = common::redis::driven(std::time::Duration::from_secs(5)).cluster(cluster);
            let opened = RedisStore::open_with(&url, &prefix, &options).await;
            Arc::new(opened.expect("the Redis store opens again"))
        }
    }))
}
#[cfg(feature = "redis")]
tollgate::store_conformance!(redis_cluster, redis_cluster_store(), quota, idempotency, rate, place);
