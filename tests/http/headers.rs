//! Rate-limit headers tell the truth: the policy describes the bucket in whole numbers, `r` never
//! exceeds `q`, `t` means the same on a 200 and a 429, and a 429 carries every policy.

use crate::common;

use std::time::Duration;

use common::Harness;

fn plan(rate: &str, burst: u32, quota: &str) -> String {
    common::one_tenant(&format!("rate = \"{rate}\"\nburst = {burst}\nquotas.requests = {quota}"))
}

/// Parses `"name";r=R;t=T` items.
fn items(header: &str) -> Vec<(String, u64, u64)> {
    header
        .split(", ")
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap().trim_matches('"').to_owned();
            let mut r = 0;
            let mut t = 0;
            for p in parts {
                let (k, v) = p.split_once('=').unwrap();
                match k {
                    "r" | "q" => r = v.parse().unwrap(),
                    "t" | "w" => t = v.parse().unwrap(),
                    _ => panic!("{p}"),
                }
            }
            (name, r, t)
        })
        .collect()
}

#[tokio::test]
async fn the_rate_policy_describes_the_bucket_and_r_never_exceeds_q() {
    // 2/s with a burst of 10: an empty bucket fills in 5 s; it holds 10.
    let h = Harness::new(&plan("2/s", 10, "{ limit = 1000, period = \"day\" }"));
    let r = h.get("/", "key-t").await;
    assert_eq!(items(r.header("ratelimit-policy").unwrap())[0], ("rate".into(), 10, 5));
    let (_, remaining, full) = items(r.header("ratelimit").unwrap())[0].clone();
    assert_eq!((remaining, full), (9, 1));
    // 100/s with a burst of 1: 100 per second.
    let h = Harness::new(&plan("100/s", 1, "{ limit = 1000, period = \"day\" }"));
    let r = h.get("/", "key-t").await;
    assert_eq!(items(r.header("ratelimit-policy").unwrap())[0], ("rate".into(), 100, 1));
    // r never exceeds q, whatever the plan.
    for (rate, burst) in [("2/s", 10), ("100/s", 1), ("6000/min", 50), ("1/h", 3)] {
        let h = Harness::new(&plan(rate, burst, "{ limit = 1000, period = \"day\" }"));
        for _ in 0..3 {
            let r = h.get("/", "key-t").await;
            let q = items(r.header("ratelimit-policy").unwrap())[0].1;
            let left = items(r.header("ratelimit").unwrap())[0].1;
            assert!(left <= q, "{rate} burst {burst}: r={left} > q={q}");
        }
    }
}

/// `t` of the rate is the seconds until the next cell (draft-10: the policy's quota units come
/// back), on a 200 and a 429 alike, and a 429's `Retry-After` is never earlier than it.
#[tokio::test]
async fn t_means_the_same_on_a_200_and_a_429() {
    // 1 per 4 s, burst 4: after 4 requests the bucket is empty; the next cell in 4 s.
    let h = Harness::new(&plan("15/min", 4, "{ limit = 1000, period = \"day\" }"));
    let first = h.get("/", "key-t").await;
    assert_eq!(items(first.header("ratelimit").unwrap())[0], ("rate".into(), 3, 4), "the next cell, not a full bucket");
    let mut last_t = 0;
    for _ in 0..3 {
        let r = h.get("/", "key-t").await;
        assert_eq!(r.status, 200);
        last_t = items(r.header("ratelimit").unwrap())[0].2;
    }
    assert_eq!(last_t, 4, "empty: the next cell in 4 s (full again in 16 s)");
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 429);
    let rate = items(r.header("ratelimit").unwrap())[0].clone();
    assert_eq!(rate, ("rate".into(), 0, 4), "t: until the next cell, as on a 200");
    assert_eq!(r.header("retry-after"), Some("4"), "never earlier than t");
    // Every policy of RateLimit-Policy is in the 429's RateLimit.
    let names: Vec<String> = items(r.header("ratelimit").unwrap()).into_iter().map(|i| i.0).collect();
    assert_eq!(names, ["rate", "requests-day"]);
    // `headers = "draft-compat"`: t until the bucket is full, as earlier versions said.
    let compat = Harness::new(&format!(
        "[limits]\nheaders = \"draft-compat\"\n{}",
        plan("15/min", 4, "{ limit = 1000, period = \"day\" }")
    ));
    let r = compat.get("/", "key-t").await;
    assert_eq!(items(r.header("ratelimit").unwrap())[0], ("rate".into(), 3, 4));
    for _ in 0..3 {
        compat.get("/", "key-t").await;
    }
    let r = compat.get("/", "key-t").await;
    assert_eq!((r.status.as_u16(), items(r.header("ratelimit").unwrap())[0].2), (429, 16));
}

#[tokio::test]
async fn a_quota_rejection_spends_no_rate_cells_and_keeps_its_retry_after() {
    let h = Harness::new(&plan("2/s", 5, "{ limit = 2, period = \"day\", mode = \"hard\", lease = 1 }"));
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(h.status("/", "key-t").await, 200);
    // Quick retries after the quota is spent: every one is told the quota's Retry-After.
    for i in 0..8 {
        let r = h.get("/", "key-t").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["policy"], "requests-day", "retry {i}");
        assert_eq!(r.header("retry-after"), Some("43200"), "retry {i}");
        let rate = items(r.header("ratelimit").unwrap())[0].clone();
        assert_eq!(rate.1, 3, "retry {i}: the rate cells were given back");
    }
    h.clock.advance(Duration::from_secs(1));
    let r = h.get("/", "key-t").await;
    assert_eq!(r.json()["policy"], "requests-day");
}
