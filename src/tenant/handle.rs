//! [`Tenant`]: a counted reference to a tenant's state whose count sits on the state's first
//! cache line.
//!
//! `std::sync::Arc` puts its counts before the value; with a cache-aligned value they get a
//! line of their own, so every request touched two lines of its tenant (the count, taken and
//! given back per request, and the state) where tower_governor touches one. This handle is
//! `Arc` without weak references, its count a field of [`TenantState`] on the line the request
//! writes anyway. It is the crate's only `unsafe` code; its orderings are those of `std`'s
//! `Arc`.
#![allow(unsafe_code)]

use std::{
    fmt,
    ops::Deref,
    ptr::NonNull,
    sync::atomic::{fence, Ordering},
};

use super::TenantState;

/// The most handles of one state; more aborts (as `Arc` does past `isize::MAX`), since a
/// wrapped count would free the state while in use. Far above any number of requests in flight.
const MAX_REFS: u32 = i32::MAX as u32;

/// A shared, counted reference to a [`TenantState`].
pub(crate) struct Tenant {
    ptr: NonNull<TenantState>,
}

// SAFETY: a `Tenant` gives `&TenantState` to whichever thread holds it, and the last one frees
// the state on its own thread: sound because `TenantState` is `Send + Sync` (checked below).
unsafe impl Send for Tenant {}
// SAFETY: as above; `&Tenant` only gives `&TenantState`.
unsafe impl Sync for Tenant {}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<TenantState>();
};

impl Tenant {
    /// Moves `state` to the heap with one reference: this handle.
    pub(crate) fn new(state: TenantState) -> Self {
        debug_assert_eq!(state.refs.load(Ordering::Relaxed), 1, "a new state has one reference");
        Self { ptr: NonNull::from(Box::leak(Box::new(state))) }
    }

    /// How many handles there are (a snapshot: others may come and go).
    pub(crate) fn count(this: &Self) -> u32 {
        this.refs.load(Ordering::Acquire)
    }

    /// Whether the two handles reach the same state.
    pub(crate) fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }
}

impl Deref for Tenant {
    type Target = TenantState;

    #[inline]
    fn deref(&self) -> &TenantState {
        // SAFETY: `ptr` comes from `Box::leak` in `new` and is freed only when the count drops
        // to zero, which cannot happen while `self` holds one of the references.
        unsafe { self.ptr.as_ref() }
    }
}

impl Clone for Tenant {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed, as in `Arc::clone`: a reference is made from one already held, so the state
        // cannot be freed meanwhile and nothing needs to be ordered.
        let old = self.refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            std::process::abort();
        }
        Self { ptr: self.ptr }
    }
}

impl Drop for Tenant {
    #[inline]
    fn drop(&mut self) {
        // Release, then Acquire before freeing, as in `Arc::drop`: every use of the state
        // through other handles happens before it is freed.
        if self.refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        // SAFETY: this was the last reference: nobody else can reach the state, and `ptr`
        // comes from `Box::leak` in `new`.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A tenant is its own rate-limiter key (see [`TenantCells`](super::TenantCells)): two handles
/// are the same key when they reach the same state.
impl PartialEq for Tenant {
    fn eq(&self, other: &Self) -> bool {
        Tenant::ptr_eq(self, other)
    }
}

impl Eq for Tenant {}

impl std::hash::Hash for Tenant {
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
        (TenantState::new("t".into(), plan.clone(), None, clock), plan)
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
