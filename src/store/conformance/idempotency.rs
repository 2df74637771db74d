//! The idempotency role: `Idempotency-Key` bindings claimed once, settled by their owner.

use super::*;
use crate::store::{IdempotencyClaim, IdempotencySettle, IdempotencyState, IdempotencyStore};

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
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 1, now)).await.unwrap(), IdempotencyState::Claimed);
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 2, now)).await.unwrap(), IdempotencyState::InFlight);
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 2, now)).await.unwrap(), IdempotencyState::Mismatch);
    // Only the owner settles.
    s.settle_idempotency("k1", 2, IdempotencySettle::Completed).await.unwrap();
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now)).await.unwrap(), IdempotencyState::InFlight);
    s.settle_idempotency("k1", 1, IdempotencySettle::Completed).await.unwrap();
    h.restart().await;
    let s = h.s();
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 10)).await.unwrap(), IdempotencyState::Completed);
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 3, now + 10)).await.unwrap(), IdempotencyState::Mismatch);
    // A completed key is not released by anyone.
    s.settle_idempotency("k1", 1, IdempotencySettle::Released).await.unwrap();
    assert_eq!(s.claim_idempotency(&claim("k1", "r1", 3, now + 20)).await.unwrap(), IdempotencyState::Completed);
    // Released: free again, for any request.
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 4, now)).await.unwrap(), IdempotencyState::Claimed);
    s.settle_idempotency("k2", 4, IdempotencySettle::Released).await.unwrap();
    assert_eq!(s.claim_idempotency(&claim("k2", "r9", 5, now)).await.unwrap(), IdempotencyState::Claimed);
    // Left in flight past its time (its node died): free again.
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 299)).await.unwrap(), IdempotencyState::Mismatch);
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 6, now + 300)).await.unwrap(), IdempotencyState::Claimed);
    // The old owner can no longer settle it.
    s.settle_idempotency("k2", 5, IdempotencySettle::Released).await.unwrap();
    assert_eq!(s.claim_idempotency(&claim("k2", "r1", 7, now + 301)).await.unwrap(), IdempotencyState::InFlight);
    // A completed binding expires.
    assert_eq!(s.claim_idempotency(&claim("k1", "r2", 8, now + 86_400)).await.unwrap(), IdempotencyState::Claimed);
}
