//! What the benchmark and the profiling harness share: the services under test and the loop
//! that drives them.

#![allow(dead_code, missing_docs)]

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
use http::{HeaderValue, Request, Response};
use tollgate::store::prelude::*;
use tollgate::store::KeyHash;
use tollgate::{
    store::{MemoryStore, TenantRecord},
    Config, Tollgate,
};
use tower::{Layer, Service};
use tower_governor::{governor::GovernorConfigBuilder, key_extractor::KeyExtractor, GovernorError, GovernorLayer};

#[derive(Clone)]
pub(crate) struct ApiKeyHeader;

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

pub(crate) type Bare =
    tower::util::ServiceFn<fn(Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>>>;

pub(crate) fn bare() -> Bare {
    fn hello(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    tower::service_fn(hello as fn(_) -> _)
}

/// The iterations of [`planted`]'s loop (`TOLLGATE_BENCH_PLANT`), read once.
static PLANT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The inner service of the tollgate cases: [`bare`], or with `TOLLGATE_BENCH_PLANT=N` one that
/// spins N iterations of a loop per request first: a slowdown planted in what the tollgate
/// cases count and the baselines do not (`scripts/instruction-budget.sh --self-test` shows
/// that the budget refuses one of 3%).
fn inner() -> Bare {
    fn planted(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        let mut x = 0u64;
        for _ in 0..*PLANT.get().unwrap_or(&0) {
            x = black_box(x.wrapping_add(1));
        }
        black_box(x);
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    let n = *PLANT.get_or_init(|| std::env::var("TOLLGATE_BENCH_PLANT").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    if n == 0 {
        bare()
    } else {
        tower::service_fn(planted as fn(_) -> _)
    }
}

/// Drives a future that is ready at once (all the cases here are, on warm state).
pub(crate) fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

pub(crate) fn key(i: usize) -> HeaderValue {
    let key = HeaderValue::from_str(&format!("tg_live_{i:024}")).unwrap();
    // Cloned once here: the first clone of a value's bytes makes them shared (an allocation),
    // which would otherwise fall in the measured loop, on the cases whose set-up did not
    // clone that key already.
    drop(key.clone());
    key
}

/// A small fast generator, so that large tenant counts are visited in a cache-unfriendly
/// order, as real traffic does.
pub(crate) struct Pick(pub(crate) u64);

impl Pick {
    #[inline]
    pub(crate) fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

pub(crate) fn request(key: &HeaderValue) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    req.headers_mut().insert("x-api-key", key.clone());
    req
}

/// Runs `iters` requests on each of `threads` threads; returns the time per request of all
/// threads together (wall time / (threads × iters)).
pub(crate) fn run<S>(
    svc: &S,
    keys: &Arc<Vec<HeaderValue>>,
    threads: usize,
    iters: u64,
    rt: &tokio::runtime::Handle,
) -> Duration
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
                drive(&mut svc, &keys, t, iters);
            });
        }
    });
    start.elapsed() / threads as u32
}

/// The measured loop of one thread, kept out of line: `scripts/instructions.sh` counts only
/// what runs inside it (`--toggle-collect`), not the set-up.
#[inline(never)]
fn drive<S>(svc: &mut S, keys: &[HeaderValue], thread: usize, iters: u64)
where
    S: Service<Request<Body>>,
{
    let mut pick = Pick(0x9e37_79b9_7f4a_7c15 ^ (thread as u64 + 1));
    for _ in 0..iters {
        let k = &keys[pick.next(keys.len())];
        let _ = black_box(now(svc.call(request(k))));
    }
}

pub(crate) fn tollgate_service(
    tenants: usize,
    headers: &str,
    context: bool,
    rt: &tokio::runtime::Runtime,
) -> tollgate::TollgateService<Bare> {
    tollgate_service_on(tenants, headers, context, false, false, rt)
}

/// When the counted runs happen, by the engine's clock: 2026-03-14 12:00:00 UTC.
const COUNTED_AT: i64 = 1_773_489_600;

/// [`tollgate_service`], with `prepaid`: each tenant's requests spend a prepaid balance (a
/// grant of 10^12 units each) instead of a month quota; with `fleet`: the plan's rate is the
/// fleet's (`rate_scope = "fleet"`, 10^6/s with a burst of 10^6: a lease of cells lives 50 ms,
/// so most requests spend warm cells and a few lease more).
pub(crate) fn tollgate_service_on(
    tenants: usize,
    headers: &str,
    context: bool,
    prepaid: bool,
    fleet: bool,
    rt: &tokio::runtime::Runtime,
) -> tollgate::TollgateService<Bare> {
    tollgate_service_with(tenants, headers, context, prepaid, fleet, "", inner(), rt)
}

/// The meter `tokens` by model and kind (three of each, no quota), for [`recording`].
const TOKENS: &str = r#"
        [meters.tokens]
        dimensions = ["model", "kind"]
        values.model = ["m-small", "m-medium", "m-large"]
        values.kind = ["input", "output", "cached_input"]
        [meters.plain_tokens]
"#;

/// The tollgate case whose handler records 1,234 tokens per request: of the meter
/// `plain_tokens` (no dimensions), or with `dimensions` of `tokens` at two values
/// (`model = m-large`, `kind = output`: its series and its total counted).
pub(crate) fn recording(
    tenants: usize,
    dimensions: bool,
    rt: &tokio::runtime::Runtime,
) -> tollgate::TollgateService<Bare> {
    fn plain(req: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        let ctx = req.extensions().get::<tollgate::TenantContext>().expect("the tenant's context");
        ctx.record("plain_tokens", black_box(1_234)).unwrap();
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    fn dimensioned(req: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        let ctx = req.extensions().get::<tollgate::TenantContext>().expect("the tenant's context");
        let values = tollgate::Dimensions::new().with("model", "m-large").with("kind", "output");
        ctx.record_with("tokens", black_box(1_234), &values).unwrap();
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    let handler: Bare =
        if dimensions { tower::service_fn(dimensioned as fn(_) -> _) } else { tower::service_fn(plain as fn(_) -> _) };
    tollgate_service_with(tenants, "none", true, false, false, TOKENS, handler, rt)
}

#[allow(clippy::too_many_arguments)]
fn tollgate_service_with(
    tenants: usize,
    headers: &str,
    context: bool,
    prepaid: bool,
    fleet: bool,
    meters: &str,
    inner: Bare,
    rt: &tokio::runtime::Runtime,
) -> tollgate::TollgateService<Bare> {
    // TOLLGATE_BENCH_NO_REFILL=1: leases no run exhausts, and no flush or revalidation of the
    // directory during a run, so that only the request path is counted (the same with any
    // store; under valgrind, a million tenants take minutes to set up, and their revalidation
    // by the worker would otherwise run in the measured loop); without it, the counts include
    // the store's share of each request (refills and flushes).
    let quiet = std::env::var_os("TOLLGATE_BENCH_NO_REFILL").is_some_and(|v| v == "1");
    let (lease, flush, ttl, idle) =
        if quiet { (", lease = 1000000000", "30m", "2h", "2h") } else { ("", "10s", "60s", "15m") };
    let config = Config::from_toml_str(&format!(
        r#"
        [limits]
        headers = "{headers}"
        fleet_size_hint = 1
        max_tenants = 2000000
        directory_ttl = "{ttl}"
        idle_timeout = "{idle}"
        [usage]
        flush_interval = "{flush}"
        {meters}
        # A rate no benchmark reaches: every request is admitted (and recorded).
        [plans.bench]
        {rate}
        quotas.requests = {quota}
        "#,
        rate = if fleet {
            "rate = \"1000000/s\"\nburst = 1000000\nrate_scope = \"fleet\""
        } else {
            "rate = \"1000000000/s\""
        },
        quota = if prepaid {
            format!("{{ period = \"prepaid\"{lease} }}")
        } else {
            format!("{{ limit = 1000000000000, period = \"month\", mode = \"hard\"{lease} }}")
        }
    ))
    .unwrap();
    let store = bench_store(rt);
    rt.block_on(async {
        for i in 0..tenants {
            let record = TenantRecord::new(format!("t{i}").into(), "bench".into());
            store.put_tenant(&record, &[KeyHash::of(key(i).as_bytes())]).await.unwrap();
            if prepaid {
                let grant = tollgate::store::CreditGrant::new(
                    format!("t{i}").into(),
                    "requests".into(),
                    "bench",
                    1_000_000_000_000,
                    0,
                );
                store.grant_credits(&grant).await.unwrap();
            }
        }
    });
    // Counted (TOLLGATE_BENCH_NO_REFILL=1), the engine's clock stands still at noon on a
    // 14th: the headers announce the seconds to the month's end, whose digits (and the
    // instructions that write them) would otherwise follow the date the count is made on (the
    // header cases counted 8 to 10% more on the 1st of a month than on its last day). Not the
    // fleet case: its leases of cells must age (it writes no quota header).
    let builder = Tollgate::builder(config).store_arc(store);
    let fixed = quiet && !fleet;
    let builder = if fixed { builder.clock(tollgate::clock::Clock::fake_at_unix(COUNTED_AT).0) } else { builder };
    let (engine, worker) = builder.build();
    let layer = tollgate::TollgateLayer::new(engine);
    if fixed {
        // Counted, no worker runs: its passes every second (holds, stale leases, places,
        // alerts) would run in the measured loop as often as valgrind slows it, so a loaded
        // machine would count more per request. Held, not dropped: the engine keeps its
        // prefetch channel.
        rt.spawn(async move {
            let _worker = worker;
            std::future::pending::<()>().await;
        });
    } else {
        rt.spawn(worker.run());
    }
    let mut svc = layer.tenant_context(context).layer(inner);
    // Warm: every tenant known, every lease reserved.
    rt.block_on(async {
        for i in 0..tenants {
            let r = svc.call(request(&key(i))).await.unwrap();
            assert_eq!(r.status(), 200);
        }
    });
    svc
}

/// The store of the tollgate cases: TOLLGATE_BENCH_STORE=sqlite for a SQLite file in a fresh
/// directory under the target directory's `tmp`, `dynamodb` (feature `dynamodb`) for a fresh
/// table on the server at TOLLGATE_DYNAMODB_ENDPOINT, `postgres` (feature `postgres`) for a
/// fresh schema on the server at TOLLGATE_POSTGRES_URL, memory otherwise.
pub(crate) fn bench_store(rt: &tokio::runtime::Runtime) -> Arc<dyn Store> {
    match std::env::var("TOLLGATE_BENCH_STORE").as_deref() {
        Ok("sqlite") => {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let store = rt.block_on(tollgate::store::SqliteStore::open(dir.path().join("bench.db"))).unwrap();
            // The directory lives as long as the process.
            let _ = dir.keep();
            Arc::new(store)
        }
        #[cfg(feature = "dynamodb")]
        Ok("dynamodb") => {
            // A fresh table on the server at TOLLGATE_DYNAMODB_ENDPOINT (a local one: the
            // standard AWS environment gives region and credentials).
            let endpoint = std::env::var("TOLLGATE_DYNAMODB_ENDPOINT").expect("TOLLGATE_DYNAMODB_ENDPOINT");
            let table = format!("tollgate-bench-{}", std::process::id());
            let store = rt.block_on(tollgate::store::DynamoStore::from_env(table, Some(&endpoint)));
            rt.block_on(store.create_table()).unwrap();
            Arc::new(store)
        }
        #[cfg(feature = "postgres")]
        Ok("postgres") => {
            // A fresh schema on the server at TOLLGATE_POSTGRES_URL.
            let url = std::env::var("TOLLGATE_POSTGRES_URL").expect("TOLLGATE_POSTGRES_URL");
            let options = tollgate::store::PostgresOptions::new(url).schema(format!("bench_{}", std::process::id()));
            Arc::new(rt.block_on(tollgate::store::PostgresStore::open(&options)).unwrap())
        }
        Ok("memory") | Err(_) => Arc::new(MemoryStore::new()),
        Ok(other) => panic!(
            "TOLLGATE_BENCH_STORE={other}: expected memory, sqlite, (feature dynamodb) dynamodb or (feature postgres) \
             postgres"
        ),
    }
}

/// tower_governor keyed on `x-api-key`, without headers, every key warm.
pub(crate) fn governor(
    keys: &[HeaderValue],
) -> impl Service<Request<Body>, Response = Response<Body>, Future: Send> + Clone + Send + 'static {
    let mut b = GovernorConfigBuilder::default();
    b.per_nanosecond(1).burst_size(1_000_000_000);
    warm(GovernorLayer::new(b.key_extractor(ApiKeyHeader).finish().unwrap()).layer(bare()), keys)
}

/// The same with tower_governor's `use_headers()` (`x-ratelimit-*` on every response).
pub(crate) fn governor_headers(
    keys: &[HeaderValue],
) -> impl Service<Request<Body>, Response = Response<Body>, Future: Send> + Clone + Send + 'static {
    let mut b = GovernorConfigBuilder::default();
    b.per_nanosecond(1).burst_size(1_000_000_000);
    // `use_headers` returns a builder of another type: it must be chained.
    let config = b.key_extractor(ApiKeyHeader).use_headers().finish().unwrap();
    warm(GovernorLayer::new(config).layer(bare()), keys)
}

fn warm<S: Service<Request<Body>> + Clone>(svc: S, keys: &[HeaderValue]) -> S {
    let mut warm = svc.clone();
    for k in keys {
        let _ = now(warm.call(request(k)));
    }
    svc
}
