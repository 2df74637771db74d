//! The idempotency role of the SqliteStore.

use super::*;
use crate::store::IdempotencySettled;

/// A binding as a claim finds it: its request, whether it completed, its response's bytes.
type Held = (String, bool, Option<Vec<u8>>);

/// Reads the binding of `key` live at `now`.
fn live(tx: &Transaction<'_>, key: &str, now: i64) -> Sql<Option<Held>> {
    tx.prepare_cached(
        "SELECT request, completed, response FROM idempotency \
         WHERE key = ?1 AND ?2 < expires_at AND (completed = 1 OR ?2 < in_flight_until)",
    )?
    .query_row(params![key, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .optional()
}

/// Adds `delta` to the count of bindings.
fn count(tx: &Transaction<'_>, delta: i64) -> Sql<()> {
    tx.prepare_cached("UPDATE idempotency_count SET n = max(0, n + ?1) WHERE id = 0")?.execute([delta])?;
    Ok(())
}

/// Whether one more binding fits under `max_keys` (and the store's own bound): bindings past
/// their window make room first, a thousand at a time; a live one never does.
fn room(tx: &Transaction<'_>, now: i64, max_keys: u64) -> Sql<bool> {
    let cap = int(max_keys.min(contract::IDEMPOTENCY_KEYS_MAX as u64));
    let n: i64 = tx.prepare_cached("SELECT n FROM idempotency_count WHERE id = 0")?.query_row([], |r| r.get(0))?;
    if n < cap {
        return Ok(true);
    }
    let gone = tx
        .prepare_cached(
            "DELETE FROM idempotency WHERE key IN \
             (SELECT key FROM idempotency WHERE expires_at <= ?1 ORDER BY expires_at LIMIT 1000)",
        )?
        .execute([now])?;
    count(tx, -(gone as i64))?;
    Ok(n - (gone as i64) < cap)
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let ask = c.clone();
        let held = self
            .write(move |tx, _| {
                let c = &ask;
                if let Some(held) = live(tx, &c.key, c.now)? {
                    return Ok(Some(Some(held)));
                }
                let present: Option<i64> = tx
                    .prepare_cached("SELECT 1 FROM idempotency WHERE key = ?1")?
                    .query_row([&c.key], |r| r.get(0))
                    .optional()?;
                if present.is_none() && !room(tx, c.now, c.max_keys)? {
                    return Ok(None);
                }
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO idempotency \
                     (key, request, owner, completed, in_flight_until, expires_at, response) \
                     VALUES (?1, ?2, ?3, 0, ?4, ?5, NULL)",
                )?
                .execute(params![
                    c.key,
                    c.request,
                    c.owner as i64,
                    c.in_flight_until,
                    c.expires_at
                ])?;
                if present.is_none() {
                    count(tx, 1)?;
                }
                Ok(Some(None))
            })
            .await?;
        match held {
            None => Ok(IdempotencyState::Full),
            Some(None) => Ok(IdempotencyState::Claimed),
            Some(Some((bound, completed, response))) => {
                IdempotencyState::of_binding(&bound, &c.request, completed, response.as_deref())
            }
        }
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        let key = key.to_owned();
        let held = self.read(move |tx| live(tx, &key, now)).await?;
        held.map(|(bound, completed, response)| {
            IdempotencyState::of_binding(&bound, request, completed, response.as_deref())
        })
        .transpose()
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        let key = key.to_owned();
        let completed = match how {
            IdempotencySettle::Completed(done) => Some((done.response.encode(), done.bucket(), done.bucket_bytes())),
            _ => None,
        };
        let renewed = match how {
            IdempotencySettle::Renewed { until } => Some(*until),
            _ => None,
        };
        self.write(move |tx, _| {
            let held: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM idempotency WHERE key = ?1 AND owner = ?2 AND completed = 0")?
                .query_row(params![key, owner as i64], |r| r.get(0))
                .optional()?;
            if held.is_none() {
                return Ok(IdempotencySettled::NotHeld);
            }
            if let Some(until) = renewed {
                tx.prepare_cached(
                    "UPDATE idempotency SET in_flight_until = min(?3, expires_at) \
                     WHERE key = ?1 AND owner = ?2 AND completed = 0",
                )?
                .execute(params![key, owner as i64, until])?;
                return Ok(IdempotencySettled::Settled);
            }
            let release = |tx: &Transaction<'_>| {
                let gone = tx
                    .prepare_cached("DELETE FROM idempotency WHERE key = ?1 AND owner = ?2 AND completed = 0")?
                    .execute(params![key, owner as i64])?;
                count(tx, -(gone as i64))
            };
            let Some((bytes, bucket, allowed)) = &completed else {
                release(tx)?;
                return Ok(IdempotencySettled::Settled);
            };
            // Only this bucket and the one before can hold live responses.
            tx.prepare_cached("DELETE FROM idempotency_bytes WHERE bucket < ?1")?.execute([bucket - 1])?;
            let added = tx
                .prepare_cached(
                    "INSERT INTO idempotency_bytes (bucket, bytes) SELECT ?1, ?2 WHERE ?2 <= ?3 \
                     ON CONFLICT (bucket) DO UPDATE SET bytes = bytes + excluded.bytes \
                     WHERE bytes + excluded.bytes <= ?3",
                )?
                .execute(params![bucket, bytes.len() as i64, int(*allowed)])?;
            if added == 0 {
                release(tx)?;
                return Ok(IdempotencySettled::Refused);
            }
            tx.prepare_cached(
                "UPDATE idempotency SET completed = 1, response = ?3 WHERE key = ?1 AND owner = ?2 AND completed = 0",
            )?
            .execute(params![key, owner as i64, bytes])?;
            Ok(IdempotencySettled::Settled)
        })
        .await
    }
}
