//! How many DynamoDB requests tollgate makes per million API requests: the measurement of
//! docs/performance.md. Drives API requests spread over many tenants through the tower layer
//! with a fake clock spread over a run time, flushing at the flush interval and revalidating
//! the directory as the worker would, against a DynamoDB-compatible server, and counts every
//! request the SDK sends, by operation.
//!
//! moto's TransactWriteItems copies its whole table on every call, so against moto a flush of
//! 1,000 tenants takes seconds per transaction as the table grows: use a small run there (100
//! tenants), or DynamoDB itself (DynamoDB Local) for the full one. The counts do not depend on
//! the server's speed. Run with a local server (scripts/moto-server.py) and:
//! `TOLLGATE_DYNAMODB_ENDPOINT=http://127.0.0.1:PORT cargo run --release --features dynamodb
//!  --example dynamodb_traffic -- <tenants> <requests> <flush interval, s> <run time, s>`

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex,
    },
};

use tollgate::store::prelude::*;
use tollgate::store::KeyHash;
use tollgate::{
    aws_sdk_dynamodb::{
        config::{
            interceptors::BeforeTransmitInterceptorContextRef, BehaviorVersion, ConfigBag, Credentials, Intercept,
            Region, RuntimeComponents,
        },
        Client, Config as SdkConfig,
    },
    clock::Clock,
    store::{DynamoStore, TenantRecord},
    Config, Tollgate, TollgateLayer,
};
use tower::Layer;
use traffic::Run;

#[path = "support/traffic.rs"]
mod traffic;

/// Counts the requests the SDK sends, by operation (`X-Amz-Target`), and the writes to each
/// item (by partition key) in each second of the run's clock.
#[derive(Debug, Clone, Default)]
struct Count(Arc<Mutex<BTreeMap<String, u64>>>, Arc<Mutex<HashMap<(String, i64), u64>>>, Arc<AtomicI64>);

/// The partition keys a write request touches (one per action of a transaction).
fn written_keys(op: &str, body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return Vec::new() };
    let pk = |item: &serde_json::Value| item["pk"]["S"].as_str().map(str::to_owned);
    match op {
        "PutItem" => pk(&v["Item"]).into_iter().collect(),
        "UpdateItem" | "DeleteItem" => pk(&v["Key"]).into_iter().collect(),
        "TransactWriteItems" => v["TransactItems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                pk(&a["Put"]["Item"]).or_else(|| pk(&a["Update"]["Key"])).or_else(|| pk(&a["Delete"]["Key"]))
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl Intercept for Count {
    fn name(&self) -> &'static str {
        "count"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let op = context.request().headers().get("x-amz-target").unwrap_or("?");
        let op = op.rsplit('.').next().unwrap_or(op).to_owned();
        let second = self.2.load(Ordering::Relaxed);
        if let Some(body) = context.request().body().bytes() {
            let mut per_item = self.1.lock().unwrap();
            for pk in written_keys(&op, body) {
                *per_item.entry((pk, second)).or_default() += 1;
            }
        }
        *self.0.lock().unwrap().entry(op).or_default() += 1;
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let (tenants, requests, flush, run) = match args[..] {
        [t, r, f, s] => (t, r, f, s),
        _ => (1000, 1_000_000, 10, 600),
    };
    let endpoint = std::env::var("TOLLGATE_DYNAMODB_ENDPOINT").expect("TOLLGATE_DYNAMODB_ENDPOINT");
    let count = Count::default();
    let sdk = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "traffic"))
        .interceptor(count.clone())
        .build();
    let table = format!("traffic-{}", std::process::id());
    let store = DynamoStore::new(Client::from_conf(sdk), &table);
    store.create_table().await.unwrap();
    for i in 0..tenants {
        let record = TenantRecord::new(format!("t{i}").into(), "metered".into());
        store.put_tenant(&record, &[KeyHash::of(format!("key-{i}").as_bytes())]).await.unwrap();
    }
    count.0.lock().unwrap().clear();
    count.1.lock().unwrap().clear();

    let config = Config::from_toml_str(&format!(
        "[usage]\nflush_interval = \"{flush}s\"\nwindow = \"1h\"\nstore_timeout = \"60s\"\n[limits]\nheaders = \"none\"\n\
         [plans.metered]\nrate = \"1000000/s\"\n\
         quotas.requests = {{ limit = 100000000, period = \"month\", mode = \"hard\" }}\n"
    ))
    .unwrap();
    let start = 1_773_489_600; // 2026-03-14T12:00:00Z
    let (clock, fake) = Clock::fake_at_unix(start);
    let (engine, _worker) = Tollgate::builder(config).store(store).clock(clock).build();
    let layer = TollgateLayer::new(engine.clone());
    let svc = layer.layer(tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    }));
    let second = |elapsed: u64| count.2.store(elapsed as i64, Ordering::Relaxed);
    Run { tenants, requests, flush, run }.drive(&engine, svc, &fake, "/", second).await;
    engine.shutdown().await.unwrap();
    let counts = count.0.lock().unwrap().clone();
    let total: u64 = counts.values().sum();
    println!(
        "{requests} API requests over {tenants} tenants, {run} s, flush every {flush} s: {total} DynamoDB requests \
         ({:.1} per million API requests)",
        total as f64 * 1e6 / requests as f64
    );
    for (op, n) in counts {
        println!("  {op:<20} {n}");
    }
    // The busiest item: DynamoDB takes about 1,000 writes per second on one item.
    let per_item = count.1.lock().unwrap();
    let mut items: HashMap<&str, (u64, u64)> = HashMap::new();
    for ((pk, _), n) in per_item.iter() {
        let e = items.entry(pk.as_str()).or_default();
        e.0 += n;
        e.1 = e.1.max(*n);
    }
    if let Some((pk, (total, peak))) = items.iter().max_by_key(|(_, (_, peak))| *peak) {
        println!(
            "busiest item {}: {total} writes in {run} s, at most {peak} in one second ({:.2}/s on average)",
            pk.replace('\u{1}', "␁"),
            *total as f64 / run as f64
        );
    }
}
