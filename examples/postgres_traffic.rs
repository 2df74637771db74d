//! What tollgate asks of PostgreSQL per million API requests: the measurement of
//! docs/performance.md ("PostgreSQL traffic"). Drives API requests spread over many tenants
//! through the tower layer with a fake clock spread over a run time, flushing at the flush
//! interval and revalidating the directory as the worker would, against a real server, and
//! reads what the server ran from `pg_stat_statements` (statements, by kind: `START` and
//! `COMMIT` open and close a transaction, `SET` its statement timeout). The quota role is wrapped to time each reserve and to
//! count the writes to each counter row per second of the run's clock; each flush is timed.
//!
//! The counts do not depend on the server's speed; the latencies do (loopback, one machine).
//! Run with a server that loads pg_stat_statements (scripts/postgres-server.sh starts one):
//! `TOLLGATE_POSTGRES_URL=postgres://… cargo run --release --features postgres
//!  --example postgres_traffic -- <tenants> <requests> <flush interval, s> <run time, s> [held]`
//!
//! With `held`, each request holds 200 tokens of a hard month quota (`x-max-tokens`) and its
//! handler records 40 of them: the traffic of held requests (docs/performance.md).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tollgate::store::prelude::*;
use tollgate::store::{Grant, KeyHash, PostgresOptions, PostgresStore, QuotaKey, Reservation, StoreError};
use tollgate::{clock::Clock, store::TenantRecord, Config, Tollgate, TollgateLayer};
use tower::Layer;
use traffic::Run;

#[path = "support/traffic.rs"]
mod traffic;

/// The quota role of a store, timed: each reserve's latency, and the writes to each counter
/// row (tenant, meter, period) in each second of the run's clock.
#[derive(Debug)]
struct Timed {
    inner: Arc<PostgresStore>,
    second: Arc<AtomicI64>,
    latencies: Mutex<Vec<Duration>>,
    writes: Mutex<HashMap<(String, i64), u64>>,
}

impl Timed {
    fn wrote(&self, key: &QuotaKey) {
        let row = format!("{}/{}/{}", key.tenant.as_str(), key.meter.as_str(), key.start);
        *self.writes.lock().unwrap().entry((row, self.second.load(Ordering::Relaxed))).or_default() += 1;
    }
}

#[async_trait::async_trait]
impl QuotaStore for Timed {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let started = Instant::now();
        let grant = self.inner.reserve(r).await;
        self.latencies.lock().unwrap().push(started.elapsed());
        self.wrote(&r.key);
        grant
    }

    async fn release(&self, releases: &[tollgate::store::Release]) -> Vec<Result<(), StoreError>> {
        for r in releases {
            self.wrote(&r.key);
        }
        self.inner.release(releases).await
    }

    async fn grant_credits(
        &self,
        grant: &tollgate::store::CreditGrant,
    ) -> Result<tollgate::store::GrantOutcome, StoreError> {
        self.inner.grant_credits(grant).await
    }

    async fn credit_grants(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: Option<&tollgate::config::MeterId>,
    ) -> Result<
        (Vec<tollgate::store::CreditGrant>, Vec<(tollgate::config::MeterId, tollgate::store::CreditBalance)>),
        StoreError,
    > {
        self.inner.credit_grants(tenant, meter).await
    }

    async fn close_credits(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: &tollgate::config::MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<tollgate::store::CreditClosure>, StoreError> {
        self.inner.close_credits(tenant, meter, id, revoke, now).await
    }

    async fn refund_credits(
        &self,
        refund: &tollgate::store::CreditRefund,
    ) -> Result<tollgate::store::RefundOutcome, StoreError> {
        self.inner.refund_credits(refund).await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<tollgate::store::CreditGrant>, StoreError> {
        self.inner.expired_credits(now, limit).await
    }

    async fn values(
        &self,
        call: &tollgate::store::ValueCall,
        mode: tollgate::store::ValueMode,
    ) -> Result<tollgate::store::HeldValues, StoreError> {
        self.inner.values(call, mode).await
    }

    async fn payments(
        &self,
        call: &tollgate::store::PaymentCall,
        now: i64,
    ) -> Result<tollgate::store::PaymentAnswer, StoreError> {
        self.inner.payments(call, now).await
    }

    async fn counters(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: &tollgate::config::MeterId,
    ) -> Result<Vec<tollgate::store::QuotaCounter>, StoreError> {
        self.inner.counters(tenant, meter).await
    }
}

/// The `q` quantile of `samples` (sorted here), in microseconds.
fn quantile(samples: &mut [Duration], q: f64) -> u128 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort();
    let at = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[at].as_micros()
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let held = std::env::args().nth(5).as_deref() == Some("held");
    let args: Vec<u64> = args.into_iter().take(4).collect();
    let (tenants, requests, flush, run) = match args[..] {
        [t, r, f, s] => (t, r, f, s),
        _ => (1000, 1_000_000, 10, 600),
    };
    let url = std::env::var("TOLLGATE_POSTGRES_URL").expect("TOLLGATE_POSTGRES_URL");
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("the server");
    tokio::spawn(connection);
    let schema = format!("traffic_{}", std::process::id());
    let store = Arc::new(PostgresStore::open(&PostgresOptions::new(url.clone()).schema(schema.clone())).await.unwrap());
    for i in 0..tenants {
        let record = TenantRecord::new(format!("t{i}").into(), "metered".into());
        store.put_tenant(&record, &[KeyHash::of(format!("key-{i}").as_bytes())]).await.unwrap();
    }
    let quota = Arc::new(Timed {
        inner: store.clone(),
        second: Arc::new(AtomicI64::new(0)),
        latencies: Mutex::new(Vec::new()),
        writes: Mutex::new(HashMap::new()),
    });

    let config = Config::from_toml_str(&format!(
        "[usage]\nflush_interval = \"{flush}s\"\nwindow = \"1h\"\nstore_timeout = \"60s\"\n[limits]\nheaders = \"none\"\n\
         [plans.metered]\nrate = \"1000000/s\"\n\
         quotas.requests = {{ limit = 100000000, period = \"month\", mode = \"hard\" }}\n{}",
        if held {
            "quotas.tokens = { limit = 100000000, period = \"month\", mode = \"hard\" }\n[meters.tokens]\n\
             [[routes]]\npath = \"/complete\"\nreports = [\"tokens\"]\n\
             hold.tokens = { header = \"x-max-tokens\", default = 200, max = 1000 }\n"
        } else {
            ""
        }
    ))
    .unwrap();
    let start = 1_773_489_600; // 2026-03-14T12:00:00Z
    let (clock, fake) = Clock::fake_at_unix(start);
    let (engine, _worker) =
        Tollgate::builder(config).store_arc(store.clone()).quota_store(quota.clone()).clock(clock).build();
    let layer = TollgateLayer::new(engine.clone());
    let svc = layer.layer(tower::service_fn(|req: http::Request<axum::body::Body>| async move {
        if let Some(ctx) = req.extensions().get::<tollgate::TenantContext>() {
            if req.uri().path() == "/complete" {
                ctx.record("tokens", 40).expect("within the hold");
            }
        }
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    }));
    // What the server ran from here on (the setup's statements are not counted).
    let has_statements = admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()")
        .await
        .is_ok();
    if !has_statements {
        eprintln!("pg_stat_statements is not loaded (shared_preload_libraries): statements are not counted");
    }

    let path = if held { "/complete" } else { "/" };
    let second = |elapsed: u64| quota.second.store(elapsed as i64, Ordering::Relaxed);
    let mut flushes = Run { tenants, requests, flush, run }.drive(&engine, svc, &fake, path, second).await;
    engine.shutdown().await.unwrap();

    let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
    if has_statements {
        for row in admin
            .query(
                "SELECT split_part(ltrim(query), ' ', 1), sum(calls)::bigint FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND query NOT LIKE '%pg_stat%' GROUP BY 1",
                &[],
            )
            .await
            .unwrap()
        {
            *by_kind.entry(row.get::<_, String>(0).to_uppercase()).or_default() += row.get::<_, i64>(1);
        }
    }
    let statements: i64 = by_kind.values().sum();
    println!(
        "{requests} API requests over {tenants} tenants, {run} s, flush every {flush} s: {statements} statements \
         ({:.1} per million API requests)",
        statements as f64 * 1e6 / requests as f64
    );
    for (kind, n) in &by_kind {
        println!("  {kind:<10} {n}");
    }
    let mut latencies = quota.latencies.lock().unwrap().clone();
    println!(
        "reserve: {} calls, p50 {} µs, p99 {} µs; flush: {} calls, p50 {} µs, p99 {} µs",
        latencies.len(),
        quantile(&mut latencies, 0.5),
        quantile(&mut latencies, 0.99),
        flushes.len(),
        quantile(&mut flushes, 0.5),
        quantile(&mut flushes, 0.99)
    );
    let writes = quota.writes.lock().unwrap().clone();
    let mut rows: HashMap<&str, (u64, u64)> = HashMap::new();
    for ((row, _), n) in writes.iter() {
        let e = rows.entry(row.as_str()).or_default();
        e.0 += n;
        e.1 = e.1.max(*n);
    }
    if let Some((row, (total, peak))) = rows.iter().max_by_key(|(_, (_, peak))| *peak) {
        println!(
            "busiest row (quota {row}): {total} writes in {run} s, at most {peak} in one second ({:.2}/s on average)",
            *total as f64 / run as f64
        );
    }
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
