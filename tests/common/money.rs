//! Spend caps across a fleet: the configuration, and the four engines' check the engine's and
//! the stores' tests share.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use super::{committed, holds::Rng, Harness, NOON};
use tollgate::{
    config::Period,
    door::{Admission, Credential, RequestInfo, Ticket},
    money::{ceil_nanos, cost_nanos, Decimal, NANOS},
    store::QuotaKey,
    Overrun, RejectionKind, TenantContext,
};

/// The price of a token: 7,313.3333 nano-dollars (a price finer than a nano-unit, so that
/// rounding shows).
pub const TOKEN_PRICE: &str = "0.0000073133333";
/// The price of a request: 1,000 nano-dollars.
pub const REQUEST_PRICE: &str = "0.000001";

/// Tenant `t` with a hard spend cap of 1.00 a month on priced tokens and requests; the route
/// that reports tokens.
pub const TOML: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.000001"
[meters.tokens]
price = "0.0000073133333"
[plans.p]
spend = { limit = "1.00", period = "month", mode = "hard", max_limit = "10.00" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.u]
plan = "p"
keys = ["key-u"]
"#;

/// The counter of `tenant`'s spend in the month holding noon.
pub fn spend_key(tenant: &str) -> QuotaKey {
    let month = Period::Month { anchor_day: 1 };
    let (start, end) = month.bounds(NOON);
    QuotaKey::new(tenant.into(), "spend".into(), month, start, end)
}

/// ⌈units × price⌉ in nano-units.
pub fn nanos(units: u64, price: &str) -> u64 {
    ceil_nanos(cost_nanos(units, Decimal::from_str(price).unwrap()))
}

/// A request of the tenant with `key` on the route that reports tokens: admitted with its
/// context, or refused.
pub async fn admit(h: &Harness, key: &'static str) -> Result<(Ticket, TenantContext), tollgate::Rejection> {
    let info = RequestInfo::new("POST", "/generate", Credential::ApiKey(key.as_bytes()));
    let ticket = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await?,
        Admission::Rejected(r) => return Err(r),
    };
    let ctx = ticket.context();
    Ok((ticket, ctx))
}

/// Four engines with their workers on one store, the clock moving: `tasks` tasks send calls
/// that each cost a priced request and hold a random estimate of priced tokens with `overrun =
/// "refuse"`, recording an actual (some streaming with extensions, some failing before they
/// record, some cut off). The spend recorded never passes the cap of 1.00; once the nodes shut
/// down (their leases given back), the store's spend counter holds exactly what the calls
/// cost, to the nano-dollar, and so does the spend usage.
pub async fn four_engines_never_pass_a_hard_spend_cap(store: Arc<dyn tollgate::store::StoreInspect>, tasks: u64) {
    spend_cap_run(store, tasks, false).await;
}

/// Tenant `t`'s tokens by model and kind, nine prices (`SERIES`), under the spend cap of
/// [`TOML`].
pub const TOML_DIMENSIONS: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.000001"
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-small", "m-medium", "m-large"]
values.kind = ["input", "output", "cached_input"]
[meters.tokens.prices.m-small]
input = "0.00000015"
output = "0.0000006"
cached_input = "0.000000075"
[meters.tokens.prices.m-medium]
input = "0.0000011"
output = "0.0000044"
cached_input = "0.00000055"
[meters.tokens.prices.m-large]
input = "0.0000025"
output = "0.00001"
cached_input = "0.0000012513"
[plans.p]
spend = { limit = "1.00", period = "month", mode = "hard", max_limit = "10.00" }
quotas.tokens = { limit = 100000000, period = "day" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.u]
plan = "p"
keys = ["key-u"]
"#;

/// The nine series of [`TOML_DIMENSIONS`]: model, kind, price.
pub const SERIES: [(&str, &str, &str); 9] = [
    ("m-small", "input", "0.00000015"),
    ("m-small", "output", "0.0000006"),
    ("m-small", "cached_input", "0.000000075"),
    ("m-medium", "input", "0.0000011"),
    ("m-medium", "output", "0.0000044"),
    ("m-medium", "cached_input", "0.00000055"),
    ("m-large", "input", "0.0000025"),
    ("m-large", "output", "0.00001"),
    ("m-large", "cached_input", "0.0000012513"),
];

/// [`four_engines_never_pass_a_hard_spend_cap`] with tokens by model and kind: each call holds
/// a series picked at random, at its own price.
pub async fn four_engines_never_pass_a_hard_spend_cap_by_dimension(
    store: Arc<dyn tollgate::store::StoreInspect>,
    tasks: u64,
) {
    spend_cap_run(store, tasks, true).await;
}

/// [`four_engines_never_pass_a_hard_spend_cap_by_dimension`] on four nodes' stores (the quota
/// role on a store of its own, such as Redis), read back through `quota` and `usage`.
pub async fn four_nodes_never_pass_a_spend_cap_by_dimension_on(
    stores: [super::NodeStore; 4],
    quota: Arc<dyn tollgate::store::QuotaInspect>,
    usage: Arc<dyn tollgate::store::UsageStore>,
    tasks: u64,
) {
    spend_cap_run_on(stores, quota, usage, tasks, true).await;
}

async fn spend_cap_run(store: Arc<dyn tollgate::store::StoreInspect>, tasks: u64, dimensions: bool) {
    let whole: Arc<dyn tollgate::store::Store> = store.clone();
    let stores = std::array::from_fn(|_| super::NodeStore::Whole(whole.clone()));
    spend_cap_run_on(stores, store.clone(), store, tasks, dimensions).await;
}

async fn spend_cap_run_on(
    stores: [super::NodeStore; 4],
    quota: Arc<dyn tollgate::store::QuotaInspect>,
    store: Arc<dyn tollgate::store::UsageStore>,
    tasks: u64,
    dimensions: bool,
) {
    const CAP: u64 = NANOS;
    // The clock moves a second every 5 ms: with the default `hold_timeout` (15 minutes) a hold
    // whose store call took 4.5 s of a loaded machine's time would be settled under its task.
    let base = if dimensions { TOML_DIMENSIONS } else { TOML };
    let toml = base.to_owned() + "[usage]\nstore_timeout = \"30s\"\n[limits]\nhold_timeout = \"24h\"\n";
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|s| Arc::new(super::node_on(&toml, s, clock.clone(), handle.clone()))).collect();
    let cost = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let (h, cost) = (nodes[i as usize % 4].clone(), cost.clone());
        set.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
            let (mut refused, mut calls) = (0, 0);
            while refused < 3 {
                calls += 1;
                assert!(calls < 5_000, "never refused: the cap does not hold");
                let (ticket, ctx) = match admit(&h, "key-t").await {
                    Ok(admitted) => admitted,
                    Err(r) => {
                        assert_eq!(r.kind(), RejectionKind::SpendCapReached, "{r}");
                        refused += 1;
                        continue;
                    }
                };
                let estimate = 1 + rng.below(150);
                let (dims, price) = if dimensions {
                    let (model, kind, price) = SERIES[rng.below(9) as usize];
                    (tollgate::Dimensions::new().with("model", model).with("kind", kind), price)
                } else {
                    (tollgate::Dimensions::new(), TOKEN_PRICE)
                };
                let mut hold = match ctx.hold_in_with("tokens", &dims, estimate, Overrun::Refuse).await {
                    Ok(hold) => hold,
                    Err(r) => {
                        match r.kind() {
                            RejectionKind::SpendCapReached => refused += 1,
                            RejectionKind::UnitsHeld => tokio::task::yield_now().await,
                            other => panic!("{other:?}: {r}"),
                        }
                        ticket.give_back();
                        continue;
                    }
                };
                let mut recorded = 0;
                let billed = match rng.below(4) {
                    // Fails before it records: the whole hold goes back, and the request's.
                    0 => {
                        drop(hold);
                        ticket.give_back();
                        false
                    }
                    // Streams: records in chunks, extending while the cap allows.
                    1 => {
                        for _ in 0..1 + rng.below(6) {
                            let chunk = 1 + rng.below(40);
                            if hold.record(chunk).is_err() {
                                if hold.extend(chunk).await.is_err() {
                                    break;
                                }
                                hold.record(chunk).unwrap();
                            }
                            recorded += chunk;
                            tokio::task::yield_now().await;
                        }
                        hold.settle();
                        ticket.complete(200)
                    }
                    // Cut off after it recorded part: what it recorded is charged, the rest of
                    // its hold and the request's cost go back (the ticket dropped unserved).
                    2 => {
                        let part = rng.below(estimate + 1);
                        hold.record(part).unwrap();
                        recorded = part;
                        drop(hold);
                        drop(ticket);
                        false
                    }
                    // Records an actual at most its estimate.
                    _ => {
                        let actual = rng.below(estimate + 1);
                        hold.record(actual).unwrap();
                        recorded = actual;
                        hold.settle();
                        ticket.complete(200)
                    }
                };
                // A hold's spend is rounded once: ⌈recorded × price⌉.
                let spent = nanos(recorded, price) + if billed { nanos(1, REQUEST_PRICE) } else { 0 };
                cost.fetch_add(spent, Ordering::SeqCst);
            }
        });
    }
    // The clock moves while they run (leases age, prefetches and flushes happen).
    while !set.is_empty() {
        tokio::select! {
            done = set.join_next() => { done.unwrap().unwrap(); }
            () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {
                handle.advance(std::time::Duration::from_secs(1));
            }
        }
    }
    let cost = cost.load(Ordering::SeqCst);
    assert!(cost <= CAP, "spent {cost} of {CAP} nano-dollars");
    assert!(cost > CAP / 2, "the tasks spent most of it: {cost}");
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    let taken = quota.reserved(&spend_key("t")).await.unwrap();
    assert_eq!(taken, cost, "the store's spend = what the calls cost, nothing stranded or lost");
    let recorded = committed(&*store, "t", "spend", NOON - 40 * 86_400, NOON + 86_400, 3600).await;
    assert_eq!(recorded, cost, "the spend recorded = what the calls cost");
    if dimensions {
        // The total counts what its series count, each series its own.
        let (from, to) = (NOON - 40 * 86_400, NOON + 86_400);
        let mut series = 0;
        for (model, kind, _) in SERIES {
            series += committed(&*store, "t", &format!("tokens{{model={model},kind={kind}}}"), from, to, 3600).await;
        }
        let total = committed(&*store, "t", "tokens", from, to, 3600).await;
        assert_eq!(total, 0, "the total records no usage of its own: its series are the bill");
        assert!(series > 0);
        // The total's quota counter took exactly what its series recorded.
        let (start, end) = Period::Day.bounds(NOON);
        let key = QuotaKey::new("t".into(), "tokens".into(), Period::Day, start, end);
        assert_eq!(quota.reserved(&key).await.unwrap(), series, "the total's counter = the sum of its series");
    }
}

/// Tenant `t` may use 600 tokens of `m-large` a minute (hard) and a million a day.
pub const TOML_PER_MINUTE: &str = r#"
[meters.tokens]
dimensions = ["model", "kind"]
values.model = ["m-small", "m-large"]
values.kind = ["input", "output"]
[plans.p]
quotas.tokens = { limit = 1000000, period = "day" }
quotas."tokens{model=m-large}" = { limit = 600, period = "minute" }
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.t]
plan = "p"
keys = ["key-t"]
[usage]
store_timeout = "30s"
[limits]
hold_timeout = "24h"
"#;

/// Four engines with their workers on `stores` share a model's 600 tokens a minute through four
/// minutes: in each, `tasks` tasks hold up to 20 tokens of it at a time (`overrun = "refuse"`)
/// and record part, until the limit refuses them, while the clock moves a second each 5 ms
/// that no task ends within the minute (never past its 50th second, so the minute's work is
/// all its own: holds across a minute's end are the engine tests'). What a minute's holds
/// recorded never passes 600, and falls short of it by less than a hold's estimate per node
/// and the store's (what a refusal leaves unspent); with the model spent, every node serves
/// another model of the tenant. Once the nodes shut down (their leases given back), the
/// store's counter of each minute holds exactly what its holds recorded: no minute's units
/// leak into the next, none is stranded or lost.
pub async fn four_nodes_keep_a_models_tokens_per_minute(
    stores: [super::NodeStore; 4],
    quota: Arc<dyn tollgate::store::QuotaInspect>,
    tasks: u64,
) {
    const LIMIT: u64 = 600;
    const MINUTES: i64 = 4;
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|s| Arc::new(super::node_on(TOML_PER_MINUTE, s, clock.clone(), handle.clone()))).collect();
    let mut recorded = Vec::new();
    for minute in 0..MINUTES {
        let start = NOON + 60 * minute;
        let at = clock.unix_secs();
        handle.advance(std::time::Duration::from_secs((start + 1 - at) as u64));
        let used = Arc::new(AtomicU64::new(0));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..tasks {
            let (h, used) = (nodes[i as usize % 4].clone(), used.clone());
            set.spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1) ^ ((minute as u64) << 32));
                let mut calls = 0;
                loop {
                    calls += 1;
                    assert!(calls < 5_000, "never refused: the limit does not hold");
                    let (ticket, ctx) = admit(&h, "key-t").await.unwrap();
                    let kind = if rng.below(2) == 0 { "input" } else { "output" };
                    let dims = tollgate::Dimensions::new().with("model", "m-large").with("kind", kind);
                    let estimate = 1 + rng.below(20);
                    let mut hold = match ctx.hold_in_with("tokens", &dims, estimate, Overrun::Refuse).await {
                        Ok(hold) => hold,
                        Err(r) => {
                            ticket.give_back();
                            match r.kind() {
                                RejectionKind::QuotaExceeded => return,
                                RejectionKind::UnitsHeld => tokio::task::yield_now().await,
                                other => panic!("{other:?}: {r}"),
                            }
                            continue;
                        }
                    };
                    let actual = rng.below(estimate + 1);
                    hold.record(actual).unwrap();
                    if rng.below(3) == 0 {
                        tokio::task::yield_now().await;
                    }
                    hold.settle();
                    assert!(ticket.complete(200));
                    used.fetch_add(actual, Ordering::SeqCst);
                }
            });
        }
        while !set.is_empty() {
            tokio::select! {
                done = set.join_next() => { done.unwrap().unwrap(); }
                () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {
                    if clock.unix_secs() < start + 50 {
                        handle.advance(std::time::Duration::from_secs(1));
                    }
                }
            }
        }
        let used = used.load(Ordering::SeqCst);
        assert!(used <= LIMIT, "minute {minute}: {used} tokens of {LIMIT}");
        assert!(used > LIMIT - 5 * 20, "minute {minute}: only {used} of {LIMIT} served before the limit refused");
        recorded.push(used);
        for h in &nodes {
            let (ticket, ctx) = admit(h, "key-t").await.unwrap();
            let small = tollgate::Dimensions::new().with("model", "m-small").with("kind", "input");
            let mut hold = ctx.hold_in("tokens", &small, 10).await.expect("another model of the tenant is served");
            hold.record(10).unwrap();
            hold.settle();
            assert!(ticket.complete(200));
        }
    }
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    for (minute, used) in recorded.into_iter().enumerate() {
        let start = NOON + 60 * minute as i64;
        let key = QuotaKey::new("t".into(), "tokens{model=m-large}".into(), Period::Minute, start, start + 60);
        assert_eq!(
            quota.reserved(&key).await.unwrap(),
            used,
            "minute {minute}: the store's counter = what was recorded"
        );
    }
}
