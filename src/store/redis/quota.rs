//! The quota role of the RedisStore: a tenant's whole quota (every meter's counters with their
//! senders' last calls, its caps, recharges and credit grants) as one row, read, changed by the
//! rules every store applies ([`TenantQuota`]) and written back under a compare-and-set of its
//! version; so each call is one slot and one write, whatever it touches of the tenant.
//!
//! What concerns a payment rather than a tenant has a row per payment (and invoice): which grant
//! it bought (a dispute names only the payment), and a refund kept until that grant lands. A
//! grant names itself there first (pending), then writes its tenant's row, then settles its
//! payment's rows (landed): a refund kept meanwhile is applied then (refunds are cumulative:
//! applied twice, they take once). Grants due to expire are listed in one sorted set, added to
//! before the grant is written.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::{backend, kept_for, RedisStore, Row, Ttl};
use crate::{
    base::{MeterId, TenantId},
    store::{
        contract::{REFUNDS_KEPT_MAX, REFUNDS_KEPT_SECS, RETENTION_SECS},
        quota::{kept_refund_json, kept_refund_of, newer_refund, CreditRefund},
        race::{until_won, Race, Retries, ATTEMPTS},
        tenant_quota::TenantQuota,
        CreditBalance, CreditClosure, CreditGrant, Grant, GrantOutcome, QuotaCounter, QuotaStore, RefundOutcome,
        Release, Reservation, StoreError,
    },
};

/// How long a grant may stay pending in its payment's rows (named, its tenant's row not written
/// yet) before a dispute of the payment stops waiting for it: a grant whose write failed is
/// delivered again by Stripe within this.
const PENDING_SECS: i64 = 86_400;

/// Now, by this node's clock (Unix seconds): rows expire on the server's clock by durations
/// drawn from it.
fn now_secs() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

/// A due grant's member in the sorted set of grants due to expire.
fn due_member(tenant: &TenantId, meter: &MeterId, id: &str) -> String {
    serde_json::json!([tenant.as_str(), meter.as_str(), id]).to_string()
}

/// The keys a refund of a payment is kept under: its payment (or the grant's id) and its
/// invoice (the id of a grant an invoice bought).
fn payment_keys(payment: &str, other: Option<&str>) -> Vec<String> {
    let mut keys = vec![payment.to_owned()];
    if let Some(other) = other.filter(|o| *o != payment) {
        keys.push(other.to_owned());
    }
    keys
}

impl RedisStore {
    /// Runs `apply` on `tenant`'s quota and writes it back if it changed and no other call
    /// wrote it meanwhile (else reads it again); `now` is the call's time, by the caller's
    /// clock (Unix seconds), from which the row's time to live is counted.
    async fn with_quota<T: Send>(
        &self,
        tenant: &TenantId,
        now: i64,
        retries: Retries,
        apply: impl Fn(&mut TenantQuota) -> T + Sync,
    ) -> Result<T, StoreError> {
        let key = &self.keys().quota(tenant);
        let apply = &apply;
        until_won("a tenant's quota, written by other calls all along", retries, (), |(), _| {
            Box::pin(async move {
                let found = self.row(key).await?;
                let read = found.text("state").unwrap_or("");
                let mut quota = match found.exists() {
                    true => TenantQuota::from_json(tenant, read).map_err(|e| {
                        StoreError::Backend(format!("redis: a tenant's quota does not read ({e})").into())
                    })?,
                    false => TenantQuota::default(),
                };
                let out = apply(&mut quota);
                let state = quota.to_json();
                if state == read || (!found.exists() && quota.is_empty()) {
                    // Nothing changed (a call answered again, a refund of another tenant's): no write.
                    return Ok(Race::Won(out));
                }
                // Calendar periods alone: gone when their counters would be dropped, 35 days
                // past the latest one's end, and never sooner than 35 days after this write
                // (a call on a period long over must not see the row vanish under the next);
                // a balance, a cap, a recharge or a grant: kept.
                let ttl = match quota.periods_end() {
                    Some(end) => Ttl::For(
                        kept_for(now, end.saturating_add(RETENTION_SECS))
                            .max(Duration::from_secs(RETENTION_SECS as u64)),
                    ),
                    None => Ttl::Never,
                };
                match self.put(key, &found.version(), ttl, &[("state", state.as_bytes())]).await? {
                    true => Ok(Race::Won(out)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    /// `tenant`'s quota as stored.
    async fn quota_of(&self, tenant: &TenantId) -> Result<TenantQuota, StoreError> {
        let found = self.row(&self.keys().quota(tenant)).await?;
        if !found.exists() {
            return Ok(TenantQuota::default());
        }
        TenantQuota::from_json(tenant, found.text("state").unwrap_or(""))
            .map_err(|e| StoreError::Backend(format!("redis: a tenant's quota does not read ({e})").into()))
    }

    /// The refund kept in a payment's row, if any.
    fn kept_in(row: &Row) -> Option<CreditRefund> {
        row.text("refund").and_then(kept_refund_of)
    }

    /// The grant a payment's row names, if it names one, and whether it landed.
    fn grant_in(row: &Row) -> Option<((TenantId, MeterId, String), bool)> {
        let v: serde_json::Value = serde_json::from_str(row.text("grant")?).ok()?;
        let named = (v[0].as_str()?.into(), v[1].as_str()?.into(), v[2].as_str()?.to_owned());
        Some((named, row.text("landed") == Some("1")))
    }

    /// Writes a payment's row at `key` as `read` was, naming a grant (its name, whether it
    /// landed, since when) or none, the refund kept there as `refund` says: whether it was
    /// written.
    async fn put_payment(
        &self,
        key: &str,
        read: &Row,
        named: Option<(&str, bool, i64)>,
        refund: KeptRefund<'_>,
    ) -> Result<bool, StoreError> {
        let at;
        let mut fields: Vec<(&str, &[u8])> = Vec::new();
        if let Some((grant, landed, since)) = named {
            at = since.to_string();
            fields.push(("grant", grant.as_bytes()));
            fields.push(("at", at.as_bytes()));
            if landed {
                fields.push(("landed", b"1"));
            }
        }
        let refund = match refund {
            KeptRefund::AsRead => read.text("refund"),
            KeptRefund::Set(r) => Some(r),
            KeptRefund::Dropped => None,
        };
        if let Some(r) = refund {
            fields.push(("refund", r.as_bytes()));
        }
        // Kept while it names a grant (its grant's rows are bounded, and drop it); a refund
        // alone, for its time.
        let ttl = match (named.is_some(), refund.and_then(kept_refund_of)) {
            (false, Some(r)) => Ttl::For(kept_for(now_secs(), r.at.saturating_add(REFUNDS_KEPT_SECS))),
            _ => Ttl::Never,
        };
        self.put(key, &read.version(), ttl, &fields).await
    }

    /// Before `grant` is written: each of its payment's rows names it, pending (a row naming
    /// another grant of the payment keeps it). The refunds kept there, the newest.
    async fn claim_payment(&self, grant: &CreditGrant) -> Result<Option<CreditRefund>, StoreError> {
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        let named = named_json(&grant.tenant, &grant.meter, &grant.id);
        let mut kept: Option<CreditRefund> = None;
        for k in payment_keys(payment, Some(&grant.id)) {
            let key = &self.keys().payment(&k);
            let named = &named;
            let found =
                until_won("a payment's row, written by its refunds all along", Retries::BACKING_OFF, (), |(), _| {
                    Box::pin(async move {
                        let found = self.row(key).await?;
                        if Self::grant_in(&found).is_some() {
                            return Ok(Race::Won(found));
                        }
                        match self
                            .put_payment(key, &found, Some((named, false, grant.granted_at)), KeptRefund::AsRead)
                            .await?
                        {
                            true => Ok(Race::Won(found)),
                            false => Ok(Race::Lost(())),
                        }
                    })
                })
                .await?;
            if let Some(r) = Self::kept_in(&found) {
                kept = Some(match kept {
                    Some(before) => newer_refund(before, r),
                    None => r,
                });
            }
        }
        Ok(kept)
    }

    /// After `grant` was written (or found written): each of its payment's rows names it,
    /// landed, and a refund kept there meanwhile is applied to it, then forgotten. With
    /// `refused`, it was not written: the rows stop naming it.
    async fn settle_payment(&self, grant: &CreditGrant, refused: bool) -> Result<(), StoreError> {
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        let named = named_json(&grant.tenant, &grant.meter, &grant.id);
        for k in payment_keys(payment, Some(&grant.id)) {
            let key = &self.keys().payment(&k);
            let named = &named;
            until_won("a payment's row, written by its refunds all along", Retries::BACKING_OFF, (), |(), _| {
                Box::pin(async move {
                    let found = self.row(key).await?;
                    let ours = found.text("grant").is_none_or(|g| g == named.as_str());
                    if !ours {
                        return Ok(Race::Won(()));
                    }
                    if refused {
                        return match self.put_payment(key, &found, None, KeptRefund::AsRead).await? {
                            true => Ok(Race::Won(())),
                            false => Ok(Race::Lost(())),
                        };
                    }
                    if let Some(refund) = Self::kept_in(&found) {
                        let refund = refund.landing(grant);
                        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
                        self.with_quota(&grant.tenant, refund.at, retries, |q| q.refund(&refund)).await?;
                    } else if Self::grant_in(&found).is_some_and(|(_, landed)| landed) {
                        return Ok(Race::Won(()));
                    }
                    match self
                        .put_payment(key, &found, Some((named, true, grant.granted_at)), KeptRefund::Dropped)
                        .await?
                    {
                        true => Ok(Race::Won(())),
                        false => Ok(Race::Lost(())),
                    }
                })
            })
            .await?;
        }
        Ok(())
    }

    /// The payment's rows of grants a close dropped: deleted if they still name them.
    async fn drop_payments(&self, dropped: &[CreditGrant]) -> Result<(), StoreError> {
        for grant in dropped {
            let payment = grant.payment.as_deref().unwrap_or(&grant.id);
            let named = named_json(&grant.tenant, &grant.meter, &grant.id);
            for k in payment_keys(payment, Some(&grant.id)) {
                let key = self.keys().payment(&k);
                let found = self.row(&key).await?;
                if found.text("grant") == Some(named.as_str()) {
                    // Lost to a refund written meanwhile: it goes with the next close.
                    let _ = self.put(&key, &found.version(), Ttl::Never, &[]).await?;
                }
            }
        }
        Ok(())
    }

    /// Keeps `refund` in its payment's rows until its grant lands, on the condition that each
    /// is as `read` (no grant landed meanwhile): `None` when one changed (read again).
    async fn keep_refund(
        &self,
        refund: &CreditRefund,
        read: &[(String, Row)],
    ) -> Result<Option<RefundOutcome>, StoreError> {
        let new = read.iter().any(|(_, row)| Self::kept_in(row).is_none());
        let mut counted = None;
        if new {
            // At most REFUNDS_KEPT_MAX kept: shared out over the days they are kept.
            let per_day = (REFUNDS_KEPT_MAX as u64).div_ceil((REFUNDS_KEPT_SECS / 86_400) as u64);
            let day_key = self.keys().refunds_kept(refund.at.div_euclid(86_400));
            let mut conn = self.conn.clone();
            let (n, _): (u64, bool) = redis::pipe()
                .atomic()
                .incr(&day_key, 1)
                .expire(&day_key, REFUNDS_KEPT_SECS + 86_400)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
            if n > per_day {
                let _: i64 = conn.decr(&day_key, 1).await.map_err(|e| backend(&e))?;
                return Ok(Some(RefundOutcome::Full));
            }
            counted = Some(day_key);
        }
        let mut kept_all = true;
        for (key, row) in read {
            let kept = match Self::kept_in(row) {
                Some(before) => newer_refund(before, refund.clone()),
                None => refund.clone(),
            };
            let json = kept_refund_json(&kept);
            let named = Self::grant_in(row)
                .map(|_| (row.text("grant").unwrap_or(""), false, row.int("at").ok().flatten().unwrap_or(0)));
            match self.put_payment(key, row, named, KeptRefund::Set(&json)).await {
                Ok(true) => {}
                Ok(false) => {
                    kept_all = false;
                    break;
                }
                Err(e) => {
                    self.uncount(counted.as_deref()).await;
                    return Err(e);
                }
            }
        }
        if !kept_all {
            self.uncount(counted.as_deref()).await;
            return Ok(None);
        }
        Ok(Some(RefundOutcome::Kept))
    }

    /// Takes back the count of a refund not kept after all.
    async fn uncount(&self, day_key: Option<&str>) {
        if let Some(day_key) = day_key {
            let mut conn = self.conn.clone();
            let _: redis::RedisResult<i64> = conn.decr(day_key, 1).await;
        }
    }
}

/// What a payment's row written keeps of the refund kept there.
#[derive(Debug, Clone, Copy)]
enum KeptRefund<'a> {
    /// As read.
    AsRead,
    /// This one (JSON).
    Set(&'a str),
    /// None: applied.
    Dropped,
}

/// A grant's name in its payment's rows.
fn named_json(tenant: &TenantId, meter: &MeterId, id: &str) -> String {
    serde_json::json!([tenant.as_str(), meter.as_str(), id]).to_string()
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        // Twice a counter's tries: every node of a busy tenant writes this one row.
        let retries = Retries::QUICK_FIRST.attempts(2 * ATTEMPTS);
        self.with_quota(&r.key.tenant, r.token.at, retries, |q| q.reserve(r)).await
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        // One write per tenant for all of its releases in the batch.
        let mut tenants: Vec<&TenantId> = releases.iter().map(|r| &r.key.tenant).collect();
        tenants.sort();
        tenants.dedup();
        let mut out: Vec<Result<(), StoreError>> = releases.iter().map(|_| Ok(())).collect();
        for tenant in tenants {
            let mine: Vec<usize> = (0..releases.len()).filter(|i| releases[*i].key.tenant == *tenant).collect();
            let retries = Retries::AT_ONCE.attempts(2 * ATTEMPTS);
            let now = mine.iter().map(|i| releases[*i].token.at).max().unwrap_or_else(now_secs);
            let written = self
                .with_quota(tenant, now, retries, |q| {
                    for i in &mine {
                        q.release(&releases[*i]);
                    }
                })
                .await;
            if let Err(e) = written {
                for i in &mine {
                    out[*i] = Err(e.duplicate());
                }
            }
        }
        out
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        // Named in its payment's rows first, the refunds kept there read: applied in the grant's
        // own write.
        let kept = self.claim_payment(grant).await?;
        let due = self.keys().credits_due();
        let member = due_member(&grant.tenant, &grant.meter, &grant.id);
        let mut conn = self.conn.clone();
        if let Some(at) = grant.expires_at {
            // Listed before it is written (the list may name a grant that is not, never the
            // other way round); a grant listed already keeps its time.
            let _: i64 = redis::cmd("ZADD")
                .arg(&due)
                .arg("NX")
                .arg(at)
                .arg(&member)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
        }
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        let outcome =
            self.with_quota(&grant.tenant, grant.granted_at, retries, |q| q.grant(grant, kept.as_ref())).await?;
        match &outcome {
            GrantOutcome::Granted(_) => self.settle_payment(grant, false).await?,
            GrantOutcome::Duplicate(seen) => {
                // Listed as it was written (a delivery again may carry a later expiry).
                if grant.expires_at.is_some() && due_member(&seen.tenant, &seen.meter, &seen.id) != member {
                    let _: i64 = conn.zrem(&due, &member).await.map_err(|e| backend(&e))?;
                }
                if let (Some(at), None) = (seen.expires_at, seen.closed) {
                    let seen_member = due_member(&seen.tenant, &seen.meter, &seen.id);
                    let _: i64 = conn.zadd(&due, seen_member, at).await.map_err(|e| backend(&e))?;
                }
                // Its payment's rows settled again: a crash between the grant and them is
                // repaired by the grant's next delivery.
                if seen.closed.is_none() {
                    self.settle_payment(seen, false).await?;
                }
            }
            _ => {
                if grant.expires_at.is_some() {
                    let _: i64 = conn.zrem(&due, &member).await.map_err(|e| backend(&e))?;
                }
                self.settle_payment(grant, true).await?;
            }
        }
        Ok(match outcome {
            GrantOutcome::Granted(_) => {
                let q = self.quota_of(&grant.tenant).await?;
                let (_, balances) = q.grants(&grant.tenant, Some(&grant.meter));
                GrantOutcome::Granted(balances.into_iter().next().map_or_else(CreditBalance::default, |(_, b)| b))
            }
            other => other,
        })
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        Ok(self.quota_of(tenant).await?.grants(tenant, meter))
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        let (closed, dropped) =
            self.with_quota(tenant, now, retries, |q| q.close(tenant, meter, id, revoke, now)).await?;
        if closed.is_some() {
            let mut conn = self.conn.clone();
            let _: i64 =
                conn.zrem(self.keys().credits_due(), due_member(tenant, meter, id)).await.map_err(|e| backend(&e))?;
        }
        self.drop_payments(&dropped).await?;
        Ok(closed)
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let keys = payment_keys(&refund.payment, refund.invoice.as_deref());
        let keys = &keys;
        let retries = Retries::BACKING_OFF.attempts(2 * ATTEMPTS);
        until_won("a refund raced with its grant under every attempt", retries, (), |(), _| {
            Box::pin(async move {
                let mut read = Vec::with_capacity(keys.len());
                for k in keys {
                    let key = self.keys().payment(k);
                    let row = self.row(&key).await?;
                    read.push((key, row));
                }
                // The tenant of the grant its payment's rows name, and the tenant that paid:
                // an open grant of the payment first, else one closed.
                let mut tenants: Vec<TenantId> =
                    read.iter().filter_map(|(_, row)| Self::grant_in(row)).map(|((t, _, _), _)| t).collect();
                tenants.extend(refund.tenant.clone());
                tenants.dedup();
                for tenant in &tenants {
                    let outcome = self.with_quota(tenant, refund.at, retries, |q| q.refund(refund)).await?;
                    if let Some(outcome) = outcome {
                        return Ok(Race::Won(outcome));
                    }
                }
                for tenant in &tenants {
                    if self.quota_of(tenant).await?.has_grant_of(refund) {
                        return Ok(Race::Won(RefundOutcome::Nothing));
                    }
                }
                // A grant named and not written yet (or not written at all, its write failed
                // within the day): a refund is kept for it, a dispute waits for it.
                let pending = read.iter().any(|(_, row)| {
                    Self::grant_in(row).is_some_and(|(_, landed)| !landed)
                        && row.int("at").ok().flatten().is_some_and(|at| at > refund.at - PENDING_SECS)
                });
                if !refund.kept() {
                    if pending {
                        return Err(StoreError::Conflict("a grant of the payment is being written"));
                    }
                    return Ok(Race::Won(RefundOutcome::Unknown));
                }
                Ok(match self.keep_refund(refund, &read).await? {
                    Some(outcome) => Race::Won(outcome),
                    None => Race::Lost(()),
                })
            })
        })
        .await
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        Ok(self.quota_of(tenant).await?.counters(tenant, meter))
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        /// Pages of the due list read at most, per call.
        const PAGES: usize = 8;
        let mut conn = self.conn.clone();
        let due_key = self.keys().credits_due();
        let page = limit.saturating_mul(2).max(16);
        let mut out: Vec<CreditGrant> = Vec::new();
        let mut read: std::collections::HashMap<TenantId, Option<TenantQuota>> = std::collections::HashMap::new();
        let mut offset = 0;
        for _ in 0..PAGES {
            let listed: Vec<String> = redis::cmd("ZRANGE")
                .arg(&due_key)
                .arg("-inf")
                .arg(now)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(page)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
            let len = listed.len();
            // Entries taken off the list (or listed later) this page: the next starts that much
            // earlier.
            let mut gone = 0;
            for member in listed {
                let named: Option<(String, String, String)> = serde_json::from_str(&member).ok();
                let Some((t, m, id)) = named else {
                    let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                    gone += 1;
                    continue;
                };
                let tenant = TenantId::from(t.as_str());
                if !read.contains_key(&tenant) {
                    let q = match self.quota_of(&tenant).await {
                        Ok(q) => Some(q),
                        Err(StoreError::Backend(e)) => {
                            tracing::error!(tenant = %tenant, error = %e, "a tenant's quota on Redis does not read: its grants are not expired");
                            None
                        }
                        Err(e) => return Err(e),
                    };
                    read.insert(tenant.clone(), q);
                }
                let Some(q) = &read[&tenant] else { continue };
                let (grants, _) = q.grants(&tenant, Some(&MeterId::from(m.as_str())));
                match grants.into_iter().find(|g| g.id == id) {
                    Some(g) if g.closed.is_none() => match g.expires_at {
                        Some(at) if at <= now => out.push(g),
                        // Listed at another time than it expires: listed again, at its own.
                        Some(at) => {
                            let _: i64 = conn.zadd(&due_key, &member, at).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                        None => {
                            let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                    },
                    // Closed: no longer due.
                    Some(_) => {
                        let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                        gone += 1;
                    }
                    // Not written an hour past its listed expiry: its write failed.
                    None => {
                        let score: Option<f64> = conn.zscore(&due_key, &member).await.map_err(|e| backend(&e))?;
                        if score.is_some_and(|s| (s as i64) < now - 3_600) {
                            let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                            gone += 1;
                        }
                    }
                }
                if out.len() >= limit {
                    break;
                }
            }
            if out.len() >= limit || len < page {
                break;
            }
            offset += len - gone;
        }
        out.sort_by_key(|g| g.expires_at);
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for RedisStore {
    async fn reserved(&self, key: &crate::store::QuotaKey) -> Result<u64, StoreError> {
        Ok(self.quota_of(&key.tenant).await?.reserved(key))
    }
}
