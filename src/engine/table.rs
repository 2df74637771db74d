//! The tenant table: credential -> tenant state, in one map lookup.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use foldhash::fast::RandomState;

use super::inline_key::InlineKey;
use crate::{config::TenantId, tenant::TenantState};

/// How a request names its tenant, as a key of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup<'a> {
    ApiKey(&'a [u8]),
    Identity(&'a str),
}

/// The identity under which requests without a known tenant are served, when an anonymous
/// plan is configured. Identities with control characters are refused, so none can be this.
pub(crate) const ANONYMOUS: &str = "\0anonymous";

/// Maps keyed by the credential itself, hashed with a per-process random seed: a hit always
/// confirms the full credential, so two credentials can never share a tenant's state.
pub(crate) struct TenantTable {
    api_keys: DashMap<InlineKey, Arc<TenantState>, RandomState>,
    identities: DashMap<Box<str>, Arc<TenantState>, RandomState>,
    tenants: DashMap<TenantId, Arc<TenantState>, RandomState>,
    /// States taken out of the maps (evicted, or replaced by a reload) that may still receive
    /// usage from requests in flight: drained at every flush until nobody else holds them.
    pub(crate) retired: Mutex<Vec<Arc<TenantState>>>,
}

impl TenantTable {
    pub(crate) fn new(capacity_hint: usize) -> Self {
        let shards = (std::thread::available_parallelism().map_or(4, |n| n.get()) * 16).next_power_of_two();
        let cap = capacity_hint.min(1 << 16);
        Self {
            api_keys: DashMap::with_capacity_and_hasher_and_shard_amount(cap, RandomState::default(), shards),
            identities: DashMap::with_capacity_and_hasher_and_shard_amount(cap, RandomState::default(), shards),
            tenants: DashMap::with_capacity_and_hasher_and_shard_amount(cap, RandomState::default(), shards),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The live state for a credential, if it is known.
    #[inline]
    pub(crate) fn get(&self, lookup: Lookup<'_>) -> Option<Arc<TenantState>> {
        let state = match lookup {
            Lookup::ApiKey(key) => self.api_keys.get(key)?.clone(),
            Lookup::Identity(id) => self.identities.get(id)?.clone(),
        };
        (!state.is_evicted()).then_some(state)
    }

    /// The state of `id`, created by `make` if absent; `lookup` then reaches it directly.
    pub(crate) fn attach(
        &self,
        lookup: Lookup<'_>,
        id: &TenantId,
        make: impl FnOnce() -> TenantState,
    ) -> Arc<TenantState> {
        let state = self
            .tenants
            .entry(id.clone())
            .or_insert_with(|| Arc::new(make()))
            .clone();
        match lookup {
            Lookup::ApiKey(key) => self.api_keys.insert(key.into(), state.clone()),
            Lookup::Identity(name) => self.identities.insert(name.into(), state.clone()),
        };
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
            self.api_keys.retain(|_, s| !s.is_evicted());
            self.identities.retain(|_, s| !s.is_evicted());
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
            .field("api_keys", &self.api_keys.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}
