//! The idempotency role of the MemoryStore.

use super::*;

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let mut inner = self.lock();
        if let Some(b) = inner.idempotency.get(&c.key) {
            if b.live(c.now) {
                return Ok(if b.request != c.request {
                    IdempotencyState::Mismatch
                } else if b.completed {
                    IdempotencyState::Completed
                } else {
                    IdempotencyState::InFlight
                });
            }
        }
        inner.make_room_for_binding(c.now);
        let binding = Binding {
            request: c.request.clone(),
            owner: c.owner,
            completed: false,
            in_flight_until: c.in_flight_until,
            expires_at: c.expires_at,
        };
        inner.idempotency.insert(c.key.clone(), binding);
        Ok(IdempotencyState::Claimed)
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let held = inner.idempotency.get(key).is_some_and(|b| b.owner == owner && !b.completed);
        if held {
            match how {
                IdempotencySettle::Completed => {
                    if let Some(b) = inner.idempotency.get_mut(key) {
                        b.completed = true;
                    }
                }
                IdempotencySettle::Released => {
                    inner.idempotency.remove(key);
                }
            }
        }
        Ok(())
    }
}
