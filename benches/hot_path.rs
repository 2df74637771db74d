//! The request path side by side, in one criterion run: a bare tower service; the same
//! service behind tollgate (admit + record, memory store, warm state), with and without
//! rate-limit headers (and, to price it, without the `TenantContext` extension); and behind
//! tower_governor keyed on the same `x-api-key` header, with and without its headers.
//! With 1, 10,000 and 1,000,000 tenants, on one thread and on two.
//!
//! Run with: `cargo bench --bench hot_path` (about 10 minutes; `-- one_thread` for half).
//! Read the added cost of a middleware as its time minus `bare` in the same group.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use axum::body::Body;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Request, Response};
use tollgate::{
    store::{MemoryStore, Store, TenantRecord},
    Config, KeyHash, Tollgate,
};
use tower::{Layer, Service};
use tower_governor::{governor::GovernorConfigBuilder, key_extractor::KeyExtractor, GovernorError, GovernorLayer};

#[derive(Clone)]
struct ApiKeyHeader;

impl KeyExtractor for ApiKeyHeader {
    type Key = String;

    fn extract<T>(&self, req: &Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

type Bare = tower::util::ServiceFn<fn(Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>>>;

fn bare() -> Bare {
    fn hello(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    tower::service_fn(hello as fn(_) -> _)
}

/// Drives a future that is ready at once (all the cases here are, on warm state).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

fn key(i: usize) -> HeaderValue {
    HeaderValue::from_str(&format!("tg_live_{i:024}")).unwrap()
}

/// A small fast generator, so that large tenant counts are visited in a cache-unfriendly
/// order, as real traffic does.
struct Pick(u64);

impl Pick {
    #[inline]
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn request(key: &HeaderValue) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    req.headers_mut().insert("x-api-key", key.clone());
    req
}

/// Runs `iters` requests on each of `threads` threads; returns the time per request of all
/// threads together (wall time / (threads × iters)).
fn run<S>(svc: &S, keys: &Arc<Vec<HeaderValue>>, threads: usize, iters: u64, rt: &tokio::runtime::Handle) -> Duration
where
    S: Service<Request<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let mut svc = svc.clone();
            let keys = keys.clone();
            let rt = rt.clone();
            scope.spawn(move || {
                let _enter = rt.enter();
                let mut pick = Pick(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                for _ in 0..iters {
                    let k = &keys[pick.next(keys.len())];
                    let _ = black_box(now(svc.call(request(k))));
                }
            });
        }
    });
    start.elapsed() / threads as u32
}

fn tollgate_service(
    tenants: usize,
    headers: &str,
    context: bool,
    rt: &tokio::runtime::Runtime,
) -> tollgate::TollgateService<Bare> {
    let config = Config::from_toml_str(&format!(
        r#"
        [limits]
        headers = "{headers}"
        max_tenants = 2000000
        # A rate no benchmark reaches: every request is admitted (and recorded).
        [plans.bench]
        rate = "1000000000/s"
        quotas.requests = {{ limit = 1000000000000, period = "month", mode = "hard" }}
        "#
    ))
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    rt.block_on(async {
        for i in 0..tenants {
            let record = TenantRecord { id: format!("t{i}").into(), plan: "bench".into(), customer: None };
            store.put_tenant(&record, &[KeyHash::of(key(i).as_bytes())]).await.unwrap();
        }
    });
    let (layer, worker) = Tollgate::builder(config).store_arc(store).build();
    rt.spawn(worker.run());
    let mut svc = layer.tenant_context(context).layer(bare());
    // Warm: every tenant known, every lease reserved.
    rt.block_on(async {
        for i in 0..tenants {
            let r = svc.call(request(&key(i))).await.unwrap();
            assert_eq!(r.status(), 200);
        }
    });
    svc
}

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
        let mut kept = Vec::new();
        for &n in counts {
            let keys = Arc::new((0..n).map(key).collect::<Vec<_>>());

            let svc = bare();
            group.bench_with_input(BenchmarkId::new("bare", n), &n, |b, _| {
                b.iter_custom(|iters| run(&svc, &keys, threads, iters, rt.handle()))
            });

            let config = || {
                let mut b = GovernorConfigBuilder::default();
                b.per_nanosecond(1).burst_size(1_000_000_000);
                b
            };
            let plain = GovernorLayer::new(config().key_extractor(ApiKeyHeader).finish().unwrap()).layer(bare());
            bench_governor(&mut group, "tower_governor", plain, &keys, threads, n, &rt);
            let with_headers =
                GovernorLayer::new(config().key_extractor(ApiKeyHeader).use_headers().finish().unwrap()).layer(bare());
            bench_governor(&mut group, "tower_governor_headers", with_headers, &keys, threads, n, &rt);

            for (name, style, context) in [
                ("tollgate", "draft", true),
                ("tollgate_no_headers", "none", true),
                ("tollgate_no_headers_no_context", "none", false),
            ] {
                let svc = tollgate_service(n, style, context, &rt);
                group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                    b.iter_custom(|iters| run(&svc, &keys, threads, iters, rt.handle()))
                });
                // Stops the worker, so that no engine but the measured one uses a core; the
                // engine is kept until the group ends, so that the next case's tenants get fresh
                // memory rather than this one's freed and fragmented blocks.
                rt.block_on(svc.handle().shutdown()).unwrap();
                kept.push(svc);
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
) where
    S: Service<Request<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    // Warm: every tenant has its cell.
    let mut warm = svc.clone();
    for k in keys.iter() {
        let _ = now(warm.call(request(k)));
    }
    group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
        b.iter_custom(|iters| run(&svc, keys, threads, iters, rt.handle()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
