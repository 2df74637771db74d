//! Hard quotas on meters that only handlers report (`reports = ["tokens"]`): once spent, the
//! routes that report the meter get 429 and show its policy; reported quantities are checked.

use crate::common;

use common::{Harness, NOON};
use tollgate::{RecordError, RejectionKind};

const TOML: &str = r#"
[meters.tokens]
[plans.p]
quotas.tokens = { limit = 500, period = "month", mode = "hard", lease = 100 }
[[routes]]
path = "/tokens/{n}"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

#[tokio::test]
async fn a_spent_hard_quota_on_a_reported_meter_refuses_the_next_request() {
    let h = Harness::new(TOML);
    let r = h.get("/tokens/200", "key-t").await;
    assert_eq!(r.status, 200);
    let policy = r.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert!(policy.contains("\"tokens-month\";q=500"), "the reported meter's policy shows: {policy}");
    // Its item too, read from the tenant when the response's headers are written.
    let items = r.header("ratelimit").unwrap_or_default().to_owned();
    assert!(items.starts_with("\"tokens-month\";r="), "every listed policy has an item: {items}");
    assert_eq!(h.status("/tokens/200", "key-t").await, 200);
    // This request crosses the limit (600 of 500): it completes, reporting what it used.
    assert_eq!(h.status("/tokens/200", "key-t").await, 200);
    let r = h.get("/tokens/1", "key-t").await;
    assert_eq!(r.status, 429, "the next one is refused");
    assert!(
        r.header("ratelimit").unwrap_or_default().starts_with("\"tokens-month\";r=0;t="),
        "{:?}",
        r.header("ratelimit")
    );
    assert_eq!(r.json()["policy"], "tokens-month");
    assert_eq!(r.rejection.unwrap().kind(), RejectionKind::QuotaExceeded);
    // A route that does not report tokens is not refused; recording there still bills.
    assert_eq!(h.status("/other", "key-t").await, 200);
    h.tollgate.flush().await.unwrap();
    let billed = common::committed(&**h.tollgate.usage_store(), "t", "tokens", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(billed, 600);
}

#[tokio::test]
async fn reported_quantities_are_checked() {
    let h = Harness::new(TOML);
    let admitted = match h.tollgate.admit(&tollgate::door::RequestInfo::new(
        "GET",
        "/other",
        tollgate::door::Credential::ApiKey(b"key-t"),
    )) {
        tollgate::door::Admission::Admitted(t) => t,
        tollgate::door::Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        tollgate::door::Admission::Rejected(r) => panic!("{r}"),
    };
    let ctx = admitted.context();
    assert!(matches!(ctx.record("widgets", 1), Err(RecordError::UnknownMeter(_))));
    assert!(matches!(ctx.record("tokens", u64::MAX), Err(RecordError::TooLarge(_))));
    assert!(ctx.record("tokens", 5).is_ok());
    assert!(admitted.complete(200));
}

/// Usage recorded on a quota meter while the tenant holds no lease of it (a meter its route
/// does not declare in `reports`, or the store unreachable) is owed to the period it was
/// recorded in. Recorded a minute before midnight and settled the next day, it is charged to
/// the day it happened, not to the next day's counter.
#[tokio::test]
async fn usage_outside_a_lease_is_charged_to_the_period_it_happened_in() {
    let toml = r#"
[meters.tokens]
[plans.p]
quotas.tokens = { limit = 1000, period = "day", mode = "soft" }
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;
    let day = NOON - NOON.rem_euclid(86_400);
    let midnight = day + 86_400;
    let h = Harness::at(toml, midnight - 60);
    // `/tokens/N` records N tokens; no route reports the meter, so no lease is ever taken.
    assert_eq!(h.status("/tokens/90", "key-t").await, 200);
    h.clock.advance(std::time::Duration::from_secs(120));
    assert_eq!(h.status("/tokens/5", "key-t").await, 200);
    // Settled with the store (here by shutdown, which gives leases back and owes the rest).
    h.tollgate.shutdown().await.unwrap();
    let key = |start: i64| {
        tollgate::store::QuotaKey::new(
            "t".into(),
            "tokens".into(),
            tollgate::config::Period::Day,
            start,
            start + 86_400,
        )
    };
    assert_eq!(h.reserved(&key(day)).await, 90, "the 90 tokens of 23:59 belong to their day");
    assert_eq!(h.reserved(&key(midnight)).await, 5, "the next day is charged its own 5 only");
}

/// `RateLimit-Policy` names the unit of a quota not counted in requests: `qu` takes only the
/// draft's registered units, so another meter says it in `tollgate-unit` (with
/// `headers = "draft-compat"`, `qu` as before); a month's window is the current period's
/// length (March: 31 days), not a nominal 30 days.
#[tokio::test]
async fn the_policy_names_its_unit_and_the_current_month_s_length() {
    let toml = format!(
        "[plans.q]\nquotas.requests = {{ limit = 9, period = \"month\", anchor_day = 1 }}\n\
         [tenants.r]\nplan = \"q\"\nkeys = [\"key-r\"]\n\
         [plans.both]\nquotas.requests = {{ limit = 9, period = \"month\", anchor_day = 20 }}\n\
         quotas.tokens = {{ limit = 500, period = \"month\", mode = \"hard\", lease = 100 }}\n\
         [tenants.b]\nplan = \"both\"\nkeys = [\"key-b\"]\n{TOML}"
    );
    let h = Harness::new(&toml);
    let policy = h.get("/tokens/1", "key-t").await.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert_eq!(policy, "\"tokens-month\";q=500;w=2678400;tollgate-unit=\"tokens\"");
    let compat = Harness::new(&format!("[limits]\nheaders = \"draft-compat\"\n{toml}"));
    let policy = compat.get("/tokens/1", "key-t").await.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert_eq!(policy, "\"tokens-month\";q=500;w=2678400;qu=\"tokens\"", "today's form kept");
    let policy = h.get("/other", "key-r").await.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert_eq!(policy, "\"requests-month\";q=9;w=2678400", "requests are the default unit");
    // Two month quotas, anchored apart: each its own month (Feb 20 to Mar 20: 28 days).
    let policy = h.get("/tokens/1", "key-b").await.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert_eq!(policy, "\"requests-month\";q=9;w=2419200, \"tokens-month\";q=500;w=2678400;tollgate-unit=\"tokens\"");
    // In April (30 days) the same policy says so.
    h.clock.advance(std::time::Duration::from_secs(20 * 86_400));
    let policy = h.get("/other", "key-r").await.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert_eq!(policy, "\"requests-month\";q=9;w=2592000");
}

/// A ticket from each of the engine's entry points makes a context that records what its
/// handler reports: `Tollgate::resolve`'s, `Tollgate::admit`'s, and a front door's by
/// `admit_with` and by `admit_request`. (The tower layer makes its requests' contexts itself,
/// from the engine it holds: the first test above records through them.)
#[tokio::test]
async fn a_ticket_from_every_entry_point_makes_a_context() {
    let toml = r#"
[meters.tokens]
[plans.p]
quotas.requests = { limit = 100, period = "month", mode = "hard", lease = 10 }
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;
    let h = Harness::new(toml);
    let info = || tollgate::door::RequestInfo::new("GET", "/", tollgate::door::Credential::ApiKey(b"key-t"));
    let record = |ticket: tollgate::door::Ticket, tokens: u64| {
        ticket.context().record("tokens", tokens).expect("the context records");
        assert!(ticket.complete(200));
    };
    // The first request has no lease to take from: it waits on the store.
    let first = match h.tollgate.admit(&info()) {
        tollgate::door::Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        other => panic!("the first request should wait for its lease: {other:?}"),
    };
    record(first, 1);
    let admitted = |admission| match admission {
        tollgate::door::Admission::Admitted(t) => t,
        other => panic!("the lease covers it: {other:?}"),
    };
    record(admitted(h.tollgate.admit(&info())), 2);
    let mut door = h.tollgate.front_door();
    record(admitted(door.admit_with(|_| info())), 4);
    let request = http::Request::get("/").header("x-api-key", "key-t").body(()).unwrap();
    record(admitted(door.admit_request(&request)), 8);
    h.tollgate.flush().await.unwrap();
    let billed = common::committed(&**h.tollgate.usage_store(), "t", "tokens", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(billed, 15, "every context recorded");
}
