//! Prepaid credits on the engine's side: the worker's pass that closes expired grants, once
//! each, in the quota store.

use std::collections::HashMap;

use crate::{
    clock::Clock,
    config::{MeterId, TenantId},
    store::{QuotaStore, StoreError},
};

/// What one [`Tollgate::expire_credits`](crate::Tollgate::expire_credits) pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditExpiryReport {
    /// Grants closed as expired by this node (another node may have closed others).
    pub grants: usize,
    /// Units they still held, taken from their balances.
    pub lost: u64,
    /// Expired grants passed over because their close failed lately: each is tried again
    /// after its own wait (two minutes, doubling up to an hour), and never holds the others
    /// back.
    pub waiting: usize,
}

/// How many expired grants one store call lists (beside those waiting to be tried again).
const PAGE: usize = 100;
/// The most pages one pass closes: the rest wait for the next pass.
const PAGES: usize = 10;
/// Failures in a row, with no close between them, after which a pass stops with the error
/// (the store is down).
const MAX_FAILURES: usize = 3;
/// The first wait after a failed close, in seconds (longer than the worker's minute between
/// passes, so the next pass goes past it); it doubles with each failure.
const FIRST_WAIT_SECS: i64 = 120;
/// The longest wait, in seconds.
const LONGEST_WAIT_SECS: i64 = 3600;
/// The most grants kept waiting on a node: past it the one due soonest is forgotten (it is
/// tried at the next pass).
const MAX_WAITING: usize = 1000;

/// A grant: its tenant, meter and id.
type GrantKey = (TenantId, MeterId, String);

/// The expired grants whose close failed on this node, each with when it is tried again and
/// how many times it failed.
#[derive(Debug, Default)]
pub(crate) struct CreditExpiry {
    waiting: std::sync::Mutex<HashMap<GrantKey, (i64, u32)>>,
}

impl CreditExpiry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GrantKey, (i64, u32)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `grant` waits past `now` after a failed close.
    fn waits(&self, grant: &GrantKey, now: i64) -> bool {
        self.lock().get(grant).is_some_and(|(at, _)| *at > now)
    }

    /// Forgets the grants whose wait ended long ago: closed elsewhere, or no longer due.
    fn prune(&self, now: i64) {
        self.lock().retain(|_, (at, _)| *at + LONGEST_WAIT_SECS > now);
    }

    /// How many grants wait now.
    fn count(&self) -> usize {
        self.lock().len()
    }

    /// Records a failed close: when it is tried again, and whether it had failed before.
    fn failed(&self, grant: GrantKey, now: i64) -> (i64, bool) {
        let mut waiting = self.lock();
        let before = waiting.get(&grant).map_or(0, |(_, n)| *n);
        let failures = before.saturating_add(1);
        let wait = FIRST_WAIT_SECS.saturating_mul(1 << (failures - 1).min(10)).min(LONGEST_WAIT_SECS);
        waiting.insert(grant, (now + wait, failures));
        if waiting.len() > MAX_WAITING {
            if let Some(soonest) = waiting.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) {
                waiting.remove(&soonest);
            }
        }
        (now + wait, before > 0)
    }

    fn closed(&self, grant: &GrantKey) {
        self.lock().remove(grant);
    }
}

impl CreditExpiry {
    /// One pass closing expired grants in `quota` (see
    /// [`Tollgate::expire_credits`](crate::Tollgate::expire_credits)).
    pub(crate) async fn pass(&self, quota: &dyn QuotaStore, clock: &Clock) -> Result<CreditExpiryReport, StoreError> {
        let expiry = self;
        let mut report = CreditExpiryReport::default();
        let mut in_a_row = 0;
        expiry.prune(clock.unix_secs());
        for _ in 0..PAGES {
            let now = clock.unix_secs();
            // Those waiting are listed too (they come first, by expiry): room for them beside
            // a page of the rest.
            let waiting = expiry.count();
            let due = quota.expired_credits(now, PAGE + waiting).await?;
            let listed = due.len();
            let mut tried = 0;
            for grant in due {
                let id = (grant.tenant.clone(), grant.meter.clone(), grant.id.clone());
                if expiry.waits(&id, now) {
                    continue;
                }
                tried += 1;
                let closed = match quota.close_credits(&grant.tenant, &grant.meter, &grant.id, false, now).await {
                    Ok(closed) => closed,
                    Err(e) => {
                        let (again, retried) = expiry.failed(id, now);
                        tracing::warn!(tenant = %grant.tenant, meter = %grant.meter, grant = %grant.id, error = %e,
                            again, "an expired credit grant could not be closed; tried again after a wait");
                        // Only grants that never failed here tell that the store is down: those
                        // failing again (a hot balance) never stop the pass.
                        if !retried {
                            in_a_row += 1;
                            if in_a_row > MAX_FAILURES {
                                return Err(e);
                            }
                        }
                        continue;
                    }
                };
                in_a_row = 0;
                expiry.closed(&id);
                if let Some(closure) = closed {
                    report.grants += 1;
                    report.lost = report.lost.saturating_add(closure.lost);
                    tracing::info!(tenant = %grant.tenant, meter = %grant.meter, grant = %grant.id,
                        units = grant.units, lost = closure.lost, "credit grant expired");
                }
            }
            if listed < PAGE + waiting || tried == 0 {
                break;
            }
        }
        report.waiting = expiry.count();
        Ok(report)
    }
}
