//! The tenant table: credential -> tenant state, in one map lookup.

use std::{
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use dashmap::DashMap;
use foldhash::fast::RandomState;
use hashbrown::HashTable;

use crate::engine::rates::RateMemory;
use crate::{
    config::{TenantId, ANONYMOUS_TENANT},
    tenant::{Fingerprinter, KeyHash, Tenant, TenantState, TAG_API_KEY, TAG_TENANT},
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
pub(crate) struct Digest {
    pub(crate) lo: u64,
    pub(crate) hi: u64,
}

impl std::hash::Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Half of a keyed hash is as good a hash as any.
        state.write_u64(self.lo);
    }
}

/// The credentials that reach a tenant: each one's digest, and the hash of its key (`None`:
/// an identity).
pub(crate) type Creds = Vec<(Digest, Option<KeyHash>)>;

/// A tenant held by the table: its state and the API keys that reach it, 24 bytes. Its id is
/// its state's, and when the directory last confirmed it is in the state's cold line too
/// ([`TenantState::validated`]): the table's buckets, about half of them empty, each cost an
/// entry's size. The identity that reaches a tenant is not kept: it is the tenant's id
/// ([`TenantTable::identities`]), mapped or not in the credential map.
struct Entry {
    state: Tenant,
    /// Each key's digest and hash, sized for what it holds: most tenants have one key (48
    /// bytes), a tenant reached only by its identity none.
    keys: Box<[(Digest, KeyHash)]>,
}

/// Credentials map to tenant states by a 128-bit SipHash-1-3 digest keyed by secrets drawn at
/// start-up (a PRF: nobody outside the process can make two credentials collide, and by
/// chance they collide with probability about n²/2¹²⁹). Matching the whole digest stands for
/// matching the whole credential, with 24-byte map entries that keep the table in cache.
pub(crate) struct TenantTable {
    digest: Fingerprinter,
    credentials: DashMap<Digest, Tenant, BuildHasherDefault<PassThrough>>,
    tenants: Tenants,
    /// States taken out of the maps (evicted, or replaced by a reload) that may still receive
    /// usage from requests in flight: drained at every flush until nobody else holds them.
    retired: Mutex<Vec<Tenant>>,
    /// The rate buckets of tenants let go before they were full again, by tenant.
    rates: RateMemory,
    /// Lookups under way, one per credential.
    flights: Flights,
    /// Changes of the directory this node was told of, so that a lookup that read the
    /// directory before one does not attach what it removed ([`Changes`]).
    changes: Changes,
}

/// Changes of the directory made while lookups read it: a key removed, a tenant's plan or
/// customer changed, a tenant gone. Each change takes the next number of a sequence and marks
/// one of [`STRIPES`] stripes with it (by the key's digest, or the tenant id's) before the
/// table lets go of what it changed. A lookup takes the sequence's number before it reads the
/// directory, and once it has attached what it read, asks whether its credential's or its
/// tenant's stripe was marked since ([`TenantTable::changed_since`]): if so, the change may
/// have come after its read, and it reads again. Either the change's mark comes before that
/// question (and the lookup reads again), or its removal comes after the attach (and removes
/// what the lookup attached). Striped so that changes of other tenants seldom make a lookup
/// read twice; 8 KiB, whatever the number of tenants.
struct Changes {
    seq: AtomicU64,
    stripes: Box<[AtomicU64]>,
}

const STRIPES: usize = 1024;

impl Changes {
    fn new() -> Self {
        Self { seq: AtomicU64::new(0), stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect() }
    }

    fn stripe(&self, digest: Digest) -> &AtomicU64 {
        // Truncation intended: the low bits pick the stripe.
        #[allow(clippy::cast_possible_truncation)]
        &self.stripes[digest.lo as usize & (STRIPES - 1)]
    }

    fn mark(&self, digest: Digest) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.stripe(digest).fetch_max(n, Ordering::SeqCst);
    }

    fn mark_all(&self) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        for stripe in &self.stripes {
            stripe.fetch_max(n, Ordering::SeqCst);
        }
    }
}

/// The tenants by id, in shards each behind its own lock (as `DashMap` shards, so that a
/// lookup by id on one shard never waits for another's writer). An entry keeps no key: the
/// id is read from its state, so a tenant's id is stored once and an entry takes 24 bytes
/// (a `DashMap<TenantId, _>` entry would take 16 more for the key's handle, and 16 for when
/// the directory confirmed it and the spare room of a vector).
struct Tenants {
    shards: Box<[RwLock<HashTable<Entry>>]>,
    hasher: RandomState,
}

impl Tenants {
    fn new(shards: usize, capacity: usize) -> Self {
        let per = capacity.div_ceil(shards);
        Self {
            shards: (0..shards).map(|_| RwLock::new(HashTable::with_capacity(per))).collect(),
            hasher: RandomState::default(),
        }
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The shard of `hash`: bits the table's own buckets (the low bits) and control bytes (the
    /// top seven) do not use.
    fn shard(&self, hash: u64) -> &RwLock<HashTable<Entry>> {
        // Truncation intended: the shard count is a power of two below 2³².
        #[allow(clippy::cast_possible_truncation)]
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, HashTable<Entry>> {
        self.shard(hash).read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, HashTable<Entry>> {
        self.shard(hash).write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the entry of `id`.
    fn with<T>(&self, id: &str, f: impl FnOnce(&Entry) -> T) -> Option<T> {
        let hash = self.hash(id);
        self.read(hash).find(hash, |e| e.state.id.as_str() == id).map(f)
    }

    /// Changes the entry of `id`.
    fn with_mut<T>(&self, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let hash = self.hash(id);
        self.write(hash).find_mut(hash, |e| e.state.id.as_str() == id).map(f)
    }

    /// Takes the entry of `id` out.
    fn remove(&self, id: &str) -> Option<Entry> {
        let hash = self.hash(id);
        let mut shard = self.write(hash);
        shard.find_entry(hash, |e| e.state.id.as_str() == id).ok().map(|e| e.remove().0)
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len()).sum()
    }

    /// Every entry, a shard at a time (each read-locked while `f` runs on its entries).
    fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for shard in &self.shards {
            shard.read().unwrap_or_else(PoisonError::into_inner).iter().for_each(&mut f);
        }
    }
}

impl TenantTable {
    /// The states taken out of the maps that may still receive usage (evicted, or replaced
    /// by a reload), to drain.
    pub(crate) fn retired(&self) -> std::sync::MutexGuard<'_, Vec<Tenant>> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rate buckets of tenants let go before they were full again.
    pub(crate) fn rates(&self) -> &RateMemory {
        &self.rates
    }

    /// The turn of a lookup of the credential `key`: one lookup per credential at a time.
    pub(crate) async fn lookup_turn(&self, key: (u64, u64)) -> impl Drop + '_ {
        self.flights.enter(key).await
    }

    pub(crate) fn new(capacity_hint: usize, rate_states_dropped: metrics::Counter) -> Self {
        let shards = (std::thread::available_parallelism().map_or(4, |n| n.get()) * 16).next_power_of_two();
        // Grown on demand: a small service should not pay for its cap at start-up.
        let cap = capacity_hint.min(1024);
        Self {
            digest: Fingerprinter::random(),
            credentials: DashMap::with_capacity_and_hasher_and_shard_amount(cap, Default::default(), shards),
            tenants: Tenants::new(shards, cap),
            retired: Mutex::new(Vec::new()),
            rates: RateMemory::new(capacity_hint, rate_states_dropped),
            flights: Flights::default(),
            changes: Changes::new(),
        }
    }

    /// Where the sequence of directory changes stands: taken before a lookup reads the
    /// directory, for [`changed_since`](Self::changed_since).
    pub(crate) fn changes_seen(&self) -> u64 {
        self.changes.seq.load(Ordering::SeqCst)
    }

    /// Whether the credential `lookup` changed in the directory (`invalidate_key`,
    /// revalidation) after [`changes_seen`](Self::changes_seen) answered `seen` (or another
    /// of its stripe did).
    pub(crate) fn key_changed_since(&self, seen: u64, lookup: Lookup<'_>) -> bool {
        self.changes.stripe(self.digest(lookup)).load(Ordering::SeqCst) > seen
    }

    /// Whether the tenant `id` changed in the directory after `seen` (or another of its
    /// stripe did).
    pub(crate) fn tenant_changed_since(&self, seen: u64, id: &TenantId) -> bool {
        self.changes.stripe(self.digest(Lookup::Identity(id.as_str()))).load(Ordering::SeqCst) > seen
    }

    /// Marks a change of the tenant `id` in the directory (its plan or customer changed, or
    /// it is gone), before the table lets go of what it holds of it.
    pub(crate) fn tenant_changed(&self, id: &TenantId) {
        self.changes.mark(self.digest(Lookup::Identity(id.as_str())));
    }

    /// Marks a change of every credential (keys added to the directory whose digests this
    /// node cannot compute: imported by their hashes).
    pub(crate) fn mark_all_changed(&self) {
        self.changes.mark_all();
    }

    /// Draws new credential secrets (after a snapshot restore) and lets every tenant go
    /// (returned, and kept as retired). Every credential is taken out first: each was digested
    /// with the old secrets, and an identity's digest is found again only with them. The
    /// tenants are let go after, so that their rate buckets are kept under the new secrets.
    pub(crate) fn reseed(&self) -> Vec<Tenant> {
        self.changes.mark_all();
        self.credentials.clear();
        self.digest.reseed();
        self.evict_all()
    }

    pub(crate) fn digest(&self, lookup: Lookup<'_>) -> Digest {
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

    /// The state of `id`, created by `make` if absent; `lookup` (whose key hashes to `hash`,
    /// for an API key) then reaches it directly, unless it is an identity other than the
    /// tenant's own (see [`identity_of`](Self::identity_of)). `validated`: when the directory
    /// confirmed it. (The engine attaches what the directory answered with
    /// [`attach_read`](Self::attach_read).)
    #[cfg(test)]
    pub(crate) fn attach(
        &self,
        lookup: Lookup<'_>,
        hash: Option<KeyHash>,
        id: &TenantId,
        validated: i64,
        make: impl FnOnce() -> TenantState,
    ) -> Tenant {
        self.attach_read(lookup, hash, id, validated, None, make).expect("attached whatever changed")
    }

    /// [`attach`](Self::attach) of what the directory answered a read that began when
    /// [`changes_seen`](Self::changes_seen) answered `seen`: `None`, nothing attached, when
    /// the credential or the tenant changed since (the read may predate the change).
    pub(crate) fn attach_read(
        &self,
        lookup: Lookup<'_>,
        hash: Option<KeyHash>,
        id: &TenantId,
        validated: i64,
        seen: Option<u64>,
        make: impl FnOnce() -> TenantState,
    ) -> Option<Tenant> {
        let digest = self.digest(lookup);
        // What reaches the tenant again: an API key (kept with its hash, for revalidation), or
        // its own identity (the anonymous one for the anonymous tenant), found from its id.
        let (key, mapped) = match (lookup, hash) {
            (Lookup::ApiKey(_), Some(hash)) => (Some(hash), true),
            (Lookup::Identity(name), _) if Self::identity_of(name, id) => (None, true),
            _ => {
                // No directory of this crate answers so. A credential the entry could not
                // account for is not mapped (each request with it is looked up again), so
                // that no eviction leaves it on a state the table no longer holds.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(tenant = %id, "the tenant directory answered a tenant id with another tenant's record: \
                        such credentials are looked up on every request (said once)");
                });
                (None, false)
            }
        };
        let h = self.tenants.hash(id.as_str());
        // The credential is mapped while the tenant's shard is held, so an eviction or a
        // replacement (which take the entry first) cannot slip in between and leave the
        // credential on a state the table no longer holds.
        let mut shard = self.tenants.write(h);
        // A change of the tenant lets go of it under this shard after its mark: asked here,
        // either the mark is seen, or the change comes after and lets go of what is attached.
        let changed = |digest| seen.is_some_and(|seen| self.changes.stripe(digest).load(Ordering::SeqCst) > seen);
        if changed(self.digest(Lookup::Identity(id.as_str()))) || (mapped && changed(digest)) {
            return None;
        }
        // `Some(bucket)`: made here (with the bucket it was let go with, if any).
        let mut created = None;
        let entry =
            shard.entry(h, |e| e.state.id == *id, |e| self.tenants.hash(e.state.id.as_str())).or_insert_with(|| {
                let state = make();
                state.set_validated(validated);
                // A tenant let go before its bucket was full again finds it as it left it.
                let now = state.rate_now();
                let bucket = self.rates.take(self.rate_key(id), now);
                if let Some(tat) = bucket {
                    state.restore_rate(tat);
                }
                created = Some(bucket.map(|tat| (tat, now)));
                Entry { state: Tenant::new(state), keys: Box::default() }
            });
        let state = entry.get().state.clone();
        if mapped {
            // Under the credential's own lock, which `forget` takes after its mark: asked
            // here, either the mark is seen, or `forget` finds the credential mapped.
            let slot = self.credentials.entry(digest);
            if changed(digest) {
                drop(slot);
                if let Some(bucket) = created {
                    // Made for this credential alone: nothing of it stays (the bucket it was
                    // let go with goes back as it was found).
                    entry.remove();
                    if let Some((tat, now)) = bucket {
                        self.rates.keep(self.rate_key(id), tat, now);
                    }
                }
                return None;
            }
            slot.insert(state.clone());
        }
        let entry = entry.into_mut();
        if let Some(hash) = key.filter(|_| !entry.keys.iter().any(|(d, _)| *d == digest)) {
            // Sized exactly: the boxed slice keeps this allocation as it is.
            let mut keys = Vec::with_capacity(entry.keys.len() + 1);
            keys.extend_from_slice(&entry.keys);
            keys.push((digest, hash));
            entry.keys = keys.into_boxed_slice();
        }
        drop(shard);
        Some(state)
    }

    /// The state an organization's counters are kept under (`id`, its counters' id), on
    /// `plan`, made by `make` if absent or held on another plan (a reload changed it: the old
    /// state is retired, as a replaced tenant's is, and its leases go back). Held beside the
    /// tenants, so that the passes that refill, flush, return and evict their leases reach it
    /// too; no credential reaches it.
    pub(crate) fn org(
        &self,
        id: &TenantId,
        plan: &std::sync::Arc<crate::plan::CompiledPlan>,
        make: impl FnOnce() -> TenantState,
    ) -> Tenant {
        if let Some(state) = self.tenants.with(id.as_str(), |e| e.state.clone()) {
            if std::sync::Arc::ptr_eq(&state.plan, plan) {
                return state;
            }
        }
        let h = self.tenants.hash(id.as_str());
        let mut shard = self.tenants.write(h);
        let mut retired = None;
        let entry = match shard.find_mut(h, |e| e.state.id == *id) {
            Some(entry) => {
                if !std::sync::Arc::ptr_eq(&entry.state.plan, plan) {
                    let new = make();
                    new.set_validated(i64::MAX);
                    retired = Some(std::mem::replace(&mut entry.state, Tenant::new(new)));
                }
                entry.state.clone()
            }
            None => {
                let new = make();
                new.set_validated(i64::MAX);
                let state = Tenant::new(new);
                shard.insert_unique(h, Entry { state: state.clone(), keys: Box::default() }, |e| {
                    self.tenants.hash(e.state.id.as_str())
                });
                state
            }
        };
        drop(shard);
        if let Some(old) = retired {
            old.mark_evicted();
            self.retired.lock().unwrap_or_else(|e| e.into_inner()).push(old);
        }
        entry
    }

    pub(crate) fn len(&self) -> usize {
        self.tenants.len()
    }

    pub(crate) fn for_each(&self, mut f: impl FnMut(&Tenant)) {
        self.tenants.for_each(|e| f(&e.state));
    }

    /// (last seen, tenant) of every tenant.
    pub(crate) fn last_seen(&self) -> Vec<(i64, TenantId)> {
        let mut out = Vec::with_capacity(self.len());
        self.tenants.for_each(|e| out.push((e.state.last_seen(), e.state.id.clone())));
        out
    }

    /// Tenants last confirmed before `before` (declared ones excepted): (tenant, last seen,
    /// its credentials).
    pub(crate) fn stale(&self, before: i64) -> Vec<(TenantId, i64, Creds)> {
        let mut out = Vec::new();
        self.tenants.for_each(|e| {
            if e.state.validated() < before {
                let mut creds: Creds = e.keys.iter().map(|&(d, h)| (d, Some(h))).collect();
                creds.extend(self.identities(&e.state.id).filter(|d| self.maps(*d, &e.state)).map(|d| (d, None)));
                out.push((e.state.id.clone(), e.state.last_seen(), creds));
            }
        });
        out
    }

    /// The state held for `id`.
    pub(crate) fn state(&self, id: &TenantId) -> Option<Tenant> {
        self.tenants.with(id.as_str(), |e| e.state.clone())
    }

    /// Marks `id`, or with `None` every tenant held, as never confirmed by the directory: the
    /// next revalidation reads it again (a tenant declared in the configuration is never
    /// read). Returns how many were marked.
    pub(crate) fn unconfirm(&self, id: Option<&TenantId>) -> usize {
        let mut marked = 0;
        let mut mark = |state: &Tenant| {
            if state.validated() != i64::MAX {
                state.set_validated(0);
                marked += 1;
            }
        };
        match id {
            Some(id) => self.tenants.with(id.as_str(), |e| mark(&e.state)).unwrap_or(()),
            None => self.tenants.for_each(|e| mark(&e.state)),
        }
        marked
    }

    /// How many tenants held are marked never confirmed ([`unconfirm`](Self::unconfirm)) and
    /// were not read again since.
    pub(crate) fn unconfirmed(&self) -> usize {
        let mut n = 0;
        self.tenants.for_each(|e| n += usize::from(e.state.validated() == 0));
        n
    }

    /// Records that the directory confirmed `id` at `now`.
    pub(crate) fn confirmed(&self, id: &TenantId, now: i64) {
        self.tenants.with(id.as_str(), |e| e.state.set_validated(now));
    }

    /// Takes one credential out of the table. Under its tenant's shard, where `attach` and
    /// `replace` map credentials: neither can map it again between its removal from the
    /// credential map and from the tenant's keys (which would leave it mapped, and listed
    /// nowhere an eviction or a revalidation finds it).
    pub(crate) fn forget(&self, digest: Digest) {
        // Marked first, so that a lookup of the credential that read the directory before
        // reads it again (see [`Changes`]).
        self.changes.mark(digest);
        let Some(state) = self.credentials.get(&digest).map(|s| s.value().clone()) else {
            return;
        };
        let held = self.tenants.with_mut(state.id.as_str(), |e| {
            self.credentials.remove(&digest);
            if e.keys.iter().any(|(d, _)| *d == digest) {
                e.keys = e.keys.iter().filter(|(d, _)| *d != digest).copied().collect();
            }
        });
        if held.is_none() {
            // Its tenant is gone from the table: no shard to take. An attach of the tenant
            // meanwhile maps it again and lists it, or lists it unmapped (one more lookup).
            self.credentials.remove(&digest);
        }
    }

    /// Replaces the state of `id` (its plan or customer changed): its credentials reach `make`'s
    /// state from now on; the old one is retired (its usage is kept, its leases go back).
    /// `seen`: where [`changes_seen`](Self::changes_seen) stood when the record was read;
    /// nothing is replaced when the tenant changed since (the record may predate the change).
    pub(crate) fn replace(
        &self,
        id: &TenantId,
        now: i64,
        seen: u64,
        make: impl FnOnce() -> TenantState,
    ) -> Option<Tenant> {
        let old = self.tenants.with_mut(id.as_str(), |e| {
            if self.tenant_changed_since(seen, id) {
                return None;
            }
            // Marked under the shard, before the old state is let go (see [`Changes`]).
            self.tenant_changed(id);
            let new = make();
            if let Some(tat) = e.state.rate_tat() {
                // The same tenant: its bucket carries over to its new state.
                new.restore_rate(tat);
            }
            new.set_validated(now);
            let old = std::mem::replace(&mut e.state, Tenant::new(new));
            // Only what still reaches the old state: a credential forgotten meanwhile stays so.
            for digest in e.keys.iter().map(|(d, _)| *d).chain(self.identities(id)) {
                if let Some(mut mapped) = self.credentials.get_mut(&digest) {
                    if Tenant::ptr_eq(&mapped, &old) {
                        *mapped = e.state.clone();
                    }
                }
            }
            Some(old)
        })??;
        old.mark_evicted();
        self.retired.lock().unwrap_or_else(|e| e.into_inner()).push(old.clone());
        Some(old)
    }

    /// Takes tenants out of the table; returns their states, which are also kept as retired.
    pub(crate) fn evict(&self, ids: impl IntoIterator<Item = TenantId>) -> Vec<Tenant> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(entry) = self.tenants.remove(id.as_str()) {
                let identities = self.identities(&id);
                for digest in entry.keys.iter().map(|(d, _)| *d).chain(identities) {
                    self.credentials.remove_if(&digest, |_, s| Tenant::ptr_eq(s, &entry.state));
                }
                entry.state.mark_evicted();
                if let Some(tat) = entry.state.rate_tat() {
                    self.rates.keep(self.rate_key(&id), tat, entry.state.rate_now());
                }
                out.push(entry.state);
            }
        }
        if !out.is_empty() {
            self.retired.lock().unwrap_or_else(|e| e.into_inner()).extend(out.iter().cloned());
        }
        out
    }

    /// Lets go of the retired states `alone` (no request holds them) once their leases are
    /// back: those in `unreturned` (the store did not take a lease back) stay retired, and the
    /// next flush sends their calls again, at most `cap` of them (`limits.max_tenants`). Past
    /// it, the rest are let go, logged: the store counts their units until it gives back, at
    /// their expiry, what their last call that landed said they keep.
    pub(crate) fn let_go(&self, alone: &[Tenant], unreturned: &[Tenant], cap: usize) {
        if alone.is_empty() {
            return;
        }
        // Only the states kept for their give-back count against the cap (not those retired
        // meanwhile, whose own return may still be under way).
        let over = unreturned.len().saturating_sub(cap);
        let kept: std::collections::HashSet<usize> = unreturned.iter().skip(over).map(Tenant::addr).collect();
        let gone: std::collections::HashSet<usize> =
            alone.iter().map(Tenant::addr).filter(|a| !kept.contains(a)).collect();
        self.retired().retain(|s| !gone.contains(&Tenant::addr(s)));
        if over > 0 {
            tracing::error!(
                tenants = over,
                "retired tenant states whose leases the store did not take back were let go (more than \
                 limits.max_tenants of them): the store counts their units until their reservation's expiry"
            );
        }
    }

    /// Whether the identity `name` reaches the tenant `id`: its own id, or the anonymous
    /// identity the anonymous tenant.
    fn identity_of(name: &str, id: &TenantId) -> bool {
        name == id.as_str() || (name == ANONYMOUS && id.as_str() == ANONYMOUS_TENANT)
    }

    /// The digests of the identities that may reach the tenant `id` ([`identity_of`](Self::identity_of)).
    fn identities(&self, id: &TenantId) -> impl Iterator<Item = Digest> {
        let anonymous = (id.as_str() == ANONYMOUS_TENANT).then(|| self.digest(Lookup::Identity(ANONYMOUS)));
        std::iter::once(self.digest(Lookup::Identity(id.as_str()))).chain(anonymous)
    }

    /// Whether the credential `digest` reaches `state`.
    fn maps(&self, digest: Digest, state: &Tenant) -> bool {
        self.credentials.get(&digest).is_some_and(|s| Tenant::ptr_eq(&s, state))
    }

    /// The key of a tenant's bucket in [`TenantTable::rates`]: its id's digest.
    fn rate_key(&self, id: &TenantId) -> (u64, u64) {
        let d = self.digest(Lookup::Identity(id.as_str()));
        (d.lo, d.hi)
    }

    /// Takes every tenant out of the table (a reload, a snapshot's restore): every lookup
    /// under way reads again ([`Changes`]).
    pub(crate) fn evict_all(&self) -> Vec<Tenant> {
        self.changes.mark_all();
        let mut ids = Vec::with_capacity(self.len());
        self.tenants.for_each(|e| ids.push(e.state.id.clone()));
        self.evict(ids)
    }
}

/// Lookups of credentials the table does not hold, one at a time per credential: concurrent
/// requests with one key cost one directory read, the others waiting for it and then finding
/// the tenant in the table, or the key in the cache of unknown ones. Holds only the
/// credentials being looked up or waited for now: each with its lock and how many hold a turn.
#[derive(Debug, Default)]
pub(crate) struct Flights(Mutex<std::collections::HashMap<(u64, u64), (Turn, usize)>>);

/// The lock of one credential's lookups.
type Turn = std::sync::Arc<tokio::sync::Mutex<()>>;

/// A turn for one credential's lookup: counted in [`Flights`] from before it waits, so that a
/// request dropped while waiting still leaves the map as it found it.
pub(crate) struct Flight<'a> {
    flights: &'a Flights,
    key: (u64, u64),
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Flights {
    /// Waits for the lookups of `key` under way, then holds the turn.
    pub(crate) async fn enter(&self, key: (u64, u64)) -> Flight<'_> {
        let turn = {
            let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = map.entry(key).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        let mut flight = Flight { flights: self, key, lock: None };
        flight.lock = Some(turn.lock_owned().await);
        flight
    }

    /// Credentials with a lookup under way or awaited.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        drop(self.lock.take());
        let mut map = self.flights.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
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

    /// A turn dropped while it waits (its request gone) leaves the map as it found it.
    #[tokio::test]
    async fn flights_hold_only_the_credentials_in_flight() {
        let flights = Flights::default();
        let first = flights.enter((1, 1)).await;
        let mut waiting = Box::pin(flights.enter((1, 1)));
        assert!(futures_poll_once(waiting.as_mut()).await.is_none(), "waits for the first");
        drop(first);
        // Handed the lock, then dropped before it was polled again.
        drop(waiting);
        assert_eq!(flights.len(), 0);
        let again = flights.enter((1, 1)).await;
        assert_eq!(flights.len(), 1);
        drop(again);
        assert_eq!(flights.len(), 0);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    fn table_and_state() -> (TenantTable, impl Fn(&str) -> TenantState) {
        let config = crate::config::Config::from_toml_str("[plans.p]\nrate = \"10/s\"").unwrap();
        let clock = crate::clock::Clock::fake_at_unix(1_700_000_000).0;
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::register());
        let rt = crate::plan::Runtime::compile(config, &metrics, &clock);
        let plan = rt.plans.values().next().unwrap().clone();
        let table = TenantTable::new(16, metrics::Counter::noop());
        (table, move |id: &str| TenantState::new(id.into(), plan.clone(), None))
    }

    /// A tenant's identity is not kept in its entry: it is found from its id wherever the
    /// entry's credentials are (revalidation, a replacement, an eviction), as its keys are.
    #[test]
    fn a_tenants_identity_is_found_from_its_id_as_its_keys_are_kept() {
        let (table, make) = table_and_state();
        let t1 = TenantId::from("t1");
        let hash = KeyHash::of(b"key-1");
        let by_key = table.attach(Lookup::ApiKey(b"key-1"), Some(hash), &t1, 5, || make("t1"));
        let by_id = table.attach(Lookup::Identity("t1"), None, &t1, 5, || make("t1"));
        assert!(Tenant::ptr_eq(&by_key, &by_id));
        assert_eq!(table.tenants.with("t1", |e| e.keys.len()), Some(1), "the key kept, not the identity");
        let (key, identity) = (table.digest(Lookup::ApiKey(b"key-1")), table.digest(Lookup::Identity("t1")));
        let stale = table.stale(i64::MAX);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].2, vec![(key, Some(hash)), (identity, None)], "revalidated by key and by id");

        let old = table.replace(&t1, 6, table.changes_seen(), || make("t1")).expect("held");
        assert!(Tenant::ptr_eq(&old, &by_key));
        let new = table.state(&t1).unwrap();
        assert!(!Tenant::ptr_eq(&new, &old));
        for lookup in [Lookup::ApiKey(b"key-1"), Lookup::Identity("t1")] {
            assert!(Tenant::ptr_eq(&table.get(lookup).unwrap(), &new), "{lookup:?} reaches the new state");
        }

        table.forget(key);
        assert!(table.get(Lookup::ApiKey(b"key-1")).is_none());
        assert_eq!(table.stale(i64::MAX)[0].2, vec![(identity, None)]);
        table.forget(identity);
        assert!(table.stale(i64::MAX)[0].2.is_empty(), "an identity forgotten is not revalidated");
        table.attach(Lookup::Identity("t1"), None, &t1, 5, || make("t1"));
        assert_eq!(table.tenants.with("t1", |e| e.keys.len()), Some(0), "reached by its identity alone");

        assert_eq!(table.evict([t1.clone()]).len(), 1);
        assert!(table.get(Lookup::Identity("t1")).is_none(), "an eviction takes the identity out");
        assert_eq!(table.len(), 0);
    }

    /// New secrets let every tenant go first: each credential, an identity's too, is found
    /// and taken out with the secrets that digested it.
    #[test]
    fn reseeding_takes_every_credential_out() {
        let (table, make) = table_and_state();
        let (t1, t2) = (TenantId::from("t1"), TenantId::from("t2"));
        table.attach(Lookup::ApiKey(b"key-1"), Some(KeyHash::of(b"key-1")), &t1, 5, || make("t1"));
        table.attach(Lookup::Identity("t2"), None, &t2, 5, || make("t2"));
        assert_eq!(table.credentials.len(), 2);
        assert_eq!(table.reseed().len(), 2);
        assert_eq!((table.len(), table.credentials.len()), (0, 0), "no credential left on a state let go");
    }

    /// The anonymous tenant is reached by the anonymous identity, found from its id too; an
    /// identity that is not the tenant's own reaches it for this request only.
    #[test]
    fn the_anonymous_identity_and_a_foreign_one() {
        let (table, make) = table_and_state();
        let anonymous = TenantId::from(ANONYMOUS_TENANT);
        table.attach(Lookup::Identity(ANONYMOUS), None, &anonymous, i64::MAX, || make(ANONYMOUS_TENANT));
        assert!(table.get(Lookup::Identity(ANONYMOUS)).is_some());
        assert!(table.stale(i64::MAX).is_empty(), "declared: never revalidated");
        let old = table.replace(&anonymous, 7, table.changes_seen(), || make(ANONYMOUS_TENANT)).unwrap();
        assert!(!Tenant::ptr_eq(&table.get(Lookup::Identity(ANONYMOUS)).unwrap(), &old));
        table.evict([anonymous]);
        assert!(table.get(Lookup::Identity(ANONYMOUS)).is_none());

        let t2 = TenantId::from("t2");
        let state = table.attach(Lookup::Identity("other"), None, &t2, 5, || make("t2"));
        assert!(Tenant::ptr_eq(&state, &table.state(&t2).unwrap()), "held, so its usage is flushed");
        assert!(table.get(Lookup::Identity("other")).is_none(), "not mapped: nothing could take it out");
    }

    #[test]
    fn a_credential_entry_and_a_tenant_entry_take_24_bytes() {
        assert_eq!(size_of::<(Digest, Tenant)>(), 24);
        assert_eq!(size_of::<Entry>(), 24, "the id is the state's");
        assert_eq!(size_of::<(Digest, KeyHash)>(), 48, "a key kept for revalidation");
    }
}
