//! The request path side by side, in one criterion run: a bare tower service; the same
//! service behind tower_governor keyed on the same `x-api-key` header, without and with its
//! headers; and behind tollgate (admit + record, memory store, warm state, its worker running)
//! doing the same jobs: `tollgate` (no headers, no `TenantContext`: tower_governor's job plus a
//! quota and metering), `tollgate_headers` (draft-10 headers, against tower_governor's), and
//! `tollgate_defaults` (headers and the `TenantContext` extension, the layer's defaults, which
//! tower_governor has no counterpart for). With 1, 10,000 and 1,000,000 tenants, on one thread
//! and on two.
//!
//! Run with: `cargo bench --bench hot_path` (about 10 minutes; `-- one_thread` for half).
//! Read the added cost of a middleware as its time minus `bare` in the same group.

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Request};
use tower::Service;

#[path = "support/mod.rs"]
mod support;

use support::*;

fn bench(c: &mut Criterion) {
    let quick = std::env::args().any(|a| a == "--test");
    // TOLLGATE_BENCH_TENANTS=1,10000 picks the tenant counts (setup of 1M tenants takes a while).
    let chosen: Option<Vec<usize>> = std::env::var("TOLLGATE_BENCH_TENANTS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let counts: &[usize] = match &chosen {
        Some(c) => c,
        None if quick => &[1, 1_000],
        None => &[1, 10_000, 1_000_000],
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    for &threads in &[1usize, 2] {
        let mut group = c.benchmark_group(if threads == 1 { "one_thread" } else { "two_threads" });
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(30);
        let mut kept: Vec<Box<dyn std::any::Any>> = Vec::new();
        for &n in counts {
            let keys = Arc::new((0..n).map(key).collect::<Vec<_>>());

            let svc = bare();
            group.bench_with_input(BenchmarkId::new("bare", n), &n, |b, _| {
                b.iter_custom(|iters| run(&svc, &keys, threads, iters, rt.handle()))
            });

            // Every service is kept until its group ends, so that each case allocates its state
            // in fresh memory rather than in the blocks the case before it freed.
            kept.push(bench_governor(&mut group, "tower_governor", governor(&keys), &keys, threads, n, &rt));
            kept.push(bench_governor(
                &mut group,
                "tower_governor_headers",
                governor_headers(&keys),
                &keys,
                threads,
                n,
                &rt,
            ));

            for (name, style, context) in [
                ("tollgate", "none", false),
                ("tollgate_headers", "draft", false),
                ("tollgate_defaults", "draft", true),
            ] {
                let svc = tollgate_service(n, style, context, &rt);
                group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                    b.iter_custom(|iters| run(&svc, &keys, threads, iters, rt.handle()))
                });
                // Stops the worker, so that no engine but the measured one uses a core.
                rt.block_on(svc.handle().shutdown()).unwrap();
                kept.push(Box::new(svc));
            }
        }
        group.finish();
        drop(kept);
    }
}

fn bench_governor<S>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
    keys: &Arc<Vec<HeaderValue>>,
    threads: usize,
    n: usize,
    rt: &tokio::runtime::Runtime,
) -> Box<dyn std::any::Any>
where
    S: Service<Request<axum::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
        b.iter_custom(|iters| run(&svc, keys, threads, iters, rt.handle()))
    });
    Box::new(svc)
}

criterion_group!(benches, bench);
criterion_main!(benches);
