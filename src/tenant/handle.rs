//! [`Tenant`]: a counted reference to a tenant's state whose count sits on the state's first
//! cache line.
//!
//! `std::sync::Arc` puts its counts before the value; with a cache-aligned value they get a
//! line of their own, so every request touched two lines of its tenant (the count, taken and
//! given back per request, and the state) where tower_governor touches one. This handle is
//! `Arc` without weak references, its count a field of [`TenantState`] on the line the request
//! writes anyway. It is the crate's only `unsafe` code; its orderings are those of `std`'s
//! `Arc`.
//!
//! The handle is generic over what it counts ([`Counted`]) and over the counter
//! ([`RefCounter`]), so that the reference count is model-checked with loom: `scripts/test.sh`
//! runs this file's loom tests with `--cfg tollgate_loom` (a cfg of its own: `--cfg loom` would
//! reach tokio, whose runtimes panic under loom), in a target directory of their own.
#![allow(unsafe_code)]

use std::{fmt, ops::Deref, ptr::NonNull, sync::atomic::Ordering};

use super::TenantState;

/// An atomic reference counter: `std`'s `AtomicU32` (loom's in the loom tests).
pub(crate) trait RefCounter {
    fn load(&self, order: Ordering) -> u32;
    fn fetch_add(&self, n: u32, order: Ordering) -> u32;
    fn fetch_sub(&self, n: u32, order: Ordering) -> u32;
    /// An acquire fence of the same memory model as the counter.
    fn acquire_fence();
}

impl RefCounter for std::sync::atomic::AtomicU32 {
    #[inline]
    fn load(&self, order: Ordering) -> u32 {
        self.load(order)
    }

    #[inline]
    fn fetch_add(&self, n: u32, order: Ordering) -> u32 {
        self.fetch_add(n, order)
    }

    #[inline]
    fn fetch_sub(&self, n: u32, order: Ordering) -> u32 {
        self.fetch_sub(n, order)
    }

    #[inline]
    fn acquire_fence() {
        std::sync::atomic::fence(Ordering::Acquire);
    }
}

/// A value that carries its own reference count (a new one holds 1: its first handle).
pub(crate) trait Counted: Send + Sync {
    /// The counter.
    type Count: RefCounter;

    /// The value's reference count.
    fn refs(&self) -> &Self::Count;
}

impl Counted for TenantState {
    type Count = std::sync::atomic::AtomicU32;

    #[inline]
    fn refs(&self) -> &Self::Count {
        &self.refs
    }
}

/// The most handles of one state; more aborts (as `Arc` does past `isize::MAX`), since a
/// wrapped count would free the state while in use. Far above any number of requests in flight.
const MAX_REFS: u32 = i32::MAX as u32;

/// A shared, counted reference to a [`TenantState`].
pub(crate) type Tenant = Handle<TenantState>;

/// A shared, counted reference to a value that carries its count.
pub(crate) struct Handle<T: Counted> {
    ptr: NonNull<T>,
    /// The handle owns a `T` (for the drop check), as `Arc` does.
    _owns: std::marker::PhantomData<T>,
}

// SAFETY: a `Handle` gives `&T` to whichever thread holds it, and the last one frees the value
// on its own thread: sound because `T: Counted` is `Send + Sync`.
unsafe impl<T: Counted> Send for Handle<T> {}
// SAFETY: as above; `&Handle` only gives `&T`.
unsafe impl<T: Counted> Sync for Handle<T> {}

impl<T: Counted> Handle<T> {
    /// Moves `value` to the heap with one reference: this handle.
    pub(crate) fn new(value: T) -> Self {
        debug_assert_eq!(value.refs().load(Ordering::Relaxed), 1, "a new value has one reference");
        Self { ptr: NonNull::from(Box::leak(Box::new(value))), _owns: std::marker::PhantomData }
    }

    /// How many handles there are (a snapshot: others may come and go).
    pub(crate) fn count(this: &Self) -> u32 {
        this.refs().load(Ordering::Acquire)
    }

    /// Whether the two handles reach the same state.
    pub(crate) fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }

    /// The address of the state it reaches: one per state, for sets of them.
    pub(crate) fn addr(this: &Self) -> usize {
        this.ptr.as_ptr() as usize
    }
}

impl<T: Counted> Deref for Handle<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: `ptr` comes from `Box::leak` in `new` and is freed only when the count drops
        // to zero, which cannot happen while `self` holds one of the references.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: Counted> Clone for Handle<T> {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed, as in `Arc::clone`: a reference is made from one already held, so the state
        // cannot be freed meanwhile and nothing needs to be ordered.
        let old = self.refs().fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            std::process::abort();
        }
        Self { ptr: self.ptr, _owns: std::marker::PhantomData }
    }
}

impl<T: Counted> Drop for Handle<T> {
    #[inline]
    fn drop(&mut self) {
        // Release, then Acquire before freeing, as in `Arc::drop`: every use of the state
        // through other handles happens before it is freed.
        if self.refs().fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // SAFETY: this drop made the last decrement.
        unsafe { self.free() };
    }
}

impl<T: Counted> Handle<T> {
    /// Frees the state, once its last handle is dropped: out of line, so that a handle's
    /// drop (on every request) stays a decrement and a compare wherever it is inlined,
    /// whatever the state's drop takes.
    ///
    /// # Safety
    ///
    /// Only from [`Drop::drop`], after its decrement found this the last reference; `self` is
    /// not used after.
    #[cold]
    #[inline(never)]
    unsafe fn free(&mut self) {
        T::Count::acquire_fence();
        // SAFETY: this was the last reference: nobody else can reach the state, and `ptr`
        // comes from `Box::leak` in `new`.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

impl<T: Counted + fmt::Debug> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A tenant is its own rate-limiter key (see [`TenantCells`](super::TenantCells)): two handles
/// are the same key when they reach the same state.
impl<T: Counted> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        Handle::ptr_eq(self, other)
    }
}

impl<T: Counted> Eq for Handle<T> {}

impl<T: Counted> std::hash::Hash for Handle<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ptr.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{clock::Clock, config::Config, metrics::Metrics, plan::Runtime};

    fn state() -> (TenantState, Arc<crate::plan::CompiledPlan>) {
        let config = Config::from_toml_str("[plans.p]\nrate = \"10/s\"").unwrap();
        let clock = Clock::fake_at_unix(1_700_000_000).0;
        let rt = Runtime::compile(config, &Arc::new(Metrics::register()), &clock);
        let plan = rt.plans.values().next().unwrap().clone();
        (TenantState::new("t".into(), plan.clone(), None), plan)
    }

    #[test]
    fn the_last_handle_frees_the_state_once() {
        let (state, plan) = state();
        let before = Arc::strong_count(&plan);
        let a = Tenant::new(state);
        let b = a.clone();
        assert!(Tenant::ptr_eq(&a, &b) && a == b);
        assert_eq!(Tenant::count(&a), 2);
        drop(a);
        assert_eq!(Tenant::count(&b), 1);
        assert_eq!(Arc::strong_count(&plan), before, "the state is alive");
        drop(b);
        assert_eq!(Arc::strong_count(&plan), before - 1, "the state (and its plan reference) is gone");
    }

    #[test]
    fn handles_cross_threads() {
        let (state, plan) = state();
        let before = Arc::strong_count(&plan);
        let t = Tenant::new(state);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let t = t.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        let c = t.clone();
                        c.touch(1_700_000_001);
                    }
                });
            }
        });
        assert_eq!(Tenant::count(&t), 1);
        drop(t);
        assert_eq!(Arc::strong_count(&plan), before - 1);
    }
}

/// The reference count under loom's model checker: every interleaving of two threads cloning
/// and dropping handles frees the value exactly once, after every use through any handle.
#[cfg(all(test, tollgate_loom))]
mod loom_tests {
    use loom::{
        cell::UnsafeCell,
        sync::{
            atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst},
            Arc,
        },
    };

    use super::{Counted, Handle, Ordering, RefCounter};

    impl RefCounter for AtomicU32 {
        fn load(&self, order: Ordering) -> u32 {
            self.load(order)
        }

        fn fetch_add(&self, n: u32, order: Ordering) -> u32 {
            self.fetch_add(n, order)
        }

        fn fetch_sub(&self, n: u32, order: Ordering) -> u32 {
            self.fetch_sub(n, order)
        }

        fn acquire_fence() {
            loom::sync::atomic::fence(Ordering::Acquire);
        }
    }

    /// A counted value that records being freed, with data written through shared handles.
    struct Probe {
        refs: AtomicU32,
        data: UnsafeCell<u64>,
        freed: Arc<AtomicUsize>,
    }

    // SAFETY: `data` is written by one thread at a time in these tests; loom checks every
    // access against the others (a data race is a test failure).
    unsafe impl Sync for Probe {}

    impl Counted for Probe {
        type Count = AtomicU32;

        fn refs(&self) -> &AtomicU32 {
            &self.refs
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            // Reads what the last writer wrote: a race unless the write happens before the
            // free (the Release decrement and the Acquire fence).
            self.data.with(|d| assert!(unsafe { *d } <= 2));
            self.freed.fetch_add(1, SeqCst);
        }
    }

    fn probe(freed: &Arc<AtomicUsize>) -> Probe {
        Probe { refs: AtomicU32::new(1), data: UnsafeCell::new(0), freed: freed.clone() }
    }

    #[test]
    fn the_last_of_two_threads_frees_once() {
        loom::model(|| {
            let freed = Arc::new(AtomicUsize::new(0));
            let a = Handle::new(probe(&freed));
            let b = a.clone();
            let t = loom::thread::spawn(move || {
                let c = b.clone();
                drop(b);
                assert!(Handle::count(&c) >= 1);
                drop(c);
            });
            drop(a);
            t.join().unwrap();
            assert_eq!(freed.load(SeqCst), 1);
        });
    }

    #[test]
    fn a_write_through_one_handle_happens_before_the_free() {
        loom::model(|| {
            let freed = Arc::new(AtomicUsize::new(0));
            let a = Handle::new(probe(&freed));
            let b = a.clone();
            let t = loom::thread::spawn(move || {
                // SAFETY: the only writer while `a`'s thread does not touch `data`.
                b.data.with_mut(|d| unsafe { *d = 2 });
                drop(b);
            });
            drop(a);
            t.join().unwrap();
            assert_eq!(freed.load(SeqCst), 1);
        });
    }
}
