//! The latency a fleet rate adds to a request that waits on a lease of cells: the figure of
//! docs/performance.md ("Fleet rates"). Sends requests one after another through the tower
//! layer, on the system clock, against a real PostgreSQL server, once with a plan whose rate is
//! each node's and once with a rate kept for the fleet (`rate_scope = "fleet"`) with a burst
//! of 2 at 10^6/s: a lease holds at most 2 cells and lives at most 2 µs, so every request's
//! cells have expired by the next request and each one waits on a lease (one
//! `RateStore::take_cells` transaction). Prints p50 and p99 of both, and their difference.
//!
//! Run with a server (scripts/postgres-server.sh starts one):
//! `TOLLGATE_POSTGRES_URL=postgres://… cargo run --release --features postgres
//!  --example fleet_rate_latency -- [requests]`

use std::{sync::Arc, time::Instant};

use tollgate::store::{PostgresOptions, PostgresStore};
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

/// The latencies of `n` requests, sorted, in microseconds.
async fn latencies(scope: &str, store: Arc<PostgresStore>, n: usize) -> Vec<f64> {
    let plan = match scope {
        "fleet" => "burst = 2\nrate_scope = \"fleet\"",
        _ => "burst = 1000",
    };
    let config = Config::from_toml_str(&TOML.replace("SCOPE", plan)).unwrap();
    let (engine, worker) = Tollgate::builder(config).store_arc(store).build();
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

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let url = std::env::var("TOLLGATE_POSTGRES_URL").expect("TOLLGATE_POSTGRES_URL");
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let schema = format!("fleet_latency_{}", std::process::id());
    let store = Arc::new(PostgresStore::open(&PostgresOptions::new(url).schema(schema)).await.unwrap());
    let node = latencies("node", store.clone(), n).await;
    let fleet = latencies("fleet", store, n).await;
    for (name, l) in [("node", &node), ("fleet", &fleet)] {
        println!(
            "{name}: p50 {:.1} µs, p99 {:.1} µs ({} of {n} requests admitted)",
            pct(l, 0.5),
            pct(l, 0.99),
            l.len()
        );
    }
    println!(
        "added by a lease of cells: p50 {:.1} µs, p99 {:.1} µs",
        pct(&fleet, 0.5) - pct(&node, 0.5),
        pct(&fleet, 0.99) - pct(&node, 0.99)
    );
}
