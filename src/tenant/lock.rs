//! `CallLock`: the lock that serializes a quota cell's store calls, in one byte.
//!
//! Every quota of every resident tenant holds one, and it is taken only off the request's
//! fast path (refills, returns, reports, a request that finds its lease short while a refill
//! is under way). A `tokio::sync::Mutex<()>` costs 40 bytes there; this lock is one
//! `AtomicU8`, placed in the padding of the cell's flags. Its waiters park as `parking_lot`'s
//! do, on a table shared by every lock: one of [`PARKING`] `Notify`s chosen by the lock's
//! address. A release wakes that `Notify`'s waiters only if one said it waits, and each woken
//! waiter tries again (waiters of another lock on the same `Notify` go back to sleep).
//!
//! It is not fair: a caller that arrives as the lock is released may take it before a woken
//! waiter. The cell's callers do not need turns (each call tells the store everything the
//! cell owes, whoever makes it); a fleet rate's lease, whose waiters weigh the time they have
//! left in turn, keeps tokio's fair mutex. [`Turn`] is what both give the store-call wrapper.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

/// The lock is held.
const HELD: u8 = 1;
/// A waiter is parked, or about to park, on the lock's `Notify`: the release wakes it.
const WAITING: u8 = 2;

/// How many `Notify`s the waiters of every lock share.
const PARKING: usize = 64;

/// Where waiters park, chosen by a lock's address.
static PARKED: [Notify; PARKING] = [const { Notify::const_new() }; PARKING];

/// A one-byte asynchronous lock (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct CallLock {
    state: AtomicU8,
}

/// The lock held; released when dropped.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub(crate) struct CallGuard<'a> {
    lock: &'a CallLock,
}

impl CallLock {
    /// The lock, taken if nobody holds it.
    pub(crate) fn try_lock(&self) -> Option<CallGuard<'_>> {
        // Setting a bit already set changes nothing: whoever held it still does. (A guard
        // made eagerly would release it when dropped unused.)
        (self.state.fetch_or(HELD, Ordering::Acquire) & HELD == 0).then(|| CallGuard { lock: self })
    }

    /// The lock, waited for. Cancel-safe: a waiter dropped before its turn takes nothing and
    /// leaves the others woken as they would have been. Each call spends a unit of the task's
    /// cooperative budget, as tokio's own locks do.
    pub(crate) async fn lock(&self) -> CallGuard<'_> {
        tokio::task::coop::consume_budget().await;
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            let notified = self.parking().notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before saying it waits: a release after that says so wakes it.
            notified.as_mut().enable();
            let mut seen = self.state.load(Ordering::Acquire);
            let parked = loop {
                if seen & HELD == 0 {
                    // Released meanwhile: try again without parking.
                    break false;
                }
                match self.state.compare_exchange_weak(seen, seen | WAITING, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break true,
                    Err(now) => seen = now,
                }
            };
            if parked {
                notified.await;
            }
        }
    }

    /// The `Notify` this lock's waiters park on.
    fn parking(&self) -> &'static Notify {
        // A lock is one byte: neighbouring cells' locks are apart by their cells' size, so
        // the low bits of the address spread them.
        let at = std::ptr::from_ref(self) as usize;
        &PARKED[(at ^ (at >> 6) ^ (at >> 12)) % PARKING]
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        // AcqRel: a waiter's registration, made before its WAITING bit, is seen by the wake.
        if self.lock.state.swap(0, Ordering::AcqRel) & WAITING != 0 {
            self.lock.parking().notify_waiters();
        }
    }
}

/// A lock the store-call wrapper (`StoreCalls::under_lock`) takes before a cell's
/// calls: a quota cell's [`CallLock`], or a fleet rate lease's fair tokio mutex.
pub(crate) trait Turn {
    /// The lock, held.
    type Guard<'a>
    where
        Self: 'a;
    /// The lock if nobody holds it.
    fn try_turn(&self) -> Option<Self::Guard<'_>>;
    /// The lock, waited for.
    fn turn(&self) -> impl Future<Output = Self::Guard<'_>> + Send;
}

impl Turn for CallLock {
    type Guard<'a> = CallGuard<'a>;

    fn try_turn(&self) -> Option<CallGuard<'_>> {
        self.try_lock()
    }

    fn turn(&self) -> impl Future<Output = CallGuard<'_>> + Send {
        self.lock()
    }
}

impl Turn for tokio::sync::Mutex<()> {
    type Guard<'a> = tokio::sync::MutexGuard<'a, ()>;

    fn try_turn(&self) -> Option<Self::Guard<'_>> {
        self.try_lock().ok()
    }

    fn turn(&self) -> impl Future<Output = Self::Guard<'_>> + Send {
        self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    /// A lost wake-up would hang a test: it fails after this instead (they take microseconds).
    const HANG: Duration = Duration::from_secs(60);

    #[test]
    fn the_lock_is_one_byte() {
        assert_eq!(std::mem::size_of::<CallLock>(), 1);
    }

    #[test]
    fn try_lock_is_refused_while_held_and_taken_after() {
        let lock = CallLock::default();
        let guard = lock.try_lock().expect("free");
        assert!(lock.try_lock().is_none(), "held");
        drop(guard);
        assert!(lock.try_lock().is_some(), "released");
    }

    /// Waits until `lock` says a waiter is parked on it.
    async fn until_parked(lock: &CallLock) {
        while lock.state.load(Ordering::Acquire) & WAITING == 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_parked_waiter_is_woken_by_the_release() {
        let lock = Arc::new(CallLock::default());
        let guard = lock.try_lock().expect("free");
        let waiter = tokio::spawn({
            let lock = lock.clone();
            async move {
                let _g = lock.lock().await;
            }
        });
        tokio::time::timeout(HANG, until_parked(&lock)).await.expect("the waiter parks");
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(HANG, waiter).await.expect("woken").expect("no panic");
        assert!(lock.try_lock().is_some(), "the waiter released it");
    }

    /// Polls `fut` once: `true` when it is pending (a waiter on the lock is then registered).
    async fn pending<F: Future>(fut: std::pin::Pin<&mut F>) -> bool {
        let mut fut = fut;
        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_leaves_the_next_one_woken() {
        let lock = CallLock::default();
        let guard = lock.try_lock().expect("free");
        {
            // Parks, then gives up (dropped, as a timeout drops it).
            let first = std::pin::pin!(lock.lock());
            assert!(pending(first).await, "held: the first waiter parks");
        }
        let mut second = std::pin::pin!(lock.lock());
        assert!(pending(second.as_mut()).await, "held: the second waiter parks");
        drop(guard);
        let _g = tokio::time::timeout(HANG, second).await.expect("the second waiter is woken");
        assert!(lock.try_lock().is_none(), "the second waiter holds it");
    }

    #[test]
    fn many_tasks_on_two_threads_over_locks_that_share_their_parking_hold_each_lock_alone() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        rt.block_on(async {
            // Locks in one array: 8 neighbouring bytes, so several share a `Notify`.
            let locks: Arc<[CallLock; 8]> = Arc::new(Default::default());
            let inside: Arc<[AtomicUsize; 8]> = Arc::new(Default::default());
            let tasks: Vec<_> = (0..64)
                .map(|t| {
                    let (locks, inside) = (locks.clone(), inside.clone());
                    tokio::spawn(async move {
                        for round in 0..200 {
                            let i = (t + round) % 8;
                            let _g = locks[i].lock().await;
                            assert_eq!(inside[i].fetch_add(1, Ordering::SeqCst), 0, "one holder at a time");
                            tokio::task::yield_now().await;
                            inside[i].fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for task in tasks {
                tokio::time::timeout(HANG, task).await.expect("no waiter lost").expect("no panic");
            }
        });
    }
}
