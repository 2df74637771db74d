//! The idempotency role of the PostgresStore: a claim is one conditional upsert.

use super::*;
use crate::store::IdempotencySettled;

/// A binding as read: its request, whether it completed, its stored response's bytes.
fn binding(r: &Row) -> (String, bool, Option<Vec<u8>>) {
    (r.get(0), r.get(1), r.get(2))
}

/// A binding live at `$2`: unexpired, and completed or still within its in-flight time.
const LIVE: &str = "$2 < expires_at AND (completed OR $2 < in_flight_until)";

/// The shards of the count of bindings and of the bytes of stored responses: a claim or a
/// completion updates one of them, so that they do not queue on one row.
pub(super) const SHARDS: u64 = 16;

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        // The binding is taken only where none is live: the condition is checked on the row as
        // the last writer left it (the conflict locks it), so two nodes never both claim a key.
        let claim = self.sql(
            "INSERT INTO {s}.idempotency AS i (idem_key, request, owner, completed, in_flight_until, expires_at, response) \
             VALUES ($1, $3, $4, false, $5, $6, NULL) \
             ON CONFLICT (idem_key) DO UPDATE SET request = excluded.request, owner = excluded.owner, completed = false, \
             in_flight_until = excluded.in_flight_until, expires_at = excluded.expires_at, response = NULL \
             WHERE NOT ($2 < i.expires_at AND (i.completed OR $2 < i.in_flight_until)) RETURNING (xmax = 0)",
        );
        // A new row is counted in its key's shard, under the fleet's cap shared out.
        let count = self
            .sql("UPDATE {s}.idempotency_count SET n = n + 1 WHERE shard = hashtext($1) & 15 AND n < $2 RETURNING 1");
        // Bindings past their window make room, a thousand at a time; a live one never does.
        let room = self.sql(
            "WITH gone AS (DELETE FROM {s}.idempotency WHERE idem_key IN (SELECT idem_key FROM {s}.idempotency \
             WHERE expires_at <= $2 AND hashtext(idem_key) & 15 = hashtext($1) & 15 AND idem_key <> $1 LIMIT 1000) \
             RETURNING 1) \
             UPDATE {s}.idempotency_count SET n = GREATEST(n - (SELECT count(*) FROM gone), 0) \
             WHERE shard = hashtext($1) & 15",
        );
        let cap = int(c.max_keys.div_ceil(SHARDS));
        let held = self
            .sql(&format!("SELECT request, completed, response FROM {{s}}.idempotency WHERE idem_key = $1 AND {LIVE}"));
        let found = self
            .retrying(|| async {
                let mut client = self.client().await?;
                let tx = self.begin(&mut client).await?;
                let claimed = tx
                    .query_typed_opt(
                        &claim,
                        args![
                            c.key.as_str(),
                            c.now,
                            c.request.as_str(),
                            c.owner as i64,
                            c.in_flight_until,
                            c.expires_at
                        ],
                    )
                    .await?
                    .map(|r| r.get::<_, bool>(0));
                if claimed == Some(true) {
                    // A new row: counted, or rolled back past the cap.
                    if tx.query_typed(&count, args![c.key.as_str(), cap]).await?.is_empty() {
                        tx.query_typed(&room, args![c.key.as_str(), c.now]).await?;
                        if tx.query_typed(&count, args![c.key.as_str(), cap]).await?.is_empty() {
                            return Ok(Some(None));
                        }
                    }
                }
                let found = if claimed.is_some() {
                    None
                } else {
                    let row = tx.query_typed_opt(&held, args![c.key.as_str(), c.now]).await?;
                    // Not live by now (it expired between the two statements): claim again.
                    let row = row.ok_or(Fail::Store(StoreError::Conflict("the idempotency binding")))?;
                    Some(Some(binding(&row)))
                };
                tx.commit().await?;
                Ok(found)
            })
            .await?;
        match found {
            None => Ok(IdempotencyState::Claimed),
            Some(None) => Ok(IdempotencyState::Full),
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
        let sql = self
            .sql(&format!("SELECT request, completed, response FROM {{s}}.idempotency WHERE idem_key = $1 AND {LIVE}"));
        let held = self
            .retrying(|| async {
                let client = self.client().await?;
                let row = client.query_typed_opt(&sql, args![key, now]).await?;
                Ok(row.as_ref().map(binding))
            })
            .await?;
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
        let completed = match how {
            IdempotencySettle::Completed(done) => Some((done.response.encode(), done.bucket(), done.bucket_bytes())),
            _ => None,
        };
        let held =
            self.sql("SELECT 1 FROM {s}.idempotency WHERE idem_key = $1 AND owner = $2 AND NOT completed FOR UPDATE");
        let release = self.sql(
            "WITH gone AS (DELETE FROM {s}.idempotency WHERE idem_key = $1 AND owner = $2 AND NOT completed RETURNING 1) \
             UPDATE {s}.idempotency_count SET n = GREATEST(n - (SELECT count(*) FROM gone), 0) \
             WHERE shard = hashtext($1) & 15",
        );
        // Each completion adds to one of the bucket's shards (by owner, drawn per request),
        // each holding its share of the bound: completions do not queue on one row.
        let old_buckets = self.sql("DELETE FROM {s}.idempotency_shard_bytes WHERE bucket < $1");
        let add = self.sql(
            "INSERT INTO {s}.idempotency_shard_bytes AS b (bucket, shard, bytes) SELECT $1, $4, $2 WHERE $2 <= $3 \
             ON CONFLICT (bucket, shard) DO UPDATE SET bytes = b.bytes + excluded.bytes \
             WHERE b.bytes + excluded.bytes <= $3 RETURNING 1",
        );
        let shard = (owner % SHARDS) as i64;
        let settle = self.sql(
            "UPDATE {s}.idempotency SET completed = true, response = $3 WHERE idem_key = $1 AND owner = $2 AND NOT completed",
        );
        let renew = self.sql(
            "UPDATE {s}.idempotency SET in_flight_until = least($3, expires_at) \
             WHERE idem_key = $1 AND owner = $2 AND NOT completed RETURNING 1",
        );
        let renewed = match how {
            IdempotencySettle::Renewed { until } => Some(*until),
            _ => None,
        };
        let owner = owner as i64;
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            if let Some(until) = renewed {
                // One statement: held, not completed, this owner's.
                let renewed = !tx.query_typed(&renew, args![key, owner, until]).await?.is_empty();
                tx.commit().await?;
                return Ok(if renewed { IdempotencySettled::Settled } else { IdempotencySettled::NotHeld });
            }
            if tx.query_typed_opt(&held, args![key, owner]).await?.is_none() {
                return Ok(IdempotencySettled::NotHeld);
            }
            let Some((bytes, bucket, allowed)) = &completed else {
                tx.query_typed(&release, args![key, owner]).await?;
                tx.commit().await?;
                return Ok(IdempotencySettled::Settled);
            };
            // Only this bucket and the one before can hold live responses.
            tx.query_typed(&old_buckets, args![*bucket - 1]).await?;
            let size = bytes.len() as i64;
            if tx.query_typed(&add, args![*bucket, size, int(*allowed / SHARDS), shard]).await?.is_empty() {
                tx.query_typed(&release, args![key, owner]).await?;
                tx.commit().await?;
                return Ok(IdempotencySettled::Refused);
            }
            tx.query_typed(&settle, args![key, owner, bytes.as_slice()]).await?;
            tx.commit().await?;
            Ok(IdempotencySettled::Settled)
        })
        .await
    }
}
