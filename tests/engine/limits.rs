//! Rate, burst, quotas, route costs, give-back and idempotency, through the tower layer.

use crate::common;

use std::time::Duration;

use common::{req, Harness, NOON};

const PLANS: &str = r#"
[meters.tokens]

[plans.free]
rate = "2/s"
burst = 5
quotas.requests = { limit = 5, period = "day", mode = "hard", lease = 2 }

[plans.soft]
quotas.requests = { limit = 2, period = "day", mode = "soft" }

[plans.big]
rate = "100/s"
quotas.requests = { limit = 12, period = "month", mode = "hard", anchor_day = 1 }

[[routes]]
method = "POST"
path = "/v1/generate"
cost = 5

[tenants.acme]
plan = "free"
keys = ["key-acme"]

[tenants.softco]
plan = "soft"
keys = ["key-soft"]

[tenants.bigco]
plan = "big"
keys = ["key-big"]
"#;

#[tokio::test]
async fn rate_admits_the_burst_then_refills_at_the_rate() {
    let toml = PLANS.replace("limit = 5, period = \"day\"", "limit = 50, period = \"day\"");
    let h = Harness::new(&toml);
    for _ in 0..5 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["policy"], "rate");
    // One cell comes back every 500 ms.
    h.clock.advance(Duration::from_millis(499));
    assert_eq!(h.status("/", "key-acme").await, 429);
    h.clock.advance(Duration::from_millis(1));
    assert_eq!(h.status("/", "key-acme").await, 200);
    assert_eq!(h.status("/", "key-acme").await, 429);
}

#[tokio::test]
async fn a_hard_daily_quota_rejects_until_utc_midnight() {
    // 23:59:50 UTC.
    let h = Harness::at(PLANS, NOON + 12 * 3600 - 10);
    for i in 0..5 {
        assert_eq!(h.status("/", "key-acme").await, 200, "request {i}");
        h.clock.advance(Duration::from_secs(1));
    }
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(body["policy"], "requests-day");
    assert_eq!(body["retry_after"], 5, "seconds to midnight");
    assert_eq!(r.header("retry-after"), Some("5"));
    h.clock.advance(Duration::from_secs(4));
    assert_eq!(h.status("/", "key-acme").await, 429, "still the same day");
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(h.status("/", "key-acme").await, 200, "a new day, a new quota");
}

#[tokio::test]
async fn a_monthly_quota_follows_the_calendar_month() {
    // 2026-02-28T23:59:00Z: February has 28 days.
    let h = Harness::at(PLANS, 1_772_323_140);
    // Cost 5 per generate: 12 units allow two.
    let post = || req("POST", "/v1/generate", Some("key-big"), None);
    assert_eq!(h.send(post()).await.status, 200);
    assert_eq!(h.send(post()).await.status, 200);
    let r = h.send(post()).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["policy"], "requests-month");
    assert_eq!(r.json()["retry_after"], 60);
    // A GET costs 1: two units are left.
    assert_eq!(h.status("/", "key-big").await, 200);
    assert_eq!(h.status("/", "key-big").await, 200);
    assert_eq!(h.status("/", "key-big").await, 429);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(h.send(post()).await.status, 200, "March 1st starts a new period");
}

#[tokio::test]
async fn a_soft_quota_admits_past_its_limit_and_reports_zero_remaining() {
    let h = Harness::new(PLANS);
    for _ in 0..5 {
        let r = h.get("/", "key-soft").await;
        assert_eq!(r.status, 200);
    }
    let r = h.get("/", "key-soft").await;
    assert_eq!(r.header("ratelimit"), Some("\"requests-day\";r=0;t=43200"));
}

#[tokio::test]
async fn failed_requests_give_their_units_back() {
    let h = Harness::new(PLANS);
    // 5xx responses are not billable: they do not spend the daily quota of 5.
    for _ in 0..3 {
        assert_eq!(h.status("/fail", "key-acme").await, 500);
        h.clock.advance(Duration::from_secs(1));
    }
    for _ in 0..5 {
        assert_eq!(h.status("/missing", "key-acme").await, 404, "4xx is billable by default");
        h.clock.advance(Duration::from_secs(1));
    }
    assert_eq!(h.status("/", "key-acme").await, 429);
    h.tollgate.flush().await.unwrap();
    let total =
        common::committed(&**h.tollgate.usage_store(), "acme", "requests", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(total, 5);
}

#[tokio::test]
async fn an_idempotent_replay_is_neither_charged_nor_recorded_twice() {
    let h = Harness::new(PLANS);
    let post = |k: &str| req("POST", "/", Some("key-acme"), Some(k));
    assert_eq!(h.send(post("order-1")).await.status, 200);
    assert_eq!(h.send(post("order-1")).await.status, 200);
    assert_eq!(h.send(post("order-1")).await.status, 200);
    h.clock.advance(Duration::from_secs(2));
    // Four more distinct requests fill the quota of 5: the replays took nothing.
    for k in ["a", "b", "c", "d"] {
        assert_eq!(h.send(post(k)).await.status, 200, "key {k}");
        h.clock.advance(Duration::from_secs(1));
    }
    assert_eq!(h.send(post("e")).await.status, 429);
    // A replay is never charged and takes nothing: answered from the store (no work is done)
    // even past a spent hard quota.
    let replay = h.send(post("a")).await;
    assert_eq!((replay.status.as_u16(), replay.header("idempotent-replayed")), (200, Some("true")));
    h.tollgate.flush().await.unwrap();
    let total =
        common::committed(&**h.tollgate.usage_store(), "acme", "requests", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(total, 5);
    // A failed request releases its key: its retry is charged.
    assert_eq!(h.send(req("POST", "/fail", Some("key-soft"), Some("retry-me"))).await.status, 500);
    assert_eq!(h.send(req("POST", "/", Some("key-soft"), Some("retry-me"))).await.status, 200);
    h.tollgate.flush().await.unwrap();
    assert_eq!(
        common::committed(&**h.tollgate.usage_store(), "softco", "requests", NOON - 7200, NOON + 7200, 3600).await,
        1
    );
}

#[tokio::test]
async fn the_idempotency_key_is_honoured_only_on_the_configured_methods() {
    // By default only POST and PATCH honour it: two GETs with one key are charged twice.
    let h = Harness::new(PLANS);
    assert_eq!(h.send(req("GET", "/", Some("key-soft"), Some("k"))).await.status, 200);
    assert_eq!(h.send(req("GET", "/", Some("key-soft"), Some("k"))).await.status, 200);
    // A malformed key on a method that ignores it is not read, so not refused.
    assert_eq!(h.send(req("GET", "/", Some("key-soft"), Some(&"x".repeat(300)))).await.status, 200);
    assert_eq!(h.send(req("PATCH", "/", Some("key-soft"), Some("p"))).await.status, 200);
    assert_eq!(h.send(req("PATCH", "/", Some("key-soft"), Some("p"))).await.status, 200);
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store().clone();
    assert_eq!(common::committed(&*store, "softco", "requests", NOON - 7200, NOON + 7200, 3600).await, 4);

    // Listed methods only (any case); POST is then charged every time.
    let toml = format!("[limits]\nidempotency_methods = [\"get\"]\n{PLANS}");
    let h = Harness::new(&toml);
    assert_eq!(h.send(req("GET", "/", Some("key-soft"), Some("k"))).await.status, 200);
    assert_eq!(h.send(req("GET", "/", Some("key-soft"), Some("k"))).await.status, 200);
    assert_eq!(h.send(req("POST", "/", Some("key-soft"), Some("k"))).await.status, 200);
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store().clone();
    assert_eq!(common::committed(&*store, "softco", "requests", NOON - 7200, NOON + 7200, 3600).await, 2);

    let err = tollgate::Config::from_toml_str("[limits]\nidempotency_methods = [\"POST\", \"post\"]").unwrap_err();
    assert!(err.to_string().contains("limits.idempotency_methods[1]"), "{err}");
    let err = tollgate::Config::from_toml_str("[limits]\nidempotency_methods = [\"PO ST\"]").unwrap_err();
    assert!(err.to_string().contains("is not an HTTP method"), "{err}");
}

#[tokio::test]
async fn the_same_idempotency_key_of_another_tenant_is_charged() {
    let h = Harness::new(PLANS);
    assert_eq!(h.send(req("POST", "/", Some("key-soft"), Some("k"))).await.status, 200);
    assert_eq!(h.send(req("POST", "/", Some("key-big"), Some("k"))).await.status, 200);
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store().clone();
    assert_eq!(common::committed(&*store, "softco", "requests", NOON - 7200, NOON + 7200, 3600).await, 1);
    assert_eq!(common::committed(&*store, "bigco", "requests", NOON - 7200, NOON + 7200, 3600).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_hammering_one_tenant_never_pass_a_hard_quota() {
    let toml = &common::one_tenant(r#"quotas.requests = { limit = 500, period = "day", mode = "hard", lease = 7 }"#);
    let store: std::sync::Arc<dyn tollgate::store::Store> = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    // Two nodes (two engines) share one store, as a fleet shares one table.
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes = [
        std::sync::Arc::new(Harness::build(toml, store.clone(), clock.clone(), handle.clone())),
        std::sync::Arc::new(Harness::build(toml, store.clone(), clock, handle)),
    ];
    let mut tasks = Vec::new();
    for i in 0..16 {
        let node = nodes[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u32;
            for _ in 0..100 {
                if node.status("/", "key-t").await == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    // 1,600 requests for 500 units: never more, and every unit leased is eventually used
    // (a node gets the other's leftovers once that one is empty too, or keeps its own).
    assert!(admitted <= 500, "admitted {admitted}");
    assert!(admitted >= 500 - 2 * 7, "admitted {admitted}: at most one lease per node may be stranded");
    for n in &nodes {
        n.tollgate.flush().await.unwrap();
    }
    let committed = common::committed(&*store, "t", "requests", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(committed, u64::from(admitted));
}

#[tokio::test]
async fn leases_grow_for_busy_tenants_and_shrink_back() {
    let toml =
        &common::one_tenant(r#"quotas.requests = { limit = 1000000, period = "day", mode = "hard", lease = 10 }"#);
    let h = Harness::new(toml);
    let key = common::day_key("t", NOON);
    for _ in 0..2000 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    // The fake clock stands still, so every lease lasted under a second and the next one
    // doubled: 10 + 20 + ... + 1,280 = 2,550 units in 8 store calls, where fixed leases of 10
    // would have taken 200.
    assert_eq!(h.reserved(&key).await, 2550);
    // A lease that lasted over a minute halves the next one.
    h.clock.advance(Duration::from_secs(61));
    for _ in 0..551 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert_eq!(h.reserved(&key).await, 2550 + 640);
    // Never above a sixteenth of the limit: a plan with a small limit keeps its configured size.
    let toml = &common::one_tenant(r#"quotas.requests = { limit = 31, period = "day", mode = "hard", lease = 2 }"#);
    let h = Harness::new(toml);
    for _ in 0..10 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert_eq!(h.reserved(&key).await, 10, "five leases of 2 (cap: max(2, 31/16))");
}

/// `HEAD` is charged by the `GET` rules (routers serve it with the `GET` handler), and a path
/// is matched as the routers decode it: escapes of unreserved characters decoded, an encoded
/// `/` kept; an idempotent request is the same request however its path is escaped.
#[tokio::test]
async fn head_and_encoded_paths_are_charged_by_their_route() {
    let toml = "[plans.p]\nquotas.requests = { limit = 12, period = \"day\", mode = \"hard\" }\n\
                [[routes]]\nmethod = \"GET\"\npath = \"/v1/export\"\ncost = 4\n\
                [tenants.acme]\nplan = \"p\"\nkeys = [\"key-a\"]\n";
    let h = Harness::new(toml);
    assert_eq!(h.send(req("HEAD", "/v1/export", Some("key-a"), None)).await.status, 200);
    assert_eq!(h.send(req("GET", "/v1/%65xport", Some("key-a"), None)).await.status, 200);
    assert_eq!(h.send(req("HEAD", "/v1/%65%78port", Some("key-a"), None)).await.status, 200);
    assert_eq!(h.send(req("GET", "/v1/export", Some("key-a"), None)).await.status, 429, "12 spent: 3 × 4");
    assert_eq!(h.send(req("GET", "/v1/other", Some("key-a"), None)).await.status, 429);
    h.tollgate.flush().await.unwrap();
    assert_eq!(
        common::committed(h.tollgate.usage_store().as_ref(), "acme", "requests", NOON - 86_400, NOON + 86_400, 3600)
            .await,
        12
    );

    // The same idempotent request, escaped or not: a replay, not a mismatch.
    let toml = "[plans.p]\n[tenants.acme]\nplan = \"p\"\nkeys = [\"key-a\"]\n";
    let h = Harness::new(toml);
    assert_eq!(h.send(req("POST", "/v1/orders", Some("key-a"), Some("o-1"))).await.status, 200);
    assert_eq!(h.send(req("POST", "/v1/%6Frders", Some("key-a"), Some("o-1"))).await.status, 200);
    assert_eq!(h.send(req("POST", "/v1/%6Frders%2F", Some("key-a"), Some("o-1"))).await.status, 422);
}

/// A tenant's rate bucket survives its state being let go: a directory tenant revalidated
/// after `directory_ttl` of silence, a file tenant swept after `idle_timeout`, a tenant evicted
/// by the cap, every tenant at a reload. Coming back before its bucket refilled, it finds it
/// as it left it; once it refilled, full. The buckets kept are bounded by `max_tenants`, the one
/// closest to full going first, counted.
#[tokio::test]
async fn a_spent_rate_survives_eviction_revalidation_and_reload() {
    use std::sync::Arc;
    use tollgate::store::{KeyHash, TenantRecord};
    let toml = "[limits]\ndirectory_ttl = \"60s\"\nidle_timeout = \"5m\"\nmax_tenants = 3\n\
                [plans.daily]\nrate = \"10/day\"\n[plans.other]\nrate = \"20/day\"\n\
                [tenants.file]\nplan = \"daily\"\nkeys = [\"key-file\"]\n";
    let store = Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(toml, store.clone(), clock, handle);
    for i in 0..6 {
        let record = TenantRecord::new(format!("d{i}").into(), "daily".into());
        store.inner.put_tenant(&record, &[KeyHash::of(format!("key-d{i}").as_bytes())]).await.unwrap();
    }
    let spend = |key: &'static str, n: usize| {
        let h = &h;
        async move {
            for _ in 0..n {
                assert_eq!(h.status("/", key).await, 200, "{key}");
            }
        }
    };
    spend("key-d0", 10).await;
    spend("key-file", 10).await;
    assert_eq!(h.status("/", "key-d0").await, 429);
    assert_eq!(h.status("/", "key-file").await, 429);

    // 75 s of silence: the directory tenant is let go by the revalidation (not seen within
    // directory_ttl), and read again when it comes back.
    h.clock.advance(Duration::from_secs(75));
    h.tollgate.revalidate().await;
    assert_eq!(h.tollgate.stats().tracked_tenants, 1, "only the file tenant is held");
    assert_eq!(h.status("/", "key-d0").await, 429, "its bucket as it left it");
    // Past idle_timeout the file tenant is swept.
    h.clock.advance(Duration::from_secs(301));
    assert!(h.tollgate.sweep().await >= 1);
    assert_eq!(h.status("/", "key-file").await, 429, "swept, its bucket kept");

    // The cap (3): four more tenants push d0 and the file tenant out.
    for key in ["key-d1", "key-d2", "key-d3", "key-d4"] {
        spend(key, 1).await;
    }
    assert!(h.tollgate.stats().tracked_tenants <= 3);
    assert_eq!(h.status("/", "key-d0").await, 429, "evicted by the cap, its bucket kept");
    // A reload gives every tenant a state of the new configuration: buckets carry over.
    h.tollgate.reload(tollgate::Config::from_toml_str(toml).unwrap()).await.unwrap();
    assert_eq!(h.status("/", "key-file").await, 429, "after a reload");

    // A day later every bucket is full again.
    h.clock.advance(Duration::from_secs(86_400));
    h.tollgate.revalidate().await;
    assert_eq!(h.status("/", "key-d0").await, 200);
    assert_eq!(h.status("/", "key-file").await, 200);

    // Bounded by max_tenants (3): the bucket closest to full goes first, counted. (A second
    // apart, so that the cap evicts the tenant seen longest ago, not one in use.)
    let dropped = h.tollgate.stats().rate_states_dropped;
    for (key, n) in [("key-d5", 10), ("key-d1", 9), ("key-d2", 2), ("key-d3", 10)] {
        h.clock.advance(Duration::from_secs(1));
        spend(key, n).await; // d5 and d3 empty, d1 one cell left, d2 eight
    }
    h.tollgate.reload(tollgate::Config::from_toml_str(toml).unwrap()).await.unwrap();
    let stats = h.tollgate.stats();
    assert!(stats.held_rate_states <= 3, "{stats:?}");
    assert!(stats.rate_states_dropped > dropped, "{stats:?}");
    assert_eq!(h.status("/", "key-d5").await, 429);
    assert_eq!(h.status("/", "key-d3").await, 429);
    // d2 (the fullest) went: it starts again with a full bucket.
    spend("key-d2", 10).await;
}

/// A request cut off once the service has it is billed as completed (the handler may have
/// done its work), unless `usage.bill_cancelled = false`; billed, its `Idempotency-Key` is
/// bound (a retry is a replay, not a second charge).
#[tokio::test]
async fn a_request_cut_off_in_its_handler_is_billed_as_configured() {
    use tower::{Layer, ServiceExt};
    for bill in [true, false] {
        let toml = format!(
            "[usage]\nbill_cancelled = {bill}\n[plans.p]\nquotas.requests = {{ limit = 5, period = \"day\", mode = \"hard\" }}\n\
             [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n"
        );
        let (clock, _handle) = tollgate::clock::Clock::fake_at_unix(NOON);
        let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
        let (engine, _worker) = tollgate::Tollgate::builder(tollgate::Config::from_toml_str(&toml).unwrap())
            .store_arc(store.clone())
            .clock(clock)
            .build();
        let started = std::sync::Arc::new(tokio::sync::Notify::new());
        let svc = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn({
            let started = started.clone();
            move |_req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| {
                let started = started.clone();
                async move {
                    started.notify_one();
                    std::future::pending::<()>().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::new(),
                    )))
                }
            }
        }));
        let call = svc.clone().oneshot(req("POST", "/", Some("key-t"), Some("order-1")));
        tokio::select! {
            _ = call => panic!("the handler never answers"),
            () = started.notified() => {}
        }
        // The client is gone (the future dropped).
        engine.flush().await.unwrap();
        let billed = common::committed(&*store, "t", "requests", NOON - 3600, NOON + 3600, 3600).await;
        assert_eq!(billed, u64::from(bill), "bill_cancelled = {bill}");
        // The retry with the same key, cut off too: the first left no response to answer it
        // with, so its key was released and the retry runs again, charged and billed as the
        // first was (one charge per run of the handler).
        let retry = svc.clone().oneshot(req("POST", "/", Some("key-t"), Some("order-1")));
        tokio::select! {
            _ = retry => panic!("the handler never answers"),
            () = started.notified() => {}
        }
        engine.flush().await.unwrap();
        let billed = common::committed(&*store, "t", "requests", NOON - 3600, NOON + 3600, 3600).await;
        assert_eq!(billed, 2 * u64::from(bill), "bill_cancelled = {bill}: one charge per run");
    }
}

/// A tenant moved to a plan with another rate keeps what it spent, but never waits longer
/// than the new plan's own bucket takes to fill: moved from `10/day` (spent) to `100/s`, it is
/// served within a second, not a day later.
#[tokio::test]
async fn a_spent_bucket_carried_to_a_faster_plan_waits_at_most_the_new_bucket() {
    use std::sync::Arc;
    use tollgate::store::{KeyHash, TenantRecord};
    let toml = "[plans.daily]\nrate = \"10/day\"\n[plans.fast]\nrate = \"100/s\"\n";
    let store = Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(toml, store.clone(), clock, handle);
    store.inner.put_tenant(&TenantRecord::new("d".into(), "daily".into()), &[KeyHash::of(b"key-d")]).await.unwrap();
    for _ in 0..10 {
        assert_eq!(h.status("/", "key-d").await, 200);
    }
    assert_eq!(h.status("/", "key-d").await, 429);
    // Upgraded (a webhook, an admin): this node forgets the tenant and reads it again.
    store.inner.put_tenant(&TenantRecord::new("d".into(), "fast".into()), &[]).await.unwrap();
    h.tollgate.invalidate_tenant(&"d".into());
    let r = h.send(req("GET", "/", Some("key-d"), None)).await;
    if r.status == 429 {
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry <= 1, "at most the new bucket's second: {retry}");
        h.clock.advance(Duration::from_secs(1));
    }
    assert_eq!(h.status("/", "key-d").await, 200, "the new bucket, not the old day");
}

/// A handler that panics is a failure, not a client gone: its request gives its units back
/// whoever catches the panic (here the runtime, which drops the request's future after).
#[tokio::test]
async fn a_request_whose_handler_panics_is_not_billed() {
    use tower::{Layer, ServiceExt};
    let toml = "[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n";
    let (clock, _handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let (engine, _worker) = tollgate::Tollgate::builder(tollgate::Config::from_toml_str(toml).unwrap())
        .store_arc(store.clone())
        .clock(clock)
        .build();
    let svc = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
        |_req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async move {
            if true {
                panic!("the handler fails");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
        },
    ));
    let task = tokio::spawn(svc.oneshot(req("GET", "/", Some("key-t"), None)));
    assert!(task.await.unwrap_err().is_panic());
    engine.flush().await.unwrap();
    assert_eq!(common::committed(&*store, "t", "requests", NOON - 3600, NOON + 3600, 3600).await, 0);
}

/// Escapes are decoded as actix-web decodes them (all but `%`, `/`, `+`): a rule with a `:` or
/// an `@` in its path charges the request actix-web serves for it.
#[tokio::test]
async fn escapes_actix_web_decodes_are_charged_by_their_route() {
    let toml = "[plans.p]\nquotas.requests = { limit = 6, period = \"day\", mode = \"hard\" }\n\
                [[routes]]\nmethod = \"POST\"\npath = \"/v1/models:generate\"\ncost = 3\n\
                [tenants.acme]\nplan = \"p\"\nkeys = [\"key-a\"]\n";
    let h = Harness::new(toml);
    assert_eq!(h.send(req("POST", "/v1/models%3Agenerate", Some("key-a"), None)).await.status, 200);
    assert_eq!(h.send(req("POST", "/v1/models%3agenerate", Some("key-a"), None)).await.status, 200);
    assert_eq!(h.send(req("POST", "/v1/models:generate", Some("key-a"), None)).await.status, 429, "6 spent: 2 × 3");
}

/// A request waiting on the store that is dropped before it is resolved (its client gone
/// while its lease was asked for, a timeout around it) gives back the rate cells its check
/// took: on main they stayed spent, and the tenant's next request was refused for a rate it
/// never used.
#[tokio::test]
async fn a_pending_admission_dropped_gives_its_rate_cells_back() {
    use tollgate::door::{Admission, Credential, RequestInfo};
    let toml = common::one_tenant(
        "rate = \"1/min\"\nburst = 2\nquotas.requests = { limit = 100, period = \"day\", mode = \"hard\", lease = 1 }",
    );
    let h = Harness::new(&toml);
    assert_eq!(h.status("/", "key-t").await, 200, "one cell of two");
    // The lease of one unit is spent: the next request waits on the store, its cell taken.
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(b"key-t"));
    let Admission::Pending(pending) = h.tollgate.admit(&info) else { panic!("an empty lease waits on the store") };
    drop(pending);
    // The clock has not moved: only the cell given back lets this one through.
    assert_eq!(h.status("/", "key-t").await, 200, "the dropped request's cell came back");
    assert_eq!(h.status("/", "key-t").await, 429, "and the burst is spent");
}
