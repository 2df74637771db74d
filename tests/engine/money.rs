//! Money: prices on meters, spend caps over the reserved meter `spend`, caps tenants set.
//! What a tenant is charged never passes a hard cap when its work holds first and refuses to
//! overrun; spend is rounded once per request and once per hold; a tenant's own cap is kept
//! by the store and seen by every node.

use std::sync::Arc;

use crate::common;

use common::money::{admit, spend_key, TOKEN_PRICE, TOML};
use common::{node_with_worker, Harness, NOON};
use tollgate::{
    admin::Admin,
    config::QuotaMode,
    money::{amount_of, NANOS},
    Overrun, RejectionKind,
};

/// Half a month from noon to the end of March (2026-03-14T12:00Z → 2026-04-01).
const TO_MONTH_END: u64 = 1_775_001_600 - NOON as u64;

async fn spend_recorded(h: &Harness, tenant: &str) -> u64 {
    h.tollgate.flush().await.unwrap();
    common::committed(&**h.tollgate.usage_store(), tenant, "spend", NOON - 40 * 86_400, NOON + 86_400, 3600).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_never_pass_a_hard_spend_cap() {
    common::money::four_engines_never_pass_a_hard_spend_cap(Arc::new(tollgate::store::MemoryStore::new()), 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_sqlite_file_never_pass_a_hard_spend_cap() {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate::store::SqliteStore::open(dir.path().join("spend.db")).await.unwrap();
    common::money::four_engines_never_pass_a_hard_spend_cap(Arc::new(store), 32).await;
}

/// The issue's example: 7 tokens at $0.15 per million cost 1,050 nano-dollars, exactly.
#[tokio::test]
async fn seven_tokens_at_fifteen_cents_a_million_cost_1050_nano_dollars() {
    let toml = TOML.replace(TOKEN_PRICE, "0.00000015").replace("price = \"0.000001\"", "");
    let h = Harness::new(&toml);
    assert_eq!(h.status("/tokens/7", "key-t").await, 200);
    assert_eq!(spend_recorded(&h, "t").await, 1_050);
    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    assert_eq!(report.currency.as_deref(), Some("usd"));
    let spend = report.quotas.iter().find(|q| q.meter.as_str() == "spend").expect("the spend quota is reported");
    assert_eq!((spend.used, spend.limit, spend.remaining), (1_050, NANOS, NANOS - 1_050));
    assert_eq!(amount_of(spend.used).to_string(), "0.00000105");
    assert!(report.usage.iter().any(|w| w.meter.as_str() == "spend" && w.quantity == 1_050));
}

/// A node's flush counts money apart from units (`Stats::flushed_spend_nanos`, the shutdown's
/// report): the 1,050 nano-dollars of 7 tokens are not 1,050 more units flushed.
#[tokio::test]
async fn a_flush_counts_money_apart_from_units() {
    let toml = TOML.replace(TOKEN_PRICE, "0.00000015").replace("price = \"0.000001\"", "");
    let h = Harness::new(&toml);
    assert_eq!(h.status("/tokens/7", "key-t").await, 200);
    let flushed = h.tollgate.flush().await.unwrap();
    assert_eq!(flushed.spend_nanos, 1_050);
    let stats = h.tollgate.stats();
    assert_eq!(stats.flushed_spend_nanos, 1_050);
    assert_eq!(stats.flushed_units, flushed.units);
    let stored = common::committed(&**h.tollgate.usage_store(), "t", "tokens", NOON - 3600, NOON + 3600, 3600).await;
    assert_eq!(stored, 7);
    assert!(flushed.units >= 7 && flushed.units < 1_050, "units of the meters alone: {}", flushed.units);
}

/// A price finer than a nano-unit (1.5 nano-dollars a token): a request's records without a
/// hold are rounded once for the request (ten records of one token: ⌈15⌉, not 10 × ⌈1.5⌉ =
/// 20); a hold's once for the hold (three records: ⌈4.5⌉ = 5); a usage event once per event.
#[tokio::test]
async fn spend_is_rounded_once_per_request_and_once_per_hold() {
    let toml = TOML.replace(TOKEN_PRICE, "0.0000000015").replace("price = \"0.000001\"", "");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    for _ in 0..10 {
        ctx.record("tokens", 1).unwrap();
    }
    assert!(ticket.complete(200));
    assert_eq!(spend_recorded(&h, "t").await, 15, "one request: ⌈10 × 1.5⌉");
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_with("tokens", 10, Overrun::Refuse).await.unwrap();
    for _ in 0..3 {
        hold.record(1).unwrap();
    }
    hold.settle();
    assert!(ticket.complete(200));
    assert_eq!(spend_recorded(&h, "t").await, 15 + 5, "one hold: ⌈3 × 1.5⌉");
    // A streamed request of many records settles to the same total as one record of them all.
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    for _ in 0..1_001 {
        ctx.record("tokens", 1).unwrap();
    }
    drop(ctx);
    assert!(ticket.complete(200));
    assert_eq!(spend_recorded(&h, "t").await, 20 + 1_502, "⌈1001 × 1.5⌉ = 1502");
    // Usage events (jobs): each event rounded on its own.
    for i in 0..3 {
        let e = tollgate::events::Event::new(
            format!("job-{i}"),
            "t".into(),
            "tokens".into(),
            1,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOON as u64),
        );
        h.tollgate.record_event(e).await.unwrap();
    }
    assert_eq!(spend_recorded(&h, "t").await, 1_522 + 3 * 2, "an event: ⌈1.5⌉ each");
    // The quota counter took what was recorded (this node's lease given back).
    h.tollgate.shutdown().await.unwrap();
    assert_eq!(h.reserved(&spend_key("t")).await, 1_528);
}

/// A usage event whose write landed but whose answer was lost (a timeout), or whose caller
/// was gone before the answer, is charged its spend once: its retry answers `Duplicate`, which
/// on main left its cost never charged. One whose write failed before landing and whose retry
/// applies it is charged once too, not twice.
#[tokio::test]
async fn an_event_whose_write_may_have_landed_is_charged_once() {
    use std::sync::atomic::Ordering::SeqCst;
    use tollgate::{events::Event, store::EventOutcome};
    let faulty = Arc::new(common::Faulty::default());
    let h = Harness::with_store(TOML, faulty.clone(), NOON);
    let job = |id: &str| {
        Event::new(
            id,
            "t".into(),
            "tokens".into(),
            1_000,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOON as u64),
        )
    };
    let cost = common::money::nanos(1_000, TOKEN_PRICE);
    faulty.lose_event_answers.store(1, SeqCst);
    let lost = h.tollgate.record_event(job("landed")).await.unwrap_err();
    assert!(lost.is_retryable(), "{lost}");
    assert_eq!(h.tollgate.record_event(job("landed")).await.unwrap(), EventOutcome::Duplicate, "the write landed");
    assert_eq!(spend_recorded(&h, "t").await, cost, "charged once though its retry is a duplicate");
    faulty.usage_down.store(true, SeqCst);
    assert!(h.tollgate.record_event(job("failed")).await.unwrap_err().is_retryable());
    assert!(h.tollgate.record_event(job("failed")).await.unwrap_err().is_retryable(), "failed again");
    faulty.usage_down.store(false, SeqCst);
    assert_eq!(h.tollgate.record_event(job("failed")).await.unwrap(), EventOutcome::Applied);
    assert_eq!(spend_recorded(&h, "t").await, 2 * cost, "charged once over three attempts");
    assert_eq!(h.tollgate.record_event(job("failed")).await.unwrap(), EventOutcome::Duplicate);
    assert_eq!(spend_recorded(&h, "t").await, 2 * cost);
    // Its caller gone while the write is under way (a job's deadline): the write landed, the
    // retry is a duplicate, and the spend is charged once all the same.
    faulty.hang_event_answers.store(true, SeqCst);
    let cut = tokio::spawn({
        let tollgate = h.tollgate.clone();
        let e = job("cut");
        async move { tollgate.record_event(e).await }
    });
    while faulty.hung_event_writes.load(SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    cut.abort();
    assert!(cut.await.unwrap_err().is_cancelled());
    faulty.hang_event_answers.store(false, SeqCst);
    assert_eq!(h.tollgate.record_event(job("cut")).await.unwrap(), EventOutcome::Duplicate, "the write landed");
    assert_eq!(spend_recorded(&h, "t").await, 3 * cost, "charged once though its caller was gone");
}

/// A route's priced cost is taken before the work: once the cap cannot cover it, 402 with
/// `Retry-After` and `t` at the month's end, and the spend policy in the headers, its `r` what
/// remains of the cap (main said 0 while 0.10 remained for cheaper work).
#[tokio::test]
async fn a_spent_cap_refuses_before_the_work_until_the_period_ends() {
    // A request costs 0.30: three fit in 1.00.
    let toml = TOML.replace("price = \"0.000001\"", "price = \"0.30\"");
    let h = Harness::new(&toml);
    for _ in 0..3 {
        let r = h.get("/anything", "key-t").await;
        assert_eq!(r.status, 200);
        let policy = r.header("ratelimit-policy").unwrap();
        assert!(
            policy.contains("\"spend-month\";q=1000000000;w=2678400;tollgate-unit=\"nano-usd\""),
            "the cap is a policy of the route: {policy}"
        );
        assert!(!policy.contains("qu="), "no unit outside the registry: {policy}");
    }
    let r = h.get("/anything", "key-t").await;
    assert_eq!(r.status, 402);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some(TO_MONTH_END.to_string().as_str()));
    let limit = r.header("ratelimit").unwrap();
    // What remains for cheaper work (0.10), not 0.
    assert!(limit.contains(&format!("\"spend-month\";r=100000000;t={TO_MONTH_END}")), "{limit}");
    let body = r.json();
    assert_eq!(body["title"], "Spend cap reached");
    assert_eq!(body["policy"], "spend-month");
    assert_eq!(body["retry_after"], TO_MONTH_END);
    assert_eq!(spend_recorded(&h, "t").await, 3 * 300_000_000, "the refused request costs nothing");
}

/// A hold on a priced meter holds its estimated cost too: refused (402) when the cap cannot
/// cover it, before anything is taken; a record past it with `overrun = "refuse"` is refused
/// and records nothing.
#[tokio::test]
async fn a_hold_on_a_priced_meter_holds_its_cost() {
    // A token costs 0.01: 100 tokens fill the cap.
    let toml = TOML.replace(TOKEN_PRICE, "0.01").replace("price = \"0.000001\"", "");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_with("tokens", 60, Overrun::Refuse).await.unwrap();
    // Another request's hold cannot take what this one holds.
    let (other, other_ctx) = admit(&h, "key-t").await.unwrap();
    let r = other_ctx.hold_with("tokens", 50, Overrun::Refuse).await.unwrap_err();
    assert!(matches!(r.kind(), RejectionKind::SpendCapReached | RejectionKind::UnitsHeld), "{r}");
    other.give_back();
    hold.record(60).unwrap();
    // Past the hold and the cap: refused, nothing recorded.
    let mut rest = other_ctx.hold_with("tokens", 40, Overrun::Refuse).await.unwrap();
    assert_eq!(hold.record(1), Err(tollgate::RecordError::SpendCap(10_000_000)));
    rest.record(40).unwrap();
    rest.settle();
    hold.settle();
    assert!(ticket.complete(200));
    let r = ctx.hold_with("tokens", 1, Overrun::Refuse).await.unwrap_err();
    assert_eq!(r.kind(), RejectionKind::SpendCapReached);
    assert_eq!(r.status().as_u16(), 402);
    assert_eq!(r.retry_after(), Some(std::time::Duration::from_secs(TO_MONTH_END)));
    assert_eq!(spend_recorded(&h, "t").await, NANOS, "exactly the cap");
}

/// A cap the tenant lowers below what it has spent: every node refuses once the spend lease it
/// holds is used (at most one lease per node, the documented bound), and from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_cap_is_held_by_every_node_within_a_lease() {
    // A request costs 0.001; the plan's cap is 1.00 (a lease is at most 1/16 of it: 62.5
    // requests' worth).
    let toml = TOML.replace("price = \"0.000001\"", "price = \"0.001\"");
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Harness> =
        (0..4).map(|_| node_with_worker(&toml, store.clone(), clock.clone(), handle.clone())).collect();
    for h in &nodes {
        for _ in 0..50 {
            assert_eq!(h.status("/anything", "key-t").await, 200);
        }
    }
    let before = 200 * 1_000_000;
    let admin = Admin::for_engine(&nodes[0].tollgate);
    let view = admin.set_spend_cap("t", Some("0.10"), QuotaMode::Hard).await.unwrap();
    assert_eq!((view.limit, view.hard, view.own.is_some()), (100_000_000, true, true));
    let lease_cap = NANOS / 16 / 1_000_000;
    for (i, h) in nodes.iter().enumerate() {
        let mut served = 0;
        loop {
            let r = h.get("/anything", "key-t").await;
            if r.status == 402 {
                let detail = r.json()["detail"].as_str().unwrap().to_owned();
                assert!(detail.contains("the tenant's month spend cap of 0.1"), "{detail}");
                break;
            }
            assert_eq!(r.status, 200);
            served += 1;
            assert!(served <= lease_cap, "node {i} served {served} past a lowered cap: more than its lease");
        }
        // And from then on, in later seconds too.
        handle.advance(std::time::Duration::from_secs(2));
        assert_eq!(h.status("/anything", "key-t").await, 402, "node {i}");
    }
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    let spent = tollgate::store::QuotaInspect::reserved(&*store, &spend_key("t")).await.unwrap();
    assert!(spent <= before + 4 * NANOS / 16, "{spent}: at most a lease per node past the lowered cap");
}

/// A raised cap is seen within a second by every node, the one that did not set it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_cap_is_seen_within_a_second() {
    let toml = TOML.replace("price = \"0.000001\"", "price = \"0.25\"");
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let a = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let b = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let mut served = 0;
    while a.status("/anything", "key-t").await == 200 {
        served += 1;
    }
    assert_eq!(served, 4, "1.00 at 0.25 a request");
    assert_eq!(b.status("/anything", "key-t").await, 402);
    // The tenant raises its own cap (through the route an application mounts: see the doors'
    // tests; here through Admin).
    Admin::for_engine(&a.tollgate).set_spend_cap("t", Some("2.00"), QuotaMode::Hard).await.unwrap();
    handle.advance(std::time::Duration::from_secs(1));
    assert_eq!(b.status("/anything", "key-t").await, 200, "seen within a second by a node that did not set it");
    assert_eq!(a.status("/anything", "key-t").await, 200);
    // Its own cap is left out of RateLimit-Policy (it is not the plan's), the item stays.
    let r = a.get("/anything", "key-t").await;
    assert!(!r.header("ratelimit-policy").unwrap_or("").contains("spend"), "{:?}", r.header("ratelimit-policy"));
    assert!(r.header("ratelimit").unwrap().contains("\"spend-month\";r="));
    let report = a.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let spend = report.quotas.iter().find(|q| q.meter.as_str() == "spend").unwrap();
    assert_eq!(spend.limit, 2 * NANOS, "the report shows the tenant's own cap");
}

/// Above the plan's `max_limit`, not an amount, or on a plan without a cap: refused, nothing
/// changes.
#[tokio::test]
async fn a_cap_above_the_maximum_or_not_an_amount_is_refused_and_changes_nothing() {
    let toml = TOML.to_owned() + "[plans.free]\n[tenants.f]\nplan = \"free\"\nkeys = [\"key-f\"]\n";
    let h = Harness::new(&toml);
    let admin = Admin::for_engine(&h.tollgate);
    for (limit, why) in
        [("10.01", "above the most"), ("abc", "not a decimal"), ("-1", "more than 0"), ("0.0000000001", "9 decimals")]
    {
        let e = admin.set_spend_cap("t", Some(limit), QuotaMode::Hard).await.unwrap_err();
        assert!(matches!(e, tollgate::admin::AdminError::SpendCap(_)), "{limit}: {e}");
        assert!(e.to_string().contains(why), "{limit}: {e}");
    }
    let e = admin.set_spend_cap("f", Some("1.00"), QuotaMode::Hard).await.unwrap_err();
    assert!(e.to_string().contains("has no spend cap"), "{e}");
    let view = admin.spend_cap("t").await.unwrap();
    assert_eq!((view.limit, view.own, view.max_limit), (NANOS, None, 10 * NANOS), "nothing changed");
    // Soft on a plan whose cap is hard: refused (the operator's hard stop stays).
    let e = admin.set_spend_cap("t", Some("5.00"), QuotaMode::Soft).await.unwrap_err();
    assert!(e.to_string().contains("is hard too"), "{e}");
    assert_eq!(admin.spend_cap("t").await.unwrap().own, None, "nothing changed");
    // At the maximum: taken.
    let view = admin.set_spend_cap("t", Some("10.00"), QuotaMode::Hard).await.unwrap();
    assert_eq!((view.limit, view.hard), (10 * NANOS, true));
    // Removed: the plan's again.
    let view = admin.set_spend_cap("t", None, QuotaMode::Hard).await.unwrap();
    assert_eq!((view.limit, view.hard, view.own), (NANOS, true, None));
}

/// The tenant's own route (behind the layer): GET, PUT within the maximum, refusals as
/// problem+json 4xx that change nothing, DELETE.
#[tokio::test]
async fn the_tenants_route_sets_its_own_cap_within_the_maximum() {
    let h = Harness::new(TOML);
    let ctx = {
        let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
        ticket.give_back();
        ctx
    };
    let call = |method: &str, body: &'static str| {
        let (engine, ctx) = (h.tollgate.clone(), ctx.clone());
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        async move { engine.tenant_spend_cap(&ctx, &tollgate::Caller::api_key(b"key-t"), &method, body.as_bytes()).await }
    };
    let r = call("GET", "").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["limit"], "1");
    assert_eq!(v["max_limit"], "10");
    assert_eq!(v["set_by"], "plan");
    for (body, status) in [
        (r#"{"limit": "10.50"}"#, 422),
        (r#"{"limit": "ten"}"#, 400),
        (r#"{"limit": 5}"#, 400),
        (r#"{"limit": "5", "mode": "maybe"}"#, 400),
        (r#"{"limit": "5", "extra": 1}"#, 400),
        (r#"{"limit": "5", "mode": "soft"}"#, 422),
        (r#"{"limit": "25.0000000000000000000000000001"}"#, 400),
    ] {
        let r = call("PUT", body).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "{body}");
    }
    let v: serde_json::Value = serde_json::from_slice(call("GET", "").await.body()).unwrap();
    assert_eq!(v["set_by"], "plan", "nothing changed");
    let r = call("PUT", r#"{"limit": "2.50", "mode": "hard"}"#).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!((v["limit"].as_str(), v["set_by"].as_str()), (Some("2.5"), Some("tenant")));
    assert_eq!(call("DELETE", "").await.status(), 204);
    let v: serde_json::Value = serde_json::from_slice(call("GET", "").await.body()).unwrap();
    assert_eq!(v["set_by"], "plan");
    assert_eq!(call("POST", "").await.status(), 405);
}

/// A declared tenant's keys have the file's `key_scopes`: read-only keys read the cap and set
/// nothing (403 problem+json naming the scope), and another tenant's key opens nothing of it.
#[tokio::test]
async fn a_declared_tenants_keys_have_the_files_scopes_at_its_cap_route() {
    let toml = TOML.replace("keys = [\"key-u\"]", "keys = [\"key-u\"]\nkey_scopes = [\"usage:read\"]");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-u").await.unwrap();
    ticket.give_back();
    let call = |key: &'static str, method: &str, body: &'static str| {
        let (engine, ctx) = (h.tollgate.clone(), ctx.clone());
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        async move {
            let r = engine
                .tenant_spend_cap(&ctx, &tollgate::Caller::api_key(key.as_bytes()), &method, body.as_bytes())
                .await;
            (r.status().as_u16(), serde_json::from_slice::<serde_json::Value>(r.body()).unwrap())
        }
    };
    assert_eq!(call("key-u", "GET", "").await.0, 200);
    let (status, v) = call("key-u", "PUT", r#"{"limit": "5.00"}"#).await;
    assert_eq!((status, v["type"].as_str()), (403, Some("https://tollgate.rs/problems/scope-missing")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("caps:write"), "{v}");
    assert_eq!(call("key-u", "DELETE", "").await.0, 403);
    let (status, v) = call("key-t", "PUT", r#"{"limit": "5.00"}"#).await;
    assert_eq!((status, v["type"].as_str()), (403, Some("https://tollgate.rs/problems/key-not-live")), "{v}");
    let (_, v) = call("key-u", "GET", "").await;
    assert_eq!((v["limit"].as_str(), v["set_by"].as_str()), (Some("1"), Some("plan")), "nothing was set");
}

/// Behind an authentication layer (`source = "extension"`), the `Identity` it put in the
/// request brings its scopes: `Tollgate::caller` reads them; an identity allowed to read only
/// sets nothing, another tenant's identity opens nothing of this one, and the usage route asks
/// the same of it.
#[tokio::test]
async fn an_identity_brings_its_scopes_to_the_tenant_routes() {
    use tollgate::door::{Admission, Credential, RequestInfo};
    use tollgate::store::{KeyScope, KeyScopes};
    let toml = TOML.replace("keys = [\"key-t\"]", "").replace("keys = [\"key-u\"]", "")
        + "[identify]\nsource = \"extension\"\n";
    let h = Harness::new(&toml);
    let info = RequestInfo::new("GET", "/", Credential::Tenant("t"));
    let ticket = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    let ctx = ticket.context();
    ticket.give_back();
    let request = |identity: tollgate::Identity, path: &str| {
        let mut r = http::Request::get(path).body(()).unwrap();
        r.extensions_mut().insert(identity);
        r
    };
    let cap = |identity: tollgate::Identity, method: &'static str| {
        let (engine, ctx) = (h.tollgate.clone(), ctx.clone());
        let caller = h.tollgate.caller(&request(identity, "/v1/spend/cap"));
        async move {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let r = engine.tenant_spend_cap(&ctx, &caller, &method, br#"{"limit": "5.00"}"#).await;
            (r.status().as_u16(), serde_json::from_slice::<serde_json::Value>(r.body()).unwrap())
        }
    };
    let reader = tollgate::Identity::new("t").with_scopes(KeyScopes::NONE.with(KeyScope::UsageRead));
    assert_eq!(cap(reader.clone(), "GET").await.0, 200);
    let (status, v) = cap(reader.clone(), "PUT").await;
    assert_eq!((status, v["type"].as_str()), (403, Some("https://tollgate.rs/problems/scope-missing")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("Identity::with_scopes"), "{v}");
    let theirs = tollgate::Identity::new("u").with_scopes(KeyScopes::ALL);
    let (status, v) = cap(theirs, "PUT").await;
    assert_eq!((status, v["type"].as_str()), (403, Some("https://tollgate.rs/problems/key-not-live")), "{v}");
    let (status, v) = cap(tollgate::Identity::new("t"), "PUT").await;
    assert_eq!((status, v["set_by"].as_str()), (200, Some("tenant")), "the default sets the cap: {v}");
    // The usage route.
    let usage = |identity: tollgate::Identity| {
        let engine = h.tollgate.clone();
        let r = request(identity, "/v1/usage");
        async move { engine.tenant_usage(&r).await.status().as_u16() }
    };
    assert_eq!(usage(reader).await, 200);
    assert_eq!(usage(tollgate::Identity::new("t").with_scopes(KeyScopes::NONE)).await, 403);
    assert_eq!(usage(tollgate::Identity::new("t")).await, 200);
}

/// Scopes are read from the key as stored now, not from a listing that lags (DynamoDB's key
/// index): a key narrowed or revoked is refused at its next call, and the operator's changes
/// of a key revoked meanwhile (its scopes, a rotation) do not bring it back.
#[tokio::test]
async fn a_key_narrowed_or_revoked_is_refused_though_the_listing_lags() {
    use tollgate::admin::{Admin, KeyOptions};
    use tollgate::store::{KeyScope, KeyScopes};
    let store = Arc::new(common::Faulty::default());
    let h = Harness::with_store(TOML, store.clone(), NOON);
    let admin = Admin::for_engine(&h.tollgate);
    admin.add_tenant("d", "p", None).await.unwrap();
    let payer = admin.issue_key("d", KeyOptions::default().scopes(KeyScopes::ALL)).await.unwrap();
    let other = admin.issue_key("d", KeyOptions::default()).await.unwrap();
    let (ticket, ctx) = admit(&h, Box::leak(payer.key.clone().into_boxed_str())).await.unwrap();
    ticket.give_back();
    let cap = |key: &str, body: &'static str| {
        let (engine, ctx) = (h.tollgate.clone(), ctx.clone());
        let caller = tollgate::Caller::api_key(key.as_bytes());
        async move { engine.tenant_spend_cap(&ctx, &caller, &http::Method::PUT, body.as_bytes()).await.status().as_u16() }
    };
    assert_eq!(cap(&payer.key, r#"{"limit": "5.00"}"#).await, 200);
    // From here the listing answers what it did now.
    let listed = store.inner.list_keys(&"d".into()).await.unwrap();
    *store.lagging_keys.lock().unwrap() = Some(("d".into(), listed));
    let reader = KeyScopes::NONE.with(KeyScope::UsageRead);
    admin.set_key_scopes("d", &payer.record.id, reader).await.unwrap();
    assert_eq!(cap(&payer.key, r#"{"limit": "6.00"}"#).await, 403, "narrowed: refused at once");
    admin.revoke_key("d", &payer.record.id).await.unwrap();
    assert_eq!(cap(&payer.key, r#"{"limit": "6.00"}"#).await, 403, "revoked: refused at once");
    assert!(admin.set_key_scopes("d", &payer.record.id, KeyScopes::ALL).await.is_err(), "still listed, not revived");
    assert!(admin.rotate_key("d", &payer.record.id, NOON + 3600).await.is_err());
    assert_eq!(store.inner.key(&payer.record.hash).await.unwrap(), None, "not written back");
    assert_eq!(h.status("/anything", &payer.key).await, 401, "and not served");
    // A store-level update of a key removed meanwhile writes nothing.
    let gone = tollgate::store::ApiKeyRecord::new(payer.record.hash, "d".into(), NOON).with_scopes(KeyScopes::ALL);
    assert!(tollgate::store::DirectoryStore::put_key(&*store, &gone, tollgate::store::KeyWrite::Existing)
        .await
        .is_err());
    assert_eq!(store.inner.key(&payer.record.hash).await.unwrap(), None);
    // The other key is as it was.
    assert_eq!(cap(&other.key, r#"{"limit": "7.00"}"#).await, 200);
}

/// Plans for a tenant in the directory moved between them: `p` (hard 1.00, up to 10.00),
/// `small` (hard 0.50, no more), `softly` (soft 1.00, up to 10.00). A request costs 0.25.
fn moving_plans() -> String {
    TOML.replace("price = \"0.000001\"", "price = \"0.25\"")
        + "[limits]\ndirectory_ttl = \"5s\"\n\
           [plans.small]\nspend = { limit = \"0.50\", mode = \"hard\" }\n\
           [plans.softly]\nspend = { limit = \"1.00\", mode = \"soft\", max_limit = \"10.00\" }\n"
}

/// Served at 0.25 a request until refused (at most 100).
async fn served_until_refused(h: &Harness, key: &str) -> u32 {
    let mut served = 0;
    while served < 100 {
        match h.status("/anything", key).await {
            200 => served += 1,
            402 => break,
            other => panic!("{other}"),
        }
    }
    served
}

/// A cap set under one plan never lifts the next plan's: a hard cap of 10.00 set on `p`,
/// the tenant moved to `small` (at most 0.50), is held to 0.50; a soft cap set on `softly`,
/// the tenant moved to `p` (hard), is held to `p`'s hard 1.00 (a tenant's soft cap never
/// turns an operator's hard stop into a warning).
#[tokio::test]
async fn a_cap_set_under_one_plan_never_lifts_the_next_plans() {
    let h = Harness::new(&moving_plans());
    let admin = Admin::for_engine(&h.tollgate);
    for (tenant, from) in [("d", "p"), ("e", "softly")] {
        admin.add_tenant(tenant, from, None).await.unwrap();
    }
    let key_d = admin.issue_key("d", Default::default()).await.unwrap().key;
    let key_e = admin.issue_key("e", Default::default()).await.unwrap().key;
    admin.set_spend_cap("d", Some("10.00"), QuotaMode::Hard).await.unwrap();
    let view = admin.set_spend_cap("e", Some("5.00"), QuotaMode::Soft).await.unwrap();
    assert_eq!((view.limit, view.hard), (5 * NANOS, false), "soft on a soft plan: taken");
    admin.set_plan("d", "small").await.unwrap();
    admin.set_plan("e", "p").await.unwrap();
    h.clock.advance(std::time::Duration::from_secs(6));
    assert_eq!(served_until_refused(&h, &key_d).await, 2, "held to small's maximum, 0.50");
    assert_eq!(served_until_refused(&h, &key_e).await, 4, "held to p's hard cap, 1.00");
    let view = admin.spend_cap("d").await.unwrap();
    assert_eq!((view.limit, view.max_limit, view.own.map(|c| c.limit)), (NANOS / 2, NANOS / 2, Some(10 * NANOS)));
    let view = admin.spend_cap("e").await.unwrap();
    assert_eq!((view.limit, view.hard, view.own_in_force), (NANOS, true, false), "the plan's hard cap in force");
    // The report says the caps in force too.
    for (tenant, limit) in [("d", NANOS / 2), ("e", NANOS)] {
        let report = h.tollgate.usage_report(&tenant.into(), NOON - 3600, NOON + 3600).await.unwrap();
        let spend = report.quotas.iter().find(|q| q.meter.as_str() == "spend").unwrap();
        assert_eq!((spend.limit, spend.mode), (limit, QuotaMode::Hard), "{tenant}");
    }
}

/// On a plan whose cap is soft, a hard cap the tenant set through one node holds on another
/// node that never heard of it: a node that has not read the tenant's cap yet takes the cap
/// as possibly hard (its holds ask the store), and a node that read "none" before reads it
/// again once its spend lease is overdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_cap_set_on_a_soft_plan_holds_on_every_node() {
    let toml = moving_plans().replace("[tenants.u]\nplan = \"p\"", "[tenants.u]\nplan = \"softly\"");
    let toml = toml.replace("price = \"0.25\"", "");
    let toml = toml.replace(TOKEN_PRICE, "0.01");
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let a = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let b = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let c = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    // c serves u first: it reads "no cap of the tenant's own" (the plan's soft 1.00).
    for _ in 0..3 {
        let (ticket, ctx) = admit(&c, "key-u").await.unwrap();
        ctx.record("tokens", 1).unwrap();
        assert!(ticket.complete(200));
        // Its background refills awaited (a flush does what a prefetch asked, once).
        c.tollgate.flush().await.unwrap();
    }
    // u sets a hard cap of 0.50 through a.
    Admin::for_engine(&a.tollgate).set_spend_cap("u", Some("0.50"), QuotaMode::Hard).await.unwrap();
    // A long request on c, which read "none", streams through a hold that refuses to overrun:
    // once its spend lease is used, c reads the cap in the background and its records are
    // held to it.
    let streamed = {
        let (ticket, ctx) = admit(&c, "key-u").await.unwrap();
        let mut hold = ctx.hold_with("tokens", 1, Overrun::Refuse).await.unwrap();
        let mut streamed = 0;
        while hold.record(1).is_ok() {
            streamed += 1;
            assert!(streamed <= 60, "c streamed past the tenant's hard cap: {streamed} tokens at 0.01");
            // The background work awaited: c's flush does the refill a record asked for (which
            // reads the tenant's cap), as its worker's prefetch does at once, before the clock
            // moves on.
            c.tollgate.flush().await.unwrap();
            handle.advance(std::time::Duration::from_millis(100));
        }
        hold.settle();
        assert!(ticket.complete(200));
        streamed
    };
    // b never served u: its holds ask the store, which holds them to 0.50: to all that is
    // left of it (nothing stranded by c), in holds of 5.
    let left = 50 - 3 - streamed;
    let mut held = 0;
    loop {
        let (ticket, ctx) = admit(&b, "key-u").await.unwrap();
        match ctx.hold_with("tokens", 5, Overrun::Refuse).await {
            Ok(mut hold) => {
                hold.record(5).unwrap();
                hold.settle();
                assert!(ticket.complete(200));
                held += 5;
                assert!(held <= 50, "b passed the tenant's hard cap: {held} tokens at 0.01");
            }
            Err(r) => {
                assert_eq!(r.kind(), RejectionKind::SpendCapReached, "{r}");
                ticket.give_back();
                break;
            }
        }
    }
    assert_eq!(held, left - left % 5, "b holds all that c left, {left} tokens, in holds of 5");
    // c records without holds: it learns the cap once its lease (1.00 / 32) is overdrawn.
    let mut recorded = 0u64;
    loop {
        let Ok((ticket, ctx)) = admit(&c, "key-u").await else { break };
        ctx.record("tokens", 1).unwrap();
        assert!(ticket.complete(200));
        recorded += 1;
        assert!(recorded <= 200, "c never learned of the tenant's hard cap");
    }
    for h in [&a, &b, &c] {
        h.tollgate.shutdown().await.unwrap();
    }
    let spent = tollgate::store::QuotaInspect::reserved(&*store, &spend_key("u")).await.unwrap();
    assert!(spent <= NANOS / 2 + 2 * NANOS / 32, "{spent}: at most a lease of c's past the cap");
}

/// A hard cap the tenant set on a plan whose cap is soft is held as hard while the quota store
/// does not answer: 503, as every hard limit (main admitted such requests and billed them past
/// the cap). A tenant the node knows has no cap of its own on that plan is still admitted (the
/// plan's soft cap fails open).
#[tokio::test]
async fn a_tenants_own_hard_cap_fails_closed_when_the_store_fails() {
    let toml = moving_plans()
        .replace("[tenants.u]\nplan = \"p\"", "[tenants.u]\nplan = \"softly\"")
        .replace("[tenants.t]\nplan = \"p\"", "[tenants.t]\nplan = \"softly\"");
    let faulty = Arc::new(common::Faulty::default());
    let h = Harness::with_store(&toml, faulty.clone(), NOON);
    Admin::for_engine(&h.tollgate).set_spend_cap("u", Some("5.00"), QuotaMode::Hard).await.unwrap();
    for key in ["key-t", "key-u"] {
        assert_eq!(h.status("/anything", key).await, 200, "{key} while the store answers");
    }
    *faulty.refuse_tenant.lock().unwrap() = Some("u".into());
    let r = h.get("/anything", "key-u").await;
    assert_eq!(r.status, 503, "the tenant's own hard cap fails closed");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    *faulty.refuse_tenant.lock().unwrap() = Some("t".into());
    assert_eq!(h.status("/anything", "key-t").await, 200, "no cap of its own: the soft plan fails open");
}

/// A record whose spend is past any lease (10¹² tokens at 0.01: 10¹⁹ nano-dollars, past a
/// signed 64-bit count) through a hold that refuses to overrun: refused, nothing recorded, the
/// cap intact (it once wrapped to a negative cost and was taken).
#[tokio::test]
async fn a_record_costing_more_than_any_lease_is_refused() {
    let toml = TOML.replace(TOKEN_PRICE, "0.01").replace("price = \"0.000001\"", "");
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let mut hold = ctx.hold_with("tokens", 10, Overrun::Refuse).await.unwrap();
    assert!(matches!(hold.record(1_000_000_000_000), Err(tollgate::RecordError::SpendCap(_))));
    hold.record(10).unwrap();
    hold.settle();
    assert!(ticket.complete(200));
    assert_eq!(spend_recorded(&h, "t").await, 10 * 10_000_000, "only the ten tokens");
}

/// Under `headers = "draft-compat"` (which names other meters' units with `qu`), the spend
/// cap's unit stays a vendor parameter: `qu` takes only the draft's registered units.
#[tokio::test]
async fn the_spend_unit_is_a_vendor_parameter_in_every_header_style() {
    let toml = TOML.to_owned() + "[limits]\nheaders = \"draft-compat\"\n";
    let h = Harness::new(&toml);
    let r = h.get("/anything", "key-t").await;
    let policy = r.header("ratelimit-policy").unwrap();
    assert!(policy.contains("\"spend-month\";q=1000000000;w=2678400;tollgate-unit=\"nano-usd\""), "{policy}");
    assert!(!policy.contains("qu=\"nano-usd\""), "{policy}");
}

/// Money edges of the configuration: a currency that is not an ISO 4217 code is refused,
/// naming its key and position; a route `hold` on a priced meter is taken where a plan's spend
/// cap holds its cost (main refused it, "would hold nothing"), and refused with the right
/// reason where nothing would hold it.
#[tokio::test]
async fn a_currency_is_iso_4217_and_a_hold_on_a_priced_meter_is_held_by_the_spend_cap() {
    use tollgate::config::Config;
    let err = Config::from_toml_str(&TOML.replace("currency = \"usd\"", "currency = \"zzz\"")).unwrap_err().to_string();
    assert!(err.contains("billing.currency") && err.contains("ISO 4217") && err.contains(":3:"), "{err}");
    for code in ["eur", "jpy", "gbp", "chf", "brl", "inr"] {
        Config::from_toml_str(&TOML.replace("currency = \"usd\"", &format!("currency = \"{code}\""))).unwrap();
    }
    let held = TOML.replace("reports = [\"tokens\"]", "reports = [\"tokens\"]\nhold = { tokens = 100 }");
    Config::from_toml_str(&held).unwrap();
    let h = Harness::new(&held);
    assert_eq!(h.status("/generate", "key-t").await, 200, "the route's hold holds its cost");
    // 100 tokens at 0.02 hold 2.00, more than the cap of 1.00: refused before the work.
    let h = Harness::new(&held.replace(TOKEN_PRICE, "0.02"));
    assert_eq!(h.status("/generate", "key-t").await, 402, "the hold's cost is held against the cap");
    // A plan price of 0 over the meter's is not a price.
    let free = held.replace("[plans.p]\n", "[plans.p]\nprices.tokens = \"0\"\n");
    let err = Config::from_toml_str(&free).unwrap_err().to_string();
    assert!(err.contains("routes[0].hold.tokens"), "{err}");
    // Without the spend cap, and without a price, nothing would hold it.
    let unpriced =
        held.replace("spend = { limit = \"1.00\", period = \"month\", mode = \"hard\", max_limit = \"10.00\" }\n", "");
    let err = Config::from_toml_str(&unpriced).unwrap_err().to_string();
    assert!(err.contains("routes[0].hold.tokens") && err.contains("spend cap"), "{err}");
}

/// Every integer of `value` (a structured header field) fits RFC 8941's 15 digits.
fn fits_rfc8941(value: &str) -> bool {
    value.split(|c: char| !c.is_ascii_digit()).all(|digits| digits.len() <= 15)
}

/// RFC 8941 integers have at most 15 digits: a spend cap of 1,000,000.00 (10¹⁵ nano-units) is
/// shown in a unit that fits (`micro-usd`), in the policy and in `RateLimit` (served or
/// refused); a cap that fits in nano-units keeps them. A day quota past 15 digits is shown as
/// the largest integer a field carries.
#[tokio::test]
async fn spend_caps_fit_the_15_digits_of_structured_headers() {
    let toml = TOML
        .replace(
            "limit = \"1.00\", period = \"month\", mode = \"hard\", max_limit = \"10.00\"",
            "limit = \"1000000.00\", period = \"month\", mode = \"hard\", max_limit = \"2000000.00\"",
        )
        .replace("price = \"0.000001\"", "price = \"60000\"");
    let h = Harness::new(&toml);
    for n in 1..=16u64 {
        let r = h.get("/anything", "key-t").await;
        assert_eq!(r.status, 200);
        let policy = r.header("ratelimit-policy").unwrap();
        assert!(policy.contains("\"spend-month\";q=1000000000000;"), "{policy}");
        assert!(policy.contains("tollgate-unit=\"micro-usd\""), "{policy}");
        assert!(fits_rfc8941(policy), "{policy}");
        let limit = r.header("ratelimit").unwrap();
        let left = 1_000_000_000_000 - n * 60_000_000_000;
        assert!(limit.contains(&format!("\"spend-month\";r={left};")), "request {n}, in micro-usd: {limit}");
    }
    let r = h.get("/anything", "key-t").await;
    assert_eq!(r.status, 402);
    let limit = r.header("ratelimit").unwrap();
    assert!(limit.contains("\"spend-month\";r=40000000000;"), "what remains, in micro-usd: {limit}");
    assert!(fits_rfc8941(limit), "{limit}");
    // A request costing more than 2⁴⁶ nano-units (100,000) is refused as no period can cover
    // it (400, no `Retry-After`), charged nothing.
    let h = Harness::new(&toml.replace("price = \"60000\"", "price = \"100000\""));
    let r = h.get("/anything", "key-t").await;
    assert_eq!(r.status, 400, "past the bound of one request's cost");
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(spend_recorded(&h, "t").await, 0, "nothing charged");
    // A cap that fits in nano-units keeps them.
    let h = Harness::new(TOML);
    let policy = h.get("/anything", "key-t").await.header("ratelimit-policy").unwrap().to_owned();
    assert!(policy.contains("q=1000000000;") && policy.contains("nano-usd"), "{policy}");
    // A quota past 15 digits is shown as the largest integer a field carries (the limit holds).
    let big =
        TOML.replace("[plans.p]\n", "[plans.p]\nquotas.requests = { limit = 1000000000000000, period = \"day\" }\n");
    let h = Harness::new(&big);
    let r = h.get("/anything", "key-t").await;
    assert_eq!(r.status, 200);
    for field in ["ratelimit-policy", "ratelimit"] {
        let value = r.header(field).unwrap();
        assert!(fits_rfc8941(value) && value.contains("999999999999999"), "{field}: {value}");
    }
}

/// A tenant's own cap leaves the spend item out of `RateLimit-Policy`, and only it: a meter
/// whose name starts with `spend-` keeps its policy.
#[tokio::test]
async fn a_tenants_own_cap_leaves_out_only_the_spend_policy() {
    let toml = TOML.replace("[plans.p]\n", "[plans.p]\nquotas.spend-tracker = { limit = 100, period = \"day\" }\n")
        + "[meters.spend-tracker]\n[[routes]]\npath = \"/track\"\nmeter = \"spend-tracker\"\n";
    let h = Harness::new(&toml);
    Admin::for_engine(&h.tollgate).set_spend_cap("t", Some("2.00"), QuotaMode::Hard).await.unwrap();
    // A priced request: the node reads the tenant's cap, and leaves the plan's out.
    let r = h.get("/anything", "key-t").await;
    assert!(
        !r.header("ratelimit-policy").unwrap_or("").contains("\"spend-month\""),
        "{:?}",
        r.header("ratelimit-policy")
    );
    let r = h.get("/track", "key-t").await;
    assert_eq!(r.status, 200);
    let policy = r.header("ratelimit-policy").unwrap_or("");
    assert!(policy.contains("\"spend-tracker-day\";q=100"), "{policy}");
}

/// A request that takes its route's priced cost, then waits on the store for its own quota
/// and is dropped there (its client gone): its spend goes back with it. Once the node's leases
/// are given back, the store's spend counter holds the one request served, not two.
#[tokio::test]
async fn a_request_dropped_while_its_quota_waits_gives_its_spend_back() {
    use futures_util::FutureExt;
    use std::sync::atomic::Ordering::SeqCst;
    use tollgate::door::{Admission, Credential, RequestInfo};
    let toml = TOML.replace(
        "spend = { limit",
        "quotas.requests = { limit = 1000, period = \"day\", mode = \"hard\", lease = 1 }\nspend = { limit",
    );
    let store = Arc::new(common::Faulty::default());
    let h = Harness::with_store(&toml, store.clone(), NOON);
    assert_eq!(h.status("/", "key-t").await, 200, "served: its spend and its unit leased");
    store.stall(true);
    let calls = store.quota_calls.load(SeqCst);
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(b"key-t"));
    let Admission::Pending(pending) = h.tollgate.admit(&info) else { panic!("its quota's lease is empty") };
    assert!(h.tollgate.resolve(pending).now_or_never().is_none(), "its quota waits on the store");
    assert!(store.quota_calls.load(SeqCst) > calls, "it asked the store, its spend taken");
    store.stall(false);
    h.tollgate.shutdown().await.unwrap();
    use tollgate::store::QuotaInspect;
    assert_eq!(store.reserved(&spend_key("t")).await.unwrap(), 1_000, "one request's price, in nano-dollars");
}

/// Overrides work on a plan with a spend cap for tenants of the store's directory too (issue
/// 54, item 0): each documented override, set through `Admin::set_overrides` (as
/// `tollgate tenants set-override` does), on the plan with a hard spend cap and on one
/// without, is taken and served (main refused `rate`, `prices` and `spend` on the capped plan,
/// and `spend` on any plan).
#[tokio::test]
async fn directory_overrides_hold_on_plans_with_and_without_a_spend_cap() {
    let toml = TOML.to_owned()
        + "[plans.free]\n[meters.account]\n[[routes]]\npath = \"/sso\"\nmeter = \"account\"\nfeature = \"sso\"\n";
    let h = Harness::new(&toml);
    let admin = Admin::for_engine(&h.tollgate);
    let mut n = 0;
    let mut tenant = |plan: &'static str, overrides: &'static str| {
        n += 1;
        let admin = admin.clone();
        async move {
            let id = format!("d{n}");
            admin.add_tenant(&id, plan, None).await.unwrap();
            admin.set_overrides(&id, Some(overrides)).await.unwrap_or_else(|e| panic!("{plan}: {overrides}: {e}"));
            admin.issue_key(&id, Default::default()).await.unwrap().key
        }
    };
    let served = |key: String, path: &'static str| {
        let h = &h;
        async move {
            let mut served = 0;
            while served < 20 {
                match h.status(path, &key).await {
                    200 => served += 1,
                    _ => break,
                }
            }
            served
        }
    };
    for plan in ["p", "free"] {
        let key = tenant(plan, r#"{"quotas": {"requests": {"limit": 3, "period": "day", "mode": "hard"}}}"#).await;
        assert_eq!(served(key, "/anything").await, 3, "{plan}: quotas");
        let key = tenant(plan, r#"{"rate": "2/m"}"#).await;
        assert_eq!(served(key, "/anything").await, 2, "{plan}: rate");
        let key = tenant(plan, r#"{"rate": "5/m", "burst": 4}"#).await;
        assert_eq!(served(key, "/anything").await, 4, "{plan}: burst");
        let key = tenant(plan, r#"{"features": ["sso"]}"#).await;
        assert_eq!(served(key, "/sso").await, 20, "{plan}: features");
        let key = tenant(plan, r#"{"spend": {"limit": "0.000003", "period": "month", "mode": "hard"}}"#).await;
        assert_eq!(served(key, "/anything").await, 3, "{plan}: spend");
        let key = tenant(
            plan,
            r#"{"prices": {"requests": "0.25"}, "spend": {"limit": "1.00", "period": "month", "mode": "hard"}}"#,
        )
        .await;
        assert_eq!(served(key, "/anything").await, 4, "{plan}: prices");
    }
}

/// Overrides work on a plan with a spend cap (issue 54, item 0): a file tenant's
/// `quotas.requests = { limit = 3 }` on a plan with a hard spend cap is applied (the fourth
/// request refused), not dropped at its first request; an override that adds a spend cap to a
/// plan without one holds too; both pass `Config::check_override`, as
/// `tollgate tenants set-override` calls it.
#[tokio::test]
async fn overrides_hold_on_a_plan_with_a_spend_cap() {
    let toml = TOML.replace(
        "[tenants.u]\nplan = \"p\"\nkeys = [\"key-u\"]\n",
        "[tenants.u]\nplan = \"p\"\nkeys = [\"key-u\"]\n[tenants.u.overrides]\n\
         quotas.requests = { limit = 3, period = \"day\", mode = \"hard\" }\n\
         [plans.free]\n[tenants.v]\nplan = \"free\"\nkeys = [\"key-v\"]\n[tenants.v.overrides]\n\
         spend = { limit = \"0.000002\", period = \"month\", mode = \"hard\" }\n",
    );
    let config = tollgate::Config::from_toml_str(&toml).unwrap();
    for t in config.tenants() {
        if let Some(o) = t.overrides() {
            config.check_override(t.plan(), o).unwrap_or_else(|e| panic!("{}: {e}", t.id()));
        }
    }
    let h = Harness::new(&toml);
    for i in 0..3 {
        let (ticket, _) = admit(&h, "key-u").await.unwrap_or_else(|r| panic!("request {i}: {r:?}"));
        assert!(ticket.complete(200));
    }
    let refused = admit(&h, "key-u").await.expect_err("the override's 3 a day");
    assert_eq!(refused.kind(), tollgate::RejectionKind::QuotaExceeded, "{refused:?}");
    // v's own cap: two requests at 0.000001 each, then 402.
    for _ in 0..2 {
        let (ticket, _) = admit(&h, "key-v").await.unwrap();
        assert!(ticket.complete(200));
    }
    let refused = admit(&h, "key-v").await.expect_err("the override's cap");
    assert_eq!(refused.kind(), tollgate::RejectionKind::SpendCapReached, "{refused:?}");
}

/// One served plan: the spend cap a tenant may set is the plan the engine serves it. A
/// directory tenant's overrides that no longer fit the configuration (a fleet rate without
/// `limits.fleet_size_hint`, with a spend cap of 5.00 up to 50.00) are not served: the engine
/// holds it to the plan alone (1.00 up to 10.00), and so do its route, `Admin`, and the usage
/// report. Before, the route took a cap of 20.00 against the overrides' 50.00 while the engine
/// refused at 10.00 with 402.
#[tokio::test]
async fn the_cap_a_tenant_may_set_is_the_plan_the_engine_serves() {
    use tollgate::store::{KeyHash, TenantRecord};
    let toml = TOML.to_owned() + "[plans.pro]\nrate = \"100/s\"\nspend = { limit = \"1.00\", period = \"month\", mode = \"hard\", max_limit = \"10.00\" }\n";
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let mut d = TenantRecord::new("d".into(), "pro".into());
    d.overrides = Some(
        r#"{"rate_scope": "fleet", "spend": {"limit": "5.00", "period": "month", "mode": "hard", "max_limit": "50.00"}}"#
            .into(),
    );
    tollgate::store::DirectoryStore::put_tenant(&*store, &d, &[KeyHash::of(b"key-d")]).await.unwrap();
    let h = Harness::with_store(&toml, store, NOON);
    let (ticket, ctx) = admit(&h, "key-d").await.unwrap();
    ticket.give_back();
    assert_eq!(h.tollgate.stats().overrides_not_served, 1, "the engine serves the plan alone");
    let call = |method: &'static str, body: &'static str| {
        let (engine, ctx) = (h.tollgate.clone(), ctx.clone());
        async move {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            engine.tenant_spend_cap(&ctx, &tollgate::Caller::api_key(b"key-d"), &method, body.as_bytes()).await
        }
    };
    let v: serde_json::Value = serde_json::from_slice(call("GET", "").await.body()).unwrap();
    assert_eq!((v["limit"].as_str(), v["max_limit"].as_str()), (Some("1"), Some("10")), "{v}");
    let r = call("PUT", r#"{"limit": "20.00"}"#).await;
    assert_eq!(r.status(), 422, "above the served plan's most: {:?}", r.body());
    let admin = Admin::for_engine(&h.tollgate);
    let view = admin.spend_cap("d").await.unwrap();
    assert_eq!((view.limit, view.own, view.max_limit), (NANOS, None, 10 * NANOS), "nothing changed");
    let e = admin.set_spend_cap("d", Some("20.00"), QuotaMode::Hard).await.unwrap_err();
    assert!(e.to_string().contains("above the most"), "{e}");
    // Within it: taken, and the engine holds the tenant to it.
    assert_eq!(call("PUT", r#"{"limit": "10.00"}"#).await.status(), 200);
    let report = h.tollgate.usage_report(&"d".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let spend = report.quotas.iter().find(|q| q.meter.as_str() == "spend").expect("the spend quota is reported");
    assert_eq!(spend.limit, 10 * NANOS);
}

/// A priced held request on a spend-capped plan holds its cost (and, where the meter has a
/// hard quota of its own, its units), and counts as one hold toward
/// `limits.max_holds_per_tenant` and `max_holds` (issue 85 item 4, the review's N8): two
/// streams of a tenant whose share is two are both served, a third refused by the tenant's
/// share, and another tenant's one more by the node's cap. On main the cost's side counted as
/// a hold of its own beside the meter's, and the second stream was refused `Units held`.
#[tokio::test]
async fn a_priced_hold_counts_once_toward_the_caps_on_open_holds() {
    // The meter with a hard quota of its own (two holds each), and without (the cost's alone).
    let quota = TOML.replace(
        "[plans.p]\n",
        "[plans.p]\nquotas.tokens = { limit = 1000000, period = \"month\", mode = \"hard\" }\n",
    );
    for toml in [quota, TOML.to_owned()] {
        let h = Harness::new(&(toml + "[limits]\nmax_holds = 3\nmax_holds_per_tenant = 2\n"));
        let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
        let first = ctx.hold_with("tokens", 10, Overrun::Refuse).await.expect("the first stream");
        let second = ctx.hold_with("tokens", 10, Overrun::Refuse).await.expect("the second: two holds, not four");
        assert_eq!(h.tollgate.stats().holds_open, 2, "each priced hold counted once");
        let r = ctx.hold_with("tokens", 10, Overrun::Refuse).await.unwrap_err();
        assert_eq!(r.kind(), RejectionKind::UnitsHeld);
        assert!(r.to_string().contains("(limits.max_holds_per_tenant)"), "{r}");
        // The node's cap counts them once too: another tenant's one more fills it.
        let (other, octx) = admit(&h, "key-u").await.unwrap();
        let third = octx.hold_with("tokens", 10, Overrun::Refuse).await.expect("the node's third hold");
        let r = octx.hold_with("tokens", 10, Overrun::Refuse).await.unwrap_err();
        assert!(r.to_string().contains("(limits.max_holds)"), "{r}");
        for mut hold in [first, second, third] {
            hold.record(10).unwrap();
            hold.settle();
        }
        assert_eq!(h.tollgate.stats().holds_open, 0);
        assert!(ticket.complete(200));
        assert!(other.complete(200));
        // Three holds of 10 tokens (⌈73,133.3⌉ nano-dollars each) and two requests (1,000 each).
        assert_eq!(spend_recorded(&h, "t").await + spend_recorded(&h, "u").await, 3 * 73_134 + 2 * 1_000);
    }
}

/// Priced holds open at shutdown are settled with the others, and the count of open holds
/// stays whole (issue 85 review: the spend sides' count was not cleared with the holds, and
/// `Stats::holds_open` wrapped below zero).
#[tokio::test]
async fn priced_holds_open_at_shutdown_leave_the_count_whole() {
    let toml = TOML.replace(
        "[plans.p]\n",
        "[plans.p]\nquotas.tokens = { limit = 1000000, period = \"month\", mode = \"hard\" }\n",
    );
    let h = Harness::new(&toml);
    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
    let open = ctx.hold_with("tokens", 10, Overrun::Refuse).await.unwrap();
    assert_eq!(h.tollgate.stats().holds_open, 1);
    h.tollgate.shutdown().await.unwrap();
    assert_eq!(h.tollgate.stats().holds_open, 0);
    drop(open);
    ticket.give_back();
}
