//! A quota cell's lease: drained and released, its next size, rolled to a new period,
//! credited with the store's grants, taken whole.

use std::sync::atomic::Ordering;

use super::{holds::age_holds, Lease, PeriodBits, QuotaRef, Wanted};
use crate::store::QuotaKey;

impl QuotaRef<'_> {
    /// Takes up to `units` from the lease of the current period (what a request waiting on a
    /// refill uses of the lease before asking the store for the rest). Returns the units
    /// taken. Call with the lock held.
    pub(crate) fn drain(&self, units: u64) -> u64 {
        let h = self.hot;
        let tag = PeriodBits::tag(h.period.load(Ordering::Acquire));
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag || left <= 0 {
                return 0;
            }
            let taken = left.min(i64::try_from(units).unwrap_or(i64::MAX));
            match h.lease.compare_exchange_weak(
                word,
                Lease::word(tag, left - taken),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return taken as u64,
                Err(w) => word = w,
            }
        }
    }

    /// `units` given back to the store: its count as this node knows it, less them; the
    /// limit is no longer reached.
    pub(crate) fn released(&self, units: u64) {
        let cold = self.cold();
        let _ = cold.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(units)));
        // The store has them left now: not spent.
        if units > 0 {
            cold.exhausted.store(false, Ordering::Release);
            self.not_spent_for_waiters();
        }
    }

    /// Forgets that the store said the hard limit was reached: requests finding the lease
    /// short ask the store again. Call with the lock held.
    pub(crate) fn forget_spent(&self) {
        self.cold().exhausted.store(false, Ordering::Release);
    }

    /// The size of the next lease, adapted to how fast the tenant uses its units, so that a
    /// busy tenant asks the store about once a second whatever its request rate (store traffic
    /// follows tenants, not requests): doubled when the last lease lasted under a second,
    /// halved (down to the configured size) when it lasted over a minute. Capped at a
    /// sixteenth of the limit (or the configured size, if larger), so that one node of a fleet
    /// never holds much of a hard quota. Reads only; [`leased`](Self::leased) records it.
    pub(crate) fn next_size(&self, now_nanos: i64) -> u64 {
        let cold = self.cold();
        let base = self.spec.lease().get().min(Lease::MAX as u64 / 4);
        let cap = self.lease_cap();
        let size = match cold.size.load(Ordering::Relaxed) {
            0 => base,
            s => s,
        };
        let last = cold.refilled_at.load(Ordering::Relaxed);
        let lasted = now_nanos.saturating_sub(last);
        if last == 0 {
            size
        } else if lasted < 1_000_000_000 {
            size.saturating_mul(2).min(cap)
        } else if lasted > 60_000_000_000 {
            (size / 2).max(base)
        } else {
            size
        }
    }

    /// The largest lease of this cell: a sixteenth of the limit, or the configured size if
    /// larger.
    pub(crate) fn lease_cap(&self) -> u64 {
        let base = self.spec.lease().get().min(Lease::MAX as u64 / 4);
        base.max(self.limit() / 16).min(Lease::MAX as u64 / 4)
    }

    /// Records a lease of `size` units granted at `now_nanos` (the pace the next size
    /// follows) and moves the low watermark to a quarter of it. Call with the lock held, only
    /// once the store has answered: a failed refill changes nothing.
    pub(crate) fn leased(&self, size: u64, now_nanos: i64) {
        let cold = self.cold();
        cold.size.store(size, Ordering::Relaxed);
        cold.refilled_at.store(now_nanos, Ordering::Relaxed);
        self.hot.low.store(u32::try_from(size / 4).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// Whether a refill ahead of need was asked for and not done yet.
    pub(crate) fn prefetch_pending(&self) -> bool {
        self.cold().prefetching.load(Ordering::Acquire)
    }

    pub(crate) fn prefetch_done(&self) {
        self.cold().prefetching.store(false, Ordering::Release);
    }

    /// Starts the period `[start, end)`: the lease of the old one is emptied in the same
    /// atomic step that tags the word with the new period. Returns the old period's key (if a
    /// lease of it was held) and the units left in it (negative: a debt), to settle with the
    /// store; the old period is kept as the previous one ([`Locked::prev`]), which its late
    /// refunds go to. Call with the lock held.
    pub(crate) fn roll_period(&self, start: i64, end: i64) -> Option<(QuotaKey, i64)> {
        let cold = self.cold();
        let bits = PeriodBits::pack(start, end);
        let old_bits = self.hot.period.load(Ordering::Acquire);
        let old_tag = PeriodBits::tag(old_bits);
        // Late refunds of the old period go to it from now on.
        cold.prev_tag.store(if old_bits == 0 { u32::MAX } else { u32::from(old_tag) }, Ordering::Release);
        let old = self.hot.lease.swap(Lease::word(PeriodBits::tag(bits), 0), Ordering::AcqRel);
        cold.exhausted.store(false, Ordering::Release);
        self.not_spent_for_waiters();
        cold.reserved.store(0, Ordering::Release);
        // The period changes under the bookkeeping mutex, with the holds aged in the same
        // step: a hold counted or given back meanwhile reads the period under it too, so it
        // finds its units on the side of the roll they are on.
        let mut locked = self.locked();
        self.hot.period.store(bits, Ordering::Release);
        if !self.prepaid() {
            // Holds open now belong to the period that ends (a hold counted from now on is
            // counted by its own tag).
            age_holds(&mut locked);
        }
        if old_bits == 0 {
            return None;
        }
        // The previous period, as the lease's own word packed it: a late refund's key.
        locked.prev = old_bits;
        drop(locked);
        let (old_start, old_end) = PeriodBits::bounds(old_bits);
        let left = if Lease::tag(old) == old_tag { Lease::value(old) } else { 0 };
        Some((self.key(old_start, old_end), left))
    }

    /// Adds `units` to the lease of the current period (units granted by the store, and the
    /// debt the store call covered). Call with the lock held.
    pub(crate) fn credit(&self, units: u64) {
        let tag = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        let mut word = self.hot.lease.load(Ordering::Acquire);
        while Lease::tag(word) == tag {
            let next = Lease::word(tag, Lease::value(word).saturating_add(units as i64).min(Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(w) => word = w,
            }
        }
    }

    /// Records the store's answer: `reserved` units in all; whether the hard limit is reached
    /// (fewer units granted than asked). Call with the lock held.
    /// Units reserved by the whole fleet as of the store's last answer (0 before one in this
    /// period): a lower bound, other nodes may have reserved more since.
    pub(crate) fn known_reserved(&self) -> u64 {
        self.cold().reserved.load(Ordering::Relaxed)
    }

    /// `limit`: a prepaid balance's granted units, as the store said. An answer with room
    /// left clears what an earlier one said: a top-up (or units given back by other nodes)
    /// is spendable at once, and leases grow again.
    pub(crate) fn granted(&self, reserved: u64, limit: Option<u64>, short: bool) {
        if let Some(limit) = limit {
            self.cold().rare_made().balance.store(limit, Ordering::Relaxed);
        }
        self.cold().reserved.store(reserved, Ordering::Release);
        if self.hard() {
            self.cold().exhausted.store(short, Ordering::Release);
        }
    }

    /// Empties the lease of the current period (on eviction and shutdown): returns the units
    /// to give back (negative: a debt to owe). Call with the lock held.
    pub(crate) fn take_all(&self) -> i64 {
        let mut word = self.hot.lease.load(Ordering::Acquire);
        loop {
            let next = Lease::word(Lease::tag(word), 0);
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Lease::value(word),
                Err(w) => word = w,
            }
        }
    }
}

impl<'a> QuotaRef<'a> {
    /// Says that `units` of this cell are wanted by work about to wait for its call lock,
    /// until the guard drops: the call made meanwhile asks the store for them too
    /// ([`wanted`](Self::wanted)), and the waiter, its turn come, takes them from the lease
    /// instead of calling the store itself. Off the request path's straight line: only work
    /// that must wait for a refill says so.
    pub(crate) fn want(&self, units: u64) -> Wanted<'a> {
        let rare = self.cold().rare_made();
        let since = rare.asked.load(Ordering::Acquire);
        rare.wanted.fetch_add(units, Ordering::AcqRel);
        Wanted { wanted: &rare.wanted, units, since }
    }

    /// Numbers a refill about to ask for the waiters' units ([`wanted`](Self::wanted), read
    /// after this): waiters that began to wait before it are asked for. Call with the lock
    /// held.
    pub(crate) fn asking(&self) -> u64 {
        self.cold().rare_made().asked.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether the last refill that asked for waiters found nothing left for them.
    pub(crate) fn spent_for_waiters(&self) -> bool {
        self.cold().rare_load(|r| &r.last_answer) & 1 == 1
    }

    /// Forgets that the last refill found nothing left for its waiters ([`Wanted::refused`]):
    /// units came back to the store, or a new period began.
    fn not_spent_for_waiters(&self) {
        if let Some(rare) = self.cold().rare() {
            rare.last_answer.fetch_and(!1, Ordering::AcqRel);
        }
    }

    /// The answer to refill `asking` ([`asking`](Self::asking)): whether it said the hard
    /// limit was reached. Call with the lock held.
    pub(crate) fn answered_asking(&self, asking: u64, spent: bool) {
        let spent = spent && self.hard();
        self.cold().rare_made().last_answer.store(asking << 1 | u64::from(spent), Ordering::Release);
    }

    /// The units work waiting for this cell's call lock wants now ([`want`](Self::want)), at
    /// most what a lease holds.
    pub(crate) fn wanted(&self) -> u64 {
        self.cold().rare_load(|r| &r.wanted).min(Lease::MAX as u64 / 4)
    }
}
