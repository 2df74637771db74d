//! The idempotency role of the MemoryStore.

use super::*;
use std::sync::Arc;

use crate::store::{IdempotencySettled, StoredResponse};

impl Binding {
    fn state(&self) -> IdempotencyState {
        if self.completed {
            IdempotencyState::Completed(self.response.as_deref().cloned().map(Box::new))
        } else {
            IdempotencyState::InFlight
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let mut inner = self.lock();
        if let Some(b) = inner.idempotency.get(&c.key) {
            if b.live(c.now) {
                return Ok(if b.request != c.request { IdempotencyState::Mismatch } else { b.state() });
            }
        }
        let replacing = inner.idempotency.contains_key(&c.key);
        if !replacing && !inner.make_room_for_binding(c.now, c.max_keys) {
            return Ok(IdempotencyState::Full);
        }
        let binding = Binding {
            request: c.request.clone(),
            owner: c.owner,
            completed: false,
            in_flight_until: c.in_flight_until,
            expires_at: c.expires_at,
            response: None,
        };
        inner.idempotency.insert(c.key.clone(), binding);
        Ok(IdempotencyState::Claimed)
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        let inner = self.lock();
        let live = inner.idempotency.get(key).filter(|b| b.live(now));
        Ok(live.map(|b| if b.request != request { IdempotencyState::Mismatch } else { b.state() }))
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        let mut inner = self.lock();
        let held = inner.idempotency.get(key).is_some_and(|b| b.owner == owner && !b.completed);
        if !held {
            return Ok(IdempotencySettled::NotHeld);
        }
        match how {
            IdempotencySettle::Completed(done) => {
                let bytes = done.response.encoded_len() as u64;
                let bucket = done.bucket();
                // Only this bucket and the one before can hold live responses.
                inner.response_bytes.retain(|b, _| *b >= bucket - 1);
                let used = inner.response_bytes.get(&bucket).copied().unwrap_or(0);
                if used + bytes > done.bucket_bytes() {
                    inner.idempotency.remove(key);
                    return Ok(IdempotencySettled::Refused);
                }
                *inner.response_bytes.entry(bucket).or_insert(0) += bytes;
                if let Some(b) = inner.idempotency.get_mut(key) {
                    b.completed = true;
                    b.response = Some(Arc::<StoredResponse>::clone(&done.response));
                }
            }
            IdempotencySettle::Renewed { until } => {
                if let Some(b) = inner.idempotency.get_mut(key) {
                    b.in_flight_until = (*until).min(b.expires_at);
                }
            }
            _ => {
                inner.idempotency.remove(key);
            }
        }
        Ok(IdempotencySettled::Settled)
    }
}
