//! `CallLock`: the lock that serializes a quota cell's store calls, in one byte.
//!
//! Every quota of every resident tenant holds one, and it is taken only off the request's
//! fast path (refills, returns, reports, a request that finds its lease short while a refill
//! is under way). A `tokio::sync::Mutex<()>` costs 40 bytes there; this lock is one
//! `AtomicU8`, placed in the padding of the cell's flags. Its waiters queue as `parking_lot`'s
//! do, in a table shared by every lock: one of [`PARKING`] slots chosen by the lock's address,
//! each a map from a lock's address to its waiters, a lock's entry there only while it has
//! some. Like tokio's mutex it is fair: a release with waiters hands the lock to the first of
//! them (it stays held, so no newcomer takes it first) and wakes that one alone; a waiter
//! dropped after the lock was handed to it passes it on.
//!
//! A waiter that is leaked (`mem::forget` of a polled `lock()`) stays queued: once its turn
//! comes the lock stays held for good (the cell's calls time out until it is let go), and a
//! lock made later at the same address would hand its first contended turn to it. Nothing
//! here leaks one (clippy's `mem_forget` lint is on, and CI denies warnings).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// The lock is held.
const HELD: u8 = 1;
/// Waiters of the lock are queued: a release hands it on under its queue's mutex. Set and
/// cleared only under that mutex, and only while the lock is held.
const WAITING: u8 = 2;

/// How many queues the waiters of every lock share.
const PARKING: usize = 64;

/// A waiter: told by the release that handed it the lock.
#[derive(Debug, Default)]
struct Waiter {
    handed: AtomicBool,
    waker: AtomicWaker,
}

/// The waiters of the locks whose address picks this slot, by lock, first come first; a
/// lock's entry is removed with its last waiter.
type Waiters = BTreeMap<usize, VecDeque<Arc<Waiter>>>;

/// Where waiters queue, chosen by a lock's address.
static PARKED: [Mutex<Waiters>; PARKING] = [const { Mutex::new(BTreeMap::new()) }; PARKING];

/// The slot of the lock at `at`. A lock is one byte: neighbouring cells' locks are apart by
/// their cells' size, so the low bits of the address spread them.
fn slot(at: usize) -> usize {
    (at ^ (at >> 6) ^ (at >> 12)) % PARKING
}

/// A one-byte, fair asynchronous lock (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct CallLock {
    state: AtomicU8,
}

/// The lock held; released (or handed to its first waiter) when dropped.
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

    /// The lock, waited for in turn. Cancel-safe: a waiter dropped before its turn leaves
    /// the queue; one dropped after the lock was handed to it passes it on. Each call spends
    /// a unit of the task's cooperative budget, as tokio's own locks do.
    pub(crate) async fn lock(&self) -> CallGuard<'_> {
        tokio::task::coop::consume_budget().await;
        if let Some(guard) = self.try_lock() {
            return guard;
        }
        let waiter = {
            let mut queue = self.queue();
            // Under the queue's mutex: free now, or held with this waiter queued before the
            // holder's release looks (it takes the same mutex once it sees `WAITING`).
            let mut seen = self.state.load(Ordering::Acquire);
            loop {
                let (next, taken) = if seen & HELD == 0 { (seen | HELD, true) } else { (seen | WAITING, false) };
                match self.state.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) if taken => return CallGuard { lock: self },
                    Ok(_) => break,
                    Err(now) => seen = now,
                }
            }
            let waiter = Arc::new(Waiter::default());
            queue.entry(self.address()).or_default().push_back(waiter.clone());
            waiter
        };
        Queued { lock: self, waiter, done: false }.await
    }

    /// Releases the lock, or hands it to its first waiter and wakes that one.
    fn release(&self) {
        if self.state.compare_exchange(HELD, 0, Ordering::Release, Ordering::Relaxed).is_ok() {
            return;
        }
        // Waiters are queued (and none can queue or leave while the queue is locked).
        let mut queue = self.queue();
        let at = self.address();
        let Some(mine) = queue.get_mut(&at) else {
            // They left meanwhile.
            self.state.store(0, Ordering::Release);
            return;
        };
        let waiter = mine.pop_front().expect("a lock's entry has waiters");
        if mine.is_empty() {
            // Handed on, still held: the last waiter.
            queue.remove(&at);
            self.state.store(HELD, Ordering::Release);
        }
        // Told before the queue is let go: a waiter dropped meanwhile finds itself either
        // queued or handed the lock, never neither.
        waiter.handed.store(true, Ordering::Release);
        drop(queue);
        waiter.waker.wake();
    }

    /// The queue this lock's waiters wait in.
    fn queue(&self) -> MutexGuard<'static, Waiters> {
        PARKED[slot(self.address())].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

/// A queued waiter's wait for its turn.
struct Queued<'a> {
    lock: &'a CallLock,
    waiter: Arc<Waiter>,
    /// The guard was given out: nothing to undo when dropped.
    done: bool,
}

impl<'a> Future for Queued<'a> {
    type Output = CallGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CallGuard<'a>> {
        if !self.waiter.handed.load(Ordering::Acquire) {
            self.waiter.waker.register(cx.waker());
            if !self.waiter.handed.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        self.done = true;
        Poll::Ready(CallGuard { lock: self.lock })
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queue = self.lock.queue();
        if self.waiter.handed.load(Ordering::Acquire) {
            // Handed the lock, never taken: passed on.
            drop(queue);
            self.lock.release();
            return;
        }
        let at = self.lock.address();
        let mine = queue.get_mut(&at).expect("a waiter not handed the lock is queued");
        // Waiters give up in about the order they came (their deadlines): near the front.
        let i = mine.iter().position(|w| Arc::ptr_eq(w, &self.waiter)).expect("queued");
        mine.remove(i);
        if mine.is_empty() {
            // The last waiter left: a release finds none to hand the lock to.
            queue.remove(&at);
            self.lock.state.fetch_and(!WAITING, Ordering::AcqRel);
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

    /// Free, with nothing of it left in its slot.
    fn idle(lock: &CallLock) -> bool {
        lock.state.load(Ordering::Acquire) == 0 && !lock.queue().contains_key(&lock.address())
    }

    /// Waits until `lock` says a waiter is queued on it.
    async fn until_queued(lock: &CallLock) {
        while lock.state.load(Ordering::Acquire) & WAITING == 0 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_queued_waiter_is_woken_by_the_release() {
        let lock = Arc::new(CallLock::default());
        let guard = lock.try_lock().expect("free");
        let waiter = tokio::spawn({
            let lock = lock.clone();
            async move {
                let _g = lock.lock().await;
            }
        });
        tokio::time::timeout(HANG, until_queued(&lock)).await.expect("the waiter queues");
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(HANG, waiter).await.expect("woken").expect("no panic");
        assert!(idle(&lock), "the waiter released it");
    }

    /// Polls `fut` once: its output if it is ready (a pending waiter is then queued).
    async fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_leaves_the_next_one_its_turn() {
        let lock = CallLock::default();
        let guard = lock.try_lock().expect("free");
        {
            // Queues, then gives up (dropped, as a timeout drops it).
            let first = std::pin::pin!(lock.lock());
            assert!(poll_once(first).await.is_none(), "held: the first waiter queues");
        }
        let mut second = std::pin::pin!(lock.lock());
        assert!(poll_once(second.as_mut()).await.is_none(), "held: the second waiter queues");
        drop(guard);
        let g = poll_once(second).await.expect("handed to the second waiter");
        assert!(lock.try_lock().is_none(), "the second waiter holds it");
        drop(g);
        assert!(idle(&lock), "no waiter left: free");
    }

    /// Fair: a release hands the lock to the first waiter (a newcomer cannot take it first),
    /// waiters take it in the order they came, and one handed the lock but dropped before it
    /// took it passes it on.
    #[tokio::test]
    async fn waiters_take_the_lock_in_turn_and_one_dropped_after_its_turn_came_passes_it_on() {
        let lock = CallLock::default();
        let guard = lock.try_lock().expect("free");
        let mut first = std::pin::pin!(lock.lock());
        // Boxed: dropped below (a `pin!`ned future lives to the end of its scope).
        let mut second = Box::pin(lock.lock());
        let mut third = std::pin::pin!(lock.lock());
        assert!(poll_once(first.as_mut()).await.is_none());
        assert!(poll_once(second.as_mut()).await.is_none());
        assert!(poll_once(third.as_mut()).await.is_none());
        drop(guard);
        assert!(lock.try_lock().is_none(), "handed to the first waiter, not to a newcomer");
        assert!(poll_once(second.as_mut()).await.is_none(), "not the second's turn");
        assert!(poll_once(third.as_mut()).await.is_none(), "nor the third's");
        drop(poll_once(first).await.expect("the first waiter's turn"));
        // The second's turn came; it is dropped without taking it.
        drop(second);
        let g = poll_once(third).await.expect("passed on to the third");
        assert!(lock.try_lock().is_none());
        drop(g);
        assert!(idle(&lock), "free once every waiter had its turn");
    }

    #[test]
    fn many_tasks_on_two_threads_over_locks_that_share_a_slot_hold_each_lock_alone_and_lose_no_turn() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        rt.block_on(async {
            // Eight locks whose waiters share one slot, out of 4,096 neighbouring bytes.
            let all: Arc<Vec<CallLock>> = Arc::new((0..4096).map(|_| CallLock::default()).collect());
            let shared = slot(all[0].address());
            let picked: Arc<Vec<usize>> =
                Arc::new((0..all.len()).filter(|&i| slot(all[i].address()) == shared).take(8).collect());
            assert_eq!(picked.len(), 8, "eight locks in one slot");
            let inside: Arc<[AtomicUsize; 8]> = Arc::new(Default::default());
            let tasks: Vec<_> = (0..64)
                .map(|t| {
                    let (all, picked, inside) = (all.clone(), picked.clone(), inside.clone());
                    tokio::spawn(async move {
                        for round in 0..200 {
                            let i = (t + round) % 8;
                            let lock = &all[picked[i]];
                            let _g = if round % 4 == 0 {
                                // Some give up soon (a store call's deadline, here the timer's
                                // next tick): their drop leaves the queue, or passes on a turn
                                // that just came.
                                match tokio::time::timeout(Duration::from_micros(20), lock.lock()).await {
                                    Ok(g) => g,
                                    Err(_) => continue,
                                }
                            } else {
                                lock.lock().await
                            };
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
            for &i in picked.iter() {
                assert!(idle(&all[i]), "every lock free at the end: no turn left handed to nobody");
            }
        });
    }
}
