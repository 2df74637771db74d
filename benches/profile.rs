//! Profiling harness (not a benchmark): runs one case in a loop so that `perf record` or
//! `valgrind --tool=callgrind` sees only it, and prints its ns per request. Usage:
//! `cargo bench --bench profile -- <case> <tenants> <iterations> [threads]`
//! where case is one of the benchmark's: bare, tower_governor, tower_governor_headers,
//! tollgate, tollgate_headers, tollgate_defaults, tollgate_credits (a prepaid balance instead of
//! the month quota), tollgate_fleet (the rate shared by a fleet: cells from a warm lease),
//! tollgate_record and tollgate_record_dimensions (the handler records tokens: of a meter
//! without dimensions, or at two values of a meter with them). `scripts/compare.sh` (interleaved medians)
//! and `scripts/instructions.sh` (callgrind counts per request) drive it. Under `cargo test
//! --benches` (no case given) it runs every case a thousand times, as a smoke test.

const CASES: [&str; 10] = [
    "bare",
    "tower_governor",
    "tower_governor_headers",
    "tollgate",
    "tollgate_headers",
    "tollgate_defaults",
    "tollgate_credits",
    "tollgate_fleet",
    "tollgate_record",
    "tollgate_record_dimensions",
];

#[path = "support/mod.rs"]
mod support;

use std::{hint::black_box, sync::Arc, time::Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(case) = args.first() else {
        for case in CASES {
            one(case, 10, 1_000, 1);
        }
        return;
    };
    let tenants: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let iters: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    one(case, tenants, iters, threads);
}

fn one(case: &str, tenants: usize, iters: u64, threads: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let keys = Arc::new((0..tenants).map(support::key).collect::<Vec<_>>());
    let per = match case {
        "bare" => time(&support::bare(), &keys, iters, threads, &rt),
        "tower_governor" => time(&support::governor(&keys), &keys, iters, threads, &rt),
        "tower_governor_headers" => time(&support::governor_headers(&keys), &keys, iters, threads, &rt),
        "tollgate" => time(&support::tollgate_service(tenants, "none", false, &rt), &keys, iters, threads, &rt),
        "tollgate_headers" => {
            time(&support::tollgate_service(tenants, "draft", false, &rt), &keys, iters, threads, &rt)
        }
        "tollgate_defaults" => {
            time(&support::tollgate_service(tenants, "draft", true, &rt), &keys, iters, threads, &rt)
        }
        "tollgate_credits" => {
            time(&support::tollgate_service_on(tenants, "none", false, true, false, &rt), &keys, iters, threads, &rt)
        }
        "tollgate_fleet" => {
            time(&support::tollgate_service_on(tenants, "none", false, false, true, &rt), &keys, iters, threads, &rt)
        }
        "tollgate_record" => time(&support::recording(tenants, false, &rt), &keys, iters, threads, &rt),
        "tollgate_record_dimensions" => time(&support::recording(tenants, true, &rt), &keys, iters, threads, &rt),
        other => panic!("unknown case {other}"),
    };
    println!("{case} {tenants}: {per:.1} ns/request");
}

fn time<S>(svc: &S, keys: &Arc<Vec<http::HeaderValue>>, iters: u64, threads: usize, rt: &tokio::runtime::Runtime) -> f64
where
    S: tower::Service<http::Request<axum::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    let start = Instant::now();
    black_box(support::run(svc, keys, threads, iters, rt.handle()));
    start.elapsed().as_nanos() as f64 / (iters * threads as u64) as f64
}
