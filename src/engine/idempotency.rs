//! `Idempotency-Key` (IETF httpapi draft): a key is bound to the tenant and to the request it
//! first came with (method and concrete path, query included; bodies are not compared). While
//! that request is in flight the key answers 409; reused on another request, 422; after it
//! completed, a replay is admitted but never charged or billed again.

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    config::TenantId,
    tenant::{Fingerprinter, TAG_IDEMPOTENCY},
};

/// The longest `Idempotency-Key` accepted, in bytes.
const MAX_LEN: usize = 255;

pub(crate) fn check_key(key: &[u8]) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_LEN {
        return Err("the Idempotency-Key must be 1 to 255 characters long");
    }
    if !key.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err("the Idempotency-Key has characters other than printable ASCII");
    }
    Ok(())
}

const IN_FLIGHT: u8 = 0;
const DONE: u8 = 1;

/// One key: the request it is bound to, and whether that request is done.
struct Entry {
    request: u128,
    state: AtomicU8,
}

/// A bounded, expiring map of (tenant, key) to the request each key is bound to. Least
/// recently used keys go first when it is full.
#[derive(Clone)]
pub(crate) struct Idempotency {
    seen: moka::sync::Cache<u128, Arc<Entry>>,
    fp: Fingerprinter,
}

/// What a key says about a request.
pub(crate) enum Verdict {
    /// The first request with this key: charge it; the claim settles the key.
    First(Claim),
    /// The request the key is bound to completed: a replay (not charged).
    Replay,
    /// The request the key is bound to is still in flight: 409.
    InFlight,
    /// The key is bound to another request (method or path): 422.
    Mismatch,
}

/// The first request's hold on a key. Dropped without [`done`](Self::done) (the request was
/// not billed, refused, or dropped while it waited), it releases the key, so a retry is
/// charged.
pub(crate) struct Claim {
    set: Idempotency,
    key: u128,
    entry: Arc<Entry>,
    done: bool,
}

impl Claim {
    /// The request completed and was billed: later requests with the key are replays.
    pub(crate) fn done(mut self) {
        self.entry.state.store(DONE, Ordering::Release);
        self.done = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            let entry = self.entry.clone();
            // Only this claim's entry: a later request may have bound the key anew.
            self.set.seen.entry(self.key).and_compute_with(|e| match e {
                Some(e) if Arc::ptr_eq(e.value(), &entry) => moka::ops::compute::Op::Remove,
                _ => moka::ops::compute::Op::Nop,
            });
        }
    }
}

impl Idempotency {
    pub(crate) fn new(window: Duration, capacity: u64, fp: Fingerprinter) -> Self {
        let seen = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(window)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self { seen, fp }
    }

    fn digest(&self, parts: &[&[u8]]) -> u128 {
        let mut material = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for p in parts {
            material.extend_from_slice(&(p.len() as u64).to_le_bytes());
            material.extend_from_slice(p);
        }
        let f = self.fp.of(TAG_IDEMPOTENCY, &material);
        (u128::from(f.hi) << 64) | u128::from(f.lo)
    }

    /// The digest of a request a key can be bound to: method and concrete path, query
    /// included.
    pub(crate) fn request(&self, method: &str, path: &str, query: Option<&str>) -> u128 {
        let has_query = [u8::from(query.is_some())];
        self.digest(&[method.as_bytes(), path.as_bytes(), query.unwrap_or("").as_bytes(), &has_query])
    }

    /// What `key` of `tenant` says about the request with digest `request`.
    pub(crate) fn check(&self, tenant: &TenantId, key: &[u8], request: u128) -> Verdict {
        let id = self.digest(&[tenant.as_str().as_bytes(), key]);
        let fresh = Arc::new(Entry { request, state: AtomicU8::new(IN_FLIGHT) });
        let entry = self.seen.entry(id).or_insert_with(|| fresh.clone());
        if entry.is_fresh() && Arc::ptr_eq(entry.value(), &fresh) {
            return Verdict::First(Claim { set: self.clone(), key: id, entry: fresh, done: false });
        }
        let existing = entry.into_value();
        if existing.request != request {
            Verdict::Mismatch
        } else if existing.state.load(Ordering::Acquire) == DONE {
            Verdict::Replay
        } else {
            Verdict::InFlight
        }
    }
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("entries", &self.seen.entry_count()).finish()
    }
}
