//! `Idempotency-Key`: the same key from the same tenant is charged once within a window.

use std::time::Duration;

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

/// A bounded, expiring set of (tenant, key) pairs already charged.
#[derive(Clone)]
pub(crate) struct Idempotency {
    seen: moka::sync::Cache<u128, ()>,
    fp: Fingerprinter,
}

/// A claim on a (tenant, key) pair, given back when the request is not billed.
pub(crate) struct Claim {
    set: Idempotency,
    key: u128,
}

impl Claim {
    pub(crate) fn release(self) {
        self.set.seen.invalidate(&self.key);
    }
}

impl Idempotency {
    pub(crate) fn new(window: Duration, capacity: u64, fp: Fingerprinter) -> Self {
        let seen = moka::sync::Cache::builder().max_capacity(capacity).time_to_live(window).build();
        Self { seen, fp }
    }

    /// Claims `key` for `tenant`: `Some` when this is the first request with it (charge it),
    /// `None` for a replay.
    pub(crate) fn claim(&self, tenant: &TenantId, key: &[u8]) -> Option<Claim> {
        let mut material = Vec::with_capacity(tenant.as_str().len() + 1 + key.len());
        material.extend_from_slice(tenant.as_str().as_bytes());
        material.push(0);
        material.extend_from_slice(key);
        let f = self.fp.of(TAG_IDEMPOTENCY, &material);
        let id = (u128::from(f.hi) << 64) | u128::from(f.lo);
        let entry = self.seen.entry(id).or_insert(());
        entry.is_fresh().then(|| Claim { set: self.clone(), key: id })
    }
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("entries", &self.seen.entry_count()).finish()
    }
}
