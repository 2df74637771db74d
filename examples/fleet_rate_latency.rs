//! The latency a fleet rate adds to a request that waits on a lease of cells: the figure of
//! docs/performance.md ("Fleet rates"). Sends requests one after another through the tower
//! layer, on the system clock, against a real PostgreSQL server, once with a plan whose rate is
//! each node's and once with the same rate kept for the fleet (`rate_scope = "fleet"`) and a
//! burst of 1 at 10^6/s, so that every request's cell has expired by the next request and each
//! one waits on a lease (one `RateStore::take_cells` transaction). Prints p50 and p99 of both,
//! and their difference.
//!
//! Run with a server (scripts/postgres-server.sh starts one):
//! `TOLLGATE_POSTGRES_URL=postgres://… cargo run --release --features postgres
//!  --example fleet_rate_latency -- [requests]`

use std::{sync::Arc, time::Instant};

use tollgate::store::{PostgresOptions, PostgresStore};
use tollgate::{Config, Tollgate, TollgateLayer};
use tower::{Layer, ServiceExt};

const TOML: &str = r#"
[plans.p]
rate = "1000000/s"
burst = 1
rate_scope = "SCOPE"
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// The latencies of `n` requests, sorted, in microseconds.
async fn latencies(scope: &str, store: Arc<PostgresStore>, n: usize) -> Vec<f64> {
    let config = Config::from_toml_str(&TOML.replace("SCOPE", scope)).unwrap();
    let (engine, worker) = Tollgate::builder(config).store_arc(store).build();
    tokio::spawn(worker.run());
    let service = TollgateLayer::new(engine.clone()).layer(tower::service_fn(|_: http::Request<String>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    }));
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let request = http::Request::get("/").header("x-api-key", "key-t").body(String::new()).unwrap();
        let started = Instant::now();
        let response = service.clone().oneshot(request).await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 200, "{scope}: {:?}", response.headers());
        // The first hundred warm the tenant and the connections.
        if i >= 100 {
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
        println!("{name}: p50 {:.0} µs, p99 {:.0} µs ({n} requests)", pct(l, 0.5), pct(l, 0.99));
    }
    println!(
        "added by a lease of cells: p50 {:.0} µs, p99 {:.0} µs",
        pct(&fleet, 0.5) - pct(&node, 0.5),
        pct(&fleet, 0.99) - pct(&node, 0.99)
    );
}
