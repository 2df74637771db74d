//! The quota role of the PostgresStore: a reserve is one conditional `UPDATE … RETURNING`.

use super::*;

/// The reserve (and release) statement. The counter's row carries its senders' last calls, so
/// the condition that the token is new, the grant under the limit and the record of the answer
/// are one atomic write; every node of a fleet sees the row as the last one left it.
///
/// `$1..$5` the key, `$6` the node (text), `$7` its sequence number, `$8` the units wanted,
/// `$9` the units added unconditionally (owed; negative to release), `$10` the limit (NULL:
/// none), `$11` the fewest units worth granting. The grant follows [`Reservation::grant_for`].
pub(super) fn reserve_sql(schema: &str) -> String {
    let after = format!("GREATEST(LEAST(q.reserved::numeric + $9, {MAX_INT}), 0)");
    let left = format!("GREATEST($10::numeric - {after}, 0)");
    let granted = format!(
        "(CASE WHEN $10 IS NULL THEN $8::numeric ELSE LEAST($8::numeric, GREATEST(ceil({left} / 8), $11), {left}) END)"
    );
    let reserved = format!("LEAST({after} + {granted}, {MAX_INT})");
    format!(
        "UPDATE {schema}.quota AS q SET reserved = {reserved}::bigint, answer = {granted}::bigint, \
         senders = (SELECT jsonb_object_agg(e.key, e.value) FROM (SELECT key, value FROM jsonb_each(q.senders || \
             jsonb_build_object($6::text, jsonb_build_array($7::bigint, {granted}, {reserved}))) \
             ORDER BY (value ->> 0)::numeric DESC LIMIT {kept}) e) \
         WHERE q.tenant = $1 AND q.meter = $2 AND q.period = $3 AND q.start_at = $4 AND q.end_at = $5 \
         AND coalesce((q.senders -> $6::text ->> 0)::numeric < $7, true) \
         RETURNING q.answer, q.reserved",
        kept = contract::SENDERS_KEPT
    )
}

/// One quota call: a reserve, or a release (`units` 0, `delta` negative, no limit).
struct Call<'a> {
    key: &'a QuotaKey,
    token: ReserveToken,
    units: u64,
    delta: i64,
    limit: Option<u64>,
    at_least: u64,
}

enum Attempt {
    Done(Grant),
    /// No counter yet (or it was dropped meanwhile): create it, then try again.
    Missing,
}

impl PostgresStore {
    async fn quota_call(&self, call: &Call<'_>) -> Result<Grant, StoreError> {
        for _ in 0..ATTEMPTS {
            match self.retrying(|| self.try_quota(call)).await? {
                Attempt::Done(grant) => return Ok(grant),
                Attempt::Missing => {
                    if !self.retrying(|| self.create_counter(call.key)).await? {
                        // A period long over: nothing is left to reserve in it.
                        return Ok(Grant::new(0, 0));
                    }
                }
            }
        }
        Err(StoreError::Conflict("the quota counter"))
    }

    /// The conditional update; when it changes nothing, the row is read to tell a token seen
    /// (answered again) from a counter that does not exist.
    async fn try_quota(&self, c: &Call<'_>) -> Pg<Attempt> {
        let k = c.key;
        let (period, node) = (k.period_tag(), node_int(c.token.node).to_string());
        let (t, m, p) = (k.tenant.as_str(), k.meter.as_str(), period.as_str());
        let client = self.client().await?;
        let row = client
            .query_typed_opt(
                &self.inner.reserve_sql,
                args![
                    t,
                    m,
                    p,
                    k.start,
                    k.end,
                    node.as_str(),
                    int(c.token.seq),
                    int(c.units),
                    c.delta,
                    c.limit.map(int),
                    int(c.at_least)
                ],
            )
            .await?;
        if let Some(row) = row {
            return Ok(Attempt::Done(Grant::new(uint(row.get(0)), uint(row.get(1)))));
        }
        let seen = client
            .query_typed_opt(
                &self.sql(
                    "SELECT reserved, (senders -> $6 ->> 0)::numeric::text, (senders -> $6 ->> 1)::bigint, \
                     (senders -> $6 ->> 2)::bigint FROM {s}.quota \
                     WHERE tenant = $1 AND meter = $2 AND period = $3 AND start_at = $4 AND end_at = $5",
                ),
                args![t, m, p, k.start, k.end, node.as_str()],
            )
            .await?;
        let Some(row) = seen else { return Ok(Attempt::Missing) };
        let last = row.get::<_, Option<String>>(1).and_then(|s| s.parse::<u64>().ok());
        match last {
            Some(last) if c.token.seq == last => Ok(Attempt::Done(Grant::new(
                uint(row.get::<_, Option<i64>>(2).unwrap_or(0)),
                uint(row.get::<_, Option<i64>>(3).unwrap_or(0)),
            ))),
            Some(last) if c.token.seq < last => Ok(Attempt::Done(Grant::new(0, uint(row.get(0))))),
            // Created by another node between the two statements: the update again (the
            // creation finds the counter there and changes nothing).
            _ => Ok(Attempt::Missing),
        }
    }

    /// Creates the counter of `key` if its period is still of use, dropping the periods of the
    /// same tenant and meter that ended before it started; `false` for a period dropped. The
    /// floor row of (tenant, meter) is locked first, so creations and drops of one tenant's
    /// periods run one at a time, and a late call never brings a dropped period back.
    async fn create_counter(&self, key: &QuotaKey) -> Pg<bool> {
        let (t, m, period) = (key.tenant.as_str(), key.meter.as_str(), key.period_tag());
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let floor: i64 = tx
            .query_typed_one(
                &self.sql(
                    "INSERT INTO {s}.quota_floor (tenant, meter, dropped_before) VALUES ($1, $2, -9223372036854775808) \
                     ON CONFLICT (tenant, meter) DO UPDATE SET dropped_before = quota_floor.dropped_before \
                     RETURNING dropped_before",
                ),
                args![t, m],
            )
            .await?
            .get(0);
        if key.end <= floor {
            tx.commit().await?;
            return Ok(false);
        }
        let made = tx
            .query_typed(
                &self.sql(
                    "INSERT INTO {s}.quota (tenant, meter, period, start_at, end_at, reserved) \
                     VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT DO NOTHING RETURNING 1",
                ),
                args![t, m, period.as_str(), key.start, key.end],
            )
            .await?;
        if !made.is_empty() {
            tx.query_typed(
                &self.sql(
                    "WITH gone AS (DELETE FROM {s}.quota WHERE tenant = $1 AND meter = $2 AND end_at < $3 \
                     RETURNING end_at) \
                     UPDATE {s}.quota_floor f SET dropped_before = GREATEST(f.dropped_before, g.last) \
                     FROM (SELECT max(end_at) AS last FROM gone) g \
                     WHERE f.tenant = $1 AND f.meter = $2 AND g.last IS NOT NULL",
                ),
                args![t, m, key.start],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl QuotaStore for PostgresStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let call = Call {
            key: &r.key,
            token: r.token,
            units: r.units,
            delta: int(r.owed),
            limit: r.limit,
            at_least: r.at_least,
        };
        self.quota_call(&call).await
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let call = Call { key, token, units: 0, delta: int(units).saturating_neg(), limit: None, at_least: 0 };
        self.quota_call(&call).await.map(drop)
    }
}
