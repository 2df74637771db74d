//! Open dimensions (`max_values`): a dimension whose values are not all listed, each value a
//! series of its own, at most `max_values` of them per tenant and month across the fleet, a
//! value past them refused (400) or counted under `other` as the configuration says, and
//! memory bounded whatever a client sends. Through the public API.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use crate::common;

use common::money::admit;
use common::{Harness, NOON};
use tollgate::{config::DimensionError, store::QuotaStoreExt as _, Dimensions, RecordError, RejectionKind};

/// Tokens by model (open: `m-large` listed, 3 other values a tenant a month) and kind.
const OPEN: &str = r#"
[billing]
currency = "usd"
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-large"]
max_values.model = 3
values.kind = ["input", "output"]
[meters.tokens.prices]
default = "0.000001"
[meters.tokens.prices.m-large]
default = "0.00001"
[plans.p]
spend = { limit = "100.00", period = "month", mode = "soft" }
quotas.tokens = { limit = 100000000, period = "day" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[[routes]]
path = "/tokens/{n}"
reports = ["tokens"]
hold.tokens = { header = "x-max-tokens", default = 100, max = 5000 }
hold_values = { model = { header = "x-model" }, kind = "output" }
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.u]
plan = "p"
keys = ["key-u"]
"#;

fn series<'a>(model: &'a str, kind: &'a str) -> Dimensions<'a> {
    Dimensions::new().with("model", model).with("kind", kind)
}

/// Everything tenant `tenant` committed, by series id.
async fn committed(h: &Harness, tenant: &str) -> BTreeMap<String, u64> {
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store();
    let all = store.usage_range(&tenant.into(), NOON - 40 * 86_400, NOON + 40 * 86_400).await.unwrap();
    let mut out = BTreeMap::new();
    for a in all {
        *out.entry(a.key.meter.to_string()).or_default() += a.quantity;
    }
    out
}

/// Values not listed count each as a series of its own, priced at the open position's price
/// (`default`), limited in the meter's total; a listed value keeps its own series and price.
#[tokio::test]
async fn unlisted_values_are_series_of_their_own_priced_by_default() {
    let h = Harness::new(OPEN);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 100, &series("m-a", "output")).unwrap();
    ctx.record_with("tokens", 30, &series("m-b", "input")).unwrap();
    ctx.record_with("tokens", 7, &series("m-a", "output")).unwrap();
    ctx.record_with("tokens", 5, &series("m-large", "output")).unwrap();
    assert!(ticket.complete(200));
    let got = committed(&h, "t").await;
    assert_eq!(got.get("tokens{model=m-a,kind=output}"), Some(&107), "{got:?}");
    assert_eq!(got.get("tokens{model=m-b,kind=input}"), Some(&30), "{got:?}");
    assert_eq!(got.get("tokens{model=m-large,kind=output}"), Some(&5), "{got:?}");
    assert!(got.keys().all(|k| !k.contains('*')), "the open position records nothing of its own: {got:?}");
    assert_eq!(got.get("tokens"), None, "the total records nothing of its own");
    // 137 tokens at 0.000001 and 5 at 0.00001: 0.000187, in nano-units, rounded once.
    assert_eq!(got.get("spend"), Some(&187_000), "{got:?}");
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let total = report.quotas.iter().find(|q| q.meter.as_str() == "tokens").unwrap();
    assert_eq!(total.used, 142, "the total counts every value");
    let used = |m: &str| report.usage.iter().filter(|w| w.meter.as_str() == m).map(|w| w.quantity).sum::<u64>();
    assert_eq!(used("tokens{model=m-a,kind=output}"), 107, "the report lists each value's series");
    // The tenant's usage route: each value's series with its meter and values.
    let request = http::Request::builder().uri("/v1/usage").header("x-api-key", "key-t").body(()).unwrap();
    let response = h.tollgate.tenant_usage(&request).await;
    assert_eq!(response.status(), 200);
    common::check_usage_schema(&[response.body().clone()]);
    let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    let item = body["usage"].as_array().unwrap().iter().find(|u| u["meter"] == "tokens{model=m-a,kind=output}");
    let item = item.unwrap_or_else(|| panic!("{body}"));
    assert_eq!(item["of"], "tokens");
    assert_eq!(item["dimensions"], serde_json::json!({ "model": "m-a", "kind": "output" }));
    assert_eq!(item["current"], 107);
    let total = body["quotas"].as_array().unwrap().iter().find(|q| q["meter"] == "tokens").unwrap();
    assert_eq!(total["used"], 142);
}

/// Exported: one event per (tenant, value's series, window), its values as the event's
/// dimensions; `other` too.
#[tokio::test]
async fn each_value_is_exported_as_a_series_with_its_dimensions() {
    use tollgate::{billing::JsonlSink, clock::Clock, Config, Tollgate};
    let toml = OPEN.replace(
        "values.kind = [\"input\", \"output\"]",
        "values.kind = [\"input\", \"output\"]\non_unknown = \"other\"",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.jsonl");
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap())
        .clock(clock)
        .billing_sink(JsonlSink::new(&path))
        .build();
    let info = tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-t"));
    let ticket = common::admitted_ticket(&engine, &info).await;
    for (m, n) in [("m-a", 3), ("m-b", 4), ("m-c", 5), ("m-d", 6), ("m-a", 1)] {
        ticket.context().record_with("tokens", n, &series(m, "output")).unwrap();
    }
    assert!(ticket.complete(200));
    fake.advance(Duration::from_secs(3 * 3600));
    engine.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |model: &str| {
        let id = format!("tokens{{model={model},kind=output}}");
        let found: Vec<_> = lines.iter().filter(|l| l["meter"] == id.as_str()).collect();
        assert_eq!(found.len(), 1, "{id} once: {text}");
        found[0].clone()
    };
    assert_eq!(of("m-a")["value"], 4);
    assert_eq!(of("m-a")["dimensions"], serde_json::json!({ "model": "m-a", "kind": "output" }));
    assert_eq!(of("m-a")["event_name"], "tokens");
    assert_eq!(of("other")["value"], 6, "m-d, the 4th value");
    assert!(lines.iter().all(|l| !l["meter"].as_str().unwrap_or("").contains('*')), "{text}");
}

/// The 4th value new to a tenant this month (3 may be used) is refused, 400, nothing counted;
/// a listed value, a value already used and another tenant's values are served. Under
/// `on_unknown = "other"`, it counts under `other` instead.
#[tokio::test]
async fn a_value_past_max_values_is_answered_as_configured() {
    let h = Harness::new(OPEN);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    for m in ["m-a", "m-b", "m-c"] {
        ctx.record_with("tokens", 10, &series(m, "input")).unwrap();
    }
    let e = ctx.record_with("tokens", 10, &series("m-d", "input")).unwrap_err();
    assert_eq!(
        e,
        RecordError::Dimension(DimensionError::TooManyValues {
            dimension: "model".into(),
            value: "m-d".into(),
            max: 3
        })
    );
    let r = ctx.refusal("tokens", &e).expect("a 400 to answer");
    assert_eq!((r.kind(), r.status().as_u16()), (RejectionKind::InvalidDimension, 400));
    assert!(r.to_string().contains("max_values"), "{r}");
    let hold = ctx.hold_in("tokens", &series("m-e", "output"), 10).await.unwrap_err();
    assert_eq!(hold.kind(), RejectionKind::InvalidDimension);
    ctx.record_with("tokens", 1, &series("m-large", "input")).unwrap();
    ctx.record_with("tokens", 1, &series("m-c", "output")).unwrap();
    assert!(ticket.complete(200));
    // A route holding the model a header names: the 4th value refused before anything is
    // taken, as problem+json.
    let send = |model: &'static str| {
        let mut r = common::req("POST", "/tokens/20", Some("key-t"), None);
        r.headers_mut().insert("x-max-tokens", 50u64.into());
        r.headers_mut().insert("x-model", http::HeaderValue::from_static(model));
        h.send(r)
    };
    let refused = send("m-z").await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.rejection.as_ref().map(|r| r.kind()), Some(RejectionKind::InvalidDimension));
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert_eq!(send("m-b").await.status, 200, "a value used this month");
    // Another tenant has its own three.
    let (ticket, ctx) = admit(&h, "key-u").await.unwrap();
    for m in ["m-x", "m-y", "m-z"] {
        ctx.record_with("tokens", 1, &series(m, "input")).unwrap();
    }
    assert!(ticket.complete(200));
    let got = committed(&h, "t").await;
    assert_eq!(got.get("tokens{model=m-b,kind=output}"), Some(&20), "the route's 20 under its value: {got:?}");
    assert!(got.keys().all(|k| !k.contains("m-d") && !k.contains("m-e") && !k.contains("m-z")), "{got:?}");
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let total = report.quotas.iter().find(|q| q.meter.as_str() == "tokens").unwrap();
    assert_eq!(total.used, 30 + 2 + 20, "nothing of the refused values: {:?}", report.quotas);
    let u = committed(&h, "u").await;
    assert_eq!(u.keys().filter(|k| k.starts_with("tokens{")).count(), 3, "u's three values: {u:?}");

    let other = OPEN.replace(
        "values.kind = [\"input\", \"output\"]",
        "values.kind = [\"input\", \"output\"]\non_unknown = \"other\"",
    );
    let h = Harness::new(&other);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    for m in ["m-a", "m-b", "m-c", "m-d", "m-e"] {
        ctx.record_with("tokens", 10, &series(m, "input")).unwrap();
    }
    ctx.record_with("tokens", 4, &Dimensions::new().with("kind", "input")).unwrap();
    assert!(ticket.complete(200));
    let got = committed(&h, "t").await;
    assert_eq!(got.get("tokens{model=other,kind=input}"), Some(&24), "m-d, m-e and the missing model: {got:?}");
    assert_eq!(got.keys().filter(|k| k.starts_with("tokens{")).count(), 4, "three values and other: {got:?}");
}

/// A client sends 1,000,000 distinct values: the node keeps at most the tenant's 3 (`Stats`),
/// claims them in the store a few times, commits at most 3 series and `other`, and loses no
/// unit.
#[tokio::test]
async fn a_million_distinct_values_keep_memory_and_series_bounded() {
    let toml = OPEN.replace(
        "values.kind = [\"input\", \"output\"]",
        "values.kind = [\"input\", \"output\"]\non_unknown = \"other\"",
    );
    let memory: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let faulty = Arc::new(common::Faulty::over(memory));
    let h = Harness::with_store(&toml, faulty.clone(), NOON);
    let mut sent = 0u64;
    for batch in 0..100 {
        let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
        for i in 0..10_000u64 {
            let value = format!("m-{batch}-{i}");
            ctx.record_with("tokens", 1, &series(&value, "output")).unwrap();
            sent += 1;
        }
        assert!(ticket.complete(200));
        assert!(h.tollgate.stats().open_values <= 3, "{}", h.tollgate.stats().open_values);
        if batch % 10 == 0 {
            h.tollgate.flush().await.unwrap();
        }
    }
    let got = committed(&h, "t").await;
    let tokens: Vec<_> = got.iter().filter(|(k, _)| k.starts_with("tokens{")).collect();
    assert!(tokens.len() <= 4, "at most 3 values and `other`: {tokens:?}");
    assert_eq!(tokens.iter().map(|(_, q)| **q).sum::<u64>(), sent, "every unit billed");
    assert!(faulty.value_calls.load(Ordering::SeqCst) <= 11, "one claim per flush at most");
    assert!(h.tollgate.stats().open_values <= 3);
}

/// Four engines on one store record 30 overlapping values each for one tenant: the tenant's
/// row ends at its cap exactly, the values it refused are billed under `other`, and every
/// unit is billed once. (The nodes each admit the cap at most before their flush claims.)
async fn four_engines_race_for_a_tenants_values(store: Arc<dyn tollgate::store::StoreInspect>) {
    let toml = OPEN.replace("max_values.model = 3", "max_values.model = 50");
    let whole: Arc<dyn tollgate::store::Store> = store.clone();
    let nodes: Vec<Harness> = (0..4).map(|_| Harness::with_store(&toml, whole.clone(), NOON)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, h) in nodes.iter().enumerate() {
        let engine = h.tollgate.clone();
        tasks.spawn(async move {
            let info =
                tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-t"));
            let ticket = common::admitted_ticket(&engine, &info).await;
            let mut recorded = 0u64;
            for i in 0..30u64 {
                let value = format!("m-{}", n as u64 * 10 + i);
                ticket.context().record_with("tokens", 1 + i, &series(&value, "output")).unwrap();
                recorded += 1 + i;
            }
            assert!(ticket.complete(200));
            engine.flush().await.unwrap();
            recorded
        });
    }
    let mut sent = 0;
    while let Some(r) = tasks.join_next().await {
        sent += r.unwrap();
    }
    let row = store
        .read_values(&tollgate::store::ValueCall::new("t".into(), "tokens".into(), "model", 1_772_323_200, 50, 0))
        .await
        .unwrap();
    assert_eq!(row.values.len(), 50, "the cap exactly: {row:?}");
    let all = store.usage_range(&"t".into(), NOON - 86_400, NOON + 86_400).await.unwrap();
    let mut billed = 0;
    for a in all.iter().filter(|a| a.key.meter.as_str().starts_with("tokens{")) {
        let id = a.key.meter.as_str();
        let value = id.trim_start_matches("tokens{model=").split(',').next().unwrap();
        assert!(value == "other" || row.holds(value), "{id} billed, not in the row");
        billed += a.quantity;
    }
    assert_eq!(billed, sent, "every unit billed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_race_for_a_tenants_values() {
    four_engines_race_for_a_tenants_values(Arc::new(tollgate::store::MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_sqlite_file_race_for_a_tenants_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate::store::SqliteStore::open(dir.path().join("values.db")).await.unwrap();
    four_engines_race_for_a_tenants_values(Arc::new(store)).await;
}

/// The quota role's store is down: a new value is counted and waits for its claim; back
/// within a minute, it is claimed and billed under itself; down past a minute, its units are
/// billed under `other`, never lost.
#[tokio::test]
async fn a_value_waiting_for_its_claim_is_billed_under_other_past_a_minute() {
    let memory: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let faulty = Arc::new(common::Faulty::over(memory));
    let h = Harness::with_store(OPEN, faulty.clone(), NOON);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 9, &series("m-a", "output")).unwrap();
    assert!(ticket.complete(200));
    faulty.down.store(true, Ordering::SeqCst);
    let _quota_down = h.tollgate.flush().await;
    faulty.down.store(false, Ordering::SeqCst);
    assert_eq!(committed(&h, "t").await.get("tokens{model=m-a,kind=output}"), Some(&9), "claimed once back");
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 4, &series("m-b", "output")).unwrap();
    assert!(ticket.complete(200));
    faulty.down.store(true, Ordering::SeqCst);
    let _quota_down = h.tollgate.flush().await;
    h.clock.advance(Duration::from_secs(61));
    let _quota_down = h.tollgate.flush().await;
    faulty.down.store(false, Ordering::SeqCst);
    let got = committed(&h, "t").await;
    assert_eq!(got.get("tokens{model=other,kind=output}"), Some(&4), "{got:?}");
    assert_eq!(got.get("tokens{model=m-b,kind=output}"), None, "{got:?}");
}

/// A new month frees the tenant's values: the 4th value refused in March is served in April.
#[tokio::test]
async fn a_new_month_frees_a_tenants_values() {
    let h = Harness::new(OPEN);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    for m in ["m-a", "m-b", "m-c"] {
        ctx.record_with("tokens", 1, &series(m, "input")).unwrap();
    }
    assert!(ctx.record_with("tokens", 1, &series("m-d", "input")).is_err());
    assert!(ticket.complete(200));
    h.tollgate.flush().await.unwrap();
    // March 14th noon to April 1st.
    h.clock.advance(Duration::from_secs((1_775_001_600 - NOON + 60) as u64));
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 1, &series("m-d", "input")).unwrap();
    assert!(ctx.record_with("tokens", 1, &series("m-e", "input")).is_ok());
    assert!(ctx.record_with("tokens", 1, &series("m-f", "input")).is_ok());
    assert!(ctx.record_with("tokens", 1, &series("m-g", "input")).is_err(), "April's three");
    assert!(ticket.complete(200));
}

/// A hold on a value outlives the claim that refused it (another node took the tenant's last
/// place first): what it records is billed under `other`, never as a series past the cap, and
/// recorded once.
#[tokio::test]
async fn a_hold_outliving_its_values_refused_claim_bills_under_other() {
    let toml = OPEN.replace("max_values.model = 3", "max_values.model = 1");
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let whole: Arc<dyn tollgate::store::Store> = store.clone();
    let (a, b) = (Harness::with_store(&toml, whole.clone(), NOON), Harness::with_store(&toml, whole, NOON));
    // Node B holds m-b (new to it); node A records m-a and claims the tenant's one place.
    let (ticket_b, ctx_b) = admit(&b, "key-t").await.unwrap();
    let mut hold = ctx_b.hold_in("tokens", &series("m-b", "output"), 50).await.unwrap();
    hold.record(5).unwrap();
    let (ticket_a, ctx_a) = admit(&a, "key-t").await.unwrap();
    ctx_a.record_with("tokens", 7, &series("m-a", "output")).unwrap();
    assert!(ticket_a.complete(200));
    a.tollgate.flush().await.unwrap();
    // B's claim of m-b is refused; its hold records on, then settles.
    b.tollgate.flush().await.unwrap();
    hold.record(20).unwrap();
    // A record of m-b beside the hold is a new value past the cap: refused, nothing counted.
    let e = ctx_b.record_with("tokens", 3, &series("m-b", "output")).unwrap_err();
    assert!(matches!(e, RecordError::Dimension(DimensionError::TooManyValues { .. })), "{e}");
    hold.settle();
    assert!(ticket_b.complete(200));
    let got = committed(&b, "t").await;
    let tokens: BTreeMap<_, _> = got.iter().filter(|(k, _)| k.starts_with("tokens{")).collect();
    assert_eq!(tokens.get(&"tokens{model=m-a,kind=output}".to_owned()), Some(&&7), "{tokens:?}");
    assert_eq!(tokens.get(&"tokens{model=other,kind=output}".to_owned()), Some(&&25), "{tokens:?}");
    assert_eq!(tokens.len(), 2, "no series of m-b: {tokens:?}");
}

/// The series of the values not listed has no value to count under: recorded or held by its
/// id, it is refused, nothing counted (never spend without usage).
#[tokio::test]
async fn the_open_position_is_no_series_to_record() {
    let h = Harness::new(OPEN);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let e = ctx.record("tokens{model=*,kind=output}", 5).unwrap_err();
    assert!(matches!(e, RecordError::Dimension(DimensionError::Invalid(_))), "{e}");
    let r = ctx.hold("tokens{model=*,kind=output}", 5).await.unwrap_err();
    assert_eq!(r.kind(), RejectionKind::InvalidDimension);
    let e = ctx.record_with("tokens", 5, &series("*", "output")).unwrap_err();
    assert!(matches!(e, RecordError::Dimension(DimensionError::UnknownValue { .. })), "{e}");
    assert!(ticket.complete(200));
    let got = committed(&h, "t").await;
    assert!(got.keys().all(|k| !k.starts_with("tokens") && k != "spend"), "{got:?}");
}

/// Usage of open values not flushed yet is in the usage report: the total's `used` and each
/// value's series.
#[tokio::test]
async fn the_report_counts_open_values_not_flushed_yet() {
    let h = Harness::new(OPEN);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 11, &series("m-a", "output")).unwrap();
    assert!(ticket.complete(200));
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let total = report.quotas.iter().find(|q| q.meter.as_str() == "tokens").unwrap();
    assert_eq!(total.used, 11);
    let used = |m: &str| report.usage.iter().filter(|w| w.meter.as_str() == m).map(|w| w.quantity).sum::<u64>();
    assert_eq!(used("tokens{model=m-a,kind=output}"), 11);
}

/// A request refused (its hold past the quota) takes no place: its value is never claimed, and
/// the tenant's places stay for the values it uses.
#[tokio::test]
async fn a_refused_hold_takes_no_place() {
    let toml = OPEN.replace(
        "quotas.tokens = { limit = 100000000, period = \"day\" }",
        "quotas.tokens = { limit = 100, period = \"day\" }",
    );
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    // 90 of the day's 100 tokens, of a listed model (no place); then holds of 50 refused.
    ctx.record_with("tokens", 90, &series("m-large", "input")).unwrap();
    for m in ["m-x", "m-y", "m-z", "m-w"] {
        let r = ctx.hold_in("tokens", &series(m, "output"), 50).await.unwrap_err();
        assert_eq!(r.kind(), RejectionKind::QuotaExceeded, "{m}: {r}");
    }
    for m in ["m-a", "m-b", "m-c"] {
        ctx.record_with("tokens", 1, &series(m, "input")).unwrap();
    }
    assert!(ticket.complete(200));
    h.tollgate.flush().await.unwrap();
    let call = tollgate::store::ValueCall::new("t".into(), "tokens".into(), "model", 1_772_323_200, 3, 0);
    let row = h.memory.as_ref().unwrap().read_values(&call).await.unwrap();
    assert_eq!(row.values, ["m-a", "m-b", "m-c"]);
}

/// At shutdown with the quota role's store down, a value still waiting for its claim is
/// billed under `other`: nothing held back, nothing lost.
#[tokio::test]
async fn shutdown_bills_a_value_still_waiting_under_other() {
    let memory: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let faulty = Arc::new(common::Faulty::over(memory.clone()));
    let h = Harness::with_store(OPEN, faulty.clone(), NOON);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    ctx.record_with("tokens", 6, &series("m-a", "output")).unwrap();
    assert!(ticket.complete(200));
    faulty.values_down.store(true, Ordering::SeqCst);
    h.tollgate.shutdown().await.unwrap();
    let all = memory.usage_range(&"t".into(), NOON - 86_400, NOON + 86_400).await.unwrap();
    let other: u64 =
        all.iter().filter(|a| a.key.meter.as_str() == "tokens{model=other,kind=output}").map(|a| a.quantity).sum();
    assert_eq!(other, 6, "{all:?}");
}

/// A route holds a value past the tenant's places (`on_unknown = "other"`); the handler
/// records it by name after the month turned (April has room): the units go through the
/// route's hold (`settle = "estimate"`), billed once, the same as for a listed model (never
/// recorded beside the hold and the estimate billed again).
#[tokio::test]
async fn a_routes_hold_on_a_value_past_the_cap_bills_its_units_once() {
    let toml = OPEN
        .replace("max_values.model = 3", "max_values.model = 1")
        .replace("hold_values = {", "settle = \"estimate\"\nhold_values = {")
        .replace(
            "values.kind = [\"input\", \"output\"]",
            "values.kind = [\"input\", \"output\"]\non_unknown = \"other\"",
        );
    let billed = |model: &'static str| {
        let toml = toml.clone();
        async move {
            let h = Harness::new(&toml);
            let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
            ctx.record_with("tokens", 1, &series("m-a", "input")).unwrap();
            assert!(ticket.complete(200));
            h.tollgate.flush().await.unwrap();
            let headers: [(&str, &[u8]); 2] = [("x-max-tokens", b"50"), ("x-model", model.as_bytes())];
            let info =
                tollgate::door::RequestInfo::new("POST", "/tokens/20", tollgate::door::Credential::ApiKey(b"key-t"))
                    .with_headers(&headers);
            let ticket = common::admitted_ticket(&h.tollgate, &info).await;
            // The work ends in April, whose places are free.
            h.clock.advance(Duration::from_secs((1_775_001_600 - NOON + 10) as u64));
            ticket.context().record_with("tokens", 20, &series(model, "output")).unwrap();
            assert!(ticket.complete(200));
            let got = committed(&h, "t").await;
            got.iter().filter(|(k, _)| k.starts_with("tokens{") && k.contains("output")).map(|(_, q)| *q).sum::<u64>()
        }
    };
    let listed = billed("m-large").await;
    assert_eq!(listed, 50, "the estimate, in full");
    assert_eq!(billed("m-b").await, listed, "the same units as a listed model's");
}

/// The issue's case: `max_values.model = 50`; the 51st model value of a tenant in a month is
/// answered as configured (400 under `refuse`, `other` under `"other"`), after the fleet's row
/// holds the 50.
#[tokio::test]
async fn the_51st_model_value_of_a_tenant_is_answered_as_configured() {
    for policy in ["refuse", "other"] {
        let toml = OPEN.replace("max_values.model = 3", "max_values.model = 50").replace(
            "values.kind = [\"input\", \"output\"]",
            &format!("values.kind = [\"input\", \"output\"]\non_unknown = \"{policy}\""),
        );
        let h = Harness::new(&toml);
        let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
        for i in 1..=50 {
            ctx.record_with("tokens", 1, &series(&format!("m-{i}"), "output")).unwrap();
        }
        assert!(ticket.complete(200));
        h.tollgate.flush().await.unwrap();
        let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
        let answer = ctx.record_with("tokens", 7, &series("m-51", "output"));
        match policy {
            "refuse" => {
                let e = answer.unwrap_err();
                let r = ctx.refusal("tokens", &e).expect("a 400 to answer");
                assert_eq!((r.kind(), r.status().as_u16()), (RejectionKind::InvalidDimension, 400), "{e}");
            }
            _ => answer.unwrap(),
        }
        ctx.record_with("tokens", 1, &series("m-50", "output")).unwrap();
        assert!(ticket.complete(200));
        let got = committed(&h, "t").await;
        let series: Vec<_> = got.keys().filter(|k| k.starts_with("tokens{")).collect();
        let other = got.get("tokens{model=other,kind=output}").copied();
        match policy {
            "refuse" => assert_eq!((series.len(), other), (50, None), "{got:?}"),
            _ => assert_eq!((series.len(), other), (51, Some(7)), "{got:?}"),
        }
        assert_eq!(got.get("tokens{model=m-50,kind=output}"), Some(&2));
    }
}
