//! Headers, problem bodies, credentials and store failures, field by field.

use crate::common;

use std::sync::{atomic::Ordering, Arc};

use common::{req, Harness, NOON};
use tollgate::store::KeyHash;
use tollgate::{store::TenantRecord, RejectionKind};

const CONFIG: &str = r#"
[meters.tokens]
description = "LLM tokens"

[plans.free]
rate = "10/s"
burst = 4
quotas.requests = { limit = 3, period = "day" }

[plans.open]
quotas.tokens = { limit = 1000, period = "month", mode = "hard" }

[[routes]]
path = "/generate"
meter = "tokens"

[tenants.acme]
plan = "free"
keys = ["key-acme"]

[tenants.tokco]
plan = "open"
keys = ["key-tok"]
"#;

fn problem_fields(body: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn admitted_responses_carry_draft_10_fields() {
    let h = Harness::new(CONFIG);
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"acme on free");
    assert_eq!(r.header("ratelimit-policy"), Some("\"rate\";q=10;w=1, \"requests-day\";q=3;w=86400"));
    // 3 of 4 cells left, refilled in 100 ms (rounded up to 1 s); 2 of 3 units, 12 h to midnight.
    assert_eq!(r.header("ratelimit"), Some("\"rate\";r=3;t=1, \"requests-day\";r=2;t=43200"));
    assert_eq!(r.header("retry-after"), None);
    assert!(r.rejection.is_none());
}

#[tokio::test]
async fn a_quota_rejection_is_a_complete_problem() {
    let h = Harness::new(CONFIG);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some("43200"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"rate\";q=10;w=1, \"requests-day\";q=3;w=86400"));
    // The refused request spent no rate cell: one of four is left, as before it.
    assert_eq!(r.header("ratelimit"), Some("\"rate\";r=1;t=1, \"requests-day\";r=0;t=43200"));
    let body = r.json();
    // The draft's problem type, naming the violated RateLimit-Policy item; tollgate's kind beside.
    assert_eq!(
        problem_fields(&body),
        ["detail", "kind", "policy", "retry_after", "status", "title", "type", "violated-policies"]
    );
    assert_eq!(body["type"], "https://iana.org/assignments/http-problem-types#quota-exceeded");
    assert_eq!(body["violated-policies"], serde_json::json!(["requests-day"]));
    assert_eq!(body["kind"], "quota_exceeded");
    assert_eq!(body["title"], "Quota exceeded");
    assert_eq!(body["status"], 429);
    assert_eq!(body["detail"], "the day quota of 3 requests on plan `free` is spent until the period ends");
    assert_eq!(body["policy"], "requests-day");
    assert_eq!(body["retry_after"], 43200);
    let rejection = r.rejection.expect("the rejection is in the response extensions");
    assert_eq!(rejection.kind(), RejectionKind::QuotaExceeded);
    assert_eq!(rejection.tenant().map(|t| t.as_str()), Some("acme"));
}

#[tokio::test]
async fn a_rate_rejection_is_a_complete_problem() {
    let h = Harness::new(&CONFIG.replace("limit = 3,", "limit = 300,"));
    for _ in 0..4 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    // Every policy of RateLimit-Policy: the quota's item too.
    assert_eq!(r.header("ratelimit"), Some("\"rate\";r=0;t=1, \"requests-day\";r=296;t=43200"));
    let body = r.json();
    assert_eq!(body["type"], "https://iana.org/assignments/http-problem-types#quota-exceeded");
    assert_eq!(body["violated-policies"], serde_json::json!(["rate"]));
    assert_eq!(body["kind"], "rate_limited");
    assert_eq!(body["title"], "Rate limit exceeded");
    assert_eq!(body["policy"], "rate");
    assert_eq!(body["retry_after"], 1);
    assert_eq!(body["detail"], "the rate of plan `free` (10/s, burst 4) is spent");
}

/// `headers = "draft-compat"` keeps the forms of earlier versions for clients that depend on
/// them: tollgate's own problem type on a 429, and `t` of the rate until the bucket is full.
#[tokio::test]
async fn draft_compat_keeps_the_earlier_forms() {
    let h = Harness::new(&format!(
        "[limits]\nheaders = \"draft-compat\"\n{}",
        CONFIG.replace("limit = 3,", "limit = 300,")
    ));
    for _ in 0..4 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    let r = h.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    let body = r.json();
    assert_eq!(problem_fields(&body), ["detail", "policy", "retry_after", "status", "title", "type"]);
    assert_eq!(
        body["type"],
        "https://docs.rs/tollgate/latest/tollgate/response/enum.RejectionKind.html#variant.RateLimited"
    );
}

#[tokio::test]
async fn missing_unknown_and_malformed_keys_get_4xx_and_create_no_state() {
    let h = Harness::new(CONFIG);
    let missing = h.send(req("GET", "/", None, None)).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("ApiKey header=\"x-api-key\""));
    assert_eq!(missing.json()["title"], "Missing credentials");
    assert_eq!(problem_fields(&missing.json()), ["detail", "status", "title", "type"]);

    for _ in 0..50 {
        let unknown = h.get("/", "key-nobody").await;
        assert_eq!(unknown.status, 401);
        assert_eq!(unknown.json()["title"], "Unknown credentials");
    }

    let long = "k".repeat(300);
    for bad in [long.as_str(), ""] {
        let r = h.get("/", bad).await;
        assert_eq!(r.status, 400, "key {bad:?}");
        assert_eq!(r.json()["title"], "Malformed credentials");
    }
    let non_ascii = http::Request::builder()
        .uri("/")
        .header("x-api-key", http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h.send(non_ascii).await.status, 400);
    let twice = http::Request::builder()
        .uri("/")
        .header("x-api-key", "key-acme")
        .header("x-api-key", "key-acme")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h.send(twice).await.status, 400);
    // Joined by a proxy: read as a repeated header, not looked up as one key.
    let joined = h.get("/", "key-acme, key-acme").await;
    assert_eq!(joined.status, 400);
    assert!(joined.json()["detail"].as_str().unwrap().contains("repeated"), "{:?}", joined.json());
    // A malformed key is answered before a malformed path, as before the key was checked
    // only when no tenant holds it.
    let both = h.get("/v1/x/../reports", "bad key").await;
    assert_eq!(both.status, 400);
    assert_eq!(both.json()["title"], "Malformed credentials");
    let bad_idem = h.send(req("POST", "/", Some("key-acme"), Some(&"x".repeat(256)))).await;
    assert_eq!(bad_idem.status, 400);
    assert_eq!(bad_idem.json()["title"], "Malformed Idempotency-Key");

    assert_eq!(h.tollgate.stats().tracked_tenants, 0, "no request above created tenant state");
}

#[tokio::test]
async fn legacy_and_no_headers() {
    let legacy = Harness::new(&format!("[limits]\nheaders = \"legacy\"\n{CONFIG}"));
    let r = legacy.get("/", "key-acme").await;
    // The tightest policy is the quota: 2 left of 3.
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("43200"));
    assert_eq!(r.header("ratelimit"), None);

    let none = Harness::new(&format!("[limits]\nheaders = \"none\"\n{CONFIG}"));
    let r = none.get("/", "key-acme").await;
    assert!(r.headers.keys().all(|k| !k.as_str().contains("ratelimit")), "{:?}", r.headers);
    for _ in 0..2 {
        none.get("/", "key-acme").await;
    }
    let r = none.get("/", "key-acme").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("43200"), "Retry-After is always sent on 429");
}

#[tokio::test]
async fn a_handler_records_tokens_that_count_against_the_quota() {
    let h = Harness::new(CONFIG);
    assert_eq!(h.status("/tokens/600", "key-tok").await, 200);
    assert_eq!(h.status("/tokens/500", "key-tok").await, 200, "usage that happened is never refused");
    // 1,100 of 1,000 tokens are spent: requests charged to the tokens meter are refused now,
    // requests on the requests meter (no quota on this plan) still pass.
    let r = h.get("/generate", "key-tok").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["policy"], "tokens-month");
    assert_eq!(h.status("/", "key-tok").await, 200);
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store().clone();
    assert_eq!(common::committed(&*store, "tokco", "tokens", NOON - 7200, NOON + 7200, 3600).await, 1100);
    assert_eq!(common::committed(&*store, "tokco", "requests", NOON - 7200, NOON + 7200, 3600).await, 3);
}

#[tokio::test]
async fn identity_from_an_auth_layer_and_an_anonymous_plan() {
    let config = r#"
        [identify]
        source = "extension"
        unknown = "anonymous"
        anonymous_plan = "guest"

        [plans.guest]
        rate = "1/min"
        burst = 2
        [plans.pro]
        rate = "100/s"
        [tenants.acme]
        plan = "pro"
    "#;
    let h = Harness::new(config);
    let with_identity = |tenant: &str| {
        let mut r = req("GET", "/", None, None);
        r.extensions_mut().insert(tollgate::Identity::new(tenant));
        r
    };
    let r = h.send(with_identity("acme")).await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"acme on pro"[..]));
    // Unknown identities and requests without one share the anonymous tenant's small budget.
    assert_eq!(&h.send(with_identity("stranger")).await.body[..], b"anonymous on guest");
    assert_eq!(h.send(req("GET", "/", None, None)).await.status, 200);
    assert_eq!(h.send(with_identity("other")).await.status, 429);
    assert_eq!(h.tollgate.stats().tracked_tenants, 2);
}

#[tokio::test]
async fn store_errors_follow_the_plan_policy_and_lose_no_usage() {
    let config = r#"
        [usage]
        on_store_error = "fail-open"
        [plans.open]
        quotas.requests = { limit = 100, period = "day", lease = 1 }
        [plans.closed]
        on_store_error = "fail-closed"
        quotas.requests = { limit = 100, period = "day", lease = 1 }
        [tenants.a]
        plan = "open"
        keys = ["key-a"]
        [tenants.b]
        plan = "closed"
        keys = ["key-b"]
        [tenants.c]
        plan = "closed"
    "#;
    let store = Arc::new(common::Faulty::default());
    let h = Harness::with_store(config, store.clone(), NOON);
    store.inner.put_tenant(&TenantRecord::new("c".into(), "closed".into()), &[KeyHash::of(b"key-c")]).await.unwrap();
    assert_eq!(h.status("/", "key-a").await, 200);
    assert_eq!(h.status("/", "key-b").await, 200);
    store.down.store(true, Ordering::SeqCst);
    // Each lease is one unit: the next request must ask the store.
    assert_eq!(h.status("/", "key-a").await, 200, "fail-open admits");
    let r = h.get("/", "key-b").await;
    assert_eq!(r.status, 503, "fail-closed rejects");
    assert_eq!(r.json()["title"], "Quota store unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    // A tenant only the store knows cannot be identified while it is down.
    assert_eq!(h.status("/", "key-c").await, 503);
    assert_eq!(h.tollgate.stats().store_errors, 3);
    // Usage waits for the store; the failed flush is retried with the same batch.
    assert!(h.tollgate.flush().await.is_err());
    store.down.store(false, Ordering::SeqCst);
    // Requests failed fast after three failures in a row: the interval passes, a probe goes.
    h.clock.advance(std::time::Duration::from_secs(1));
    h.tollgate.flush().await.unwrap();
    assert_eq!(common::committed(&*store, "a", "requests", NOON - 7200, NOON + 7200, 3600).await, 2);
    assert_eq!(common::committed(&*store, "b", "requests", NOON - 7200, NOON + 7200, 3600).await, 1);
    assert_eq!(h.status("/", "key-c").await, 200, "found in the store once it is back");
}

#[test]
fn the_service_and_its_future_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let h = Harness::new(CONFIG);
    assert_send(&h.svc);
    let fut = tower::ServiceExt::oneshot(h.svc.clone(), req("GET", "/", Some("key-acme"), None));
    assert_send(&fut);
}

#[tokio::test]
async fn without_the_tenant_context_usage_is_still_recorded() {
    use tower::{Layer, ServiceExt};
    let (clock, _fake) = tollgate::clock::Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(CONFIG).unwrap();
    let (engine, _worker) = tollgate::Tollgate::builder(config).clock(clock).build();
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let tollgate = layer.handle().clone();
    let svc = layer.tenant_context(false).layer(tower::service_fn(
        |r: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async move {
            let has_context = r.extensions().get::<tollgate::TenantContext>().is_some();
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                has_context.to_string(),
            ))))
        },
    ));
    let response = svc.oneshot(req("GET", "/", Some("key-acme"), None)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"false");
    tollgate.flush().await.unwrap();
    assert_eq!(
        common::committed(&**tollgate.usage_store(), "acme", "requests", NOON - 7200, NOON + 7200, 3600).await,
        1
    );
}
