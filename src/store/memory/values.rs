//! The quota role's open values in the MemoryStore: a row per (tenant, meter, dimension,
//! period), under the store's lock.

use super::*;
use crate::store::{HeldValues, ValueCall, ValueMode};

/// Rows are pruned when there are at least this many, at most once per period a call names.
const PRUNE_FROM: usize = 4_096;

impl MemoryStore {
    /// [`QuotaStore::values`].
    pub(super) fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> HeldValues {
        let mut inner = self.lock();
        // Rows kept past their time (their months long gone) go as a later month's call comes.
        if inner.values.len() >= PRUNE_FROM && call.period > inner.values_pruned {
            inner.values_pruned = call.period;
            inner.values.retain(|_, row| row.expires() >= call.period);
        }
        let key = (call.tenant.clone(), call.meter.clone(), call.dimension.clone(), call.period);
        if mode == ValueMode::Read {
            return inner.values.get(&key).cloned().unwrap_or_default().apply(call, mode);
        }
        let row = inner.values.entry(key.clone()).or_default();
        let out = row.apply(call, mode);
        if row.is_empty() {
            inner.values.remove(&key);
        }
        out
    }
}
