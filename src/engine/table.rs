//! The tenant table: credential -> tenant state, in one map lookup.

use std::{
    hash::{BuildHasherDefault, Hasher},
    sync::Mutex,
};

use dashmap::DashMap;
use foldhash::fast::RandomState;

use crate::{
    config::TenantId,
    tenant::{Fingerprinter, Tenant, TenantState, TAG_API_KEY, TAG_TENANT},
};

/// How a request names its tenant, as a key of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup<'a> {
    ApiKey(&'a [u8]),
    Identity(&'a str),
}

/// The identity under which requests without a known tenant are served, when an anonymous
/// plan is configured. Identities with control characters are refused, so none can be this.
pub(crate) const ANONYMOUS: &str = "\0anonymous";

/// The digest is already a keyed hash: its low half is used as is.
#[derive(Default)]
struct PassThrough(u64);

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

/// A credential's 128-bit digest as two words: 8-byte aligned, so that a table entry (digest
/// and handle) takes 24 bytes, not the 32 a 16-byte aligned `u128` rounds it up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest {
    lo: u64,
    hi: u64,
}

impl std::hash::Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Half of a keyed hash is as good a hash as any.
        state.write_u64(self.lo);
    }
}

/// Credentials map to tenant states by a 128-bit SipHash-1-3 digest keyed by secrets drawn at
/// start-up (a PRF: nobody outside the process can make two credentials collide, and by
/// chance they collide with probability about n²/2¹²⁹). Matching the whole digest stands for
/// matching the whole credential, with 24-byte map entries that keep the table in cache.
pub(crate) struct TenantTable {
    digest: Fingerprinter,
    credentials: DashMap<Digest, Tenant, BuildHasherDefault<PassThrough>>,
    tenants: DashMap<TenantId, Tenant, RandomState>,
    /// States taken out of the maps (evicted, or replaced by a reload) that may still receive
    /// usage from requests in flight: drained at every flush until nobody else holds them.
    pub(crate) retired: Mutex<Vec<Tenant>>,
}

impl TenantTable {
    pub(crate) fn new(capacity_hint: usize) -> Self {
        let shards = (std::thread::available_parallelism().map_or(4, |n| n.get()) * 16).next_power_of_two();
        // Grown on demand: a small service should not pay for its cap at start-up.
        let cap = capacity_hint.min(1024);
        Self {
            digest: Fingerprinter::random(),
            credentials: DashMap::with_capacity_and_hasher_and_shard_amount(cap, Default::default(), shards),
            tenants: DashMap::with_capacity_and_hasher_and_shard_amount(cap, RandomState::default(), shards),
            retired: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    fn digest(&self, lookup: Lookup<'_>) -> Digest {
        let f = match lookup {
            Lookup::ApiKey(key) => self.digest.of(TAG_API_KEY, key),
            Lookup::Identity(id) => self.digest.of(TAG_TENANT, id.as_bytes()),
        };
        Digest { lo: f.lo, hi: f.hi }
    }

    /// The state for a credential, if it is known. A state being evicted at this very moment
    /// may still be returned: the usage recorded there is drained with the retired states, and
    /// its lease given back when the last request holding it is done.
    #[inline]
    pub(crate) fn get(&self, lookup: Lookup<'_>) -> Option<Tenant> {
        Some(self.credentials.get(&self.digest(lookup))?.value().clone())
    }

    /// The state of `id`, created by `make` if absent; `lookup` then reaches it directly.
    pub(crate) fn attach(&self, lookup: Lookup<'_>, id: &TenantId, make: impl FnOnce() -> TenantState) -> Tenant {
        let state = self.tenants.entry(id.clone()).or_insert_with(|| Tenant::new(make())).clone();
        self.credentials.insert(self.digest(lookup), state.clone());
        state
    }

    pub(crate) fn len(&self) -> usize {
        self.tenants.len()
    }

    pub(crate) fn for_each(&self, mut f: impl FnMut(&Tenant)) {
        for entry in self.tenants.iter() {
            f(entry.value());
        }
    }

    /// (last seen, tenant) of every tenant.
    pub(crate) fn last_seen(&self) -> Vec<(i64, TenantId)> {
        self.tenants.iter().map(|e| (e.value().last_seen(), e.key().clone())).collect()
    }

    /// Takes tenants out of the table; returns their states, which are also kept as retired.
    pub(crate) fn evict(&self, ids: impl IntoIterator<Item = TenantId>) -> Vec<Tenant> {
        let mut out = Vec::new();
        for id in ids {
            if let Some((_, state)) = self.tenants.remove(&id) {
                state.mark_evicted();
                out.push(state);
            }
        }
        if !out.is_empty() {
            self.credentials.retain(|_, s| !s.is_evicted());
            self.retired.lock().unwrap_or_else(|e| e.into_inner()).extend(out.iter().cloned());
        }
        out
    }

    /// Takes every tenant out of the table.
    pub(crate) fn evict_all(&self) -> Vec<Tenant> {
        let ids: Vec<TenantId> = self.tenants.iter().map(|e| e.key().clone()).collect();
        self.evict(ids)
    }
}

impl std::fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTable")
            .field("tenants", &self.tenants.len())
            .field("credentials", &self.credentials.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_entry_takes_24_bytes() {
        assert_eq!(size_of::<(Digest, Tenant)>(), 24);
    }
}
