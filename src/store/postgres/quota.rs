//! The quota role of the PostgresStore: a reserve is one conditional `UPDATE … RETURNING`.

use super::*;
use crate::{
    base::MeterId,
    store::{
        quota::{
            close_against, close_used_up, expire, expire_against, fits, forgive, forgiven_by_json, forgiven_by_of,
            forgotten, kept_refund_json, kept_refund_of, mark, newer_refund, refund_against, revive, takes_json,
            takes_of, CreditRefund, ForgivenBy, Keeping, SenderCall, UsedTaken,
        },
        CapMode, CreditBalance, CreditClosure, CreditGrant, GrantOutcome, Kept, RechargeMode, RechargeSeen,
        RechargeState, RefundOutcome, Release, SpendCap,
    },
};

/// One quota call: a reserve, or a release (`units` 0, `delta` negative, no limit).
struct Call<'a> {
    key: &'a QuotaKey,
    token: ReserveToken,
    units: u64,
    delta: i64,
    limit: Option<u64>,
    at_least: u64,
    /// Whether the tenant's own cap holds the call ([`CapMode::Stored`]).
    capped: bool,
    /// The most the tenant's own hard cap holds it to.
    cap_max: Option<u64>,
    /// What the sender keeps besides the grant, and when its reservation expires.
    kept: Kept,
    expires_at: i64,
    /// Of the grant, what the caller uses at once (`Reservation::taking`).
    taking: u64,
    /// Whether the caller reads the answer (false: a release).
    answered: bool,
}

enum Attempt {
    Done(Grant),
    /// No counter yet (or it was dropped meanwhile): create it, then try again.
    Missing,
    /// A reservation of the counter may have expired (or the sender's own had): expire them
    /// (`expire_due`), then try again.
    Expiring,
}

impl PostgresStore {
    async fn quota_call(&self, call: &Call<'_>) -> Result<Grant, StoreError> {
        for _ in 0..ATTEMPTS {
            match self.retrying(|| self.try_quota(call)).await? {
                Attempt::Done(grant) => return Ok(grant),
                Attempt::Expiring => {
                    // What the sender kept before the call: a release's units were kept too.
                    let given = call.delta.min(0).unsigned_abs();
                    let before = Kept { lease: call.kept.lease.saturating_add(given), ..call.kept };
                    self.retrying(|| self.expire_due(call.key, call.token, before)).await?
                }
                Attempt::Missing => {
                    if !self.retrying(|| self.create_counter(call.key)).await? {
                        // A period long over: nothing is left to reserve in it.
                        let cap = match call.capped {
                            true => {
                                self.retrying(|| async {
                                    let client = self.client().await?;
                                    let client: &tokio_postgres::Client = &client;
                                    self.stored_cap(client, call.key).await
                                })
                                .await?
                            }
                            false => None,
                        };
                        return Ok(Grant::new(0, 0).with_cap(cap));
                    }
                }
            }
        }
        Err(StoreError::Conflict("the quota counter"))
    }

    /// The conditional update; when it changes nothing, the row is read to tell a token seen
    /// (answered again) from a counter that does not exist.
    async fn try_quota(&self, c: &Call<'_>) -> Pg<Attempt> {
        let client = self.client().await?;
        let client: &tokio_postgres::Client = &client;
        self.try_quota_on(client, c).await
    }

    /// [`try_quota`](Self::try_quota) on `client` (statements sent at once on one connection
    /// are pipelined).
    async fn try_quota_on<C: tokio_postgres::GenericClient + Sync>(&self, client: &C, c: &Call<'_>) -> Pg<Attempt> {
        let k = c.key;
        let (period, node) = (k.period_tag(), node_int(c.token.node).to_string());
        let (t, m, p) = (k.tenant.as_str(), k.meter.as_str(), period.as_str());
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
                    int(c.at_least),
                    c.token.at,
                    c.capped,
                    c.cap_max.map(int),
                    int(c.kept.lease),
                    int(c.kept.held),
                    int(c.kept.jobs),
                    c.expires_at,
                    int(c.taking),
                    c.answered
                ],
            )
            .await?;
        if let Some(row) = row {
            let limit: Option<i64> = row.get(2);
            let cap = row.get::<_, Option<i64>>(3).zip(row.get::<_, Option<bool>>(4));
            let cap = cap.map(|(limit, hard)| SpendCap::new(uint(limit), hard));
            let grant = Grant::new(uint(row.get(0)), uint(row.get(1)))
                .with_limit(limit.map(uint))
                .with_cap(cap)
                .with_used(uint(row.get(5)))
                .with_expired(row.get(6));
            return Ok(Attempt::Done(grant));
        }
        let cap = if c.capped { self.stored_cap(client, k).await? } else { None };
        let seen = client
            .query_typed_opt(
                &self.sql(
                    "SELECT reserved, (senders -> $6 ->> 0)::numeric::text, (senders -> $6 ->> 1)::bigint, \
                     (senders -> $6 ->> 2)::bigint, granted, senders_forgotten_at, \
                     (next_expiry IS NOT NULL AND next_expiry <= $7) OR coalesce((senders -> $6 ->> 8)::bigint, 0) > 0, \
                     coalesce((senders -> $6 ->> 8)::bigint, 0) \
                     FROM {s}.quota \
                     WHERE tenant = $1 AND meter = $2 AND period = $3 AND start_at = $4 AND end_at = $5",
                ),
                args![t, m, p, k.start, k.end, node.as_str(), c.token.at],
            )
            .await?;
        let Some(row) = seen else { return Ok(Attempt::Missing) };
        let expiring: bool = row.get(6);
        let last = row.get::<_, Option<String>>(1).and_then(|s| s.parse::<u64>().ok());
        let limit = row.get::<_, Option<i64>>(4).map(uint);
        match last {
            // Answered as it was, an expiry told included.
            Some(last) if c.token.seq == last => Ok(Attempt::Done(
                Grant::new(
                    uint(row.get::<_, Option<i64>>(2).unwrap_or(0)),
                    uint(row.get::<_, Option<i64>>(3).unwrap_or(0)),
                )
                .with_limit(limit)
                .with_cap(cap)
                .with_expired(row.get::<_, i64>(7) == mark::TOLD),
            )),
            Some(last) if c.token.seq < last => {
                Ok(Attempt::Done(Grant::new(0, uint(row.get(0))).with_limit(limit).with_cap(cap)))
            }
            // A sender forgotten since its call: answered as an older call, never applied.
            None if forgotten(c.token.at, row.get(5)) => {
                Ok(Attempt::Done(Grant::new(0, uint(row.get(0))).with_limit(limit).with_cap(cap)))
            }
            // A new call that found a reservation to expire first.
            _ if expiring => Ok(Attempt::Expiring),
            // Created by another node between the two statements: the update again (the
            // creation finds the counter there and changes nothing).
            _ => Ok(Attempt::Missing),
        }
    }

    /// Expires the reservations of `key`'s senders that are due at `token`'s time, and revives
    /// the sender's own if it had expired, by the rules of `store::quota` (`expire`, `revive`),
    /// in one transaction with the counter's row locked: the reserve statement, sent again,
    /// then finds nothing due (`next_expiry` recomputed exactly) and answers the revived sender
    /// `expired`.
    async fn expire_due(&self, key: &QuotaKey, token: ReserveToken, kept: Kept) -> Pg<()> {
        let (period, node) = (key.period_tag(), node_int(token.node).to_string());
        let (t, m, p) = (key.tenant.as_str(), key.meter.as_str(), period.as_str());
        let mut client = self.client().await?;
        let tx = self.begin(&mut client).await?;
        let Some(row) = tx
            .query_typed_opt(
                &self.sql(
                    "SELECT reserved, senders::text, forgiven, forgiven_until, forgiven_by::text FROM {s}.quota \
                     WHERE tenant = $1 AND meter = $2 AND period = $3 AND start_at = $4 AND end_at = $5 FOR UPDATE",
                ),
                args![t, m, p, key.start, key.end],
            )
            .await?
        else {
            tx.commit().await?;
            return Ok(());
        };
        let mut reserved = uint(row.get(0));
        let mut senders: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(row.get::<_, &str>(1)).unwrap_or_default();
        let at = |v: &serde_json::Value, i: usize| v.get(i).and_then(serde_json::Value::as_i64).unwrap_or(0);
        let mut keepings: Vec<(String, Keeping)> = senders
            .iter()
            .map(|(n, v)| {
                let k = Keeping {
                    kept: Kept::new(uint(at(v, 4)), uint(at(v, 5)), uint(at(v, 6))),
                    expires_at: at(v, 7),
                    gone: uint(at(v, 8).max(0)),
                };
                (n.clone(), k)
            })
            .collect();
        let (mut forgiven, until) = (uint(row.get(2)), row.get::<_, i64>(3));
        let mut by = forgiven_by_of(row.get::<_, &str>(4));
        if key.period == crate::base::Period::Prepaid {
            // A prepaid balance: each expiry draws first on what is forgiven to its sender.
            let seq = |n: &String| senders.get(n).map_or(0, |v| uint(at(v, 0)));
            let named: Vec<(String, u64, &mut Keeping)> =
                keepings.iter_mut().map(|(n, k)| (n.clone(), seq(n), k)).collect();
            (reserved, forgiven) = expire_against(named, token.at, (reserved, forgiven, until), &mut by);
        } else {
            reserved = reserved.saturating_sub(expire(keepings.iter_mut().map(|(_, k)| k), token.at));
        }
        let own = keepings.iter().find(|(n, _)| *n == node).map(|(_, k)| *k).unwrap_or_default();
        let revived = revive(&own, kept);
        if let Some((owed, _)) = revived {
            reserved = reserved.saturating_add(owed);
        }
        for (n, k) in &keepings {
            if let Some(serde_json::Value::Array(entry)) = senders.get_mut(n) {
                entry.resize(9, serde_json::Value::from(0));
                entry[4] = k.kept.lease.into();
                entry[5] = k.kept.held.into();
                entry[6] = k.kept.jobs.into();
                entry[7] = k.expires_at.into();
                // The reviving sender's entry says so to the statement sent again; an expired
                // one says what went back; the others keep their mark.
                if *n == node && revived.is_some() {
                    entry[8] = mark::TELL.into();
                } else if k.gone > 0 {
                    entry[8] = k.gone.into();
                }
            }
        }
        let next = keepings.iter().filter(|(_, k)| k.live()).map(|(_, k)| k.expires_at).min();
        tx.query_typed(
            &self.sql(
                "UPDATE {s}.quota SET reserved = $6, senders = $7::text::jsonb, next_expiry = $8, forgiven = $9, \
                 forgiven_by = $10::text::jsonb \
                 WHERE tenant = $1 AND meter = $2 AND period = $3 AND start_at = $4 AND end_at = $5",
            ),
            args![
                t,
                m,
                p,
                key.start,
                key.end,
                int(reserved),
                serde_json::Value::Object(senders).to_string(),
                next,
                int(forgiven),
                forgiven_by_json(&by)
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A batch of releases: one statement applies all it can (`sql::release_batch_sql`, the
    /// reserve statement's rule over arrays; one round trip and one commit), and each release
    /// it did not apply (a counter to create, a reservation to expire first, a token it saw
    /// already, a second release of one counter, or the statement failing) goes alone after,
    /// as one call. A statement that failed changed nothing; one that timed out may have
    /// applied: its releases, sent again alone with their tokens, apply once.
    async fn release_batch(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        let mut seen = std::collections::HashSet::with_capacity(releases.len());
        // Each counter once in the statement; later releases of one counter go alone, in order.
        let mut batch: Vec<usize> = (0..releases.len())
            .filter(|i| {
                let k = &releases[*i].key;
                seen.insert((k.tenant.as_str(), k.meter.as_str(), k.start, k.end))
            })
            .collect();
        // In key order (joined on the primary key, the rows are locked in the arrays. order): two nodes
        // returning at once lock shared counters in one order. A deadlock all the same fails
        // the statement, and its releases go alone.
        let order = |i: &usize| {
            let k = &releases[*i].key;
            (k.tenant.as_str(), k.meter.as_str(), k.start, k.end)
        };
        batch.sort_by(|a, b| order(a).cmp(&order(b)));
        let mut applied = vec![false; releases.len()];
        if let Ok(done) = self.scoped(self.release_many(releases, &batch)).await {
            for i in done {
                if let Some(at) = usize::try_from(i).ok().and_then(|i| i.checked_sub(1)).and_then(|i| batch.get(i)) {
                    applied[*at] = true;
                }
            }
        }
        let mut out = Vec::with_capacity(releases.len());
        for (r, applied) in releases.iter().zip(applied) {
            out.push(match applied {
                true => Ok(()),
                false => self.quota_call(&Self::release_call(r)).await.map(drop),
            });
        }
        out
    }

    /// The releases at `batch` (of `releases`) in one statement; the positions (from 1, in
    /// `batch`) of those applied.
    async fn release_many(&self, releases: &[Release], batch: &[usize]) -> Pg<Vec<i64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let of = |f: &dyn Fn(&Release) -> i64| -> Vec<i64> { batch.iter().map(|i| f(&releases[*i])).collect() };
        let text = |f: &dyn Fn(&Release) -> String| -> Vec<String> { batch.iter().map(|i| f(&releases[*i])).collect() };
        let client = self.client().await?;
        let rows = client
            .query_typed(
                &self.inner.release_batch_sql,
                args![
                    text(&|r| r.key.tenant.as_str().to_owned()),
                    text(&|r| r.key.meter.as_str().to_owned()),
                    text(&|r| r.key.period_tag()),
                    of(&|r| r.key.start),
                    of(&|r| r.key.end),
                    text(&|r| node_int(r.token.node).to_string()),
                    of(&|r| int(r.token.seq)),
                    of(&|r| int(r.units).saturating_neg()),
                    of(&|r| r.token.at),
                    of(&|r| int(r.kept.lease)),
                    of(&|r| int(r.kept.held)),
                    of(&|r| int(r.kept.jobs)),
                    of(&|r| r.expires_at)
                ],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get::<_, i64>(0)).collect())
    }

    fn release_call(r: &Release) -> Call<'_> {
        Call {
            key: &r.key,
            token: r.token,
            units: 0,
            delta: int(r.units).saturating_neg(),
            limit: None,
            at_least: 0,
            capped: false,
            cap_max: None,
            kept: r.kept,
            expires_at: r.expires_at,
            taking: 0,
            answered: false,
        }
    }

    /// Stores (or with `None` removes) the tenant's own cap on the key's meter.
    async fn set_cap(&self, key: &QuotaKey, cap: Option<SpendCap>) -> Result<(), StoreError> {
        let (t, m) = (key.tenant.as_str(), key.meter.as_str());
        let upsert = self.sql(
            "INSERT INTO {s}.quota_cap (tenant, meter, cap, hard) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, meter) DO UPDATE SET cap = excluded.cap, hard = excluded.hard",
        );
        let delete = self.sql("DELETE FROM {s}.quota_cap WHERE tenant = $1 AND meter = $2");
        self.retrying(|| async {
            let client = self.client().await?;
            match cap {
                Some(cap) => client.query_typed(&upsert, args![t, m, int(cap.limit), cap.hard]).await?,
                None => client.query_typed(&delete, args![t, m]).await?,
            };
            Ok(())
        })
        .await
    }

    /// Applies a recharge mode to the tenant's recharge of the key's meter, after the
    /// reserve's statement. Read first without a lock: a call that changes nothing (recharge
    /// off, the balance above `below`, a claim open) writes nothing. One that does runs in a
    /// transaction that locks the recharge's row, then the balance's row for share (a reserve
    /// or grant of the balance waits for it), and applies the rule again to what it reads
    /// there, so that the balance a claim checks is the one its write sees and callers
    /// crossing together claim once.
    async fn recharge(&self, key: &QuotaKey, mode: RechargeMode) -> Result<RechargeSeen, StoreError> {
        let (t, m) = (key.tenant.as_str(), key.meter.as_str());
        let read = self.sql(&format!(
            "SELECT (SELECT state FROM {{s}}.quota_recharge WHERE tenant = $1 AND meter = $2), \
             (SELECT granted - reserved FROM {{s}}.quota WHERE {PREPAID})"
        ));
        let state = self.sql("SELECT state FROM {s}.quota_recharge WHERE tenant = $1 AND meter = $2 FOR UPDATE");
        let balance = self.sql(&format!("SELECT granted - reserved FROM {{s}}.quota WHERE {PREPAID} FOR SHARE"));
        let upsert = self.sql(
            "INSERT INTO {s}.quota_recharge (tenant, meter, state) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant, meter) DO UPDATE SET state = excluded.state",
        );
        let left = |v: Option<i64>| v;
        let of = |text: Option<&str>| text.map(RechargeState::read).transpose().map(Option::unwrap_or_default);
        self.retrying(|| async {
            let mode = mode.clone();
            let mut client = self.client().await?;
            let row = client.query_typed_one(&read, args![t, m]).await?;
            let mut seen_state = of(row.get::<_, Option<&str>>(0))?;
            let before = seen_state.clone();
            let seen = seen_state.apply(mode.clone(), left(row.get(1)));
            if seen_state == before {
                return Ok(seen);
            }
            // Locks held only by the few calls that would claim (or close) at once: waited for
            // within the statement timeout (an error of a watch answers nothing, and its next
            // watch tries again).
            let tx = self.begin(&mut client).await?;
            let mut stored = of(tx.query_typed_opt(&state, args![t, m]).await?.as_ref().map(|r| r.get::<_, &str>(0)))?;
            let before = stored.clone();
            let balance = tx.query_typed_opt(&balance, args![t, m]).await?.and_then(|r| left(r.get(0)));
            let seen = stored.apply(mode.clone(), balance);
            if stored != before {
                tx.query_typed(&upsert, args![t, m, stored.to_json()]).await?;
            }
            tx.commit().await?;
            Ok(seen)
        })
        .await
    }

    /// The tenant's recharge of `(tenant, meter)`, if it ever set one.
    async fn stored_recharge(&self, client: &tokio_postgres::Client, t: &str, m: &str) -> Pg<Option<RechargeState>> {
        let row = client
            .query_typed_opt(
                &self.sql("SELECT state FROM {s}.quota_recharge WHERE tenant = $1 AND meter = $2"),
                args![t, m],
            )
            .await?;
        Ok(row.map(|r| RechargeState::read(r.get::<_, &str>(0))).transpose()?)
    }

    /// The cap stored for the key's tenant and meter, if any.
    async fn stored_cap<C: tokio_postgres::GenericClient + Sync>(
        &self,
        client: &C,
        key: &QuotaKey,
    ) -> Pg<Option<SpendCap>> {
        let row = client
            .query_typed_opt(
                &self.sql("SELECT cap, hard FROM {s}.quota_cap WHERE tenant = $1 AND meter = $2"),
                args![key.tenant.as_str(), key.meter.as_str()],
            )
            .await?;
        Ok(row.map(|r| SpendCap::new(uint(r.get(0)), r.get(1))))
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
                    "INSERT INTO {s}.quota (tenant, meter, period, start_at, end_at, reserved, granted) \
                     VALUES ($1, $2, $3, $4, $5, 0, $6) ON CONFLICT DO NOTHING RETURNING 1",
                ),
                args![
                    t,
                    m,
                    period.as_str(),
                    key.start,
                    key.end,
                    (key.period == crate::base::Period::Prepaid).then_some(0i64)
                ],
            )
            .await?;
        // A prepaid balance ends nothing: the calendar periods beside it stay.
        if !made.is_empty() && key.period != crate::base::Period::Prepaid {
            tx.query_typed(
                &self.sql(
                    "WITH gone AS (DELETE FROM {s}.quota WHERE tenant = $1 AND meter = $2 AND end_at < $3 \
                     RETURNING end_at) \
                     UPDATE {s}.quota_floor f SET dropped_before = GREATEST(f.dropped_before, g.last) \
                     FROM (SELECT max(end_at) AS last FROM gone) g \
                     WHERE f.tenant = $1 AND f.meter = $2 AND g.last IS NOT NULL",
                ),
                args![t, m, key.drops_ended_before()],
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
        if let CapMode::Set(cap) = r.cap {
            // Stored first (a write that is the same when sent again), then read by the
            // reserve's own statement.
            self.set_cap(&r.key, cap).await?;
        }
        let call = Call {
            key: &r.key,
            token: r.token,
            units: r.units,
            delta: int(r.owed),
            limit: r.limit,
            at_least: r.at_least,
            capped: r.cap != CapMode::Ignored,
            cap_max: r.cap_max,
            kept: r.kept,
            expires_at: r.expires_at,
            taking: r.taking,
            answered: true,
        };
        let grant = self.quota_call(&call).await?;
        if r.recharge == RechargeMode::Ignored {
            return Ok(grant);
        }
        let seen = crate::store::quota::recharge_after(r, self.recharge(&r.key, r.recharge.clone()).await)?;
        Ok(grant.with_recharge(seen))
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        self.release_batch(releases).await
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let key = prepaid_key(&grant.tenant, &grant.meter);
        // The counter exists first (made as for a reserve), so the grant's update finds it.
        if !self.retrying(|| self.create_counter(&key)).await? {
            return Err(StoreError::Conflict("the prepaid counter"));
        }
        let (t, m) = (grant.tenant.as_str(), grant.meter.as_str());
        let payment = grant.payment.as_deref().unwrap_or(grant.id.as_str());
        let lock = self.sql(&format!("SELECT reserved, granted FROM {{s}}.quota WHERE {PREPAID} FOR UPDATE"));
        let seen = self.sql(&format!(
            "SELECT {CREDIT_COLUMNS} FROM {{s}}.credit WHERE tenant = $1 \
             AND (id = $2 OR ($3::text IS NOT NULL AND payment = $3)) ORDER BY meter = $4 DESC, id = $2 DESC LIMIT 1"
        ));
        let open = self.sql("SELECT count(*) FROM {s}.credit WHERE tenant = $1 AND meter = $2 AND closed_at IS NULL");
        let insert = self.sql(
            "INSERT INTO {s}.credit (tenant, meter, id, units, granted_at, expires_at, payment, paid, bought) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $4)",
        );
        let add = self.sql(&format!(
            "UPDATE {{s}}.quota SET granted = coalesce(granted, 0) + $3 WHERE {PREPAID} RETURNING reserved, granted"
        ));
        let kept = self.sql(
            "DELETE FROM {s}.credit_refund_kept WHERE payment = $1 OR payment = $2 OR invoice = $2 RETURNING refund",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            // One payment's grant and its refunds run one at a time (a refund kept meanwhile
            // is seen here, a grant made meanwhile is seen by the refund).
            self.lock_payments(&tx, &[payment, grant.id.as_str()]).await?;
            // The balance's row is locked first: grants and closes of one balance run one at a
            // time.
            let row = tx.query_typed_one(&lock, args![t, m]).await?;
            let mut granted_before = uint(row.get::<_, Option<i64>>(1).unwrap_or(0));
            if let Some(row) =
                tx.query_typed_opt(&seen, args![t, grant.id.as_str(), grant.payment.as_deref(), m]).await?
            {
                tx.commit().await?;
                return Ok(GrantOutcome::Duplicate(credit_row(&row)));
            }
            let n: i64 = tx.query_typed_one(&open, args![t, m]).await?.get(0);
            if uint(n) >= contract::OPEN_GRANTS_MAX as u64 {
                match self.close_used_up(&tx, t, m, grant.granted_at).await? {
                    Some(granted) => granted_before = granted,
                    None => {
                        tx.commit().await?;
                        return Ok(GrantOutcome::TooMany);
                    }
                }
            }
            if !fits(granted_before, grant.units) {
                tx.commit().await?;
                return Ok(GrantOutcome::TooLarge);
            }
            tx.query_typed(
                &insert,
                args![
                    t,
                    m,
                    grant.id.as_str(),
                    int(grant.units),
                    grant.granted_at,
                    grant.expires_at,
                    grant.payment.as_deref(),
                    grant.paid.map(int)
                ],
            )
            .await?;
            tx.query_typed_one(&add, args![t, m, int(grant.units)]).await?;
            // A refund of this payment that came first is applied now, in the same write.
            let refund = tx
                .query_typed(&kept, args![payment, grant.id.as_str()])
                .await?
                .iter()
                .filter_map(|r| kept_refund_of(&r.get::<_, String>(0)))
                .reduce(newer_refund);
            if let Some(refund) = refund {
                let _ = self.apply_refund(&tx, t, m, &refund.landing(grant)).await?;
            }
            let balance = self.locked_balance(&tx, t, m).await?.expect("locked above").balance;
            tx.commit().await?;
            Ok(GrantOutcome::Granted(CreditBalance::new(balance.granted, balance.reserved)))
        })
        .await
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        let grants_sql = self.sql(&format!(
            "SELECT {CREDIT_COLUMNS} FROM {{s}}.credit WHERE tenant = $1 AND ($2::text IS NULL OR meter = $2)"
        ));
        let balances_sql = self.sql(&format!(
            "SELECT meter, reserved, coalesce(granted, 0) FROM {{s}}.quota \
             WHERE tenant = $1 AND ($2::text IS NULL OR meter = $2) AND {PREPAID_PERIOD}"
        ));
        let m = meter.map(MeterId::as_str);
        self.retrying(|| async {
            let client = self.client().await?;
            let mut grants: Vec<CreditGrant> =
                client.query_typed(&grants_sql, args![tenant.as_str(), m]).await?.iter().map(credit_row).collect();
            grants.sort_by(|a, b| (a.meter.as_str(), a.spending_order()).cmp(&(b.meter.as_str(), b.spending_order())));
            let with_grants: std::collections::BTreeSet<&str> = grants.iter().map(|g| g.meter.as_str()).collect();
            let mut balances: Vec<(MeterId, CreditBalance)> = client
                .query_typed(&balances_sql, args![tenant.as_str(), m])
                .await?
                .iter()
                .map(|r| (r.get::<_, String>(0), CreditBalance::new(uint(r.get(2)), uint(r.get(1)))))
                .filter(|(meter, _)| with_grants.contains(meter.as_str()))
                .map(|(meter, b)| (meter.as_str().into(), b))
                .collect();
            balances.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            Ok((grants, balances))
        })
        .await
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let (t, m) = (tenant.as_str(), meter.as_str());
        let close = self.sql(
            "UPDATE {s}.credit SET closed_at = $4, revoked = $5, lost = $6 WHERE tenant = $1 AND meter = $2 AND id = $3",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let Some(locked) = self.locked_balance(&tx, t, m).await? else {
                tx.commit().await?;
                return Ok(None);
            };
            let open = &locked.open;
            let due =
                open.iter().find(|g| g.id == id).is_some_and(|g| revoke || g.expires_at.is_some_and(|at| at <= now));
            let closing = if due { close_against(open, id, locked.balance, revoke) } else { None };
            let Some((lost, after, used)) = closing else {
                tx.commit().await?;
                return Ok(None);
            };
            self.set_locked(&tx, t, m, locked, after, used, now).await?;
            tx.query_typed(&close, args![t, m, id, now, revoke, int(lost)]).await?;
            self.prune_closed(&tx, t, m, now).await?;
            tx.commit().await?;
            Ok(Some(CreditClosure { at: now, revoked: revoke, lost }))
        })
        .await
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let invoice = refund.invoice.as_deref().unwrap_or(refund.payment.as_str());
        // Its open grant first, else a closed one it still reaches (closed used up).
        let find = self.sql(
            "SELECT tenant, meter, closed_at IS NULL OR NOT coalesce(revoked, false) AND coalesce(lost, 0) = 0 \
             FROM {s}.credit WHERE payment = $1 OR id = $1 OR id = $2 \
             ORDER BY closed_at IS NULL DESC, NOT coalesce(revoked, false) AND coalesce(lost, 0) = 0 DESC LIMIT 1",
        );
        let prune = self.sql("DELETE FROM {s}.credit_refund_kept WHERE at < $1");
        let before = self.sql("SELECT refund FROM {s}.credit_refund_kept WHERE payment = $1");
        let count = self.sql("SELECT count(*) FROM {s}.credit_refund_kept");
        let keep = self.sql(
            "INSERT INTO {s}.credit_refund_kept (payment, invoice, refund, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (payment) DO UPDATE SET invoice = excluded.invoice, refund = excluded.refund, at = excluded.at",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            self.lock_payments(&tx, &[refund.payment.as_str(), invoice]).await?;
            let found = tx.query_typed_opt(&find, args![refund.payment.as_str(), invoice]).await?;
            let outcome = match found {
                Some(row) if row.get::<_, bool>(2) => {
                    let (t, m): (String, String) = (row.get(0), row.get(1));
                    self.apply_refund(&tx, &t, &m, refund).await?.unwrap_or_else(|outcome| outcome)
                }
                Some(_) => RefundOutcome::Nothing,
                None if !refund.kept() => RefundOutcome::Unknown,
                None => {
                    tx.query_typed(&prune, args![refund.at - contract::REFUNDS_KEPT_SECS]).await?;
                    let prior = tx.query_typed_opt(&before, args![refund.payment.as_str()]).await?;
                    let kept = match prior.as_ref().and_then(|r| kept_refund_of(&r.get::<_, String>(0))) {
                        Some(prior) => Some(newer_refund(prior, refund.clone())),
                        None => {
                            let n: i64 = tx.query_typed_one(&count, &[]).await?.get(0);
                            (uint(n) < contract::REFUNDS_KEPT_MAX as u64).then(|| refund.clone())
                        }
                    };
                    match kept {
                        Some(kept) => {
                            tx.query_typed(
                                &keep,
                                args![kept.payment.as_str(), kept.invoice.as_deref(), kept_refund_json(&kept), kept.at],
                            )
                            .await?;
                            RefundOutcome::Kept
                        }
                        None => RefundOutcome::Full,
                    }
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    async fn values(
        &self,
        call: &crate::store::ValueCall,
        mode: crate::store::ValueMode,
    ) -> Result<crate::store::HeldValues, StoreError> {
        self.apply_values(call, mode).await
    }

    async fn payments(
        &self,
        call: &crate::store::PaymentCall,
        now: i64,
    ) -> Result<crate::store::PaymentAnswer, StoreError> {
        use crate::store::{PaymentCall, PaymentRow};
        let tenant = call.tenant().as_str();
        if matches!(call, PaymentCall::Read { .. }) {
            let read = self.sql("SELECT row FROM {s}.tenant_payment WHERE tenant = $1");
            let json: Option<String> = self
                .retrying(|| async {
                    let client = self.client().await?;
                    Ok(client.query_typed_opt(&read, args![tenant]).await?.map(|r| r.get(0)))
                })
                .await?;
            return PaymentRow::apply_json(json.as_deref(), call, now).map(|(answer, _)| answer);
        }
        // The row made first if missing, then locked: two first payments at once apply one
        // after the other, each on the row as the other left it.
        let ensure = self.sql("INSERT INTO {s}.tenant_payment (tenant, row) VALUES ($1, '{}') ON CONFLICT DO NOTHING");
        let lock = self.sql("SELECT row FROM {s}.tenant_payment WHERE tenant = $1 FOR UPDATE");
        let write = self.sql("UPDATE {s}.tenant_payment SET row = $2 WHERE tenant = $1");
        let applied = self
            .retrying(|| async {
                let mut client = self.client().await?;
                let tx = self.begin(&mut client).await?;
                tx.query_typed(&ensure, args![tenant]).await?;
                let json: String = tx.query_typed_one(&lock, args![tenant]).await?.get(0);
                let (answer, row) = match PaymentRow::apply_json(Some(&json), call, now) {
                    Ok(applied) => applied,
                    Err(e) => return Ok(Err(e)),
                };
                if let Some(row) = row {
                    tx.query_typed(&write, args![tenant, row.as_str()]).await?;
                }
                tx.commit().await?;
                Ok(Ok(answer))
            })
            .await?;
        applied
    }

    async fn counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<crate::store::QuotaCounter>, StoreError> {
        let sql = self.sql(
            "SELECT period, start_at, end_at, reserved, granted, \
             (SELECT coalesce(sum(coalesce((e.value ->> 4)::numeric, 0)), 0)::bigint FROM jsonb_each(senders) e), \
             (SELECT coalesce(sum(coalesce((e.value ->> 5)::numeric, 0)), 0)::bigint FROM jsonb_each(senders) e), \
             (SELECT coalesce(sum(coalesce((e.value ->> 6)::numeric, 0)), 0)::bigint FROM jsonb_each(senders) e) \
             FROM {s}.quota WHERE tenant = $1 AND meter = $2 ORDER BY start_at",
        );
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = client.query_typed(&sql, args![tenant.as_str(), meter.as_str()]).await?;
            let probe = QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Day, 0, 0);
            let cap = self.stored_cap::<tokio_postgres::Client>(&client, &probe).await?;
            let mut out = rows
                .iter()
                .filter_map(|r| {
                    let key =
                        QuotaKey::from_tag(tenant.clone(), meter.clone(), &r.get::<_, String>(0), r.get(1), r.get(2))?;
                    let granted = r.get::<_, Option<i64>>(4).map(uint);
                    let kept = Kept::new(uint(r.get(5)), uint(r.get(6)), uint(r.get(7)));
                    Some(crate::store::QuotaCounter::new(key, uint(r.get(3)), granted).with_cap(cap).keeping(kept))
                })
                .collect::<Vec<_>>();
            let recharge = self.stored_recharge(&client, tenant.as_str(), meter.as_str()).await?;
            crate::store::quota::recharge_listed(&mut out, tenant, meter, recharge);
            Ok(out)
        })
        .await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        let sql = self.sql(&format!(
            "SELECT {CREDIT_COLUMNS} FROM {{s}}.credit \
             WHERE closed_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.query_typed(&sql, args![now, int(limit as u64)]).await?.iter().map(credit_row).collect())
        })
        .await
    }
}

/// The prepaid period's columns.
const PREPAID_PERIOD: &str = "period = 'prepaid' AND start_at = 15095808000 AND end_at = 15099490800";

/// The condition on `(tenant, meter)` = `($1, $2)` that names its prepaid balance's row.
const PREPAID: &str =
    "tenant = $1 AND meter = $2 AND period = 'prepaid' AND start_at = 15095808000 AND end_at = 15099490800";

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid_key(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end)
}

impl PostgresStore {
    /// Takes the transaction's locks on payment ids (a payment intent, an invoice): a grant and
    /// a refund of one payment run one at a time. In one order, so two never wait on each other.
    async fn lock_payments(&self, tx: &deadpool_postgres::Transaction<'_>, ids: &[&str]) -> Pg<()> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            tx.query_typed("SELECT pg_advisory_xact_lock(hashtext('tollgate-payment:' || $1))", args![id]).await?;
        }
        Ok(())
    }

    /// Applies `refund` to its open grant of `(t, m)`, in `tx`: its answer, `Err` with the
    /// answer when it changes nothing.
    async fn apply_refund(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        t: &str,
        m: &str,
        refund: &CreditRefund,
    ) -> Pg<Result<RefundOutcome, RefundOutcome>> {
        let write = self.sql(
            "UPDATE {s}.credit SET bought = coalesce(bought, $6), units = $4, taken = $5, takes = $7 \
             WHERE tenant = $1 AND meter = $2 AND id = $3",
        );
        let reach = self.sql(&format!(
            "SELECT {CREDIT_COLUMNS} FROM {{s}}.credit WHERE tenant = $1 AND meter = $2 \
             AND closed_at IS NOT NULL AND NOT coalesce(revoked, false) AND coalesce(lost, 0) = 0"
        ));
        let Some(locked) = self.locked_balance(tx, t, m).await? else { return Ok(Err(RefundOutcome::Nothing)) };
        // The open grants, and the closed ones a refund still reaches (closed used up).
        let mut grants = locked.open.clone();
        if !grants.iter().any(|g| refund.is_of(g)) {
            grants.extend(tx.query_typed(&reach, args![t, m]).await?.iter().map(credit_row));
        }
        let applied = match refund_against(&grants, refund, locked.balance) {
            Ok(applied) => applied,
            Err(outcome) => return Ok(Err(outcome)),
        };
        self.set_locked(tx, t, m, locked, applied.after, applied.used, refund.at).await?;
        let g = &applied.grant;
        let takes = takes_json(&g.takes);
        tx.query_typed(&write, args![t, m, g.id.as_str(), int(g.units), int(g.taken), int(g.bought), takes.as_str()])
            .await?;
        Ok(Ok(applied.outcome()))
    }

    /// Closes the used-up grants of `(t, m)`'s balance at `now`, in `tx`
    /// (`store::quota::close_used_up`), and drops closed grants kept long enough: the granted
    /// units after, if any closed.
    async fn close_used_up(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        t: &str,
        m: &str,
        now: i64,
    ) -> Pg<Option<u64>> {
        let close = self.sql(
            "UPDATE {s}.credit SET closed_at = $4, revoked = false, lost = 0 \
             WHERE tenant = $1 AND meter = $2 AND id = ANY($3) AND closed_at IS NULL",
        );
        // The units leave the bottom of the used total: each sender's last call (its entry's
        // third element) is that much lower in it now, so a later close or refund finds its
        // lease where it is.
        let set = self.sql(&format!(
            "UPDATE {{s}}.quota SET granted = $3, reserved = $4, senders = coalesce((SELECT jsonb_object_agg(e.key, \
             CASE WHEN jsonb_typeof(e.value) = 'array' AND jsonb_array_length(e.value) > 2 \
             THEN jsonb_set(e.value, '{{2}}', to_jsonb(greatest((e.value ->> 2)::bigint - $5, 0))) ELSE e.value END) \
             FROM jsonb_each(senders) e), '{{}}'::jsonb) WHERE {PREPAID}"
        ));
        let Some(locked) = self.locked_balance(tx, t, m).await? else { return Ok(None) };
        let (ids, after) = close_used_up(&locked.open, locked.balance, locked.kept);
        if ids.is_empty() {
            return Ok(None);
        }
        let closed = int(locked.balance.reserved - after.reserved);
        tx.query_typed(&set, args![t, m, int(after.granted), int(after.reserved), closed]).await?;
        tx.query_typed(&close, args![t, m, ids, now]).await?;
        self.prune_closed(tx, t, m, now).await?;
        Ok(Some(after.granted))
    }

    /// Drops the closed grants of `(t, m)` kept long enough (`CreditGrant::kept_until`).
    async fn prune_closed(&self, tx: &deadpool_postgres::Transaction<'_>, t: &str, m: &str, now: i64) -> Pg<()> {
        let prune = self.sql(
            "DELETE FROM {s}.credit WHERE tenant = $1 AND meter = $2 AND closed_at <= $3 AND (closed_at <= $4 \
             OR revoked OR lost > 0 OR (expires_at IS NOT NULL AND closed_at >= expires_at))",
        );
        let kept = (now - contract::CLOSED_GRANTS_KEPT_SECS, now - contract::USED_UP_GRANTS_KEPT_SECS);
        tx.query_typed(&prune, args![t, m, kept.0, kept.1]).await?;
        Ok(())
    }

    /// Locks `(t, m)`'s balance row and reads it with its open grants, in `tx`: grants, closes
    /// and refunds of one balance run one at a time. `None`: no balance.
    async fn locked_balance(&self, tx: &deadpool_postgres::Transaction<'_>, t: &str, m: &str) -> Pg<Option<Locked>> {
        let lock = self.sql(&format!(
            "SELECT reserved, granted, forgiven, forgiven_until, forgiven_by::text, senders::text \
             FROM {{s}}.quota WHERE {PREPAID} FOR UPDATE"
        ));
        let open = self.sql(&format!(
            "SELECT {CREDIT_COLUMNS} FROM {{s}}.credit WHERE tenant = $1 AND meter = $2 AND closed_at IS NULL"
        ));
        let Some(row) = tx.query_typed_opt(&lock, args![t, m]).await? else { return Ok(None) };
        let balance = CreditBalance::new(uint(row.get::<_, Option<i64>>(1).unwrap_or(0)), uint(row.get(0)))
            .forgiving(uint(row.get(2)), row.get(3));
        let by = forgiven_by_of(&row.get::<_, String>(4));
        let json = row.get::<_, String>(5);
        let senders = sender_calls(&json);
        let kept = kept_by_senders(&json);
        let open = tx.query_typed(&open, args![t, m]).await?.iter().map(credit_row).collect();
        Ok(Some(Locked { balance, open, by, senders, kept }))
    }

    /// Sets a locked balance to `after`, forgiving the units of `used` that the senders' last
    /// leases hold.
    #[allow(clippy::too_many_arguments)]
    async fn set_locked(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        t: &str,
        m: &str,
        locked: Locked,
        after: CreditBalance,
        used: UsedTaken,
        now: i64,
    ) -> Pg<()> {
        let set = self.sql(&format!(
            "UPDATE {{s}}.quota SET granted = $3, reserved = $4, forgiven = $5, forgiven_until = $6, \
             forgiven_by = $7::text::jsonb WHERE {PREPAID}"
        ));
        let (after, by) = forgive(locked.balance, after, locked.by, used, &locked.senders, now);
        let by = forgiven_by_json(&by);
        tx.query_typed(
            &set,
            args![
                t,
                m,
                int(after.granted),
                int(after.reserved),
                int(after.forgiven),
                after.forgiven_until,
                by.as_str()
            ],
        )
        .await?;
        Ok(())
    }
}

/// A prepaid balance's row, locked.
struct Locked {
    balance: CreditBalance,
    open: Vec<CreditGrant>,
    by: ForgivenBy,
    senders: Vec<SenderCall>,
    /// What the senders keep together: leases, holds and jobs' reservations.
    kept: u64,
}

/// What a counter's senders (`{node: [seq, granted, reserved, time, lease, held, jobs, …]}`)
/// keep together.
fn kept_by_senders(json: &str) -> u64 {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(json) else { return 0 };
    map.values()
        .flat_map(|entry| (4..7).map(move |i| entry.get(i).and_then(serde_json::Value::as_u64).unwrap_or(0)))
        .fold(0u64, u64::saturating_add)
}

/// A counter's senders (`{node: [seq, granted, reserved, time]}`) as `forgive` reads them.
fn sender_calls(json: &str) -> Vec<SenderCall> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(json) else { return Vec::new() };
    map.into_iter()
        .filter_map(|(node, entry)| {
            let n = |i: usize| entry.get(i).and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
            Some((node, n(0)?, n(1)?, n(2)?))
        })
        .collect()
}

const CREDIT_COLUMNS: &str = "tenant, meter, id, units, granted_at, expires_at, payment, closed_at, revoked, lost, \
     refunded, paid, bought, taken, duplicate, takes";

fn credit_row(r: &Row) -> CreditGrant {
    let mut g = CreditGrant::new(
        r.get::<_, String>(0).into(),
        r.get::<_, String>(1).into(),
        r.get::<_, String>(2),
        uint(r.get(3)),
        r.get(4),
    )
    .expiring(r.get(5));
    g.payment = r.get(6);
    g.refunded = uint(r.get(10));
    g.paid = r.get::<_, Option<i64>>(11).map(uint);
    // Written before the units bought were recorded (or by such a node): its units then.
    g.bought = r.get::<_, Option<i64>>(12).map_or(g.units, uint);
    g.taken = uint(r.get(13));
    g.duplicate = r.get(14);
    g.takes = takes_of(&r.get::<_, String>(15));
    if let Some(at) = r.get::<_, Option<i64>>(7) {
        g.closed = Some(CreditClosure {
            at,
            revoked: r.get::<_, Option<bool>>(8).unwrap_or(false),
            lost: uint(r.get::<_, Option<i64>>(9).unwrap_or(0)),
        });
    }
    g
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prepaid_conditions_name_the_prepaid_period() {
        let (start, end) = crate::base::Period::Prepaid.bounds(0);
        let columns = format!("period = 'prepaid' AND start_at = {start} AND end_at = {end}");
        assert_eq!(super::PREPAID_PERIOD, columns);
        assert!(super::PREPAID.ends_with(&columns));
    }
}
