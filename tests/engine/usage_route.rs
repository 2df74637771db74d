//! The tenant's own usage route (`Tollgate::tenant_usage`), mounted outside the layer: every
//! part of its answer, valid against docs/usage.schema.json; its numbers those of the
//! headers; one view per tenant per second, with the store calls the guide lists; never
//! another tenant's; nothing charged; the layer's refusals.

use crate::common;

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;
use common::{Faulty, Harness, NOON};
use tollgate::{admin::Admin, clock::Clock, events::Event, store::MemoryStore};

const DAY: i64 = 86_400;
/// 2100-01-01: an expiry after any clock of the tests.
const FAR: i64 = 4_102_444_800;

/// A plan with every part the route shows: a daily quota, a prepaid balance spent by a
/// route's reports, a monthly soft quota of usage events, a spend cap.
const TOML: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.01"
[meters.tokens]
[meters.images]
price = "0.10"
[[routes]]
path = "/tokens/{n}"
reports = ["tokens"]
[plans.p]
rate = "100/s"
quotas.requests = { limit = 100, period = "day", mode = "hard" }
quotas.tokens = { period = "prepaid", lease = 10 }
quotas.images = { limit = 50, period = "month", mode = "soft" }
spend = { limit = "10.00", period = "month", mode = "hard", max_limit = "50.00" }
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.u]
plan = "p"
keys = ["key-u"]
"#;

/// A request of the usage route.
fn usage(method: &str, key: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder().method(method).uri("/v1/usage");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(()).unwrap()
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

fn find<'a>(list: &'a serde_json::Value, meter: &str) -> &'a serde_json::Value {
    list.as_array().unwrap().iter().find(|q| q["meter"] == meter).unwrap_or_else(|| panic!("no {meter} in {list}"))
}

/// The `r` of the item `name` in a `RateLimit` header.
fn r_of(header: &str, name: &str) -> u64 {
    header
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{name}\";")))
        .and_then(|i| i.split(';').find_map(|p| p.strip_prefix("r=")))
        .unwrap_or_else(|| panic!("no {name} in {header}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_route_answers_every_part_with_the_numbers_of_the_headers_valid_against_its_schema() {
    let h = Harness::new(TOML);
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "tokens", 1000, None, "pack-1").await.unwrap();
    admin.grant_credits("t", "tokens", 100, Some(FAR), "pack-2").await.unwrap();
    // Images: 4 in the previous month (February), 2 yesterday.
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs as u64);
    h.tollgate.record_event(Event::new("e1", "t".into(), "images".into(), 4, at(NOON - 20 * DAY))).await.unwrap();
    h.tollgate.record_event(Event::new("e2", "t".into(), "images".into(), 2, at(NOON - DAY))).await.unwrap();
    // The second pack revoked: closed, its unspent units lost. (Before the requests: a change
    // of credits makes this node read the tenant again.)
    admin.revoke_credits("t", Some("tokens"), "pack-2").await.unwrap();
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert_eq!(h.status("/tokens/30", "key-t").await, 200);
    h.clock.advance(Duration::from_secs(120));

    let response = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["cache-control"], "private, max-age=1");
    assert_eq!(response.headers()["vary"], "x-api-key", "a cache keeps one answer per key");
    assert!(response.headers()["etag"].to_str().unwrap().starts_with("W/\""));
    let body = json(response.body());
    assert_eq!((&body["version"], &body["tenant"], &body["plan"]), (&1.into(), &"t".into(), &"p".into()));
    assert_eq!(body["as_of"], NOON + 120);
    // March 2026: the current period; February the previous one, whole (usage is kept 63 days).
    assert_eq!(body["periods"]["current"]["start"], 1_772_323_200);
    assert_eq!(body["periods"]["previous"]["start"], 1_769_904_000);
    assert_eq!(body["periods"]["previous"]["complete"], true);

    let requests = find(&body["quotas"], "requests");
    assert_eq!((&requests["period"], &requests["limit"], &requests["used"]), (&"day".into(), &100.into(), &4.into()));
    assert_eq!(requests["reset"], NOON - NOON % DAY + DAY);
    let tokens = find(&body["quotas"], "tokens");
    assert_eq!((&tokens["period"], &tokens["start"], &tokens["reset"]), (&"prepaid".into(), &().into(), &().into()));
    let images = find(&body["quotas"], "images");
    assert_eq!((&images["mode"], &images["used"], &images["remaining"]), (&"soft".into(), &2.into(), &48.into()));
    assert!(body["quotas"].as_array().unwrap().iter().all(|q| q["meter"] != "spend"), "the cap is apart");

    // The next request's header says what the route said, less its own unit.
    let next = h.get("/", "key-t").await;
    let header = next.header("ratelimit").unwrap();
    assert_eq!(r_of(header, "requests-day"), requests["remaining"].as_u64().unwrap() - 1, "{header}");

    let balance = find(&body["balances"], "tokens");
    let grants = balance["grants"].as_array().unwrap();
    let pack = |id: &str| grants.iter().find(|g| g["id"] == id).unwrap();
    assert_eq!((&pack("pack-1")["bought"], &pack("pack-1")["closed"]), (&1000.into(), &().into()));
    assert_eq!(pack("pack-2")["expires_at"], FAR);
    assert_eq!(pack("pack-2")["closed"]["reason"], "revoked");
    assert!(pack("pack-2")["closed"]["at"].is_i64(), "when the operator revoked it");
    assert_eq!(balance["recharge"], serde_json::Value::Null, "the plan recharges nothing");

    let spend = &body["spend"];
    // 4 requests at 0.01 and 6 images at 0.10, charged as they were recorded.
    assert_eq!(spend["spent"], "0.64", "{spend}");
    assert_eq!((&spend["currency"], &spend["limit"], &spend["max_limit"]), (&"usd".into(), &"10".into(), &"50".into()));
    assert_eq!((&spend["mode"], &spend["set_by"], &spend["period"]), (&"hard".into(), &"plan".into(), &"month".into()));

    let images = find(&body["usage"], "images");
    assert_eq!((&images["previous"], &images["current"]), (&4.into(), &2.into()));
    let days: Vec<(String, u64)> = images["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["day"].as_str().unwrap().to_owned(), d["quantity"].as_u64().unwrap()))
        .collect();
    assert_eq!(days, [("2026-02-22".to_owned(), 4), ("2026-03-13".to_owned(), 2)]);
    assert_eq!(find(&body["usage"], "requests")["current"], 4);

    // A tenant without usage, and the one above, both valid.
    let other = h.tollgate.tenant_usage(&usage("GET", Some("key-u"))).await;
    common::check_usage_schema(&[response.body().clone(), other.body().clone()]);
}

/// 1,000 polls in a second make one view, with the store calls docs/usage.md lists; a
/// matching `If-None-Match` is 304 and reads nothing; a store that fails is 503, kept nothing.
#[tokio::test]
async fn polls_make_one_view_a_second_with_the_store_calls_the_guide_lists() {
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(TOML, store.clone(), NOON);
    let calls = || {
        store.quota_calls.load(Ordering::SeqCst)
            + store.usage_reads.load(Ordering::SeqCst)
            + store.counter_reads.load(Ordering::SeqCst)
            + store.tenant_reads.load(Ordering::SeqCst)
            + store.lookups.load(Ordering::SeqCst)
    };
    assert_eq!(h.status("/", "key-t").await, 200);
    let before = (calls(), h.tollgate.stats().usage_refreshes);
    let first = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
    assert_eq!(first.status(), 200);
    // The counters of each calendar quota (the spend cap's, the day's requests', the month's
    // images'), the usage of both periods (the closed days, the open ones), the credit grants.
    assert_eq!((calls() - before.0, h.tollgate.stats().usage_refreshes - before.1), (6, 1));
    let etag = first.headers()["etag"].clone();
    let before = calls();
    for _ in 0..1000 {
        let again = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
        assert_eq!((again.status(), again.body()), (http::StatusCode::OK, first.body()));
    }
    let mut revalidate = usage("GET", Some("key-t"));
    revalidate.headers_mut().insert("if-none-match", etag.clone());
    let not_modified = h.tollgate.tenant_usage(&revalidate).await;
    assert_eq!(not_modified.status(), 304);
    assert!(not_modified.body().is_empty());
    assert_eq!(not_modified.headers()["etag"], etag);
    let head = h.tollgate.tenant_usage(&usage("HEAD", Some("key-t"))).await;
    assert_eq!((head.status(), head.body().is_empty(), &head.headers()["etag"]), (http::StatusCode::OK, true, &etag));
    assert_eq!((calls() - before, h.tollgate.stats().usage_refreshes), (0, 1), "nothing read within the second");

    // The next second: one view made again; the same numbers, the same tag (its `as_of` is
    // not in the tag): still 304.
    h.clock.advance(Duration::from_secs(1));
    let before = calls();
    let again = h.tollgate.tenant_usage(&revalidate).await;
    assert_eq!((again.status(), h.tollgate.stats().usage_refreshes), (http::StatusCode::NOT_MODIFIED, 2));
    // The closed days as the first refresh read them (less than a minute ago): the open
    // days' usage alone is read.
    assert_eq!(calls() - before, 5);
    assert_eq!(again.headers()["etag"], etag);
    // New numbers, a new tag.
    assert_eq!(h.status("/", "key-t").await, 200);
    h.clock.advance(Duration::from_secs(1));
    let changed = h.tollgate.tenant_usage(&revalidate).await;
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"], etag);
    // A store that does not answer: 503; the polls of the next second are refused without
    // asking it again, then it is asked again.
    h.clock.advance(Duration::from_secs(1));
    store.down.store(true, Ordering::SeqCst);
    let before = calls();
    for _ in 0..100 {
        let down = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
        assert_eq!(
            (down.status(), down.headers().get("retry-after").map(|v| v.to_str().unwrap())),
            (http::StatusCode::SERVICE_UNAVAILABLE, Some("1"))
        );
    }
    assert_eq!(h.tollgate.stats().usage_refreshes, 4, "one refresh tried in the second");
    assert!(
        calls() - before <= 5,
        "{} store calls for 100 polls of a store that is down: one refresh's at most",
        calls() - before
    );
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.status(), 503, "within the second");
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.status(), 200);
    assert_eq!(h.tollgate.stats().usage_refreshes, 5);
}

/// A refresh never waits for a flush (issue 86, item 7): with a flush's batch on its way to
/// the store and held there, the route answers at once, counting the usage recorded since
/// (still in the tenant's counters) and what the store holds; once the batch lands, the next
/// view counts it, once. On main the refresh waited for the flush and answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_never_waits_for_a_flush_under_way() {
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(TOML, store.clone(), NOON);
    let used = |r: &http::Response<Bytes>| find(&json(r.body())["quotas"], "requests")["used"].as_u64().unwrap();
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    // Two more, then a flush whose commit is held before it reaches the store.
    for _ in 0..2 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    let (entered, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    *store.hold_commit.lock().unwrap() = Some((entered.clone(), release.clone()));
    let flushing = tokio::spawn({
        let engine = h.tollgate.clone();
        async move { engine.flush().await.map(|r| r.batches) }
    });
    entered.notified().await;
    // One more, recorded while the batch is on its way.
    assert_eq!(h.status("/", "key-t").await, 200);
    let during = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
    assert_eq!(during.status(), 200, "answered while the flush holds its batch");
    // The 3 stored and the 1 in the counters; the 2 on their way are counted once they land.
    assert_eq!(used(&during), 4);
    release.notify_one();
    assert_eq!(flushing.await.unwrap().unwrap(), 1, "the batch held, then committed");
    h.clock.advance(Duration::from_secs(1));
    let after = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
    assert_eq!(used(&after), 6, "each counted once");
}

/// A node's refreshes are bounded, whoever polls (issue 86, item 7): with
/// `usage.view_refresh_rate = "2/s"`, polls of six tenants in one second make two views; a
/// tenant whose view is at most a minute old is answered it, the others 503 with
/// `Retry-After: 1`, and nothing more is read; a second later two more views are made.
#[tokio::test]
async fn a_nodes_refreshes_are_bounded_whoever_polls() {
    let tenants: String = (0..6).map(|i| format!("[tenants.n{i}]\nplan = \"p\"\nkeys = [\"key-n{i}\"]\n")).collect();
    let toml = format!("[usage]\nview_refresh_rate = \"2/s\"\n{TOML}{tenants}");
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(&toml, store.clone(), NOON);
    let poll = |i: usize| h.tollgate.tenant_usage(&usage("GET", Some(&format!("key-n{i}"))));
    // n0 polls, and again 30 s later: its view is kept.
    assert_eq!(poll(0).await.status(), 200);
    h.clock.advance(Duration::from_secs(30));
    let reads = || store.usage_reads.load(Ordering::SeqCst);
    let before = reads();
    let mut answers = Vec::new();
    for i in 1..6 {
        let r = poll(i).await;
        answers.push((r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned())));
    }
    let ok = (200, None);
    let busy = (503, Some("1".to_owned()));
    assert_eq!(answers, [ok.clone(), ok.clone(), busy.clone(), busy.clone(), busy.clone()]);
    assert_eq!(reads() - before, 4, "two views made (each reading the closed days and the open ones)");
    // n0's view, 30 s old: answered as it was, nothing read.
    let kept = poll(0).await;
    assert_eq!(kept.status(), 200);
    assert_eq!(json(kept.body())["as_of"], NOON);
    assert_eq!(reads() - before, 4);
    assert_eq!(h.tollgate.stats().usage_refreshes_refused, 4);
    // A second later: two more.
    h.clock.advance(Duration::from_secs(1));
    let mut again = Vec::new();
    for i in 3..6 {
        again.push(poll(i).await.status().as_u16());
    }
    assert_eq!(again.iter().filter(|s| **s == 200).count(), 2, "{again:?}");
    assert_eq!(h.tollgate.stats().usage_refreshes, 5);
    // Past a minute, a kept view is not answered: n0 waits for the budget as the others.
    h.clock.advance(Duration::from_secs(60));
    for i in 1..3 {
        assert_eq!(poll(i).await.status(), 200);
    }
    assert_eq!(poll(0).await.status(), 503, "its view is more than a minute old");
}

/// Past the node's budget (issue 86, item 7): tenants whose views are young (under 10 s) take
/// no more than half the burst, leaving the rest to tenants whose views are older or who have
/// none; and a key issued since its tenant's view was made, answered that view, is told to
/// come back (503, `Retry-After: 1`), not refused as not live (403).
#[tokio::test]
async fn young_views_leave_half_the_budget_and_a_new_key_is_told_to_come_back() {
    let tenants: String = (2..6).map(|i| format!("[tenants.n{i}]\nplan = \"p\"\nkeys = [\"key-n{i}\"]\n")).collect();
    let toml = format!("[usage]\nview_refresh_rate = \"4/s\"\n{TOML}{tenants}");
    let h = Harness::new(&toml);
    // n1 is in the directory, with a key issued through `Admin`.
    let admin = Admin::for_engine(&h.tollgate);
    admin.add_tenant("n1", "p", None).await.unwrap();
    let issued = admin.issue_key("n1", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let key = |i: usize| if i == 1 { issued.clone() } else { format!("key-n{i}") };
    let poll = |key: String| h.tollgate.tenant_usage(&usage("GET", Some(&key)));
    let stats = || (h.tollgate.stats().usage_refreshes, h.tollgate.stats().usage_refreshes_refused);
    for i in 1..5 {
        assert_eq!(poll(key(i)).await.status(), 200);
    }
    assert_eq!(stats(), (4, 0), "the burst");
    // 1.5 s on, the bucket full again: n1 and n2, whose views are young, take half of it; n3
    // is answered its view of 1.5 s ago; n5, with none, takes a refresh still.
    h.clock.advance(Duration::from_millis(1_500));
    for i in 1..4 {
        assert_eq!(poll(key(i)).await.status(), 200);
    }
    assert_eq!(stats(), (6, 1), "two young views made, one answered as it was");
    assert_eq!(poll(key(5)).await.status(), 200);
    assert_eq!(stats(), (7, 1), "the other half for a tenant without a view");
    // A key of n1 issued now: n1's view (made before it) is answered while the budget is spent.
    let fresh = admin.issue_key("n1", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    h.clock.advance(Duration::from_millis(1_000));
    for i in [2, 3, 5] {
        assert_eq!(poll(key(i)).await.status(), 200);
    }
    let r = poll(fresh).await;
    assert_eq!(
        (r.status(), r.headers().get("retry-after").map(|v| v.to_str().unwrap())),
        (http::StatusCode::SERVICE_UNAVAILABLE, Some("1")),
        "{:?}",
        r.body()
    );
}

/// Closed days are read at most once a minute (issue 86, item 7): a refresh reads the open
/// days (from the UTC day an hour ago) and takes the closed ones as the tenant's last
/// refresh read them; an event late in a closed day shows within the minute, one of an open
/// day at the next refresh.
#[tokio::test]
async fn closed_days_are_read_once_a_minute_and_late_usage_shows_within_it() {
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(TOML, store.clone(), NOON);
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs as u64);
    let event = |id: &str, n: u64, secs: i64| Event::new(id, "t".into(), "images".into(), n, at(secs));
    let reads = || store.usage_reads.load(Ordering::SeqCst);
    let images = |h: &Harness| {
        let engine = h.tollgate.clone();
        async move {
            let r = engine.tenant_usage(&usage("GET", Some("key-t"))).await;
            assert_eq!(r.status(), 200);
            find(&json(r.body())["quotas"], "images")["used"].as_u64().unwrap()
        }
    };
    h.tollgate.record_event(event("e1", 4, NOON - 2 * DAY)).await.unwrap();
    let before = reads();
    assert_eq!(images(&h).await, 4);
    assert_eq!(reads() - before, 2, "the closed days, the open ones");
    // Three days ago, recorded late: the closed days as read less than a minute ago.
    h.clock.advance(Duration::from_secs(1));
    h.tollgate.record_event(event("e2", 3, NOON - 3 * DAY)).await.unwrap();
    assert_eq!(images(&h).await, 4);
    assert_eq!(reads() - before, 3, "the open days alone");
    // A minute on, read again.
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(images(&h).await, 7);
    assert_eq!(reads() - before, 5);
    // An hour ago, today: an open day, at the next refresh.
    h.clock.advance(Duration::from_secs(1));
    h.tollgate.record_event(event("e3", 1, NOON - 3600)).await.unwrap();
    assert_eq!(images(&h).await, 8);
    assert_eq!(reads() - before, 6);
}

/// The previous billing period is whole (issue 86, item 8): requests of the 1st of February,
/// read on the 14th of March (41 days later), are the previous period's, which is complete.
/// On main usage was kept 35 days: February's first days were gone, `complete` false (true
/// only in a month's first 4 to 7 days).
#[tokio::test]
async fn the_previous_period_is_whole_until_the_current_one_ends() {
    let h = Harness::with_store(TOML, Arc::new(MemoryStore::new()), NOON - 41 * DAY);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    h.clock.advance(Duration::from_secs(41 * DAY as u64));
    assert_eq!(h.status("/", "key-t").await, 200);
    h.tollgate.flush().await.unwrap();
    let body = json(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.body());
    let requests = find(&body["usage"], "requests");
    assert_eq!((requests["previous"].as_u64(), requests["current"].as_u64()), (Some(3), Some(1)), "{body}");
    assert_eq!(body["periods"]["previous"]["complete"], true);
}

/// Polls of two tenants in the same second, interleaved, concurrently: each gets its own
/// tenant's view, never the other's, and one view each is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_polls_of_two_tenants_get_their_own_views_one_made_each() {
    let h = Harness::new(TOML);
    let engine = h.tollgate.clone();
    let mut polls = Vec::new();
    for i in 0..200 {
        let engine = engine.clone();
        let key = if i % 2 == 0 { "key-t" } else { "key-u" };
        polls.push(tokio::spawn(async move {
            let r = engine.tenant_usage(&usage("GET", Some(key))).await;
            (key, r.status(), json(r.body())["tenant"].as_str().unwrap().to_owned(), r.headers()["etag"].clone())
        }));
    }
    let mut tags = std::collections::BTreeMap::new();
    for poll in polls {
        let (key, status, tenant, etag) = poll.await.unwrap();
        assert_eq!((status, tenant.as_str()), (http::StatusCode::OK, &key[4..]), "{key}");
        tags.entry(key).or_insert_with(std::collections::BTreeSet::new).insert(etag);
    }
    assert_eq!(engine.stats().usage_refreshes, 2, "one view per tenant");
    assert!(tags.values().all(|t| t.len() == 1));
    // Another tenant's tag is not this tenant's: its view is answered whole.
    let mut theirs = usage("GET", Some("key-u"));
    theirs.headers_mut().insert("if-none-match", tags["key-t"].first().unwrap().clone());
    let r = engine.tenant_usage(&theirs).await;
    assert_eq!((r.status(), json(r.body())["tenant"].as_str()), (http::StatusCode::OK, Some("u")));
}

/// The route charges nothing (a plan's rate and quota untouched by polls), and refuses as
/// the layer does: 401 without credentials even where anonymous callers are served, 401 for
/// a key served as the anonymous tenant, 400 for a malformed key, 405 for another method.
#[tokio::test]
async fn the_route_charges_nothing_and_refuses_as_the_layer_does() {
    let toml = r#"
[identify]
unknown = "anonymous"
anonymous_plan = "anon"
[plans.anon]
rate = "1/s"
burst = 1
[plans.p]
rate = "2/s"
burst = 2
quotas.requests = { limit = 3, period = "day", mode = "hard" }
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let h = Harness::build(toml, Arc::new(MemoryStore::new()), clock, handle);
    for _ in 0..50 {
        assert_eq!(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.status(), 200);
    }
    // The burst and the quota are whole.
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(h.status("/", "key-t").await, 200);
    let body = json(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.body());
    assert_eq!(find(&body["quotas"], "requests")["limit"], 3);

    let missing = h.tollgate.tenant_usage(&usage("GET", None)).await;
    assert_eq!(missing.status(), 401, "no usage of its own to show an anonymous caller");
    assert!(missing.headers().contains_key("www-authenticate"));
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    let unknown = h.tollgate.tenant_usage(&usage("GET", Some("key-nobody"))).await;
    assert_eq!(unknown.status(), 401, "an unknown key is not the anonymous tenant's view");
    let malformed = h.tollgate.tenant_usage(&usage("GET", Some("key t"))).await;
    assert_eq!(malformed.status(), 400);
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = h.tollgate.tenant_usage(&usage(method, Some("key-t"))).await;
        assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().unwrap()), (405, "GET, HEAD"), "{method}");
    }
    let repeated =
        http::Request::get("/v1/usage").header("x-api-key", "key-t").header("x-api-key", "key-t").body(()).unwrap();
    assert_eq!(h.tollgate.tenant_usage(&repeated).await.status(), 400);
}

/// A prepaid balance on two nodes, a hold open on the one that answers: the route's
/// `remaining` is what that node's next header says of the balance (`"tokens-prepaid";r=`,
/// which counts the other node's lease as taken: docs/usage.md), its held units are shown,
/// and nothing is counted twice (`used + held + remaining` at most the grants).
#[tokio::test]
async fn a_fleet_balance_shows_what_the_header_says_and_this_nodes_hold() {
    use tollgate::door::{Admission, Credential, RequestInfo};
    let store = Arc::new(MemoryStore::new());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let a = Harness::build(TOML, store.clone(), clock.clone(), handle.clone());
    let b = Harness::build(TOML, store.clone(), clock, handle);
    Admin::for_engine(&a.tollgate).grant_credits("t", "tokens", 1000, None, "pack-1").await.unwrap();
    assert_eq!(a.status("/tokens/5", "key-t").await, 200);
    assert_eq!(b.status("/tokens/7", "key-t").await, 200);
    let info = RequestInfo::new("GET", "/tokens/0", Credential::ApiKey(b"key-t"));
    let ticket = match a.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => a.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    let hold = ticket.context().hold_with("tokens", 30, tollgate::config::Overrun::Refuse).await.unwrap();
    let body = json(a.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.body());
    let tokens = find(&body["quotas"], "tokens");
    let (limit, used, held, remaining) = (
        tokens["limit"].as_u64().unwrap(),
        tokens["used"].as_u64().unwrap(),
        tokens["held"].as_u64().unwrap(),
        tokens["remaining"].as_u64().unwrap(),
    );
    assert_eq!((limit, held), (1000, 30), "{tokens}");
    assert!(used >= 12 && used + held + remaining <= limit, "{tokens}");
    // A request that only reports the balance (0 tokens) says `remaining` itself.
    let next = a.get("/tokens/0", "key-t").await;
    let header = next.header("ratelimit").unwrap();
    assert_eq!(r_of(header, "tokens-prepaid"), remaining, "{header}; the route said {tokens}");
    drop(hold);
    assert!(ticket.complete(200));
}

/// A balance's grants are listed up to 100, the open ones first; the rest are counted.
#[tokio::test]
async fn at_most_a_hundred_grants_are_listed_the_rest_counted() {
    let h = Harness::new(TOML);
    let admin = Admin::for_engine(&h.tollgate);
    for i in 0..103 {
        admin.grant_credits("t", "tokens", 1, None, &format!("pack-{i}")).await.unwrap();
    }
    admin.revoke_credits("t", Some("tokens"), "pack-0").await.unwrap();
    let response = h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await;
    let body = json(response.body());
    let balance = find(&body["balances"], "tokens");
    let grants = balance["grants"].as_array().unwrap();
    assert_eq!((grants.len(), &balance["grants_omitted"]), (100, &3.into()));
    assert!(grants.iter().all(|g| g["closed"].is_null()), "the open ones first");
    common::check_usage_schema(&[response.body().clone()]);
}

/// A flush that commits while the route reads the store: the route read the store without
/// holding the pipeline, so it reads again; the usage is counted once, neither missed nor
/// twice.
#[tokio::test]
async fn usage_committed_while_the_route_reads_is_counted_once() {
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(TOML, store.clone(), NOON);
    // A first view reads the closed days: the next, a second later, reads the open ones
    // alone, the read held below.
    assert_eq!(h.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.status(), 200);
    h.clock.advance(Duration::from_secs(1));
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    let (entered, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    *store.hold_usage_read.lock().unwrap() = Some((entered.clone(), release.clone()));
    let reads = store.usage_reads.load(Ordering::SeqCst);
    let engine = h.tollgate.clone();
    let poll = tokio::spawn(async move { json(engine.tenant_usage(&usage("GET", Some("key-t"))).await.body()) });
    entered.notified().await;
    // The route's read saw none of the 3 requests; the flush commits them now.
    let flushed = h.tollgate.flush().await.unwrap();
    assert!(flushed.units >= 3, "{flushed:?}");
    release.notify_one();
    let body = poll.await.unwrap();
    assert_eq!(find(&body["quotas"], "requests")["used"], 3, "{body}");
    assert_eq!(find(&body["usage"], "requests")["current"], 3, "{body}");
    assert_eq!(store.usage_reads.load(Ordering::SeqCst) - reads, 2, "the open days read again");
}

/// Polls that waited for a refresh that took longer than a second (the clock moved while it
/// read the store) take its view: one refresh, not one per poll.
#[tokio::test(flavor = "current_thread")]
async fn polls_that_waited_for_a_slow_refresh_take_its_view() {
    let store = Arc::new(Faulty::over(Arc::new(MemoryStore::new())));
    let h = Harness::with_store(TOML, store.clone(), NOON);
    assert_eq!(h.status("/", "key-t").await, 200);
    let (entered, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    *store.hold_usage_read.lock().unwrap() = Some((entered.clone(), release.clone()));
    let polls: Vec<_> = (0..6)
        .map(|_| {
            let engine = h.tollgate.clone();
            tokio::spawn(async move { engine.tenant_usage(&usage("GET", Some("key-t"))).await.status() })
        })
        .collect();
    entered.notified().await;
    // On one thread, each other poll runs until it waits for the tenant's view.
    tokio::task::yield_now().await;
    h.clock.advance(Duration::from_secs(2));
    release.notify_one();
    for poll in polls {
        assert_eq!(poll.await.unwrap(), 200);
    }
    assert_eq!(h.tollgate.stats().usage_refreshes, 1);
}

/// A directory that does not answer is 503 on the route, even where an anonymous plan fails
/// open (the layer then serves the request as the anonymous tenant): a tenant is never shown
/// the anonymous tenant's usage, nor told its key is unknown.
#[tokio::test]
async fn a_directory_outage_is_503_even_where_the_anonymous_plan_fails_open() {
    let toml = r#"
[identify]
unknown = "anonymous"
anonymous_plan = "anon"
[plans.anon]
rate = "100/s"
on_store_error = "fail-open"
[plans.p]
rate = "100/s"
"#;
    let memory = Arc::new(MemoryStore::new());
    let record = tollgate::store::TenantRecord::new("d".into(), "p".into());
    tollgate::store::DirectoryStore::put_tenant(memory.as_ref(), &record, &[tollgate::store::KeyHash::of(b"key-d")])
        .await
        .unwrap();
    let store = Arc::new(Faulty::over(memory));
    let h = Harness::with_store(toml, store.clone(), NOON);
    store.down.store(true, Ordering::SeqCst);
    let down = h.tollgate.tenant_usage(&usage("GET", Some("key-d"))).await;
    assert_eq!(down.status(), 503, "{:?}", down.body());
    assert_eq!(h.status("/", "key-d").await, 200, "the layer serves it as the anonymous tenant");
    store.down.store(false, Ordering::SeqCst);
    let up = h.tollgate.tenant_usage(&usage("GET", Some("key-d"))).await;
    assert_eq!((up.status(), json(up.body())["tenant"].as_str()), (http::StatusCode::OK, Some("d")));
}

/// Two nodes of one tenant: node A served one request of the day and leased tokens; node B
/// then served 60 requests and spent the rest of the balance, which B's webhook topped up by
/// 1,000. A's view answers every quota from one read of the store: `used + held + remaining`
/// is at most the limit, and the balance shows the top-up (it showed A's last view: 99 of 100
/// requests remaining beside 67 used, and the balance as before the top-up).
#[tokio::test]
async fn two_nodes_views_add_up_to_the_limit_from_one_read() {
    let store = Arc::new(MemoryStore::new());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let a = Harness::build(TOML, store.clone(), clock.clone(), handle.clone());
    let b = Harness::build(TOML, store.clone(), clock, handle);
    Admin::for_engine(&a.tollgate).grant_credits("t", "tokens", 100, None, "pack-1").await.unwrap();
    assert_eq!(a.status("/tokens/5", "key-t").await, 200);
    for _ in 0..60 {
        assert_eq!(b.status("/tokens/1", "key-t").await, 200);
    }
    // B spends what is left of the balance, and the tenant buys more.
    while b.status("/tokens/5", "key-t").await == 200 {}
    Admin::for_engine(&b.tollgate).grant_credits("t", "tokens", 1000, None, "pack-2").await.unwrap();
    b.tollgate.flush().await.unwrap();
    let body = json(a.tollgate.tenant_usage(&usage("GET", Some("key-t"))).await.body());
    for q in body["quotas"].as_array().unwrap() {
        let n = |k: &str| q[k].as_u64().unwrap_or_else(|| panic!("{k} of {q}"));
        assert!(n("used") + n("held") + n("remaining") <= n("limit"), "one read: {q}");
    }
    let requests = find(&body["quotas"], "requests");
    assert!(requests["used"].as_u64().unwrap() >= 62, "{requests}");
    let tokens = find(&body["quotas"], "tokens");
    assert_eq!(tokens["limit"], 1100, "the balance as the store holds it: {tokens}");
    assert!(tokens["remaining"].as_u64().unwrap() >= 990, "the top-up shows: {tokens}");
}
