//! The places role of the MemoryStore: tenants' places, under the store's lock.

use super::*;
use crate::store::{PlaceCall, PlaceMode, PlaceStore, Places};

/// Rows are pruned when there are at least this many, at most once a minute.
const PRUNE_FROM: usize = 4_096;

#[async_trait]
impl PlaceStore for MemoryStore {
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError> {
        let mut inner = self.lock();
        // Rows whose every entry expired (a tenant gone quiet) go, as another call comes.
        if inner.places.len() >= PRUNE_FROM && call.now >= inner.places_pruned.saturating_add(60_000_000_000) {
            inner.places_pruned = call.now;
            inner.places.retain(|_, row| row.expires() > call.now);
        }
        let row = inner.places.entry(call.tenant.clone()).or_default();
        let out = row.apply(call, mode);
        if row.is_empty() {
            inner.places.remove(&call.tenant);
        }
        Ok(out)
    }
}
