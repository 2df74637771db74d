//! The request path's verbs of a quota cell: units taken from the lease (one compare-and-swap
//! of its word), checked without taking, what the headers report, the low mark that asks for
//! a prefetch.

use std::sync::atomic::Ordering;

use super::{Lease, PeriodBits, QuotaRef, Take};

impl QuotaRef<'_> {
    /// Takes `cost` units without waiting, from the lease of the period holding `now`. Reads
    /// only the meter's hot cell when it succeeds.
    #[inline]
    pub(crate) fn try_take(&self, cost: u64, now: i64) -> Take {
        let h = self.hot;
        let bits = h.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        if now >= end || now < start {
            return Take::NeedLease;
        }
        let tag = PeriodBits::tag(bits);
        // A cost past any lease (a spend of a huge record) is never covered by one.
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag {
                return Take::NeedLease;
            }
            if left < cost {
                match self.short(now, word) {
                    Ok(take) => return take,
                    Err(again) => word = again,
                }
                continue;
            }
            // `left >= cost >= 0`: the subtraction cannot borrow from the tag.
            match h.lease.compare_exchange_weak(word, word - cost as u64, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Take::Taken { left: left - cost, tag },
                Err(now_word) => word = now_word,
            }
        }
    }

    /// What a request finding the lease short gets: refused if the store said this hard
    /// quota is spent this second, else sent to the store. Out of line: most requests find
    /// their units, and the request path stays small enough to inline.
    /// `word`: the lease as the request read it; `Err`: the lease as read again, changed
    /// since (see [`spent_given`](Self::spent_given)).
    #[cold]
    #[inline(never)]
    fn short(&self, now: i64, word: u64) -> Result<Take, u64> {
        if !self.hard() {
            return Ok(Take::NeedLease);
        }
        match self.spent_given(now, word) {
            Ok(true) => Ok(Take::Exhausted),
            Ok(false) => Ok(Take::NeedLease),
            Err(again) => Err(again),
        }
    }

    /// Whether the quota is spent at `now` for a request that found the lease `word` short:
    /// `Err` with the lease as read again when it changed. A refill credits its grant to the
    /// lease before its answer says "spent", so the lease is read again after the flag: a
    /// request reading the lease during the call (emptied by the caller's drain) and the flag
    /// after the answer would otherwise take the units the node holds for a spent quota.
    fn spent_given(&self, now: i64, word: u64) -> Result<bool, u64> {
        if !self.spent(now) {
            return Ok(false);
        }
        match self.hot.lease.load(Ordering::Acquire) {
            again if again != word => Err(again),
            _ => Ok(true),
        }
    }

    /// Whether a request of `cost` at `now` could take its units, without taking them (an
    /// idempotent replay): `Ok` when the quota is soft or the lease covers it,
    /// [`Take::Exhausted`] when a hard quota is spent, [`Take::NeedLease`] when only the store
    /// can tell.
    #[inline]
    pub(crate) fn check_units(&self, cost: u64, now: i64) -> Result<(), Take> {
        if !self.hard() {
            return Ok(());
        }
        let bits = self.hot.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        let mut word = self.hot.lease.load(Ordering::Acquire);
        loop {
            if now < start || now >= end || Lease::tag(word) != PeriodBits::tag(bits) {
                return Err(Take::NeedLease);
            }
            if Lease::value(word) >= i64::try_from(cost).unwrap_or(i64::MAX) {
                return Ok(());
            }
            match self.spent_given(now, word) {
                Ok(true) => return Err(Take::Exhausted),
                Ok(false) => return Err(Take::NeedLease),
                Err(again) => word = again,
            }
        }
    }

    /// Whether the store said this period's hard limit was reached, in the same second of
    /// the clock as `now`: from the next second on the store is asked again (other nodes may
    /// have given units back, a top-up may have landed), at most once a second per cell, and
    /// a refusal never outlives the second of the answer that said "spent".
    #[inline]
    fn spent(&self, now: i64) -> bool {
        let cold = self.cold();
        cold.exhausted.load(Ordering::Acquire)
            && now <= cold.refilled_at.load(Ordering::Relaxed).div_euclid(1_000_000_000)
    }

    /// (remaining units across nodes, over a soft limit?) when `lease_left` units remain here
    /// (spare units, unused, going back, count as remaining too).
    #[inline]
    pub(crate) fn estimate(&self, lease_left: i64) -> (u64, bool) {
        let reserved = self.cold().reserved.load(Ordering::Relaxed);
        let used = reserved.saturating_sub((lease_left.max(0) as u64).saturating_add(self.spare()));
        let limit = self.limit();
        (limit.saturating_sub(used), used > limit)
    }

    /// The units of the period `(start, end)` this node has taken from the store and not used:
    /// its lease and spare of that period (none of another period).
    pub(crate) fn unused_of(&self, (start, end): (i64, i64)) -> u64 {
        match self.period() == (start, end) {
            true => (self.lease().max(0) as u64).saturating_add(self.spare()),
            false => 0,
        }
    }

    /// What the `RateLimit` header says of this quota at `now` for a request that takes
    /// nothing of it (a request that takes `c` units says `c` fewer): the units remaining
    /// across nodes as this node knows them and the end of the period; `None` when this node
    /// holds no lease of the current period (its next request leases first).
    pub(crate) fn status_at(&self, now: i64) -> Option<(u64, i64)> {
        let (_, end) = self.period();
        (now < end).then(|| (self.estimate(self.lease()).0, end))
    }

    /// Whether `lease_left` is below the low watermark (a quarter of the last lease) and no
    /// prefetch is under way; claims the prefetch if so. Reads the cold part only below the
    /// watermark.
    #[inline]
    pub(crate) fn wants_prefetch(&self, lease_left: i64) -> bool {
        lease_left < self.low()
            && !self.cold().exhausted.load(Ordering::Relaxed)
            && !self.cold().prefetching.swap(true, Ordering::AcqRel)
    }

    /// The low watermark: a quarter of the last lease.
    #[inline]
    pub(crate) fn low(&self) -> i64 {
        i64::from(self.hot.low.load(Ordering::Relaxed)).max(1)
    }
}
