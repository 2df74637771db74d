//! The GCRA cell of a tenant's own rate ([`GcraCell`]: governor's theoretical arrival time,
//! which can also give cells back) and [`TenantCells`], governor's keyed state store over
//! these cells: one rate limiter per plan serves every tenant of the plan, each keyed by its
//! own cell.

use std::sync::atomic::{AtomicU64, Ordering};

use governor::{nanos::Nanos, state::StateStore};

/// A tenant's GCRA state (governor's theoretical arrival time, in nanoseconds from the plan
/// limiter's start; 0: none yet), updated as governor's own in-memory state is, and also able
/// to give cells back.
#[derive(Default)]
pub(crate) struct GcraCell(AtomicU64);

impl GcraCell {
    /// The theoretical arrival time (0: none yet).
    pub(crate) fn tat(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Sets the theoretical arrival time (another state's bucket carried over).
    pub(crate) fn set_tat(&self, tat: u64) {
        self.0.store(tat, Ordering::Release);
    }

    #[inline]
    pub(crate) fn measure_and_replace<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        let mut decision = f(std::num::NonZeroU64::new(prev).map(|n| n.get().into()));
        while let Ok((result, next)) = decision {
            match self.0.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
            decision = f(std::num::NonZeroU64::new(prev).map(|n| n.get().into()));
        }
        decision.map(|(result, _)| result)
    }
}

impl GcraCell {
    /// Gives back `nanos` of the bucket (the cells of a request refused for another reason
    /// after its rate check). A conforming check moved the arrival time to
    /// `max(tat, now) + n·T`, so taking `n·T` off never leaves it below where it was.
    pub(crate) fn give_back(&self, nanos: u64) {
        let mut prev = self.0.load(Ordering::Acquire);
        while prev > 0 {
            let next = prev.saturating_sub(nanos).max(1);
            match self.0.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => prev = now,
            }
        }
    }
}

/// governor's keyed state store over the GCRA cells that live in the tenants' states: one
/// rate limiter per plan (its parameters, its clock) serves every tenant of the plan, and a
/// tenant's rate state costs 8 bytes on the line the request touches anyway. A tenant's key is
/// its cell itself: the limiter hands it back to this store, which never hashes it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TenantCells;

impl StateStore for TenantCells {
    type Key = GcraCell;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        key.measure_and_replace(f)
    }
}

// governor's keyed limiters ask their key to be `Hash + Eq + Clone` (for its own maps); a
// cell is its own key, found without a map, so these only satisfy the bounds: a cell equals
// itself alone, hashes to nothing, and a clone is a new cell at the same arrival time.
impl std::hash::Hash for GcraCell {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl PartialEq for GcraCell {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for GcraCell {}

impl Clone for GcraCell {
    fn clone(&self) -> Self {
        Self(AtomicU64::new(self.0.load(Ordering::Acquire)))
    }
}
