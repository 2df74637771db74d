//! The places role of the MemoryStore: tenants' places, under the store's lock.

use super::*;
use crate::store::{PlaceCall, PlaceMode, PlaceStore, Places};

impl MemoryStore {
    fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Places {
        let mut inner = self.lock();
        let row = inner.places.entry(call.tenant.clone()).or_default();
        let out = row.apply(call, mode);
        if row.is_empty() {
            inner.places.remove(&call.tenant);
        }
        out
    }
}

#[async_trait]
impl PlaceStore for MemoryStore {
    async fn acquire_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        Ok(self.places(call, PlaceMode::Hold))
    }

    async fn renew_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        Ok(self.places(call, PlaceMode::Hold))
    }

    async fn release_places(&self, call: &PlaceCall) -> Result<Places, StoreError> {
        Ok(self.places(call, PlaceMode::Release))
    }
}
