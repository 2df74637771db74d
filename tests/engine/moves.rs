//! A tenant moved between plans keeps what it used, held and has in flight, for every kind of
//! limit (issue 90, "a plan change keeps what was used"; docs/architecture.md, "What a plan
//! change keeps").

use std::sync::Arc;

use crate::common;
use common::{node_on, NodeStore, NOON};
use tollgate::{
    admin::Admin,
    door::{Admission, Credential, RequestInfo},
    store::{MemoryStore, QuotaInspect as _, Store},
};

/// `fast` and `slow` plans of one prepaid balance, paid at 0.25 a request: `slow` has a lower
/// rate, concurrency and spend cap.
const TOML: &str = r#"
[billing]
currency = "usd"
[meters.requests]
price = "0.25"
[plans.fast]
rate = "1000/s"
concurrency = 3
quotas.requests = { period = "prepaid", lease = 4 }
spend = { limit = "10.00", period = "month", mode = "hard" }
[plans.slow]
rate = "1/s"
concurrency = 1
quotas.requests = { period = "prepaid", lease = 4 }
spend = { limit = "2.25", period = "month", mode = "hard" }
[usage]
flush_interval = "1s"
"#;

/// Two engines on one store serve tenant `t` of the directory on `fast`, with 100 requests
/// prepaid: 6 are served (1.50 spent) and one is in flight on node A when the CLI moves `t` to
/// `slow`. Once each node has followed the directory: node B's bucket carries what the old
/// plan's requests took of it (refused at the same instant), then serves one request and
/// refuses the next by the new rate; node A refuses by the new concurrency while its request of
/// the old plan is in flight, and serves once it ends; the spend of the old plan counts under
/// the new cap (2.25 reached: 402 on both nodes). The balance and the spend counted end at
/// exactly what was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_keeps_the_rate_concurrency_spend_and_balance_used() {
    let store = Arc::new(MemoryStore::new());
    let whole: Arc<dyn Store> = store.clone();
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let a = node_on(TOML, &NodeStore::Whole(whole.clone()), clock.clone(), handle.clone());
    let b = node_on(TOML, &NodeStore::Whole(whole.clone()), clock.clone(), handle.clone());
    let cli = Admin::new(whole).with_config(tollgate::Config::from_toml_str(TOML).unwrap());
    cli.add_tenant("t", "fast", None).await.unwrap();
    cli.grant_credits("t", "requests", 100, None, "pi_moves").await.unwrap();
    let key = cli.issue_key("t", Default::default()).await.unwrap().key;
    let mut served = 0;
    for h in [&a, &b, &a, &b, &a, &b] {
        assert_eq!(h.status("/", &key).await, 200);
        served += 1;
    }
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
    let in_flight = match a.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => a.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    served += 1; // 1.75 spent once it completes

    cli.set_plan("t", "slow").await.unwrap();
    for h in [&a, &b] {
        h.tollgate.follow_directory().await.unwrap();
    }
    // Node B: its bucket carried (its three requests of this instant put it past now, which
    // one a second with no burst does not allow), then the new rate, one a second.
    assert_eq!(b.status("/", &key).await, 429, "B: what the old plan's requests took of the new rate");
    handle.advance(std::time::Duration::from_secs(1));
    assert_eq!(b.status("/", &key).await, 200, "B: within the new rate");
    served += 1; // 2.00
    assert_eq!(b.status("/", &key).await, 429, "B: past the new rate");
    // Node A: its request in flight of the old plan counts under the new concurrency.
    let refused = a.get("/", &key).await;
    assert_eq!(refused.status, 429, "A: the new concurrency of 1 is taken");
    assert_eq!(refused.rejection.map(|r| r.kind()), Some(tollgate::RejectionKind::ConcurrencyLimited));
    assert!(in_flight.complete(200));
    assert_eq!(a.status("/", &key).await, 200, "A: its place is free");
    served += 1; // 2.25
                 // The spend of the old plan counts under the new cap: 2.25 spent of 2.25.
    handle.advance(std::time::Duration::from_secs(2));
    for (name, h) in [("A", &a), ("B", &b)] {
        assert_eq!(h.status("/", &key).await, 402, "{name}: the new cap is spent");
    }
    a.tollgate.shutdown().await.unwrap();
    b.tollgate.shutdown().await.unwrap();
    let (_, balances) = cli.credits("t").await.unwrap();
    let balance = &balances.iter().find(|(m, _)| m.as_str() == "requests").unwrap().1;
    assert_eq!((balance.granted, balance.reserved), (100, served), "the balance spent what was served");
    let counters = cli.quota_counters("t").await.unwrap();
    let spend = counters.iter().find(|c| c.key.meter.as_str() == "spend").expect("a spend counter");
    assert_eq!(spend.reserved, served * tollgate::money::NANOS / 4, "the spend counted: 0.25 a request served");
    drop(store);
}

/// A hold open across a move settles after its plan's lease went back (the old state's lease
/// is given back at the move): the units it does not use go to the store in a task of their
/// own. A shutdown right after (the process then exits) waits for that task: the day's counter
/// holds what was recorded, not the hold's unused units, reserved until the day ends. On a
/// runtime of one thread, where the task runs only when the shutdown yields (on a memory
/// store, it did not before it waited for the task: the test failed every time).
#[tokio::test(flavor = "current_thread")]
async fn a_hold_settled_after_its_lease_went_back_is_given_back_before_shutdown_ends() {
    use common::plan_change::{day_key, TOML};
    let store = Arc::new(MemoryStore::new());
    let whole: Arc<dyn Store> = store.clone();
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let node = node_on(TOML, &NodeStore::Whole(whole.clone()), clock, handle);
    let cli = Admin::new(whole);
    cli.add_tenant("t", "big", None).await.unwrap();
    let key: &'static str = Box::leak(cli.issue_key("t", Default::default()).await.unwrap().key.into_boxed_str());
    let (ticket, ctx) = common::holds::admit(&node, key).await.unwrap();
    let mut held = ctx.hold("tokens", 100).await.unwrap();
    cli.set_plan("t", "small").await.unwrap();
    node.tollgate.follow_directory().await.unwrap();
    held.record(40).unwrap();
    held.settle();
    assert!(ticket.complete(200));
    node.tollgate.shutdown().await.unwrap();
    assert_eq!(store.reserved(&day_key("t")).await.unwrap(), 40, "the day's counter: the 40 recorded");
}
