//! The idempotency role: `Idempotency-Key` bindings claimed and settled for the whole fleet.

use std::fmt;

use async_trait::async_trait;

use super::StoreError;

/// A claim on an `Idempotency-Key` for the whole fleet: the first node to put it runs the
/// request; every node answers the others from it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyClaim {
    /// The key with its tenant: a SHA-256 digest in hexadecimal (never the key itself).
    pub key: String,
    /// The request the key is bound to (method, path and query): a digest in hexadecimal.
    pub request: String,
    /// Who claims it: drawn per request, so only this claim can settle it.
    pub owner: u64,
    /// Now, in Unix seconds.
    pub now: i64,
    /// Until when an unsettled claim holds (a node that dies with the request in flight
    /// leaves the key usable again after this).
    pub in_flight_until: i64,
    /// When the binding expires (`limits.idempotency_window` after the claim).
    pub expires_at: i64,
}

impl IdempotencyClaim {
    /// A claim of `key` for `request` by `owner` at `now`, in flight until `in_flight_until`,
    /// forgotten at `expires_at`.
    pub fn new(
        key: impl Into<String>,
        request: impl Into<String>,
        owner: u64,
        now: i64,
        in_flight_until: i64,
        expires_at: i64,
    ) -> Self {
        Self { key: key.into(), request: request.into(), owner, now, in_flight_until, expires_at }
    }
}

/// What the store said to an [`IdempotencyClaim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyState {
    /// The key was free (never used, expired, or its holder's in-flight time ran out): it is
    /// now bound to this request, in flight, for this owner.
    Claimed,
    /// The key is bound to this request, which another claim is still running: 409.
    InFlight,
    /// The key is bound to this request, which completed: a replay (not charged).
    Completed,
    /// The key is bound to another request: 422.
    Mismatch,
}

/// How a claimed key ends: [`IdempotencyStore::settle_idempotency`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencySettle {
    /// The request completed and was billed: later requests with the key are replays until
    /// the binding expires.
    Completed,
    /// The request was not billed (refused, failed, dropped): the key is free again.
    Released,
}

/// Where `Idempotency-Key` bindings live: one conditional write claims a key for the fleet.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Claims an `Idempotency-Key` for the fleet: one conditional write. A binding that
    /// expired, or whose in-flight time ran out unsettled, is replaced; otherwise the binding
    /// stays and the answer says what it is. Bindings are bounded and expire at
    /// `expires_at`.
    async fn claim_idempotency(&self, claim: &IdempotencyClaim) -> Result<IdempotencyState, StoreError>;

    /// Settles a claim made by `owner`: marks the key completed, or frees it. Changes nothing
    /// when the key is no longer held by `owner`.
    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError>;
}
