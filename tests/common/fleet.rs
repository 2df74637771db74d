//! Fleet-wide rates: the configuration, requests and the fleet check the engine's and the
//! stores' tests share.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use super::{node_on, node_with_worker, Harness, NodeStore, NOON};
use tollgate::{
    door::{Admission, Credential, RequestInfo},
    RejectionKind,
};

/// Tenant `t` on a plan of 100/s with a burst of 20, its rate kept for the fleet (`SCOPE`
/// replaced by `"node"` for the contrast). The workers flush every 50 minutes: the engine clock
/// starts at [`NOON`] of a day long past, and a flush's first commit on a SQL store prunes its
/// rows by the wall clock, a shared rate's among them (full for a day by it): deleted during
/// a run, the tenant's bucket started full again, a second burst the bound does not allow (the
/// fleet check failed once under CI's load, its run past the 10 s of the first flush).
pub const TOML: &str = r#"
[plans.p]
rate = "100/s"
burst = 20
rate_scope = "SCOPE"
[tenants.t]
plan = "p"
keys = ["key-t"]
[usage]
store_timeout = "30s"
flush_interval = "50m"
[limits]
fleet_size_hint = 4
"#;

/// One cell's time of [`TOML`]'s rate, in nanoseconds.
pub const T: i64 = 10_000_000;
/// Its burst.
pub const BURST: i64 = 20;
/// The longest a leased cell waits to be spent.
pub const D: i64 = 50_000_000;

/// A request of tenant `t`: admitted (its ticket completed), or why not.
pub async fn send(h: &Harness) -> Result<(), tollgate::Rejection> {
    send_key(&h.tollgate, "key-t").await
}

/// A request with the API key `key` to `engine`: admitted (its ticket completed), or why not.
pub async fn send_key(engine: &tollgate::Tollgate, key: &str) -> Result<(), tollgate::Rejection> {
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
    let ticket = match engine.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => engine.resolve(p).await?,
        Admission::Rejected(r) => return Err(r),
    };
    assert!(ticket.complete(200));
    Ok(())
}

/// Four engines with their workers on one store, the clock moving (1 ms of engine time every
/// `step` of real time, or later: once each node has had a send answered since the last move):
/// 16 tasks send as fast as they can for `secs` seconds of engine time.
/// Returns, for each request admitted, the engine times (Unix nanoseconds) at which its send
/// began and ended: it was admitted in between (the clock may move while a store call runs).
pub async fn four_nodes_send(
    store: Arc<dyn tollgate::store::StoreInspect>,
    scope: &str,
    secs: i64,
    step: std::time::Duration,
) -> (Vec<(i64, i64)>, Vec<Arc<Harness>>) {
    four_nodes_send_each([store.clone(), store.clone(), store.clone(), store], scope, secs, step).await
}

/// [`four_nodes_send`], each node with its own handle of the store (processes sharing a
/// SQLite file: each its own connections).
pub async fn four_nodes_send_each(
    stores: [Arc<dyn tollgate::store::StoreInspect>; 4],
    scope: &str,
    secs: i64,
    step: std::time::Duration,
) -> (Vec<(i64, i64)>, Vec<Arc<Harness>>) {
    four_nodes_send_on(stores.map(NodeStore::from), scope, secs, step).await
}

/// [`four_nodes_send`], each node on its own stores.
pub async fn four_nodes_send_on(
    stores: [NodeStore; 4],
    scope: &str,
    secs: i64,
    step: std::time::Duration,
) -> (Vec<(i64, i64)>, Vec<Arc<Harness>>) {
    let toml = TOML.replace("SCOPE", scope);
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|stores| Arc::new(node_on(&toml, stores, clock.clone(), handle.clone()))).collect();
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let end = NOON * 1_000_000_000 + secs * 1_000_000_000;
    // Each task's sends answered (`u64::MAX` once it is done).
    let answered: Arc<Vec<AtomicU64>> = Arc::new((0..16).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16usize {
        let (h, admitted, clock, answered) = (nodes[i % 4].clone(), admitted.clone(), clock.clone(), answered.clone());
        tasks.spawn(async move {
            loop {
                let now = clock.unix_nanos();
                if now >= end {
                    answered[i].store(u64::MAX, Ordering::SeqCst);
                    return;
                }
                match send(&h).await {
                    Ok(()) => admitted.lock().unwrap().push((now, clock.unix_nanos())),
                    Err(r) => {
                        assert_eq!(r.kind(), RejectionKind::RateLimited, "{r}");
                        assert!(r.retry_after().is_some());
                    }
                }
                answered[i].fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        });
    }
    // The clock moves 1 ms once `step` has passed and every node has had a send answered since
    // it last moved (one of its tasks, or all of them done): however slow the store or loaded
    // the machine, a node whose tasks all wait on a store call holds the clock (one refused
    // at once from the node's reading of the bucket does not), so a slow store delays the
    // clock rather than starving the fleet.
    let node_answered = |i: usize| (i..16).step_by(4).map(|t| answered[t].load(Ordering::SeqCst)).collect::<Vec<_>>();
    let mut seen: Vec<Vec<u64>> = (0..4).map(node_answered).collect();
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => { done.unwrap().unwrap(); }
            () = tokio::time::sleep(step) => {
                let now: Vec<Vec<u64>> = (0..4).map(node_answered).collect();
                let moved = |now: &[u64], seen: &[u64]| {
                    now.iter().zip(seen).any(|(n, s)| n > s) || now.iter().all(|n| *n == u64::MAX)
                };
                if now.iter().zip(&seen).all(|(now, seen)| moved(now, seen)) {
                    seen = now;
                    handle.advance(std::time::Duration::from_millis(1));
                }
            }
        }
    }
    let mut admitted = std::mem::take(&mut *admitted.lock().unwrap());
    admitted.sort_unstable();
    (admitted, nodes)
}

/// The most requests admitted over any interval of the run, beyond what the documented bound
/// allows (burst + (Δ + d) / T): 0 when it holds. Each request is known by the times its send
/// began and ended; over [x, y], the requests certainly admitted within it are those whose
/// send began at x or later and ended at y or earlier, so no excess is found by where within
/// its send a request was admitted.
pub fn excess_over_bound(admitted: &[(i64, i64)]) -> i64 {
    let mut by_start = admitted.to_vec();
    by_start.sort_unstable();
    let mut worst = i64::MIN;
    for i in 0..by_start.len() {
        let x = by_start[i].0;
        let mut ends: Vec<i64> = by_start[i..].iter().map(|&(_, end)| end).collect();
        ends.sort_unstable();
        for (m, &y) in ends.iter().enumerate() {
            let n = (m + 1) as i64;
            let allowed = BURST + (y - x + D) / T;
            worst = worst.max(n - allowed);
        }
    }
    worst.max(0)
}

/// The fleet check: four nodes on one store share the tenant's rate within the documented
/// bound, counted on the engine clock (1 ms of it every `step` at the fastest, and only once
/// every node has had an answer since: a slow store's latency does not starve the run).
pub async fn four_nodes_share_one_rate(store: Arc<dyn tollgate::store::StoreInspect>, step: std::time::Duration) {
    four_nodes_share_one_rate_each([store.clone(), store.clone(), store.clone(), store], step).await;
}

/// [`four_nodes_share_one_rate`], each node with its own handle of the store.
pub async fn four_nodes_share_one_rate_each(
    stores: [Arc<dyn tollgate::store::StoreInspect>; 4],
    step: std::time::Duration,
) {
    four_nodes_share_one_rate_on(stores.map(NodeStore::from), step).await;
}

/// [`four_nodes_share_one_rate`], each node on its own stores.
pub async fn four_nodes_share_one_rate_on(stores: [NodeStore; 4], step: std::time::Duration) {
    let secs = 2;
    let (admitted, nodes) = four_nodes_send_on(stores, "fleet", secs, step).await;
    assert_eq!(excess_over_bound(&admitted), 0, "the fleet passed its bound");
    let ideal = BURST + secs * 1_000_000_000 / T;
    assert!(admitted.len() as i64 > ideal / 2, "the fleet under-admits: {} of about {ideal}", admitted.len());
    eprintln!("fleet scope: {} admitted in {secs} s (one limiter: {ideal})", admitted.len());
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
}

/// Store calls per 1,000 requests of one tenant sending at its plan's rate, on `store` (`name`
/// in the figures printed), the engine clock moving: at 2/s every request leases its one cell
/// (a cell lives at most 50 ms: a store call per request, as a central limiter makes); at
/// 100/s and 5,000/s a lease holds the cells of about 50 ms of the tenant's pace (at most the
/// burst), so the calls are far fewer than the requests. The counts are the engine's: the
/// store's latency does not change them (its clock does not move during a call).
pub async fn store_calls_per_thousand(store: Arc<dyn tollgate::store::StoreInspect>, name: &str) {
    for (per_second, burst) in [(2u64, 2u32), (100, 20), (5_000, 100)] {
        let toml = TOML
            .replace("SCOPE", "fleet")
            .replace("rate = \"100/s\"\nburst = 20", &format!("rate = \"{per_second}/s\"\nburst = {burst}"))
            .replace(
                "keys = [\"key-t\"]",
                &format!("keys = [\"key-t\"]\n[tenants.t{per_second}]\nplan = \"p\"\nkeys = [\"key-{per_second}\"]"),
            );
        let counted = Arc::new(super::Faulty::over(store.clone()));
        let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
        let h = node_with_worker(&toml, counted.clone(), clock, handle);
        let key = format!("key-{per_second}");
        let step = std::time::Duration::from_nanos(1_000_000_000 / per_second);
        let before = counted.rate_calls.load(Ordering::SeqCst);
        for _ in 0..1_000 {
            let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
            let ticket = match h.tollgate.admit(&info) {
                Admission::Admitted(t) => t,
                Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
                Admission::Rejected(r) => panic!("{r}"),
            };
            assert!(ticket.complete(200));
            h.clock.advance(step);
        }
        let calls = counted.rate_calls.load(Ordering::SeqCst) - before;
        eprintln!("{name}: {calls} rate store calls for 1,000 requests at {per_second}/s (rate {per_second}/s, burst {burst})");
        match per_second {
            2 => assert_eq!(calls, 1_000, "one cell per lease at 2/s"),
            100 => assert!(calls <= 250, "{calls} calls at 100/s"),
            _ => assert!(calls <= 20, "{calls} calls at 5,000/s"),
        }
        h.tollgate.shutdown().await.unwrap();
    }
}

/// Rate store calls per 1,000 requests of a fleet rate of `rate` (its burst as many) shared
/// by `nodes` nodes behind round robin, at 2,000 requests a second in all, the nodes' workers
/// running and the clock moving: arriving smoothly (one every 0.5 ms) and in clumps (20 at
/// once every 10 ms), at the same average pace. `(smooth, clumpy)`, each the calls and the
/// requests refused.
pub async fn lease_calls_smooth_and_clumpy(
    store: Arc<dyn tollgate::store::StoreInspect>,
    rate: u32,
    nodes: usize,
) -> ((u64, u64), (u64, u64)) {
    let mut out = [(0u64, 0u64); 2];
    for (i, clump) in [1u32, 20].into_iter().enumerate() {
        let refused = Arc::new(AtomicU64::new(0));
        let toml = TOML
            .replace("SCOPE", "fleet")
            .replace("rate = \"100/s\"\nburst = 20", &format!("rate = \"{rate}/s\""))
            .replace(
                "keys = [\"key-t\"]",
                &format!("keys = [\"key-t\"]\n[tenants.c{i}]\nplan = \"p\"\nkeys = [\"key-c{i}\"]"),
            );
        let counted = Arc::new(super::Faulty::over(store.clone()));
        let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
        let fleet: Vec<Harness> =
            (0..nodes).map(|_| node_with_worker(&toml, counted.clone(), clock.clone(), handle.clone())).collect();
        let key = format!("key-c{i}");
        // 2,000 a second: a clump of `clump` every `clump` × 0.5 ms.
        let step = std::time::Duration::from_micros(500 * u64::from(clump));
        // A warm-up (the leases' sizes follow the pace), then 1,000 counted.
        let mut before = 0;
        let mut sent = 0usize;
        for n in 0..2_000 / clump {
            if n == 1_000 / clump {
                before = counted.rate_calls.load(Ordering::SeqCst);
            }
            // A clump arrives at once: its requests wait on the leases together.
            let mut at_once = tokio::task::JoinSet::new();
            for _ in 0..clump {
                let (engine, key) = (fleet[sent % nodes].tollgate.clone(), key.clone());
                let (refused, counted) = (refused.clone(), n >= 1_000 / clump);
                sent += 1;
                at_once.spawn(async move {
                    let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
                    let admitted = match engine.admit(&info) {
                        Admission::Admitted(t) => Ok(t),
                        Admission::Pending(p) => engine.resolve(p).await,
                        Admission::Rejected(r) => Err(r),
                    };
                    match admitted {
                        Ok(ticket) => assert!(ticket.complete(200)),
                        Err(r) if counted => {
                            assert_eq!(r.kind(), tollgate::RejectionKind::RateLimited, "{r:?}");
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {}
                    }
                });
            }
            at_once.join_all().await;
            fleet[0].clock.advance(step);
        }
        out[i] = (counted.rate_calls.load(Ordering::SeqCst) - before, refused.load(Ordering::SeqCst));
        for h in &fleet {
            h.tollgate.shutdown().await.unwrap();
        }
    }
    (out[0], out[1])
}

/// Leases fit clumpy traffic (issue 53, item 6), on `store` (a fresh one per case from
/// `make`): 2,000 requests a second, 20 at once every 10 ms, make at most twice the lease calls
/// of smooth arrivals at the same average pace, and none is refused (the pace is within the
/// rate), on one node and on four behind round robin. The figures are printed per 1,000
/// requests.
pub async fn clumpy_arrivals_within_twice<F, Fut>(name: &str, make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn tollgate::store::StoreInspect>>,
{
    for (rate, nodes) in [(5_000, 1), (5_000, 4), (20_000, 4), (2_500, 1)] {
        let ((smooth, smooth_refused), (clumpy, clumpy_refused)) =
            lease_calls_smooth_and_clumpy(make().await, rate, nodes).await;
        eprintln!(
            "{name}: rate {rate}/s, {nodes} nodes: {smooth} lease calls per 1,000 smooth requests \
             ({smooth_refused} refused), {clumpy} clumpy ({clumpy_refused} refused)"
        );
        assert_eq!((smooth_refused, clumpy_refused), (0, 0), "{name}: rate {rate}/s, {nodes} nodes: refused");
        assert!(clumpy <= 2 * smooth.max(1), "{name}: rate {rate}/s, {nodes} nodes: {clumpy} clumpy, {smooth} smooth");
    }
}
