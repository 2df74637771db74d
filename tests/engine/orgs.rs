//! Organizations (`[orgs.NAME]`): a tenant's requests pass its organization's quotas too, at
//! the organization's own counters, shared by its tenants across the fleet.

use std::sync::Arc;

use crate::common;
use common::{holds::admit, orgs::month_key, Harness, NOON};
use tollgate::store::prelude::*;
use tollgate::{store::MemoryStore, Config, RejectionKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_share_an_organizations_month() {
    let store: Arc<dyn StoreInspect> = Arc::new(MemoryStore::new());
    let whole: Arc<dyn Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::orgs::four_nodes_share_an_organizations_month(nodes, store, 24).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_sqlite_file_share_an_organizations_month() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StoreInspect> =
        Arc::new(tollgate::store::SqliteStore::open(dir.path().join("orgs.db")).await.unwrap());
    let whole: Arc<dyn Store> = store.clone();
    let nodes = std::array::from_fn(|_| common::NodeStore::Whole(whole.clone()));
    common::orgs::four_nodes_share_an_organizations_month(nodes, store, 24).await;
}

/// An organization of two tenants with 10 requests a month, each tenant 8 of its own, and 100
/// tokens a month that `/generate` and `/tokens/N` report and `/held` holds (80 a request).
const SMALL: &str = r#"
[meters.tokens]
[plans.project]
quotas.requests = { limit = 8, period = "month", mode = "hard", lease = 1 }
quotas.tokens = { limit = 1000, period = "month", mode = "hard", lease = 100 }
[plans.company]
quotas.requests = { limit = 10, period = "month", mode = "hard", lease = 1 }
quotas.tokens = { limit = 100, period = "month", mode = "hard", lease = 1 }
[orgs.acme]
plan = "company"
[[routes]]
path = "/generate"
reports = ["tokens"]
[[routes]]
path = "/tokens/{n}"
reports = ["tokens"]
[[routes]]
path = "/held"
reports = ["tokens"]
hold.tokens = 80
[[routes]]
path = "/{*rest}"
[tenants.a]
plan = "project"
org = "acme"
keys = ["key-a"]
[tenants.b]
plan = "project"
org = "acme"
keys = ["key-b"]
[tenants.solo]
plan = "project"
keys = ["key-solo"]
[limits]
headers = "draft"
"#;

fn small() -> Harness {
    Harness::at(SMALL, NOON)
}

/// The organization's refusal names its scope and policy, in problem+json and in the headers;
/// a tenant of no organization is not limited by it; each tenant's own limit still refuses.
#[tokio::test]
async fn the_organizations_refusal_names_its_scope_and_policy() {
    let h = small();
    for _ in 0..8 {
        assert_eq!(h.status("/", "key-a").await, 200);
    }
    // Tenant a's own month is spent: its own policy refuses it.
    let own = h.get("/", "key-a").await;
    assert_eq!(own.status, 429);
    assert_eq!(own.json()["policy"], "requests-month");
    assert!(own.json().get("scope").is_none(), "{}", own.json());
    // Two more fit the organization's month, by tenant b; the third does not.
    for _ in 0..2 {
        let ok = h.get("/", "key-b").await;
        assert_eq!(ok.status, 200);
    }
    let refused = h.get("/", "key-b").await;
    assert_eq!(refused.status, 429);
    let body = refused.json();
    assert_eq!(body["policy"], "org-requests-month", "{body}");
    assert_eq!(body["scope"], "organization", "{body}");
    assert_eq!(body["violated-policies"], serde_json::json!(["org-requests-month"]), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("organization `acme`"), "{body}");
    let rejection = refused.rejection.as_ref().expect("the rejection is in the extensions");
    assert_eq!(rejection.kind(), RejectionKind::QuotaExceeded);
    assert_eq!(rejection.scope(), Some("organization"));
    assert!(refused.header("retry-after").is_some());
    // Tenant b's own quota item shows what is tightest: nothing left.
    let ratelimit = refused.header("ratelimit").unwrap_or_default().to_owned();
    assert!(ratelimit.contains("r=0"), "{ratelimit}");
    // A tenant of no organization is served.
    assert_eq!(h.status("/", "key-solo").await, 200);
}

/// The headers of an admitted request show the organization's remaining when it is tighter
/// than the tenant's.
#[tokio::test]
async fn an_admitted_requests_headers_show_the_tightest_scope() {
    let h = small();
    for _ in 0..6 {
        assert_eq!(h.status("/", "key-a").await, 200);
    }
    // Tenant b has 8 of its own left; the organization 4, and 3 after this request.
    let reply = h.get("/", "key-b").await;
    assert_eq!(reply.status, 200);
    let ratelimit = reply.header("ratelimit").unwrap_or_default().to_owned();
    assert!(ratelimit.contains("r=3"), "{ratelimit}");
}

/// Reserved is not spent, at every scope: a request refused by its tenant's own limit gives
/// back what it took of the organization's, and one that is not billed (a 500) gives back at
/// both scopes; the organization's other tenant then gets every unit.
#[tokio::test]
async fn units_not_spent_go_back_at_every_scope() {
    let h = small();
    for _ in 0..8 {
        assert_eq!(h.status("/", "key-a").await, 200);
    }
    // Refused by tenant a's own month, many times: nothing of the organization's is used.
    for _ in 0..20 {
        assert_eq!(h.status("/", "key-a").await, 429);
    }
    // Not billed: back at both scopes.
    for _ in 0..20 {
        assert_eq!(h.status("/fail", "key-b").await, 500);
    }
    assert_eq!(h.status("/", "key-b").await, 200);
    assert_eq!(h.status("/", "key-b").await, 200);
    assert_eq!(h.get("/", "key-b").await.json()["policy"], "org-requests-month");
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&month_key("org acme")).await.unwrap(), 10);
    assert_eq!(store.reserved(&month_key("a")).await.unwrap(), 8);
    assert_eq!(store.reserved(&month_key("b")).await.unwrap(), 2);
}

fn tokens_key(tenant: &str) -> tollgate::store::QuotaKey {
    let period = tollgate::config::Period::Month { anchor_day: 1 };
    let (start, end) = period.bounds(NOON);
    tollgate::store::QuotaKey::new(tenant.into(), "tokens".into(), period, start, end)
}

/// Tokens a handler records count at the organization too: once its month is spent by one
/// tenant, the organization's other tenant is refused on the routes that report tokens, and
/// served on the others.
#[tokio::test]
async fn recorded_units_count_at_the_organization() {
    let h = small();
    assert_eq!(h.status("/tokens/60", "key-a").await, 200);
    assert_eq!(h.status("/tokens/60", "key-b").await, 200);
    let refused = h.get("/tokens/1", "key-a").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["policy"], "org-tokens-month", "{}", refused.json());
    assert_eq!(h.status("/other", "key-b").await, 200);
    // Tenant solo's tokens are its own.
    assert_eq!(h.status("/tokens/60", "key-solo").await, 200);
    assert_eq!(h.status("/tokens/60", "key-solo").await, 200);
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&tokens_key("org acme")).await.unwrap(), 120);
    assert_eq!(store.reserved(&tokens_key("a")).await.unwrap(), 60);
    assert_eq!(store.reserved(&tokens_key("solo")).await.unwrap(), 120);
    // Usage is recorded once, by each tenant: the organization's counters record none.
    let used = |t: &'static str| {
        let store = store.clone();
        async move { common::committed(&*store, t, "tokens", NOON - 3600, NOON + 3600, 60).await }
    };
    assert_eq!(used("a").await, 60);
    assert_eq!(used("b").await, 60);
    assert_eq!(used("org acme").await, 0);
}

/// A hold takes from the tenant's and the organization's quotas at once: one the organization
/// cannot cover is refused naming it, and nothing is held at either scope; settled lower,
/// every scope gets the rest back.
#[tokio::test]
async fn a_hold_is_held_and_given_back_at_every_scope() {
    let h = small();
    let (ticket, ctx) = admit(&h, "key-a").await.unwrap();
    let mut hold = ctx.hold("tokens", 80).await.expect("80 of 100 fit");
    hold.record(30).unwrap();
    // Tenant b: 20 of the organization's are not held.
    let (tb, cb) = admit(&h, "key-b").await.unwrap();
    let refused = cb.hold("tokens", 30).await.expect_err("the organization holds 80 for tenant a");
    assert_eq!(refused.scope(), Some("organization"), "{refused}");
    hold.settle();
    assert!(ticket.complete(200));
    // 30 recorded: 70 left at the organization, 970 at tenant b.
    let mut held = cb.hold("tokens", 70).await.expect("the rest of a's hold came back");
    assert!(cb.hold("tokens", 1).await.is_err(), "the organization's month is all held");
    held.record(70).unwrap();
    held.settle();
    assert!(tb.complete(200));
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&tokens_key("org acme")).await.unwrap(), 100);
    assert_eq!(store.reserved(&tokens_key("a")).await.unwrap(), 30);
    assert_eq!(store.reserved(&tokens_key("b")).await.unwrap(), 70);
}

/// Bad input: refused with its place and a clear error.
#[test]
fn organizations_are_checked_by_key() {
    let err = |toml: &str| Config::from_toml_str(toml).expect_err("refused");
    let base = "[plans.p]\nquotas.requests = { limit = 10, period = \"day\" }\n";
    // An organization that does not exist.
    let e = err(&format!("{base}[tenants.t]\nplan = \"p\"\norg = \"nope\"\n"));
    assert_eq!(e.key(), "tenants.t.org", "{e}");
    assert!(e.to_string().contains("unknown organization `nope`"), "{e}");
    // A tenant in two organizations: one name, not a list.
    let e = err(&format!(
        "{base}[orgs.x]\nplan = \"p\"\n[orgs.y]\nplan = \"p\"\n[tenants.t]\nplan = \"p\"\norg = [\"x\", \"y\"]\n"
    ));
    assert!(e.key().starts_with("tenants.t"), "{e}");
    // An organization of an organization: no such key.
    let e = err(&format!("{base}[orgs.x]\nplan = \"p\"\norg = \"y\"\n[orgs.y]\nplan = \"p\"\n"));
    assert!(e.key().starts_with("orgs.x"), "{e}");
    // A plan an organization cannot enforce yet.
    let e =
        err("[plans.p]\nrate = \"10/s\"\nquotas.requests = { limit = 10, period = \"day\" }\n[orgs.x]\nplan = \"p\"\n");
    assert_eq!(e.key(), "orgs.x.plan", "{e}");
    assert!(e.to_string().contains("a rate"), "{e}");
    let e =
        err("[plans.p]\nquotas.requests = { limit = 10, period = \"day\", mode = \"soft\" }\n[orgs.x]\nplan = \"p\"\n");
    assert!(e.to_string().contains("a soft quota"), "{e}");
    let e = err("[plans.p]\nconcurrency = 2\n[orgs.x]\nplan = \"p\"\n");
    assert!(e.to_string().contains("concurrency"), "{e}");
    // A tenant in shadow mode, and an organization's plan with tenant alerts.
    let e = err("[plans.p]\nshadow = true\nquotas.requests = { limit = 10, period = \"day\" }\n[plans.o]\nquotas.requests = { limit = 10, period = \"day\" }\n[orgs.x]\nplan = \"o\"\n[tenants.t]\nplan = \"p\"\norg = \"x\"\n");
    assert_eq!(e.key(), "tenants.t.org", "{e}");
    assert!(e.to_string().contains("shadow"), "{e}");
    let e = err(
        "[plans.p]\ntenant_alerts = true\nquotas.requests = { limit = 10, period = \"day\" }\n[orgs.x]\nplan = \"p\"\n",
    );
    assert!(e.to_string().contains("tenant alerts"), "{e}");
    // An unknown plan, and a bad name.
    let e = err(&format!("{base}[orgs.x]\nplan = \"q\"\n"));
    assert_eq!(e.key(), "orgs.x.plan", "{e}");
    let e = err(&format!("{base}[orgs.\"a b\"]\nplan = \"p\"\n"));
    assert!(e.to_string().contains("organization name"), "{e}");
    assert!(e.line().is_some());
    // And the good one.
    let ok = Config::from_toml_str(&format!("{base}[orgs.x]\nplan = \"p\"\n[tenants.t]\nplan = \"p\"\norg = \"x\"\n"))
        .unwrap();
    assert_eq!(ok.tenants()[0].org().map(|o| o.as_str()), Some("x"));
    assert_eq!(ok.orgs().len(), 1);
}

fn event(id: &str, tenant: &str, quantity: u64) -> tollgate::events::Event {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOON as u64);
    tollgate::events::Event::new(id, tenant.into(), "tokens".into(), quantity, at)
}

/// A job's usage events count at its tenant's organization once, whatever their retries: work
/// done is counted there (past its limit if need be), a redelivered event is not counted again,
/// and the organization's month then refuses its tenants' requests on the routes reporting the
/// meter.
#[tokio::test]
async fn usage_events_count_at_the_organization_once() {
    let h = small();
    use tollgate::store::EventOutcome;
    assert_eq!(h.tollgate.record_event(event("e1", "a", 60)).await.unwrap(), EventOutcome::Applied);
    assert_eq!(h.tollgate.record_event(event("e1", "a", 60)).await.unwrap(), EventOutcome::Duplicate);
    assert_eq!(h.tollgate.record_event(event("e2", "b", 30)).await.unwrap(), EventOutcome::Applied);
    // 90 of 100 counted: 10 left.
    assert_eq!(h.status("/tokens/10", "key-b").await, 200);
    let refused = h.get("/tokens/1", "key-a").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["policy"], "org-tokens-month");
    // Work done past the limit is counted all the same.
    assert_eq!(h.tollgate.record_event(event("e3", "b", 5)).await.unwrap(), EventOutcome::Applied);
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&tokens_key("org acme")).await.unwrap(), 105);
    assert_eq!(store.reserved(&tokens_key("a")).await.unwrap(), 60);
    assert_eq!(store.reserved(&tokens_key("b")).await.unwrap(), 45);
}

/// A job's reservation holds at its tenant's organization too: one the organization cannot
/// cover is refused naming it, and nothing is held at the tenant; the work recorded for less
/// gives the rest back at both scopes, and a released reservation gives all of it back.
#[tokio::test]
async fn a_jobs_reservation_is_held_at_the_organization() {
    let h = small();
    let hold = std::time::Duration::from_secs(600);
    h.tollgate.reserve_event(&event("job-a", "a", 80), hold).await.unwrap();
    let refused = h.tollgate.reserve_event(&event("job-b", "b", 30), hold).await.unwrap_err();
    assert!(matches!(refused, tollgate::events::EventError::OrgQuotaExceeded { .. }), "{refused}");
    assert!(refused.to_string().contains("organization `acme`"), "{refused}");
    // The work took 30 of the 80: 50 back at the organization (and at tenant a).
    h.tollgate.record_event(event("job-a", "a", 30)).await.unwrap();
    h.tollgate.reserve_event(&event("job-b", "b", 70), hold).await.unwrap();
    assert!(h.tollgate.release_event(&event("job-b", "b", 70)).await);
    h.tollgate.reserve_event(&event("job-c", "b", 70), hold).await.unwrap();
    h.tollgate.record_event(event("job-c", "b", 70)).await.unwrap();
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&tokens_key("org acme")).await.unwrap(), 100);
    assert_eq!(store.reserved(&tokens_key("a")).await.unwrap(), 30);
    assert_eq!(store.reserved(&tokens_key("b")).await.unwrap(), 70);
}

/// A route's hold the organization cannot cover is refused as the tenant's request: naming
/// the organization's scope and policy, with the tenant's own headers, and nothing held at
/// either scope; a record past a hold that the organization refuses gets the organization's
/// refusal from `TenantContext::refusal`.
#[tokio::test]
async fn a_hold_refused_by_the_organization_is_the_tenants_refusal() {
    let h = small();
    // Tenant a holds 80 of the organization's 100 through the route, and records 10.
    let (ticket, ctx) = admit(&h, "key-a").await.unwrap();
    let mut held = ctx.hold_with("tokens", 80, tollgate::Overrun::Refuse).await.unwrap();
    held.record(10).unwrap();
    // Tenant b's route hold of 80: 20 are not held at the organization.
    let refused = h.get("/held", "key-b").await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let r = refused.rejection.as_ref().unwrap();
    assert_eq!(r.scope(), Some("organization"), "{r}");
    assert_eq!(r.tenant().map(|t| t.as_str()), Some("b"), "{r}");
    // Past its own hold, tenant a's record of 10 more does not fit the organization's lease on
    // the node (a record never waits on the store): the refusal to answer names it.
    let e = held.record(80).unwrap_err();
    let answer = ctx.refusal("tokens", &e).expect("an overrun has a refusal");
    assert_eq!(answer.scope(), Some("organization"), "{answer}");
    assert_eq!(answer.tenant().map(|t| t.as_str()), Some("a"), "{answer}");
    held.settle();
    assert!(ticket.complete(200));
    // 10 recorded: b's route hold of 80 fits now; its handler records none, so the hold
    // settles at nothing, and nothing of the refused one was kept, at either scope.
    assert_eq!(h.status("/held", "key-b").await, 200);
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    assert_eq!(store.reserved(&tokens_key("org acme")).await.unwrap(), 10);
    assert_eq!(store.reserved(&tokens_key("a")).await.unwrap(), 10);
    assert_eq!(store.reserved(&tokens_key("b")).await.unwrap(), 0);
}

/// A job's reservation made in the organization's January, whose work is recorded in its
/// February (the tenant's month, anchored on the 15th, is the same for both): what it held
/// in January goes back to January, and the work counts in February, as the organization's
/// months are its own.
#[tokio::test]
async fn a_reservation_counts_in_the_organizations_period_of_its_work() {
    const FEB_1: i64 = 1_769_904_000;
    let toml = SMALL.replace(
        "quotas.tokens = { limit = 1000, period = \"month\", mode = \"hard\", lease = 100 }",
        "quotas.tokens = { limit = 1000, period = \"month\", mode = \"hard\", lease = 100, anchor_day = 15 }",
    );
    let h = Harness::at(&toml, FEB_1 - 30);
    let at = |unix: i64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix as u64);
    let job = |unix| tollgate::events::Event::new("job-1", "a".into(), "tokens".into(), 40, at(unix));
    h.tollgate.reserve_event(&job(FEB_1 - 20), std::time::Duration::from_secs(600)).await.unwrap();
    h.clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(h.tollgate.record_event(job(FEB_1 + 20)).await.unwrap(), tollgate::store::EventOutcome::Applied);
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    let org_month = |start: i64, end: i64| {
        let period = tollgate::config::Period::Month { anchor_day: 1 };
        tollgate::store::QuotaKey::new("org acme".into(), "tokens".into(), period, start, end)
    };
    const JAN_1: i64 = 1_767_225_600;
    const MAR_1: i64 = 1_772_323_200;
    assert_eq!(store.reserved(&org_month(JAN_1, FEB_1)).await.unwrap(), 0, "January's hold went back");
    assert_eq!(store.reserved(&org_month(FEB_1, MAR_1)).await.unwrap(), 40, "the work counts in February");
}

/// The same work reserved again after the organization's month turned (the tenant's month,
/// anchored on the 15th, has not): held anew in the organization's new month, and what the
/// old month held goes back to it.
#[tokio::test]
async fn the_same_work_reserved_again_holds_in_the_organizations_new_period() {
    const FEB_1: i64 = 1_769_904_000;
    const JAN_1: i64 = 1_767_225_600;
    const MAR_1: i64 = 1_772_323_200;
    let toml = SMALL.replace(
        "quotas.tokens = { limit = 1000, period = \"month\", mode = \"hard\", lease = 100 }",
        "quotas.tokens = { limit = 1000, period = \"month\", mode = \"hard\", lease = 100, anchor_day = 15 }",
    );
    let h = Harness::at(&toml, FEB_1 - 30);
    let at = |unix: i64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix as u64);
    let job = |unix| tollgate::events::Event::new("job-1", "a".into(), "tokens".into(), 40, at(unix));
    let hold = std::time::Duration::from_secs(600);
    h.tollgate.reserve_event(&job(FEB_1 - 20), hold).await.unwrap();
    h.clock.advance(std::time::Duration::from_secs(60));
    h.tollgate.reserve_event(&job(FEB_1 + 20), hold).await.unwrap();
    // February's 100 hold its 40: 60 left there for tenant b.
    let (_, cb) = admit(&h, "key-b").await.unwrap();
    assert!(cb.hold("tokens", 61).await.is_err(), "February holds the job's 40");
    let held = cb.hold("tokens", 60).await.expect("60 are left in February");
    held.settle();
    assert_eq!(h.tollgate.record_event(job(FEB_1 + 20)).await.unwrap(), tollgate::store::EventOutcome::Applied);
    h.tollgate.shutdown().await.unwrap();
    let store = h.memory.clone().unwrap();
    let org_month = |start: i64, end: i64| {
        let period = tollgate::config::Period::Month { anchor_day: 1 };
        tollgate::store::QuotaKey::new("org acme".into(), "tokens".into(), period, start, end)
    };
    assert_eq!(store.reserved(&org_month(JAN_1, FEB_1)).await.unwrap(), 0, "January's hold went back");
    assert_eq!(store.reserved(&org_month(FEB_1, MAR_1)).await.unwrap(), 40, "the work counts in February");
}
