//! Prepaid credits on the engine's side: the worker's pass that closes expired grants, once
//! each, in the quota store.

use super::{store_calls::with_timeout, Tollgate};
use crate::store::StoreError;

/// What one [`Tollgate::expire_credits`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditExpiryReport {
    /// Grants closed as expired by this node (another node may have closed others).
    pub grants: usize,
    /// Units they still held, taken from their balances.
    pub lost: u64,
}

/// How many expired grants one store call lists.
const PAGE: usize = 100;
/// The most pages one pass closes: the rest wait for the next pass.
const PAGES: usize = 10;
/// Grants a pass passes over when their close fails, before it stops with the error.
const MAX_FAILURES: usize = 3;

impl Tollgate {
    /// Closes the credit grants expired by the engine's clock, each once across a fleet (a
    /// grant another node closed first is passed over): each loses the units it still held,
    /// units leased to nodes counting as spent. The worker runs it every minute; at most
    /// 1,000 grants a pass.
    ///
    /// # Errors
    /// A store error (or timeout): the grants not closed are closed by a later pass.
    pub async fn expire_credits(&self) -> Result<CreditExpiryReport, StoreError> {
        let quota = &self.shared.stores.roles.quota;
        let timeout = self.shared.runtime.load().config.usage.store_timeout;
        let mut report = CreditExpiryReport::default();
        for _ in 0..PAGES {
            let now = self.shared.clock.unix_secs();
            let due = with_timeout(timeout, quota.expired_credits(now, PAGE)).await?;
            let listed = due.len();
            let mut failed = 0;
            for grant in due {
                // One grant that cannot be closed now (a busy balance, a timeout) does not hold
                // back the others; the pass stops after a few failures (the store is down).
                let closed = match with_timeout(
                    timeout,
                    quota.close_credits(&grant.tenant, &grant.meter, &grant.id, false, now),
                )
                .await
                {
                    Ok(closed) => closed,
                    Err(e) if failed < MAX_FAILURES => {
                        failed += 1;
                        tracing::warn!(tenant = %grant.tenant, meter = %grant.meter, grant = %grant.id, error = %e,
                                "an expired credit grant could not be closed; tried again at the next pass");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Some(closure) = closed {
                    report.grants += 1;
                    report.lost = report.lost.saturating_add(closure.lost);
                    tracing::info!(tenant = %grant.tenant, meter = %grant.meter, grant = %grant.id,
                        units = grant.units, lost = closure.lost, "credit grant expired");
                }
            }
            if listed < PAGE || failed > 0 {
                break;
            }
        }
        Ok(report)
    }
}
