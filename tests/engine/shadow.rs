//! Shadow mode: limits computed, counted and logged, usage recorded and billed, nothing
//! refused; a shadow plan beside an enforced one; hard quotas reserved past the limit.

use crate::common;

use common::{day_key, Harness, NOON};

const TOML: &str = r#"
[plans.trial]
shadow = true
rate = "1/min"
burst = 1
quotas.requests = { limit = 3, period = "day", mode = "hard", lease = 1 }
[plans.enforced]
rate = "1/min"
burst = 1
[tenants.t]
plan = "trial"
keys = ["key-t"]
[tenants.e]
plan = "enforced"
keys = ["key-e"]
"#;

#[tokio::test]
async fn a_shadow_plan_refuses_nothing_and_bills_everything() {
    let h = Harness::new(TOML);
    for i in 0..6 {
        let r = h.get("/", "key-t").await;
        assert_eq!(r.status.as_u16(), 200, "request {i}");
        assert!(r.header("ratelimit").is_some(), "headers still tell the limits");
    }
    // The quota's item says what is left: nothing, past the limit.
    let r = h.get("/", "key-t").await;
    assert!(r.header("ratelimit").unwrap().contains("\"requests-day\";r=0"), "{:?}", r.header("ratelimit"));
    // The enforced plan beside it still refuses.
    assert_eq!(h.status("/", "key-e").await, 200);
    assert_eq!(h.status("/", "key-e").await, 429);
    h.tollgate.flush().await.unwrap();
    let billed = common::committed(&**h.tollgate.usage_store(), "t", "requests", NOON - 3600, NOON + 3600, 3600).await;
    assert_eq!(billed, 7, "every request billed");
    // The units went past the limit in the store (reserved without it), once the lease is
    // settled.
    h.tollgate.shutdown().await.unwrap();
    assert_eq!(h.reserved(&day_key("t", NOON)).await, 7);
    // 6 over the rate, 4 over the quota.
    assert_eq!(h.tollgate.stats().shadow_would_refuse, 10);
}

#[tokio::test]
async fn without_shadow_mode_unidentified_requests_are_refused() {
    let h = Harness::new(TOML);
    assert_eq!(h.send(common::req("GET", "/", None, None)).await.status.as_u16(), 401);
    let shadowed = TOML.replace("[plans.trial]", "[limits]\nshadow = true\n[plans.trial]");
    let h = Harness::new(&shadowed);
    let r = h.send(common::req("GET", "/", None, None)).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(&r.body[..], b"", "served without a tenant");
    // The whole configuration is in shadow: the enforced plan too.
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-e").await, 200);
    }
}

/// A shadow plan never refuses: an idempotent replay after the shadow quota was spent is
/// answered (its refusal counted), as every other request.
#[tokio::test]
async fn a_replay_on_a_spent_shadow_quota_is_not_refused() {
    let h = Harness::new(TOML);
    let post = |key: &str| common::req("POST", "/", Some("key-t"), Some(key));
    assert_eq!(h.send(post("order-1")).await.status, 200);
    for i in 2..6 {
        assert_eq!(h.send(post(&format!("order-{i}"))).await.status, 200, "past the limit: shadowed");
    }
    let before = h.tollgate.stats().shadow_would_refuse;
    let replay = h.send(post("order-1")).await;
    assert_eq!(replay.status, 200, "{:?}", replay.rejection);
    assert!(h.tollgate.stats().shadow_would_refuse > before, "the refusal it would have had is counted");
}
