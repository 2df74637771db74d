//! The tenant table: credential fingerprint -> tenant state, in one map lookup.

use std::{
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex},
};

use dashmap::DashMap;

use crate::{
    config::TenantId,
    tenant::{Fingerprint, TenantState},
};

/// The low half of a fingerprint is already a keyed hash: use it as is.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct KeyEntry {
    check: u64,
    state: Arc<TenantState>,
}

pub(crate) struct TenantTable {
    keys: DashMap<u64, KeyEntry, BuildHasherDefault<PassThrough>>,
    tenants: DashMap<TenantId, Arc<TenantState>>,
    /// States taken out of the maps (evicted, or replaced by a reload) that may still receive
    /// usage from requests in flight: drained at every flush until nobody else holds them.
    pub(crate) retired: Mutex<Vec<Arc<TenantState>>>,
}

impl TenantTable {
    pub(crate) fn new(capacity_hint: usize) -> Self {
        let shards =
            (std::thread::available_parallelism().map_or(4, |n| n.get()) * 16).next_power_of_two();
        let cap = capacity_hint.min(1 << 20);
        Self {
            keys: DashMap::with_capacity_and_hasher_and_shard_amount(
                cap,
                Default::default(),
                shards,
            ),
            tenants: DashMap::with_capacity_and_shard_amount(cap, shards),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The live state for a credential, if it is known.
    #[inline]
    pub(crate) fn get(&self, fp: Fingerprint) -> Option<Arc<TenantState>> {
        let entry = self.keys.get(&fp.lo)?;
        (entry.check == fp.hi && !entry.state.is_evicted()).then(|| entry.state.clone())
    }

    /// The state of `id`, created by `make` if absent; `fp` then reaches it directly.
    pub(crate) fn attach(
        &self,
        fp: Fingerprint,
        id: &TenantId,
        make: impl FnOnce() -> TenantState,
    ) -> Arc<TenantState> {
        let state = self
            .tenants
            .entry(id.clone())
            .or_insert_with(|| Arc::new(make()))
            .clone();
        self.keys.insert(
            fp.lo,
            KeyEntry {
                check: fp.hi,
                state: state.clone(),
            },
        );
        state
    }

    pub(crate) fn len(&self) -> usize {
        self.tenants.len()
    }

    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<TenantState>)) {
        for entry in self.tenants.iter() {
            f(entry.value());
        }
    }

    /// (last seen, tenant) of every tenant.
    pub(crate) fn last_seen(&self) -> Vec<(i64, TenantId)> {
        self.tenants
            .iter()
            .map(|e| (e.value().last_seen(), e.key().clone()))
            .collect()
    }

    /// Takes tenants out of the table; returns their states, which are also kept as retired.
    pub(crate) fn evict(&self, ids: impl IntoIterator<Item = TenantId>) -> Vec<Arc<TenantState>> {
        let mut out = Vec::new();
        for id in ids {
            if let Some((_, state)) = self.tenants.remove(&id) {
                state.mark_evicted();
                out.push(state);
            }
        }
        if !out.is_empty() {
            self.keys.retain(|_, e| !e.state.is_evicted());
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(out.iter().cloned());
        }
        out
    }

    /// Takes every tenant out of the table.
    pub(crate) fn evict_all(&self) -> Vec<Arc<TenantState>> {
        let ids: Vec<TenantId> = self.tenants.iter().map(|e| e.key().clone()).collect();
        self.evict(ids)
    }
}

impl std::fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTable")
            .field("tenants", &self.tenants.len())
            .field("keys", &self.keys.len())
            .finish()
    }
}
