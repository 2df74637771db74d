//! The quota role of the MemoryStore: each tenant's quota one value
//! ([`TenantQuota`](crate::store::tenant_quota::TenantQuota)), changed under the store's lock;
//! refunds kept for grants that have not landed, by payment, beside them.

use super::*;
use crate::store::{
    contract::{REFUNDS_KEPT_MAX, REFUNDS_KEPT_SECS},
    quota::{newer_refund, CreditRefund},
    HeldValues, PaymentAnswer, PaymentCall, PaymentRow, RefundOutcome, Release, ValueCall, ValueMode,
};

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let mut inner = self.lock();
        Ok(inner.quota.entry(r.key.tenant.clone()).or_default().reserve(r))
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        let mut inner = self.lock();
        releases
            .iter()
            .map(|r| {
                inner.quota.entry(r.key.tenant.clone()).or_default().release(r);
                Ok(())
            })
            .collect()
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        // A refund of this payment that came first is applied in the same step.
        let payment = grant.payment.clone().unwrap_or_else(|| grant.id.clone());
        let kept: Vec<String> = inner
            .kept_refunds
            .iter()
            .filter(|(p, r)| **p == payment || **p == grant.id || r.invoice.as_deref() == Some(grant.id.as_str()))
            .map(|(p, _)| p.clone())
            .collect();
        let refund = kept.iter().filter_map(|p| inner.kept_refunds.get(p).cloned()).reduce(newer_refund);
        let outcome = inner.quota.entry(grant.tenant.clone()).or_default().grant(grant, refund.as_ref());
        if matches!(outcome, GrantOutcome::Granted(_)) {
            for p in kept {
                inner.kept_refunds.remove(&p);
            }
        }
        Ok(outcome)
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        let inner = self.lock();
        Ok(inner.quota.get(tenant).map(|q| q.grants(tenant, meter)).unwrap_or_default())
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let mut inner = self.lock();
        Ok(inner.quota.get_mut(tenant).and_then(|q| q.close(tenant, meter, id, revoke, now)))
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let mut inner = self.lock();
        // An open grant of the payment: the tenant that paid first, then any; else one closed.
        let mut outcome = refund.tenant.as_ref().and_then(|t| inner.quota.get_mut(t)).and_then(|q| q.refund(refund));
        if outcome.is_none() {
            outcome = inner.quota.values_mut().find_map(|q| q.refund(refund));
        }
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
        if inner.quota.values().any(|q| q.has_grant_of(refund)) {
            return Ok(RefundOutcome::Nothing);
        }
        if !refund.kept() {
            return Ok(RefundOutcome::Unknown);
        }
        inner.kept_refunds.retain(|_, r| r.at >= refund.at - REFUNDS_KEPT_SECS);
        let kept = match inner.kept_refunds.remove(&refund.payment) {
            Some(before) => newer_refund(before, refund.clone()),
            None if inner.kept_refunds.len() >= REFUNDS_KEPT_MAX => return Ok(RefundOutcome::Full),
            None => refund.clone(),
        };
        inner.kept_refunds.insert(kept.payment.clone(), kept);
        Ok(RefundOutcome::Kept)
    }

    async fn values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        Ok(self.apply_values(call, mode))
    }

    async fn payments(&self, call: &PaymentCall, now: i64) -> Result<PaymentAnswer, StoreError> {
        let mut inner = self.lock();
        let stored = inner.payments.get(call.tenant()).map(String::as_str);
        let (answer, row) = PaymentRow::apply_json(stored, call, now)?;
        if let Some(row) = row {
            inner.payments.insert(call.tenant().clone(), row);
        }
        Ok(answer)
    }

    async fn counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<crate::store::QuotaCounter>, StoreError> {
        let inner = self.lock();
        Ok(inner.quota.get(tenant).map(|q| q.counters(tenant, meter)).unwrap_or_default())
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        let inner = self.lock();
        let mut due: Vec<CreditGrant> = inner.quota.values().flat_map(|q| q.expired(now)).cloned().collect();
        due.sort_by_key(|g| g.expires_at);
        due.truncate(limit);
        Ok(due)
    }
}
