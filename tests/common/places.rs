//! Fleet-wide concurrency: the configuration, requests and the fleet check the engine's and
//! the stores' tests share.

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use super::{node_on, Harness, NodeStore, NOON};
use tollgate::{
    door::{Admission, Credential, RequestInfo, Ticket},
    RejectionKind,
};

/// Tenant `t` on a plan of 5 requests in flight for the whole fleet.
pub const TOML: &str = r#"
[plans.p]
concurrency = 5
concurrency_scope = "fleet"
[tenants.t]
plan = "p"
keys = ["key-t"]
[usage]
store_timeout = "4s"
[limits]
fleet_size_hint = 4
"#;

pub async fn admit(h: &Harness) -> Result<Ticket, tollgate::Rejection> {
    admit_key(h, "key-t").await
}

/// A request of the tenant with `key`: admitted (its ticket), or why not.
pub async fn admit_key(h: &Harness, key: &str) -> Result<Ticket, tollgate::Rejection> {
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
    match h.tollgate.admit(&info) {
        Admission::Admitted(t) => Ok(t),
        Admission::Pending(p) => h.tollgate.resolve(p).await,
        Admission::Rejected(r) => Err(r),
    }
}

/// The check: shared with the stores' tests.
pub async fn four_nodes_run_at_most(store: Arc<dyn tollgate::store::StoreInspect>) {
    four_nodes_run_at_most_with(store, TOML).await;
}

/// [`four_nodes_run_at_most`] with the configuration `toml`.
pub async fn four_nodes_run_at_most_with(store: Arc<dyn tollgate::store::StoreInspect>, toml: &str) {
    four_nodes_run_at_most_each([store.clone(), store.clone(), store.clone(), store], toml).await;
}

/// [`four_nodes_run_at_most_with`], each node with its own handle of the store (processes
/// sharing a SQLite file: each its own connections).
pub async fn four_nodes_run_at_most_each(stores: [Arc<dyn tollgate::store::StoreInspect>; 4], toml: &str) {
    four_nodes_run_at_most_on(stores.map(NodeStore::from), toml).await;
}

/// [`four_nodes_run_at_most_with`], each node on its own stores.
pub async fn four_nodes_run_at_most_on(stores: [NodeStore; 4], toml: &str) {
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        stores.iter().map(|stores| Arc::new(node_on(toml, stores, clock.clone(), handle.clone()))).collect();
    let inside = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40usize {
        let (h, inside, most) = (nodes[i % 4].clone(), inside.clone(), most.clone());
        tasks.spawn(async move {
            loop {
                match admit(&h).await {
                    Ok(ticket) => {
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        assert!(ticket.complete(200));
                        return;
                    }
                    Err(r) => {
                        assert_eq!(r.kind(), RejectionKind::ConcurrencyLimited, "{r}");
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => { done.unwrap().unwrap(); }
            () = tokio::time::sleep(std::time::Duration::from_millis(1)) => {
                handle.advance(std::time::Duration::from_millis(10));
            }
        }
    }
    let most = most.load(Ordering::SeqCst);
    eprintln!("at most {most} of 5 in their handlers at once, 40 served by 4 nodes");
    assert!(most <= 5, "{most} in their handlers at once");
    assert!(most >= 2, "the nodes shared the places");
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
}

/// Places expire on the store's clock, not the nodes': a node whose clock runs an hour late
/// holds its places for their TTL all the same, and one running an hour ahead does not hold
/// them an hour longer (the store's clock being the real one).
pub async fn expire_on_the_servers_clock(store: &dyn tollgate::store::PlaceStore) {
    use tollgate::store::{PlaceCall, PlaceStoreExt, ReserveToken};
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    let hour = 3_600_000_000_000i64;
    let ttl = 30_000_000_000i64;
    let call = |tenant: &str, count, now: i64, node, seq| {
        PlaceCall::new(tenant.into(), count, 5, ttl, now, ReserveToken::new(node, seq).at(now / 1_000_000_000))
    };
    // An hour late: on its own clock its places would have expired 59 minutes ago.
    assert_eq!(store.acquire_places(&call("late", 5, real - hour, 1, 1)).await.unwrap().held, 5);
    assert_eq!(store.acquire_places(&call("late", 5, real, 2, 1)).await.unwrap().held, 0, "held for their TTL");
    // An hour ahead: its places expire 30 s from now, not an hour later. Its last call sets
    // a TTL of 1 ms; past it the others get them.
    assert_eq!(store.acquire_places(&call("ahead", 5, real + hour, 1, 1)).await.unwrap().held, 5);
    let last =
        PlaceCall::new("ahead".into(), 5, 5, 1_000_000, real + hour, ReserveToken::new(1, 2).at(real / 1_000_000_000));
    assert_eq!(store.renew_places(&last).await.unwrap().held, 5);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        store.acquire_places(&call("ahead", 5, real, 2, 1)).await.unwrap().held,
        5,
        "expired by the server's clock"
    );
}
