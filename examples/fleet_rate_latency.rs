//! The latency a lease adds to a request that waits on it: the figures of docs/performance.md
//! ("Fleet rates", "Redis"). Sends requests one after another through the tower layer, on the
//! system clock, against a real PostgreSQL server and a real Redis server (each when its URL is
//! set), once with a plan whose rate is each node's and once with a rate kept for the fleet
//! (`rate_scope = "fleet"`) with a burst of 2 at 10^6/s: a lease holds at most 2 cells and
//! lives at most 2 µs, so every request's cells have expired by the next request and each one
//! waits on a lease (one `RateStore::take_cells` call). Prints p50 and p99 of both, and their
//! difference; then the p50 and p99 of a quota reserve call alone (`QuotaStore::reserve`, a
//! lease of a hard quota's units, what a request waits on when its node's lease is spent) on
//! each store.
//!
//! Run with the servers (scripts/postgres-server.sh and scripts/redis-server.sh start them):
//! `TOLLGATE_POSTGRES_URL=postgres://… TOLLGATE_REDIS_URL=redis://… cargo run --release
//!  --features postgres,redis --example fleet_rate_latency -- [requests]`

use std::{sync::Arc, time::Instant};

use tollgate::store::{
    MemoryStore, PostgresOptions, PostgresStore, QuotaKey, QuotaStore, RateStore, RedisStore, Reservation, ReserveToken,
};
use tollgate::{Config, Tollgate, TollgateLayer};
use tower::{Layer, ServiceExt};

const TOML: &str = r#"
[limits]
fleet_size_hint = 1
[plans.p]
rate = "1000000/s"
SCOPE
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// The store under measure: PostgreSQL for every role, or Redis for the rate (beside memory).
#[derive(Clone)]
enum Under {
    Postgres(Arc<PostgresStore>),
    Redis(Arc<RedisStore>),
}

/// The latencies of `n` requests, sorted, in microseconds.
async fn latencies(scope: &str, under: &Under, n: usize) -> Vec<f64> {
    let plan = match scope {
        "fleet" => "burst = 2\nrate_scope = \"fleet\"",
        _ => "burst = 1000",
    };
    let config = Config::from_toml_str(&TOML.replace("SCOPE", plan)).unwrap();
    let builder = match under {
        Under::Postgres(store) => Tollgate::builder(config).store_arc(store.clone()),
        Under::Redis(store) => Tollgate::builder(config)
            .store_arc(Arc::new(MemoryStore::new()))
            .rate_store(store.clone() as Arc<dyn RateStore>),
    };
    let (engine, worker) = builder.build();
    tokio::spawn(worker.run());
    let service =
        TollgateLayer::new(engine.clone()).layer(tower::service_fn(|_: http::Request<axum::body::Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
        }));
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let request = http::Request::get("/").header("x-api-key", "key-t").body(axum::body::Body::empty()).unwrap();
        let started = Instant::now();
        let response = service.clone().oneshot(request).await.unwrap();
        let took = started.elapsed();
        // The first hundred warm the tenant and the connections.
        if i >= 100 && response.status() == 200 {
            out.push(took.as_secs_f64() * 1e6);
        }
    }
    engine.shutdown().await.unwrap();
    out.sort_by(f64::total_cmp);
    out
}

/// The latencies of `n` quota reserve calls of 10 units of a hard quota, one after another,
/// sorted, in microseconds.
async fn reserves(store: &dyn QuotaStore, n: usize) -> Vec<f64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let day = tollgate::config::Period::Day;
    let (start, end) = day.bounds(now);
    let key = QuotaKey::new(format!("q{}", std::process::id()).into(), "requests".into(), day, start, end);
    let mut out = Vec::with_capacity(n);
    for seq in 1..=(n + 100) as u64 {
        let r = Reservation::new(key.clone(), 10, 0, Some(u64::MAX / 2), ReserveToken::new(1, seq));
        let started = Instant::now();
        store.reserve(&r).await.unwrap();
        if seq > 100 {
            out.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn measure(name: &str, under: Under, n: usize) {
    let node = latencies("node", &under, n).await;
    let fleet = latencies("fleet", &under, n).await;
    for (scope, l) in [("node", &node), ("fleet", &fleet)] {
        println!(
            "{name}, {scope}: p50 {:.1} µs, p99 {:.1} µs ({} of {n} requests admitted)",
            pct(l, 0.5),
            pct(l, 0.99),
            l.len()
        );
    }
    println!(
        "{name}: added by a lease of cells: p50 {:.1} µs, p99 {:.1} µs",
        pct(&fleet, 0.5) - pct(&node, 0.5),
        pct(&fleet, 0.99) - pct(&node, 0.99)
    );
    let quota: &dyn QuotaStore = match &under {
        Under::Postgres(s) => &**s,
        Under::Redis(s) => &**s,
    };
    let r = reserves(quota, n).await;
    println!("{name}: a quota reserve call: p50 {:.1} µs, p99 {:.1} µs", pct(&r, 0.5), pct(&r, 0.99));
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    if let Ok(url) = std::env::var("TOLLGATE_POSTGRES_URL") {
        let schema = format!("fleet_latency_{}", std::process::id());
        let store = Arc::new(PostgresStore::open(&PostgresOptions::new(url).schema(schema)).await.unwrap());
        measure("PostgreSQL", Under::Postgres(store), n).await;
    }
    if let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") {
        let prefix = format!("latency{}", std::process::id());
        let store = Arc::new(RedisStore::open(&url, &prefix, std::time::Duration::from_secs(5)).await.unwrap());
        measure("Redis", Under::Redis(store), n).await;
    }
}
