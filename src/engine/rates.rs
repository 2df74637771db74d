//! The rate state of tenants whose state the table let go (evicted, idle, revalidated,
//! replaced by a reload) while their bucket was not yet full again: a tenant coming back
//! finds its bucket as it left it, not a new full one.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
};

/// A tenant's bucket as it was let go: the key is the digest of its id, the value its
/// theoretical arrival time (GCRA) on the engine clock's monotonic nanoseconds. Buckets full
/// again (their time passed) are worth nothing and go first.
///
/// Bounded: at most `cap` buckets (`limits.max_tenants`). When full, the bucket closest to full
/// (the earliest arrival time) is dropped, and counted: that tenant would find a full bucket.
pub(crate) struct RateMemory {
    inner: Mutex<Inner>,
    cap: AtomicUsize,
    dropped: AtomicU64,
    dropped_metric: metrics::Counter,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<(u64, u64), u64, foldhash::fast::RandomState>,
    /// (arrival time, key), to find the bucket closest to full.
    by_time: BTreeSet<(u64, (u64, u64))>,
}

impl RateMemory {
    pub(crate) fn new(cap: usize, dropped_metric: metrics::Counter) -> Self {
        Self { inner: Mutex::default(), cap: AtomicUsize::new(cap), dropped: AtomicU64::new(0), dropped_metric }
    }

    /// Keeps at most `cap` buckets from now on (a reload changed `limits.max_tenants`).
    pub(crate) fn set_cap(&self, cap: usize) {
        self.cap.store(cap.max(1), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the bucket of `key` let go with arrival time `tat`, unless it is full again at
    /// `now`.
    pub(crate) fn keep(&self, key: (u64, u64), tat: u64, now: u64) {
        if tat <= now {
            return;
        }
        let cap = self.cap.load(Ordering::Relaxed).max(1);
        let mut inner = self.lock();
        if let Some(old) = inner.by_key.remove(&key) {
            inner.by_time.remove(&(old, key));
        }
        while inner.by_key.len() >= cap {
            let Some(&(oldest, oldest_key)) = inner.by_time.first() else { break };
            if oldest > now && oldest >= tat {
                // Every bucket held is further from full than this one: this one goes.
                drop(inner);
                self.count_drop();
                return;
            }
            inner.by_time.pop_first();
            inner.by_key.remove(&oldest_key);
            if oldest > now {
                self.count_drop();
            }
        }
        inner.by_key.insert(key, tat);
        inner.by_time.insert((tat, key));
    }

    /// The bucket of `key`, taken out, if one was kept and is not full again at `now`.
    pub(crate) fn take(&self, key: (u64, u64), now: u64) -> Option<u64> {
        let mut inner = self.lock();
        if inner.by_key.is_empty() {
            return None;
        }
        let tat = inner.by_key.remove(&key)?;
        inner.by_time.remove(&(tat, key));
        (tat > now).then_some(tat)
    }

    /// Buckets dropped while not yet full (the memory at its cap).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Buckets held.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    fn count_drop(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_metric.increment(1);
    }
}

impl std::fmt::Debug for RateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateMemory").field("held", &self.len()).field("dropped", &self.dropped()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_closest_to_full_goes_first_and_is_counted() {
        let m = RateMemory::new(2, metrics::Counter::noop());
        m.keep((1, 0), 50, 100);
        assert_eq!(m.len(), 0, "full again: not kept");
        m.keep((1, 0), 300, 100);
        m.keep((2, 0), 200, 100);
        m.keep((3, 0), 150, 100);
        assert_eq!((m.len(), m.dropped()), (2, 1), "the newcomer was the closest to full");
        m.keep((3, 0), 400, 100);
        assert_eq!((m.len(), m.dropped()), (2, 2), "(2, 0) at 200 went");
        assert_eq!(m.take((2, 0), 100), None);
        assert_eq!(m.take((1, 0), 100), Some(300));
        assert_eq!(m.take((1, 0), 100), None, "taken once");
        // A bucket full again by the time it is asked for is worth nothing.
        assert_eq!(m.take((3, 0), 400), None);
        // Buckets full again make room without a drop.
        m.keep((4, 0), 500, 100);
        m.keep((5, 0), 600, 100);
        m.keep((6, 0), 900, 550);
        assert_eq!((m.len(), m.dropped()), (2, 2), "(4, 0) was full again at 550");
    }
}
