//! What tollgate asks of Redis per million API requests: the measurement of docs/performance.md
//! (store traffic per store), the counterpart of `sqlite_traffic`, `postgres_traffic` and
//! `dynamodb_traffic`. Drives the same API requests through the tower layer (tenants spread
//! over a fake clock, flushes at the flush interval, the directory revalidated as the worker
//! would) with the quotas (and with `fleet`, a fleet-wide rate) on a Redis server and the rest
//! (directory, usage) on a SQLite file, and reads the commands the server ran from
//! `INFO commandstats` (the calls of each command: `EVALSHA` is one script run, whose own
//! `HGET`, `HKEYS`, `HDEL`, `HSET`, `DEL`, `EXISTS`, `PEXPIRE` and `PERSIST` are counted apart
//! and are not round trips). The run's keys (under a prefix of its own) are deleted at the end.
//!
//! `TOLLGATE_REDIS_URL=redis://… cargo run --release --features redis,sqlite,test-util --example
//!  redis_traffic -- <tenants> <requests> <flush interval, s> <run time, s> [fleet]` (defaults
//! 1000 1000000 10 600). Use a server of its own (`scripts/redis-server.sh` starts one): every
//! command the server runs meanwhile is counted.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate::store::prelude::*;
use tollgate::store::{KeyHash, RedisOptions, RedisStore, SqliteStore, TenantRecord};
use tollgate::{clock::Clock, Config, Tollgate, TollgateLayer};
use tower::Layer;
use traffic::Run;

#[path = "support/traffic.rs"]
mod traffic;

/// The calls of each command the server has run so far (`INFO commandstats`).
async fn commands(con: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(con).await.expect("INFO commandstats");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let fleet = args.last().is_some_and(|a| a == "fleet");
    if fleet {
        args.pop();
    }
    let args: Vec<u64> = args.iter().map(|a| a.parse().expect("numbers")).collect();
    let (tenants, requests, flush, run) = match args[..] {
        [t, r, f, s] => (t, r, f, s),
        [] => (1000, 1_000_000, 10, 600),
        _ => panic!("usage: redis_traffic [<tenants> <requests> <flush interval, s> <run time, s>] [fleet]"),
    };
    let url = std::env::var("TOLLGATE_REDIS_URL").expect("TOLLGATE_REDIS_URL=redis://host:port");
    let mut con =
        redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.expect("the Redis server");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("tollgate.db")).await.unwrap();
    for i in 0..tenants {
        let record = TenantRecord::new(format!("t{i}").into(), "metered".into());
        store.put_tenant(&record, &[KeyHash::of(format!("key-{i}").as_bytes())]).await.unwrap();
    }
    // A prefix of the run's own: the counters of another run are not read.
    let prefix = format!("traffic{}", std::process::id());
    // The run's time is a fake clock: the store applies each call at its time, not the
    // server's (a fleet keeps the server's, docs/redis.md "Clocks").
    let options = RedisOptions::new(Duration::from_secs(5)).callers_clock();
    let redis = Arc::new(RedisStore::open_with(&url, &prefix, &options).await.unwrap());
    // A fleet rate that fails open serves each node's share while the store is down: the
    // nodes sharing it are told.
    let (rate, hint) = if fleet {
        ("rate = \"1000000/s\"\nrate_scope = \"fleet\"\n", "fleet_size_hint = 4\n")
    } else {
        ("rate = \"1000000/s\"\n", "")
    };
    let config = Config::from_toml_str(&format!(
        "[usage]\nflush_interval = \"{flush}s\"\nwindow = \"1h\"\n[limits]\nheaders = \"none\"\n{hint}\
         [plans.metered]\n{rate}\
         quotas.requests = {{ limit = 100000000, period = \"month\", mode = \"hard\" }}\n"
    ))
    .unwrap();
    let start = 1_773_489_600; // 2026-03-14T12:00:00Z
    let (clock, fake) = Clock::fake_at_unix(start);
    let (engine, _worker) = Tollgate::builder(config)
        .store(store)
        .quota_store(redis.clone())
        .rate_store(redis.clone())
        .places_store(redis.clone())
        .idempotency_store(redis)
        .clock(clock)
        .build();
    let layer = TollgateLayer::new(engine.clone());
    let svc = layer.layer(tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    }));

    let before = commands(&mut con).await;
    let began = Instant::now();
    Run { tenants, requests, flush, run }.drive(&engine, svc, &fake, "/", |_| {}).await;
    engine.shutdown().await.unwrap();
    let wall = began.elapsed();
    let after = commands(&mut con).await;
    // The example's own INFO is not the engine's.
    let ran: BTreeMap<&str, u64> = after
        .iter()
        .map(|(name, calls)| (name.as_str(), calls.saturating_sub(*before.get(name).unwrap_or(&0))))
        .filter(|(name, calls)| *calls > 0 && *name != "info")
        .collect();
    // What the scripts run on the server is not sent: the store sends none of these commands
    // itself (src/store/redis), and each runs at most once a script.
    let scripts = ["hget", "hset", "hdel", "hkeys", "del", "exists", "pexpire", "persist"];
    let runs = ran.get("evalsha").unwrap_or(&0) + ran.get("eval").unwrap_or(&0);
    for name in scripts {
        let calls = ran.get(name).copied().unwrap_or(0);
        assert!(calls <= runs, "{calls} {name} for {runs} script runs: the store sends {name} itself now");
    }
    let trips: u64 = ran.iter().filter(|(name, _)| !scripts.contains(name)).map(|(_, c)| c).sum();
    println!(
        "{requests} API requests over {tenants} tenants, {run} s, flush every {flush} s{}: {trips} commands sent \
         ({:.1} per thousand API requests); by command, with what the scripts ran on the server (not sent): \
         {ran:?}; {:.1} s of wall time",
        if fleet { ", a fleet rate" } else { "" },
        trips as f64 * 1e3 / requests as f64,
        wall.as_secs_f64(),
    );
    // The run's rows (a quota's are kept for weeks) go with it.
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let () = redis::cmd("UNLINK").arg(&keys).query_async(&mut con).await.expect("UNLINK");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}
