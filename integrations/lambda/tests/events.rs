//! Usage events from SQS and EventBridge: real payloads (the `aws_lambda_events` examples,
//! with usage events in their bodies) parsed by `lambda_runtime`'s event types and handled
//! by `tollgate_lambda::sqs_handler` and `eventbridge_handler`, over SQLite on a real file.
#![allow(missing_docs)]

use std::{sync::Arc, time::Duration};

use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};
use tollgate::{clock::Clock, store::Store, Config, Tollgate};
use tower::ServiceExt;

/// 2026-03-14T12:00:00Z.
const NOON: i64 = 1_773_489_600;

const TOML: &str = r#"
[usage]
store_timeout = "300ms"
[meters.tokens]
[plans.p]
quotas.tokens = { limit = 100, period = "day", mode = "hard" }
[tenants."sub|1234"]
plan = "p"
[events]
store_timeout = "300ms"
[events.products]
"example-billing-event" = "tokens"
"#;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn usage(quantity: i64, at_ms: i64, extra: Value) -> Value {
    let mut v = json!({
        "TenantID": "sub|1234", "ProductCode": "example-billing-event", "Quantity": quantity, "Timestamp": at_ms
    });
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

/// The SQS example event with one record per (messageId, body).
fn sqs_batch(messages: &[(&str, String)]) -> aws_lambda_events::sqs::SqsEvent {
    let mut event = fixture("example-sqs-event.json");
    let template = event["Records"][0].clone();
    let records: Vec<Value> = messages
        .iter()
        .map(|(id, body)| {
            let mut r = template.clone();
            r["messageId"] = json!(id);
            r["body"] = json!(body);
            r
        })
        .collect();
    event["Records"] = json!(records);
    serde_json::from_value(event).unwrap()
}

async fn engine(dir: &tempfile::TempDir) -> (Tollgate, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap());
    let (clock, _) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(TOML).unwrap();
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).clock(clock).build();
    (engine, store)
}

async fn tokens(store: &dyn Store) -> u64 {
    let all = store.usage_range(&"sub|1234".into(), NOON - 40 * 86_400, NOON + 86_400).await.unwrap();
    all.iter().filter(|a| a.key.meter.as_str() == "tokens").map(|a| a.quantity).sum()
}

async fn send(engine: &Tollgate, batch: aws_lambda_events::sqs::SqsEvent) -> Vec<String> {
    let handler = tollgate_lambda::sqs_handler(engine.clone());
    let answer = handler.oneshot(LambdaEvent::new(batch, Context::default())).await.unwrap();
    // What Lambda reads back: the documented JSON of a partial batch response.
    let wire = serde_json::to_value(&answer).unwrap();
    wire["batchItemFailures"].as_array().unwrap().iter().map(|f| f["itemIdentifier"].as_str().unwrap().into()).collect()
}

/// A batch with good, redelivered, malformed, refused and not-yet-recordable messages: only
/// messages that could succeed later are reported as failures (so the queue redelivers them or
/// moves them to its dead-letter queue: a time ahead of the clock, an unmapped product code);
/// work past the hard quota is recorded and billed; the rest is acknowledged, and the good
/// ones are counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqs_batch_reports_only_what_a_redelivery_can_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = engine(&dir).await;
    let now_ms = NOON * 1000;
    let batch = sqs_batch(&[
        ("m1", usage(5, now_ms, json!({})).to_string()),
        // The example body of the issue, with its own id: recorded under that id.
        ("m2", usage(7, now_ms - 60_000, json!({"EventID": "evt-7"})).to_string()),
        // m1 redelivered (same messageId).
        ("m1", usage(5, now_ms, json!({})).to_string()),
        ("m3", "Message Body".to_owned()),
        ("m4", usage(1, now_ms - 40 * 86_400_000, json!({})).to_string()),
        ("m5", usage(1, now_ms + 3_600_000, json!({})).to_string()),
        ("m6", usage(1, now_ms, json!({"ProductCode": "unmapped"})).to_string()),
        ("m7", usage(1000, now_ms, json!({})).to_string()),
    ]);
    assert_eq!(send(&engine, batch).await, ["m5", "m6"], "redelivered: not dropped");
    assert_eq!(tokens(&*store).await, 1012, "the work past the daily quota of 100 is billed");
    let stats = engine.stats();
    assert_eq!((stats.events_applied, stats.events_duplicate, stats.events_refused), (3, 1, 4));
    assert_eq!(stats.events_past_limit, 1);
    // The same event delivered again by another message: its EventID wins.
    let again = sqs_batch(&[("m9", usage(7, now_ms - 60_000, json!({"EventID": "evt-7"})).to_string())]);
    assert!(send(&engine, again).await.is_empty());
    assert_eq!(tokens(&*store).await, 1012);
}

/// The store cannot write (another process holds the database's write lock past
/// `events.store_timeout`): the good messages are reported for redelivery, the malformed one
/// is not; once the store writes again, the redelivered messages are counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_store_could_not_write_are_redelivered_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = engine(&dir).await;
    let now_ms = NOON * 1000;
    let messages = [
        ("m1", usage(5, now_ms, json!({})).to_string()),
        ("m2", "{".to_owned()),
        ("m3", usage(2, now_ms - 3_600_000, json!({})).to_string()),
    ];
    let locker = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let failed = send(&engine, sqs_batch(&messages)).await;
    assert_eq!(failed, ["m1", "m3"]);
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    // The writes given up on may still land once the lock is gone: wait for the blocked
    // write to finish, then redeliver what was reported.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redelivered: Vec<(&str, String)> =
        messages.iter().filter(|(id, _)| failed.contains(&id.to_string())).cloned().collect();
    let mut left = send(&engine, sqs_batch(&redelivered)).await;
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        left = send(&engine, sqs_batch(&redelivered)).await;
    }
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(tokens(&*store).await, 7, "each message counted once");
}

/// An EventBridge event whose `detail` is a usage event: recorded under its `id`, once; a
/// malformed one answered as refused (no retry), not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventbridge_events_are_recorded_once_by_their_id() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = engine(&dir).await;
    let mut event = fixture("example-eventbridge-event-obj.json");
    event["detail-type"] = json!("usage");
    event["detail"] = usage(4, NOON * 1000, json!({}));
    let parsed: aws_lambda_events::eventbridge::EventBridgeEvent = serde_json::from_value(event.clone()).unwrap();
    let handler = tollgate_lambda::eventbridge_handler(engine.clone());
    let call = |e: aws_lambda_events::eventbridge::EventBridgeEvent| {
        handler.clone().oneshot(LambdaEvent::new(e, Context::default()))
    };
    assert_eq!(call(parsed.clone()).await.unwrap(), json!({"outcome": "applied"}));
    assert_eq!(call(parsed).await.unwrap(), json!({"outcome": "duplicate"}));
    event["detail"] = json!({"instance-id": "i-abcd1111", "state": "pending"});
    event["id"] = json!("another");
    let answer = call(serde_json::from_value(event).unwrap()).await.unwrap();
    assert_eq!(answer["outcome"], "refused");
    assert_eq!(answer["reason"], "invalid");
    assert_eq!(tokens(&*store).await, 4);
}
