//! The rate role of the MemoryStore: tenants' shared buckets, under the store's lock.

use super::*;
use crate::store::{CellCall, CellGrant, CellReturn, RateStore};

/// Buckets full again for this long (and whose senders are quiet) are dropped when another is
/// written: a tenant's row lives while its rate is used.
const IDLE_NANOS: i64 = 3_600 * 1_000_000_000;

/// Buckets are pruned when there are at least this many, at most once a minute.
const PRUNE_FROM: usize = 4_096;

#[async_trait]
impl RateStore for MemoryStore {
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError> {
        let mut inner = self.lock();
        if inner.rates.len() >= PRUNE_FROM && call.now >= inner.rates_pruned.saturating_add(60_000_000_000) {
            inner.rates_pruned = call.now;
            inner.rates.retain(|_, row| !row.idle(call.now, IDLE_NANOS));
        }
        let row = inner.rates.entry(call.tenant.clone()).or_default();
        Ok(row.take(call))
    }

    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(row) = inner.rates.get_mut(&call.tenant) {
            row.give_back(call);
        }
        Ok(())
    }
}
