//! The two ways a request is decided, held equal: the straight path the common request takes
//! (`Gate::decide_straight`: a plan with nothing beyond its rate and quotas, a plain route, no
//! `Idempotency-Key`) and the whole chain (`decide_charged` → `decide_keyed` → `decide_rated`
//! → `decide_placed` → `take_and_ticket`). Each plan shape the configuration allows is run
//! twice from the same start, once as the engine decides and once with every request sent
//! through the chain, by the same script of requests (plain routes, a feature's, a reported
//! meter's, a hold's, keyed requests); what each request is answered, and what the tenant is
//! charged, must be the same. On a straight plan this compares the two paths on every plain
//! request of the script: a check the chain makes on a route or plan property the script
//! exercises, with neither flag cleared for it, makes them differ (dropping `reports == 0` from
//! `RouteCost::plain` does). On a plan that is not straight both runs take the chain, and a
//! third run forces every plain request through the straight path: it must differ, so that the
//! script reaches what the flag keeps from the straight path. The usage buffer's refusal,
//! which both paths make first, is not reached here.

use std::{sync::atomic::Ordering, time::Duration};

use crate::{
    clock::Clock,
    config::Config,
    engine::{Admission, RequestInfo, Ticket, Tollgate},
    tenant::Credential,
};

/// How `Gate::decide` goes: as the engine decides.
pub(super) const AUTO: u8 = 0;
/// Every request through the chain.
pub(super) const CHAIN: u8 = 1;
/// Every plain request without a key through the straight path, whatever its plan.
pub(super) const STRAIGHT: u8 = 2;

/// Noon, 2026-03-14 (UTC).
const NOON: i64 = 1_773_489_600;

/// The routes every shape is run with: one that needs a feature, one that reports a meter,
/// one that holds it, and the rest plain.
const ROUTES: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.000001"
[meters.tokens]
price = "0.000002"
[[routes]]
path = "/f"
feature = "sso"
[[routes]]
path = "/r"
reports = ["tokens"]
[[routes]]
method = "POST"
path = "/h"
reports = ["tokens"]
hold.tokens = 10
[plans.holds]
quotas.tokens = { limit = 1000000, period = "month", mode = "hard" }
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// Each plan shape the configuration allows, and whether its plan takes the straight path.
const SHAPES: &[(&str, &str, bool)] = &[
    ("rate only", "rate = \"2/s\"\nburst = 2", true),
    ("a hard quota", "rate = \"2/s\"\nburst = 2\nquotas.requests = { limit = 4, period = \"day\", lease = 2 }", true),
    (
        "a soft quota",
        "rate = \"2/s\"\nburst = 2\nquotas.requests = { limit = 4, period = \"day\", mode = \"soft\", lease = 2 }",
        true,
    ),
    ("a prepaid balance", "rate = \"5/s\"\nquotas.requests = { period = \"prepaid\" }", true),
    ("no rate, a hard quota", "quotas.requests = { limit = 3, period = \"day\" }", true),
    (
        "features and a reported meter's quota",
        "rate = \"5/s\"\nfeatures = [\"sso\"]\nquotas.tokens = { limit = 15, period = \"day\", mode = \"hard\" }",
        true,
    ),
    ("concurrency", "rate = \"5/s\"\nconcurrency = 1", false),
    ("fleet concurrency", "rate = \"5/s\"\nconcurrency = 2\nconcurrency_scope = \"fleet\"", false),
    ("a fleet rate", "rate = \"2/s\"\nburst = 2\nrate_scope = \"fleet\"", false),
    (
        "a spend cap",
        "rate = \"5/s\"\nspend = { limit = \"0.000004\", period = \"month\", mode = \"hard\", max_limit = \"1.00\" }",
        false,
    ),
];

/// One engine of `toml`, deciding as `path` says, at noon on a fake clock.
fn engine(toml: &str, path: u8) -> (Tollgate, crate::clock::FakeClock) {
    let config = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let (tollgate, _worker) = Tollgate::builder(config).clock(clock).build();
    tollgate.gate().path.store(path, Ordering::Relaxed);
    (tollgate, handle)
}

/// What a request was answered, as text to compare.
fn seen(out: &mut Vec<String>, what: &str, waited: bool, answer: &Result<Ticket, crate::response::Rejection>) {
    let mut headers = Vec::new();
    match answer {
        Ok(t) => {
            t.for_each_header(|f, v| headers.push(format!("{f:?}={v}")));
            out.push(format!(
                "{what}: admitted (waited {waited}) replay={} key={} holds={} {headers:?}",
                t.is_replay(),
                t.has_key(),
                t.holds()
            ));
        }
        Err(r) => {
            r.for_each_header(|f, v| headers.push(format!("{f:?}={v}")));
            out.push(format!(
                "{what}: refused (waited {waited}) {:?} {} shadowed={} policy={:?} retry={:?} {headers:?}",
                r.kind(),
                r.status_code(),
                r.is_shadowed(),
                r.policy(),
                r.retry_after()
            ));
        }
    }
}

/// The script: every kind of request, some kept in flight, some failed, the clock moving; what
/// each was answered, then what the tenant was charged.
async fn script(tollgate: &Tollgate, clock: &crate::clock::FakeClock) -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Vec<Ticket> = Vec::new();
    let requests: &[(&str, &str, Option<&[u8]>)] = &[
        ("GET", "/", None),
        ("GET", "/", None),
        ("GET", "/a", None),
        ("GET", "/f", None),
        ("GET", "/r", None),
        ("POST", "/h", None),
        ("POST", "/", Some(b"key-1")),
        ("POST", "/", Some(b"key-1")),
        ("GET", "/", None),
        ("GET", "/", None),
    ];
    for round in 0..4 {
        for (n, (method, path, key)) in requests.iter().enumerate() {
            let what = format!("{round}.{n} {method} {path}");
            let mut info = RequestInfo::new(method, path, Credential::ApiKey(b"key-t"));
            if let Some(key) = key {
                info = info.with_idempotency_key(key);
            }
            let (waited, answer) = match tollgate.admit(&info) {
                Admission::Admitted(t) => (false, Ok(t)),
                Admission::Rejected(r) => (false, Err(r)),
                Admission::Pending(p) => (true, tollgate.resolve(p).await),
            };
            seen(&mut out, &what, waited, &answer);
            if let Ok(mut ticket) = answer {
                let ctx = ticket.context();
                if path == &"/r" || path == &"/h" {
                    let recorded = ctx.record("tokens", 4);
                    out.push(format!("{what}: recorded {recorded:?}"));
                }
                ticket.service_called();
                match n % 3 {
                    // Kept in flight until the round ends.
                    0 => open.push(ticket),
                    1 => out.push(format!("{what}: billed {}", ticket.complete(200))),
                    _ => out.push(format!("{what}: billed {}", ticket.complete(500))),
                }
            }
        }
        for ticket in open.drain(..) {
            let _ = ticket.complete(200);
        }
        clock.advance(Duration::from_millis(700));
    }
    tollgate.flush().await.unwrap();
    let report = tollgate.usage_report(&"t".into(), NOON - 86_400, NOON + 86_400).await.unwrap();
    for q in &report.quotas {
        out.push(format!(
            "quota {}: used {} held {} remaining {} limit {}",
            q.meter, q.used, q.held, q.remaining, q.limit
        ));
    }
    for w in &report.usage {
        out.push(format!("usage {} at {}: {}", w.meter, w.window_start, w.quantity));
    }
    out
}

/// Every line where `a` and `b` differ, for the message.
fn diff(a: &[String], b: &[String]) -> String {
    let mut lines = Vec::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            lines.push(format!("  {x:?}\n  {y:?}"));
        }
    }
    lines.join("\n")
}

#[tokio::test]
async fn the_straight_path_decides_as_the_whole_chain_on_every_plan_shape() {
    for (name, plan, straight) in SHAPES {
        for shadow in [false, true] {
            for headers in ["draft", "none"] {
                let limits = format!(
                    "[limits]\nheaders = \"{headers}\"\nfleet_size_hint = 1\n[plans.p]\n{plan}\nshadow = {shadow}\n"
                );
                let toml = format!("{limits}{ROUTES}");
                let case = format!("{name} (shadow {shadow}, headers {headers})");
                let (auto, auto_clock) = engine(&toml, AUTO);
                let compiled = auto.shared().runtime().load().plans[&crate::config::PlanId::from("p")].straight;
                assert_eq!(compiled, *straight, "{case}: the plan's straight flag");
                let decided = script(&auto, &auto_clock).await;
                let (chain, chain_clock) = engine(&toml, CHAIN);
                let chained = script(&chain, &chain_clock).await;
                assert_eq!(
                    decided,
                    chained,
                    "{case}: the straight path and the chain differ:\n{}",
                    diff(&decided, &chained)
                );
                if !straight && !shadow {
                    // The script reaches what the straight path skips for this shape.
                    let (forced, forced_clock) = engine(&toml, STRAIGHT);
                    let skipped = script(&forced, &forced_clock).await;
                    assert_ne!(skipped, chained, "{case}: the script never reaches what the straight path skips");
                }
            }
        }
    }
}
