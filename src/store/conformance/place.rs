//! The places role: a tenant's places in flight, shared by its nodes, never more than its
//! limit at once; a node's places expire unless renewed; each call applied once.

use super::*;

use crate::store::{PlaceCall, PlaceStore, PlaceStoreExt, Places};

/// How long places hold: 30 s.
const TTL: i64 = 30_000_000_000;
/// A time in Unix nanoseconds.
const NOW: i64 = DAY0 * 1_000_000_000;

fn call(tenant: &str, count: u32, now: i64, node: u64, seq: u64) -> PlaceCall {
    short(tenant, count, now, node, seq, TTL)
}

/// The same with a TTL of `ttl` nanoseconds.
fn short(tenant: &str, count: u32, now: i64, node: u64, seq: u64, ttl: i64) -> PlaceCall {
    PlaceCall::new(tenant.into(), count, 5, ttl, now, ReserveToken::new(node, seq).at(now / 1_000_000_000))
}

/// Eight nodes each take places at once, one at a time, until none is left: together they
/// hold the limit exactly; a release frees places for the others.
pub async fn places_are_never_held_past_the_limit<S: ?Sized + PlaceStore>(h: &mut StoreUnderTest<S>) {
    let mut tasks = tokio::task::JoinSet::new();
    for node in 1..=8u64 {
        let s = h.shared();
        tasks.spawn(async move {
            let (mut held, mut seq) = (0u32, 0u64);
            loop {
                seq += 1;
                let p = s.acquire_places(&call("t", held + 1, NOW, node, seq)).await.unwrap();
                assert!(p.taken <= 5, "{p:?}");
                if p.held <= held {
                    return held;
                }
                held = p.held;
            }
        });
    }
    let mut total = 0;
    while let Some(held) = tasks.join_next().await {
        total += held.unwrap();
    }
    assert_eq!(total, 5, "the limit, each place once");
    let s = h.s();
    // Every node gives its places back: another tenant's are its own, and all five are free.
    for node in 1..=8u64 {
        s.release_places(&call("t", 0, NOW, node, 100)).await.unwrap();
    }
    assert_eq!(s.acquire_places(&call("u", 5, NOW, 9, 1)).await.unwrap(), Places::new(5, 5));
    assert_eq!(s.acquire_places(&call("t", 9, NOW, 9, 2)).await.unwrap(), Places::new(5, 5));
}

/// A node's places expire `ttl` after its last call unless it renews them: a node that died
/// frees its places then; a renewal keeps them, and a node whose places expired and were taken
/// does not get them back by renewing. The places outlive a restart of the store.
///
/// The time passes on both clocks a store may keep places on: the callers' (`now` moves) and
/// its own (the test waits past the short TTL of node 1's last call), so that it holds either
/// way without racing a clock.
pub async fn places_expire_unless_renewed<S: ?Sized + PlaceStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    assert_eq!(s.acquire_places(&call("t", 3, NOW, 1, 1)).await.unwrap(), Places::new(3, 3));
    assert_eq!(s.acquire_places(&call("t", 2, NOW, 2, 1)).await.unwrap(), Places::new(2, 5));
    h.restart().await;
    let s = h.s();
    // Node 2 renews; node 1 does, with a TTL of 1 ms, and then dies.
    let later = NOW + 1_000_000;
    assert_eq!(s.renew_places(&call("t", 2, later, 2, 2)).await.unwrap(), Places::new(2, 5));
    assert_eq!(s.acquire_places(&call("t", 1, later, 3, 1)).await.unwrap(), Places::new(0, 5), "node 1's still hold");
    assert_eq!(s.renew_places(&short("t", 3, later, 1, 2, 1_000_000)).await.unwrap(), Places::new(3, 5));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let expired = later + 2_000_000;
    assert_eq!(s.acquire_places(&call("t", 3, expired, 3, 2)).await.unwrap(), Places::new(3, 5), "node 1's freed");
    // Node 1 comes back and renews: its places went to node 3.
    assert_eq!(s.renew_places(&call("t", 3, expired, 1, 3)).await.unwrap(), Places::new(0, 5));
}

/// A call re-sent with its token is answered as it was (counts are totals: no harm done), and
/// an older call of the same sender changes nothing.
pub async fn a_resent_places_call_is_applied_once<S: ?Sized + PlaceStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    let first = s.acquire_places(&call("t", 2, NOW, 1, 5)).await.unwrap();
    assert_eq!(first, Places::new(2, 2));
    assert_eq!(s.acquire_places(&call("t", 2, NOW, 1, 5)).await.unwrap(), first, "re-sent");
    assert_eq!(s.release_places(&call("t", 1, NOW, 1, 6)).await.unwrap(), Places::new(1, 1));
    // The acquire of seq 5 arriving late (after the release of seq 6): it changes nothing.
    assert_eq!(s.acquire_places(&call("t", 2, NOW, 1, 5)).await.unwrap(), Places::new(1, 1));
    // A release re-sent: the same total.
    assert_eq!(s.release_places(&call("t", 1, NOW, 1, 6)).await.unwrap(), Places::new(1, 1));
    assert_eq!(s.acquire_places(&call("t", 5, NOW, 2, 1)).await.unwrap(), Places::new(4, 5));
    // Released to none, its sender is still known: the acquire of seq 7 arriving after the
    // release of seq 8 changes nothing (the node would hold places it does not know of).
    assert_eq!(s.acquire_places(&call("u", 2, NOW, 3, 7)).await.unwrap(), Places::new(2, 2));
    assert_eq!(s.release_places(&call("u", 0, NOW, 3, 8)).await.unwrap(), Places::new(0, 0));
    assert_eq!(s.acquire_places(&call("u", 2, NOW, 3, 7)).await.unwrap(), Places::new(0, 0), "late");
    assert_eq!(s.acquire_places(&call("u", 5, NOW, 4, 1)).await.unwrap(), Places::new(5, 5), "all free");
}

/// A node's spares (places it holds with no request on them, marked in the call) are taken by
/// another node's acquire before it is refused: a spare never refuses the tenant elsewhere.
/// The node a spare was taken from holds one fewer, as its next call reads; a spare is never
/// granted past the limit, and an acquire for spares alone takes none of the others'.
pub async fn a_spare_is_taken_before_an_acquire_is_refused<S: ?Sized + PlaceStore>(h: &mut StoreUnderTest<S>) {
    let s = h.s();
    // Node 1: 3 places, 2 of them spare; node 2: the other 2, on requests.
    let p = s.acquire_places(&call("t", 3, NOW, 1, 1)).await.unwrap();
    assert_eq!((p.held, p.taken), (3, 3));
    let p = s.release_places(&call("t", 3, NOW, 1, 2).with_spare(2)).await.unwrap();
    assert_eq!((p.held, p.taken, p.spare, p.busy()), (3, 3, 2, 1), "marked");
    assert_eq!(s.acquire_places(&call("t", 2, NOW, 2, 1)).await.unwrap(), Places::new(2, 5).with_spare(2));
    // Node 3 wants one for a request: node 1's spare, not a refusal.
    let p = s.acquire_places(&call("t", 1, NOW, 3, 1)).await.unwrap();
    assert_eq!((p.held, p.taken, p.spare), (1, 5, 1), "a spare taken");
    // Node 4 wants a spare only: it takes nobody's.
    let p = s.acquire_places(&call("t", 1, NOW, 4, 1).with_spare(1)).await.unwrap();
    assert_eq!((p.held, p.taken), (0, 5), "spares are not taken for spares");
    // Node 1 renews what it thinks it holds: one on its request, one spare left.
    let p = s.renew_places(&call("t", 3, NOW + 1, 1, 3).with_spare(2)).await.unwrap();
    assert_eq!((p.held, p.taken, p.spare), (2, 5, 1), "one of its spares went to node 3");
    // Node 5 wants two: the last spare, then refused.
    let p = s.acquire_places(&call("t", 2, NOW + 1, 5, 1)).await.unwrap();
    assert_eq!((p.held, p.taken, p.spare), (1, 5, 0));
    assert_eq!(s.renew_places(&call("t", 2, NOW + 2, 1, 4)).await.unwrap().held, 1, "its request's place");
    h.restart().await;
    let p = h.s().release_places(&call("t", 1, NOW + 2, 2, 2).with_spare(1)).await.unwrap();
    assert_eq!((p.held, p.taken, p.spare), (1, 4, 1), "marked spares outlive a restart");
}
