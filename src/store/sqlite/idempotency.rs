//! The idempotency role of the SqliteStore.

use super::*;

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let c = c.clone();
        self.write(move |tx, _| {
            let held: Option<(String, bool, i64, i64)> = tx
                .prepare_cached(
                    "SELECT request, completed, in_flight_until, expires_at FROM idempotency WHERE key = ?1",
                )?
                .query_row([&c.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some((request, completed, until, expires)) = held {
                if c.now < expires && (completed || c.now < until) {
                    return Ok(if request != c.request {
                        IdempotencyState::Mismatch
                    } else if completed {
                        IdempotencyState::Completed
                    } else {
                        IdempotencyState::InFlight
                    });
                }
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO idempotency (key, request, owner, completed, in_flight_until, expires_at) \
                 VALUES (?1, ?2, ?3, 0, ?4, ?5)",
            )?
            .execute(params![c.key, c.request, c.owner as i64, c.in_flight_until, c.expires_at])?;
            Ok(IdempotencyState::Claimed)
        })
        .await
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |tx, _| {
            let sql = match how {
                IdempotencySettle::Completed => {
                    "UPDATE idempotency SET completed = 1 WHERE key = ?1 AND owner = ?2 AND completed = 0"
                }
                _ => "DELETE FROM idempotency WHERE key = ?1 AND owner = ?2 AND completed = 0",
            };
            tx.prepare_cached(sql)?.execute(params![key, owner as i64])?;
            Ok(())
        })
        .await
    }
}
