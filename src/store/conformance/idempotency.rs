//! The idempotency role: `Idempotency-Key` bindings claimed once, settled by their owner.

use super::*;
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{
    CompletedRequest, IdempotencyClaim, IdempotencySettle, IdempotencySettled, IdempotencyState, IdempotencyStore,
    StoredResponse,
};

/// A completed request's settlement of `response` at `now`, bindings of a day, 1 MB of
/// responses at most.
fn completed(response: &StoredResponse, now: i64) -> IdempotencySettle {
    IdempotencySettle::Completed(CompletedRequest::new(Arc::new(response.clone()), now, 86_400, 1_000_000))
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse::new(
        201,
        vec![("content-type".into(), Bytes::from_static(b"text/plain")), ("x-a".into(), Bytes::from_static(b"1"))],
        Bytes::from_static(body),
        Some([9; 32]),
    )
}

/// An `Idempotency-Key` is bound by the first claim; the others learn what it is bound to;
/// only its owner settles it; a claim left in flight, or an expired binding, is free again.
pub async fn idempotency_keys_are_claimed_once_and_settled_by_their_owner<S: ?Sized + IdempotencyStore>(
    h: &mut StoreUnderTest<S>,
) {
    let now = 1_773_489_600;
    let claim = |key: &str, request: &str, owner: u64, at: i64| {
        IdempotencyClaim::new(key, request, owner, at, at + 300, at + 86_400)
    };
    let s = h.s();
    let r1 = response(b"created");
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 1, now)).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 2, now)).await.unwrap(), IdempotencyState::InFlight);
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 2, now)).await.unwrap(), IdempotencyState::Mismatch);
    assert_eq!(s.read_idempotency("k1", "r1", now).await.unwrap(), Some(IdempotencyState::InFlight));
    // Only the owner settles.
    assert_eq!(s.settle_idempotency("k1", 2, &completed(&r1, now)).await.unwrap(), IdempotencySettled::NotHeld);
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now)).await.unwrap(), IdempotencyState::InFlight);
    assert_eq!(s.settle_idempotency("k1", 1, &completed(&r1, now)).await.unwrap(), IdempotencySettled::Settled);
    h.restart().await;
    let s = h.s();
    // A completed binding answers with its response, whole.
    let done = IdempotencyState::Completed(Some(Box::new(r1.clone())));
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 10)).await.unwrap(), done);
    assert_eq!(s.read_idempotency("k1", "r1", now + 10).await.unwrap(), Some(done.clone()));
    assert_eq!(s.read_idempotency("k1", "r2", now + 10).await.unwrap(), Some(IdempotencyState::Mismatch));
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 3, now + 10)).await.unwrap(), IdempotencyState::Mismatch);
    // A completed key is not released by anyone.
    assert_eq!(s.settle_idempotency("k1", 1, &IdempotencySettle::Released).await.unwrap(), IdempotencySettled::NotHeld);
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 20)).await.unwrap(), done);
    // Released: free again, for any request.
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 4, now)).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.settle_idempotency("k2", 4, &IdempotencySettle::Released).await.unwrap(), IdempotencySettled::Settled);
    assert_eq!(s.read_idempotency("k2", "r1", now).await.unwrap(), None);
    assert_eq!(s.claim_idempotency(&claim("k2", "r9", 5, now)).await.unwrap(), IdempotencyState::Claimed);
    // Left in flight past its time (its node died): free again.
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 299)).await.unwrap(), IdempotencyState::Mismatch);
    assert_eq!(s.read_idempotency("k2", "r1", now + 300).await.unwrap(), None);
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 300)).await.unwrap(), IdempotencyState::Claimed);
    // The old owner can no longer settle it.
    s.settle_idempotency("k2", 5, &IdempotencySettle::Released).await.unwrap();
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 7, now + 301)).await.unwrap(), IdempotencyState::InFlight);
    // A completed binding expires.
    assert_eq!(s.read_idempotency("k1", "r1", now + 86_400).await.unwrap(), None);
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 8, now + 86_400)).await.unwrap(), IdempotencyState::Claimed);
}

/// Stored responses are bounded in bytes: what does not fit is refused, and its key released
/// (the retry runs again); the bound frees as the window passes.
pub async fn stored_responses_are_bounded_in_bytes<S: ?Sized + IdempotencyStore>(h: &mut StoreUnderTest<S>) {
    let now = 1_773_532_800; // the start of a day: one bucket of a day-long window
    let claim = |key: &str, owner: u64, at: i64| IdempotencyClaim::new(key, "r", owner, at, at + 300, at + 86_400);
    let s = h.s();
    // 100 KB per bucket (a fleet store may share it out: DynamoDB in 16 parts of 6,250 bytes).
    let settle = |r: &StoredResponse, at: i64| {
        IdempotencySettle::Completed(CompletedRequest::new(Arc::new(r.clone()), at, 86_400, 200_000))
    };
    let big = StoredResponse::new(200, vec![], Bytes::from(vec![b'x'; 120_000]), None);
    assert_eq!(s.claim_idempotency(&claim("big", 1, now)).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.settle_idempotency("big", 1, &settle(&big, now)).await.unwrap(), IdempotencySettled::Refused);
    // Refused: the key is free again.
    assert_eq!(s.read_idempotency("big", "r", now).await.unwrap(), None);
    let small = StoredResponse::new(200, vec![], Bytes::from(vec![b'y'; 1_000]), None);
    let mut stored = 0;
    let mut refused = 0;
    for i in 0..200u64 {
        let key = format!("k{i}");
        assert_eq!(s.claim_idempotency(&claim(&key, i, now + 1)).await.unwrap(), IdempotencyState::Claimed);
        match s.settle_idempotency(&key, i, &settle(&small, now + 1)).await.unwrap() {
            IdempotencySettled::Settled => stored += 1,
            IdempotencySettled::Refused => {
                refused += 1;
                assert_eq!(s.read_idempotency(&key, "r", now + 1).await.unwrap(), None);
            }
            other => panic!("{other:?}"),
        }
    }
    let each = small.encoded_len() as u64;
    assert!(stored * each <= 100_000, "{stored} responses of {each} bytes stored past the bound");
    assert!(stored >= 50, "only {stored} of 200 responses of {each} bytes stored under 100 KB");
    assert!(refused > 0);
    // Two windows later, the bytes of the first bucket no longer count.
    let later = now + 2 * 86_400;
    assert_eq!(s.claim_idempotency(&claim("k0", 1000, later)).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.settle_idempotency("k0", 1000, &settle(&small, later)).await.unwrap(), IdempotencySettled::Settled);
}

/// A claim renewed by its owner (the request still runs) holds past its first in-flight end,
/// never past the binding's expiry; a renewal of a claim another owner holds, or of a
/// completed one, changes nothing; a renewed claim still completes.
pub async fn a_claim_renewed_by_its_owner_holds_while_the_request_runs<S: ?Sized + IdempotencyStore>(
    h: &mut StoreUnderTest<S>,
) {
    let now = 1_773_489_600;
    let s = h.s();
    let renew = |until: i64| IdempotencySettle::Renewed { until };
    let claim = IdempotencyClaim::new("long", "r1", 1, now, now + 300, now + 86_400);
    assert_eq!(s.claim_idempotency(&claim).await.unwrap(), IdempotencyState::Claimed);
    // Another owner's renewal: nothing.
    assert_eq!(s.settle_idempotency("long", 2, &renew(now + 400)).await.unwrap(), IdempotencySettled::NotHeld);
    assert_eq!(s.settle_idempotency("long", 1, &renew(now + 400)).await.unwrap(), IdempotencySettled::Settled);
    h.restart().await;
    let s = h.s();
    let retry = |at: i64| IdempotencyClaim::new("long", "r1", 3, at, at + 300, at + 86_400);
    assert_eq!(s.claim_idempotency(&retry(now + 350)).await.unwrap(), IdempotencyState::InFlight, "renewed");
    assert_eq!(s.read_idempotency("long", "r1", now + 350).await.unwrap(), Some(IdempotencyState::InFlight));
    // Never past the binding's expiry.
    assert_eq!(s.settle_idempotency("long", 1, &renew(now + 90_000)).await.unwrap(), IdempotencySettled::Settled);
    assert_eq!(s.claim_idempotency(&retry(now + 86_400)).await.unwrap(), IdempotencyState::Claimed);
    // The first owner's claim is gone: its renewal and its completion change nothing.
    assert_eq!(s.settle_idempotency("long", 1, &renew(now + 86_500)).await.unwrap(), IdempotencySettled::NotHeld);
    // A renewed claim completes; a completed one is not renewed.
    let other = IdempotencyClaim::new("other", "r1", 4, now, now + 300, now + 86_400);
    assert_eq!(s.claim_idempotency(&other).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.settle_idempotency("other", 4, &renew(now + 500)).await.unwrap(), IdempotencySettled::Settled);
    assert_eq!(
        s.settle_idempotency("other", 4, &completed(&response(b"done"), now + 450)).await.unwrap(),
        IdempotencySettled::Settled
    );
    assert_eq!(s.settle_idempotency("other", 4, &renew(now + 900)).await.unwrap(), IdempotencySettled::NotHeld);
    let done = IdempotencyState::Completed(Some(Box::new(response(b"done"))));
    assert_eq!(
        s.claim_idempotency(&IdempotencyClaim::new("other", "r1", 5, now + 950, now + 1250, now + 86_400))
            .await
            .unwrap(),
        done
    );
}

/// A live binding is never forgotten to make room: past the fleet's cap
/// ([`IdempotencyClaim::max_keys`]) a new key is not bound ([`IdempotencyState::Full`]; a store
/// may share the cap out in parts, or, expiring bindings by itself, have no count), and every
/// key bound stays bound for its window; bindings past their window make room.
pub async fn a_live_binding_is_never_forgotten_to_make_room<S: ?Sized + IdempotencyStore>(h: &mut StoreUnderTest<S>) {
    let now = 1_773_532_800;
    let claim =
        |key: &str, owner: u64, at: i64| IdempotencyClaim::new(key, "r", owner, at, at + 300, at + 86_400).at_most(3);
    let s = h.s();
    let mut bound = Vec::new();
    for i in 0..40u64 {
        let key = format!("live{i}");
        match s.claim_idempotency(&claim(&key, i + 1, now)).await.unwrap() {
            IdempotencyState::Claimed => bound.push(key),
            IdempotencyState::Full => assert_eq!(s.read_idempotency(&key, "r", now).await.unwrap(), None, "not bound"),
            other => panic!("{other:?}"),
        }
    }
    assert!(bound.len() >= 3, "{bound:?}");
    // Completed or in flight, every key bound is still bound.
    for (i, key) in bound.iter().enumerate() {
        let again = s.claim_idempotency(&claim(key, 1000 + i as u64, now + 1)).await.unwrap();
        assert_eq!(again, IdempotencyState::InFlight, "{key} was forgotten while live");
    }
    // Past their window they make room.
    let later = now + 86_400 + 1;
    assert_eq!(s.claim_idempotency(&claim("fresh", 5000, later)).await.unwrap(), IdempotencyState::Claimed);
}
