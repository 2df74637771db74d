//! The quota role of the RedisStore: a tenant's whole quota (every meter's counters with their
//! senders' last calls, its caps, recharges and credit grants) as one row, read, changed by the
//! rules every store applies ([`TenantQuota`]) and written back under a compare-and-set of its
//! version; so each call is one slot and one write, whatever it touches of the tenant.
//!
//! What concerns a payment rather than a tenant has a row per payment (and invoice): the refund
//! kept until its grant lands, and once it landed, which grant it is (a dispute names only the
//! payment). A grant writes its tenant's row first, then settles its payment's rows: a refund
//! kept meanwhile is applied then (refunds are cumulative: applied twice, they take once).
//! Grants due to expire are listed in one sorted set, added to before the grant is written.

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

/// How long a payment's row says which grant it bought: refunds and disputes come within
/// months of a payment; past this, a refund finds the grant through the tenant it names.
pub(crate) const PAYMENT_KEPT_SECS: i64 = 400 * 86_400;

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
                if state == read {
                    return Ok(Race::Won(out));
                }
                // Calendar periods alone: gone when their counters would be dropped; a
                // balance, a cap, a recharge or a grant: kept.
                let ttl = match quota.periods_end() {
                    Some(end) => Ttl::For(kept_for(now, end.saturating_add(RETENTION_SECS))),
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

    /// The grant a payment's row names, if it names one.
    fn grant_in(row: &Row) -> Option<(TenantId, MeterId, String)> {
        let v: serde_json::Value = serde_json::from_str(row.text("grant")?).ok()?;
        Some((v[0].as_str()?.into(), v[1].as_str()?.into(), v[2].as_str()?.to_owned()))
    }

    /// After `grant` was written (or found written): each of its payment's rows names it, and
    /// a refund kept there meanwhile is applied to it, then forgotten.
    async fn settle_payment(&self, grant: &CreditGrant) -> Result<(), StoreError> {
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        let named = serde_json::json!([grant.tenant.as_str(), grant.meter.as_str(), grant.id]).to_string();
        for k in payment_keys(payment, Some(&grant.id)) {
            let key = &self.keys().payment(&k);
            let named = &named;
            until_won("a payment's row, written by its refunds all along", Retries::BACKING_OFF, (), |(), _| {
                Box::pin(async move {
                    let found = self.row(key).await?;
                    if let Some(refund) = Self::kept_in(&found) {
                        let refund = refund.landing(grant);
                        self.with_quota(&grant.tenant, refund.at, Retries::BACKING_OFF, |q| q.refund(&refund)).await?;
                    } else if found.text("grant") == Some(named.as_str()) {
                        return Ok(Race::Won(()));
                    }
                    let ttl = Ttl::For(Duration::from_secs(PAYMENT_KEPT_SECS as u64));
                    match self.put(key, &found.version(), ttl, &[("grant", named.as_bytes())]).await? {
                        true => Ok(Race::Won(())),
                        false => Ok(Race::Lost(())),
                    }
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Keeps `refund` in its payment's rows until its grant lands, on the condition that each
    /// is as `read` (no grant named it meanwhile): `None` when one changed (read again).
    async fn keep_refund(
        &self,
        refund: &CreditRefund,
        read: &[(String, Row)],
    ) -> Result<Option<RefundOutcome>, StoreError> {
        let new = read.iter().all(|(_, row)| Self::kept_in(row).is_none());
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
        for (key, row) in read {
            let kept = match Self::kept_in(row) {
                Some(before) => newer_refund(before, refund.clone()),
                None => refund.clone(),
            };
            let json = kept_refund_json(&kept);
            let ttl = kept_for(refund.at, kept.at.saturating_add(REFUNDS_KEPT_SECS));
            if !self.put(key, &row.version(), Ttl::For(ttl), &[("refund", json.as_bytes())]).await? {
                if let Some(day_key) = counted {
                    let mut conn = self.conn.clone();
                    let _: i64 = conn.decr(&day_key, 1).await.map_err(|e| backend(&e))?;
                }
                return Ok(None);
            }
        }
        Ok(Some(RefundOutcome::Kept))
    }
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
                    out[*i] = Err(StoreError::Backend(e.to_string().into()));
                }
            }
        }
        out
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        // Refunds kept for its payment first: applied in the grant's own write.
        let mut kept = None;
        for k in payment_keys(payment, Some(&grant.id)) {
            if let Some(r) = Self::kept_in(&self.row(&self.keys().payment(&k)).await?) {
                kept = Some(match kept {
                    Some(before) => newer_refund(before, r),
                    None => r,
                });
            }
        }
        if let Some(at) = grant.expires_at {
            // Listed before it is written: the list may name a grant that is not, never the
            // other way round.
            let mut conn = self.conn.clone();
            let member = due_member(&grant.tenant, &grant.meter, &grant.id);
            let _: i64 = conn.zadd(self.keys().credits_due(), member, at).await.map_err(|e| backend(&e))?;
        }
        let outcome = self
            .with_quota(&grant.tenant, grant.granted_at, Retries::BACKING_OFF, |q| q.grant(grant, kept.as_ref()))
            .await?;
        match &outcome {
            GrantOutcome::Granted(_) => self.settle_payment(grant).await?,
            // Its payment's rows settled again: a crash between the grant and them is repaired
            // by the grant's next delivery.
            GrantOutcome::Duplicate(seen) if seen.closed.is_none() => self.settle_payment(seen).await?,
            _ => {}
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
        let closed =
            self.with_quota(tenant, now, Retries::BACKING_OFF, |q| q.close(tenant, meter, id, revoke, now)).await?;
        if closed.is_some() {
            let mut conn = self.conn.clone();
            let _: i64 =
                conn.zrem(self.keys().credits_due(), due_member(tenant, meter, id)).await.map_err(|e| backend(&e))?;
        }
        Ok(closed)
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let keys = payment_keys(&refund.payment, refund.invoice.as_deref());
        let keys = &keys;
        until_won("a refund raced with its grant under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let mut read = Vec::with_capacity(keys.len());
                for k in keys {
                    let key = self.keys().payment(k);
                    let row = self.row(&key).await?;
                    read.push((key, row));
                }
                // The grant its payment's row names, else the grants of the tenant that paid.
                let mut tenants: Vec<TenantId> =
                    read.iter().filter_map(|(_, row)| Self::grant_in(row)).map(|g| g.0).collect();
                tenants.extend(refund.tenant.clone());
                for tenant in tenants {
                    if let Some(outcome) =
                        self.with_quota(&tenant, refund.at, Retries::BACKING_OFF, |q| q.refund(refund)).await?
                    {
                        return Ok(Race::Won(outcome));
                    }
                }
                if read.iter().any(|(_, row)| Self::grant_in(row).is_some()) {
                    // Named, and gone since (closed long ago): nothing to take.
                    return Ok(Race::Won(RefundOutcome::Nothing));
                }
                if !refund.kept() {
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
        let mut conn = self.conn.clone();
        let due_key = self.keys().credits_due();
        let listed: Vec<String> = redis::cmd("ZRANGE")
            .arg(&due_key)
            .arg("-inf")
            .arg(now)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit.saturating_mul(2).max(16))
            .query_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        let mut out: Vec<CreditGrant> = Vec::new();
        let mut read: std::collections::HashMap<TenantId, TenantQuota> = std::collections::HashMap::new();
        for member in listed {
            let Ok(serde_json::Value::Array(v)) = serde_json::from_str::<serde_json::Value>(&member) else {
                continue;
            };
            let (Some(t), Some(m), Some(id)) = (v[0].as_str(), v[1].as_str(), v[2].as_str()) else { continue };
            let tenant = TenantId::from(t);
            if !read.contains_key(&tenant) {
                let q = self.quota_of(&tenant).await?;
                read.insert(tenant.clone(), q);
            }
            let q = &read[&tenant];
            let (grants, _) = q.grants(&tenant, Some(&MeterId::from(m)));
            match grants.into_iter().find(|g| g.id == id) {
                Some(g) if g.closed.is_none() && g.expires_at.is_some_and(|at| at <= now) => out.push(g),
                // Closed: no longer due. Absent an hour past its expiry: its write failed.
                Some(g) if g.closed.is_some() => {
                    let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                }
                None if v.len() == 3 => {
                    let score: Option<f64> = conn.zscore(&due_key, &member).await.map_err(|e| backend(&e))?;
                    if score.is_some_and(|s| (s as i64) < now - 3_600) {
                        let _: i64 = conn.zrem(&due_key, &member).await.map_err(|e| backend(&e))?;
                    }
                }
                _ => {}
            }
            if out.len() >= limit {
                break;
            }
        }
        out.sort_by_key(|g| g.expires_at);
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
