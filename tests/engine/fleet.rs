//! Fleet-wide rates (`rate_scope = "fleet"`): one bucket per tenant for every node, leased
//! out in cells; exact up to the documented bound, a store call per lease, not per request.

use std::sync::{atomic::Ordering, Arc};

use crate::common;

use common::fleet::{excess_over_bound, four_nodes_share_one_rate, send, TOML};
use common::{node_with_worker, Faulty, Harness, NOON};
use tollgate::RejectionKind;

/// The least real time per millisecond of engine time in the fleet runs.
const STEP: std::time::Duration = std::time::Duration::from_micros(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_on_one_memory_store_share_one_rate() {
    four_nodes_share_one_rate(Arc::new(tollgate::store::MemoryStore::new()), STEP).await;
}

/// Four nodes each with its own handle of one SQLite file (its own connections, as processes
/// sharing the file on one host have).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_on_one_sqlite_file_share_one_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rate.db");
    let mut stores = Vec::new();
    for _ in 0..4 {
        let store: Arc<dyn tollgate::store::StoreInspect> =
            Arc::new(tollgate::store::SqliteStore::open(&path).await.unwrap());
        stores.push(store);
    }
    common::fleet::four_nodes_share_one_rate_each(stores.try_into().unwrap(), STEP).await;
}

/// The reason for the feature: with each node keeping its own bucket, four nodes admit about
/// four times the plan's rate, and pass the one limiter's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_each_with_its_own_rate_admit_four_times_the_plan() {
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (admitted, _nodes) = common::fleet::four_nodes_send(store, "node", 2, STEP).await;
    eprintln!("node scope: {} admitted in 2 s (one limiter: 220)", admitted.len());
    assert!(admitted.len() > 600, "{} admitted", admitted.len());
    assert!(excess_over_bound(&admitted) > 0);
}

/// Store calls per 1,000 requests at 2/s, 100/s and 5,000/s (tests/common/fleet.rs), on the
/// memory store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_calls_follow_the_pace_not_the_requests() {
    common::fleet::store_calls_per_thousand(Arc::new(tollgate::store::MemoryStore::new()), "memory").await;
}

/// A request refused by the shared bucket says when its cells come back, in `Retry-After`
/// and in `RateLimit`; a refused request's cells go back to its node's lease.
#[tokio::test]
async fn a_refusal_says_when_the_fleets_cells_come_back() {
    let toml = TOML.replace("SCOPE", "fleet");
    let h = Harness::new(&toml);
    for _ in 0..20 {
        let reply = h.get("/", "key-t").await;
        assert_eq!(reply.status, 200);
        assert!(reply.header("ratelimit").is_some());
    }
    let reply = h.get("/", "key-t").await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.rejection.as_ref().unwrap().kind(), RejectionKind::RateLimited);
    assert_eq!(reply.header("retry-after"), Some("1"), "a cell comes back in 10 ms");
    assert!(reply.header("ratelimit").unwrap().contains("r=0"), "{:?}", reply.header("ratelimit"));
    // The fleet's bucket (100/s, burst 20), as a node's own would read; not the node's share.
    assert_eq!(reply.header("ratelimit-policy"), Some("\"rate\";q=100;w=1"));
    h.clock.advance(std::time::Duration::from_millis(30));
    assert_eq!(h.get("/", "key-t").await.status, 200, "3 cells back");
}

/// The rate store failing: a fleet rate fails open by default, to the node's share of the rate
/// (`limits.fleet_size_hint`: here 4 nodes, so 5 of the burst of 20); set to fail closed, it
/// answers 503.
#[tokio::test]
async fn a_failing_rate_store_falls_back_to_the_nodes_share_or_refuses() {
    let toml = TOML.replace("SCOPE", "fleet");
    let store = Arc::new(Faulty::default());
    store.rate_down.store(true, Ordering::SeqCst);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    let mut ok = 0;
    for _ in 0..20 {
        if h.get("/", "key-t").await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 5, "the node's share of the burst");
    let closed = TOML
        .replace("SCOPE", "fleet")
        .replace("rate_scope = \"fleet\"", "rate_scope = \"fleet\"\non_store_error = \"fail-closed\"");
    let store = Arc::new(Faulty::default());
    store.rate_down.store(true, Ordering::SeqCst);
    let h = Harness::with_store(&closed, store, NOON);
    let reply = h.get("/", "key-t").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("1"));
}

/// Cells a node leased and did not spend go back to the shared bucket when it shuts down (the
/// part of the lease still ahead): another node gets them at once.
#[tokio::test]
async fn a_node_shutting_down_gives_its_unspent_cells_back() {
    let toml = TOML.replace("SCOPE", "fleet");
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let a = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let b = node_with_worker(&toml, store.clone(), clock, handle);
    // A's pace grows its leases: it holds cells it has not spent.
    for _ in 0..6 {
        send(&a).await.unwrap();
    }
    a.tollgate.shutdown().await.unwrap();
    let mut served = 0;
    while send(&b).await.is_ok() {
        served += 1;
    }
    assert_eq!(served, 20 - 6, "the burst less what A spent, nothing stranded");
}

/// A tenant over its fleet rate is refused by its node from the bucket's last reading: a storm
/// of requests costs no store call each (one at most, until its cells come back).
#[tokio::test]
async fn a_tenant_over_its_rate_costs_no_store_call_per_refusal() {
    let toml = TOML.replace("SCOPE", "fleet");
    let store = Arc::new(Faulty::default());
    let h = Harness::with_store(&toml, store.clone(), NOON);
    while h.get("/", "key-t").await.status == 200 {}
    let before = store.rate_calls.load(Ordering::SeqCst);
    for _ in 0..100 {
        let reply = h.get("/", "key-t").await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    assert!(store.rate_calls.load(Ordering::SeqCst) - before <= 1, "refused from the bucket's last reading");
    h.clock.advance(std::time::Duration::from_millis(20));
    assert_eq!(h.get("/", "key-t").await.status, 200, "its cells came back");
}

/// Requests that waited together for a lease, the bucket spent by other nodes: the first call
/// reads the bucket, the others are refused from that reading. None of them waits its turn
/// for a call of its own, so none times out into the fail-open fallback (which would serve the
/// node's own bucket while the fleet's is spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_spent_fleet_rate_are_refused_from_one_reading() {
    let toml = TOML.replace("SCOPE", "fleet").replace("store_timeout = \"30s\"", "store_timeout = \"250ms\"");
    let store = Arc::new(Faulty::default());
    let h = Arc::new(Harness::with_store(&toml, store.clone(), NOON));
    // Another node spent the whole burst: this one has not read the bucket yet.
    let now = h.tollgate.clock().unix_nanos();
    let other = tollgate::store::ReserveToken::new(u64::MAX - 7, 1);
    let call = tollgate::store::CellCall::new("t".into(), 20, 20, common::fleet::T as u64, 20, now, other);
    let grant = tollgate::store::RateStore::take_cells(&*store.inner, &call).await.unwrap();
    assert_eq!(grant.granted, 20);
    // A store 20 ms away: 100 waiters each calling in turn would wait 2 s for their turn.
    store.rate_delay_ms.store(20, Ordering::SeqCst);
    let before = store.rate_calls.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move { send(&h).await }));
    }
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => served += 1,
            Err(r) => assert_eq!(r.kind(), RejectionKind::RateLimited, "{r:?}"),
        }
    }
    assert_eq!(served, 0, "the fleet's bucket is spent: nothing served from the node's own");
    let calls = store.rate_calls.load(Ordering::SeqCst) - before;
    assert!(calls <= 2, "{calls} store calls: the waiters share one reading");
}

/// Requests waiting for a lease on a slow but healthy store: a waiter left with too little of
/// its time for a call of its own is answered busy, not sent to call and time out (which would
/// be taken for a store failure, and the node's own bucket would serve): what is served never
/// passes what the shared bucket granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_slow_store_never_fall_back_while_it_answers() {
    let toml = TOML.replace("SCOPE", "fleet").replace("store_timeout = \"30s\"", "store_timeout = \"250ms\"");
    let store = Arc::new(Faulty::default());
    store.rate_delay_ms.store(100, Ordering::SeqCst);
    let h = Arc::new(Harness::with_store(&toml, store.clone(), NOON));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move { send(&h).await }));
    }
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => served += 1,
            Err(r) => assert_eq!(r.kind(), RejectionKind::RateLimited, "{r:?}"),
        }
    }
    // The engine clock does not move: the shared bucket has its burst to give, no more.
    assert!(served <= 20, "{served} served: the node's own bucket served beside the fleet's");
}

/// Busy is not down (issue 53, item 2): a rate call that times out (a row other nodes' calls
/// hold answers as late as a store down) is answered busy, 429, until the breaker's run of
/// failures takes the store for down; only then does the node count alone, its share.
///
/// One thread, its clock paused: the store's delay and the time limit are virtual.
#[tokio::test(start_paused = true)]
async fn a_timeout_is_busy_until_the_breaker_opens() {
    let toml = TOML.replace("SCOPE", "fleet").replace("store_timeout = \"30s\"", "store_timeout = \"250ms\"");
    let store = Arc::new(Faulty::default());
    store.rate_delay_ms.store(1_000, Ordering::SeqCst);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    for i in 0..2 {
        let r = send(&h).await.expect_err("a timeout is busy");
        assert_eq!(r.kind(), RejectionKind::RateLimited, "timeout {i}: {r:?}");
    }
    // The third timeout in a row: the store is taken as down, and the node's share serves.
    let mut ok = 0;
    for _ in 0..20 {
        if send(&h).await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 5, "the node's share of the burst, once the breaker opened");
}

/// The same for a fleet concurrency: a places call that times out is busy (429) until the
/// breaker opens; then the node counts alone, its share.
#[tokio::test(start_paused = true)]
async fn a_places_timeout_is_busy_until_the_breaker_opens() {
    let toml = common::places::TOML
        .replace("store_timeout = \"4s\"", "store_timeout = \"250ms\"")
        .replace("fleet_size_hint = 4", "fleet_size_hint = 5");
    let store = Arc::new(Faulty::default());
    store.place_delay_ms.store(1_000, Ordering::SeqCst);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    for i in 0..2 {
        let r = common::places::admit(&h).await.expect_err("a timeout is busy");
        assert_eq!(r.kind(), RejectionKind::ConcurrencyLimited, "timeout {i}: {r:?}");
    }
    let mut running = Vec::new();
    for _ in 0..5 {
        if let Ok(t) = common::places::admit(&h).await {
            running.push(t);
        }
    }
    assert_eq!(running.len(), 1, "the node's share (5 / 5), once the breaker opened");
}

/// Leases fit clumpy traffic (issue 53, item 6): 2,000 requests a second, 20 at once every
/// 10 ms, make at most twice the lease calls of smooth arrivals at the same average pace (a
/// lease is sized on the pace over the last lease's time, not on the last clump), on one node
/// and on four behind round robin, for a rate well above the pace and one near it.
#[tokio::test]
async fn clumpy_arrivals_cost_at_most_twice_the_lease_calls_of_smooth_ones() {
    common::fleet::clumpy_arrivals_within_twice("memory", || async {
        Arc::new(tollgate::store::MemoryStore::new()) as Arc<dyn tollgate::store::StoreInspect>
    })
    .await;
}

/// A rate store that times out while the engine's other calls answer (a rate role on a store
/// of its own): the breaker never opens, yet after three timeouts in a row of the tenant's own
/// rate calls the store is taken as down and the node's share serves, not 429 for ever.
#[tokio::test(start_paused = true)]
async fn a_rate_store_timing_out_alone_is_down_after_three_timeouts() {
    let toml = TOML.replace("SCOPE", "fleet").replace("store_timeout = \"30s\"", "store_timeout = \"250ms\"")
        + "[plans.q]\nquotas.requests = { limit = 1000, period = \"day\", lease = 1 }\n\
           [tenants.u]\nplan = \"q\"\nkeys = [\"key-u\"]\n";
    let store = Arc::new(Faulty::default());
    store.rate_delay_ms.store(1_000, Ordering::SeqCst);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    let other = |h: &Harness| {
        let info = tollgate::door::RequestInfo::new("GET", "/", tollgate::door::Credential::ApiKey(b"key-u"));
        let engine = h.tollgate.clone();
        async move {
            match engine.admit(&info) {
                tollgate::door::Admission::Admitted(t) => assert!(t.complete(200)),
                tollgate::door::Admission::Pending(p) => assert!(engine.resolve(p).await.unwrap().complete(200)),
                tollgate::door::Admission::Rejected(r) => panic!("{r:?}"),
            }
        }
    };
    for i in 0..2 {
        let r = send(&h).await.expect_err("a timeout is busy");
        assert_eq!(r.kind(), RejectionKind::RateLimited, "timeout {i}: {r:?}");
        // Another tenant's quota call answers: the breaker's run starts again.
        other(&h).await;
    }
    assert!(send(&h).await.is_ok(), "the third timeout in a row: down, the node's share serves");
}

/// The same with requests at once: the waiters answered busy behind a call that timed out do
/// not end its run (they made no call), so three rounds of timeouts take the store for down.
#[tokio::test(start_paused = true)]
async fn concurrent_requests_on_a_rate_store_timing_out_reach_the_fallback() {
    let toml = TOML.replace("SCOPE", "fleet").replace("store_timeout = \"30s\"", "store_timeout = \"250ms\"");
    let store = Arc::new(Faulty::default());
    store.rate_delay_ms.store(1_000, Ordering::SeqCst);
    let h = Arc::new(Harness::with_store(&toml, store.clone(), NOON));
    let mut served = 0;
    for _round in 0..5 {
        let mut at_once = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let h = h.clone();
            at_once.spawn(async move { send(&h).await.is_ok() });
        }
        served += at_once.join_all().await.into_iter().filter(|ok| *ok).count();
    }
    assert!(served > 0, "the rate store taken for down after three timeouts in a row: the node's share serves");
}

/// A fleet rate of 1/min, burst 10, failing closed, on `store` (the engine clock standing
/// still unless the test moves it).
fn one_per_minute(store: Arc<Faulty>) -> (Harness, tollgate::clock::FakeClock) {
    let toml = r#"
        [usage]
        store_timeout = "200ms"
        on_store_error = "fail-closed"
        [plans.p]
        rate = "1/min"
        burst = 10
        rate_scope = "fleet"
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
    "#;
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    (node_with_worker(toml, store, clock, handle.clone()), handle)
}

/// Requests until `tries` were sent: how many were served (refusals are 429 or 503).
async fn served_of(h: &Harness, tries: usize) -> usize {
    let mut served = 0;
    for _ in 0..tries {
        match send(h).await {
            Ok(()) => served += 1,
            Err(r) => assert!(matches!(r.kind(), RejectionKind::StoreUnavailable | RejectionKind::RateLimited), "{r}"),
        }
    }
    served
}

/// A lease call the store applied but whose answer never came in time (a timeout after the
/// write) strands nothing: the node's next call goes with its token, and is answered its
/// cells (one call, not two). The engine clock stands still: the tenant gets exactly its
/// burst.
#[tokio::test]
async fn a_lease_whose_answer_was_lost_is_asked_again_and_strands_no_cell() {
    let store = Arc::new(Faulty::default());
    let (h, _handle) = one_per_minute(store.clone());
    store.lose_rate_answers.store(true, Ordering::SeqCst);
    // Refused (a timeout: 503, or 429 while the engine takes it for a contended bucket).
    assert_eq!(served_of(&h, 1).await, 0, "its lease's answer never came");
    assert_eq!(store.rate_calls.load(Ordering::SeqCst), 1);
    store.lose_rate_answers.store(false, Ordering::SeqCst);
    assert_eq!(served_of(&h, 1).await, 1);
    assert_eq!(store.rate_calls.load(Ordering::SeqCst), 2, "answered by the call sent again");
    assert_eq!(served_of(&h, 50).await, 9, "the burst, the lost lease's cells among it");
}

/// Asked again later, a lost lease serves only its cells whose time is still ahead, and a
/// call the store never applied is weighed when it is sent again: the fleet never passes its
/// bound (the burst, and a cell a minute).
#[tokio::test]
async fn a_lost_lease_asked_again_late_never_passes_the_bound() {
    // Applied, its answer lost; asked again a minute later.
    let store = Arc::new(Faulty::default());
    let (h, handle) = one_per_minute(store.clone());
    store.lose_rate_answers.store(true, Ordering::SeqCst);
    assert_eq!(served_of(&h, 1).await, 0);
    store.lose_rate_answers.store(false, Ordering::SeqCst);
    handle.advance(std::time::Duration::from_secs(61));
    assert_eq!(served_of(&h, 50).await, 10, "the burst: the lost cell's time has passed");
    // Never applied (the store down); asked again a minute later.
    let store = Arc::new(Faulty::default());
    let (h, handle) = one_per_minute(store.clone());
    store.rate_down.store(true, Ordering::SeqCst);
    assert_eq!(served_of(&h, 1).await, 0);
    store.rate_down.store(false, Ordering::SeqCst);
    handle.advance(std::time::Duration::from_secs(61));
    assert_eq!(served_of(&h, 50).await, 10, "the burst, weighed now");
}
