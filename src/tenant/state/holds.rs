//! Units a quota cell holds for open holds and jobs, and what the store was told this node
//! keeps of them (reported, stale, forgotten).

use std::sync::atomic::Ordering;

use super::{Holds, Lease, Locked, PeriodBits, QuotaRef};

impl QuotaRef<'_> {
    /// Units this node holds for open holds (jobs' among them), of any period.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        let holds = self.locked().holds();
        holds.held.saturating_add(holds.held_old)
    }

    /// Units this node holds for open holds (jobs' among them) of the current period: those
    /// whose end gives units back to it (a hold of a period over gives back to that one).
    pub(crate) fn held_now(&self) -> u64 {
        self.locked().holds().held
    }

    /// Of `units` a hold took from the lease of the period tagged `tag`, those
    /// [`held_now`](Self::held_now) counts: all of them if that period is the current one,
    /// else none.
    pub(crate) fn held_now_of(&self, units: u64, tag: Option<u16>) -> u64 {
        if self.of_current(tag) {
            units
        } else {
            0
        }
    }

    /// Whether units taken from the lease of the period tagged `tag` (`None`: outside any
    /// lease) belong to the current period's counter. A balance has one counter, whatever
    /// its window.
    fn of_current(&self, tag: Option<u16>) -> bool {
        self.prepaid() || tag.is_none_or(|t| t == PeriodBits::tag(self.hot.period.load(Ordering::Acquire)))
    }

    /// `units` more held (`true`) or no longer held (`false`) by an open hold, taken from the
    /// lease of the period tagged `tag`.
    pub(crate) fn count_held(&self, units: u64, more: bool, tag: Option<u16>) {
        // The period read under the mutex, which a roll changes it and ages the holds under:
        // units counted land on the side of the roll they were taken on.
        let mut locked = self.locked();
        let current = self.of_current(tag);
        locked.change_holds(units, more, current, false);
    }

    /// Takes `units` from the lease for a hold and counts them held in one step, under the
    /// cell's mutex (under which every call reads what the node keeps, [`kept`](Self::kept)):
    /// a call made meanwhile on another thread never finds them in neither the lease nor the
    /// holds (it would tell the store the node keeps them less, and a node killed before its
    /// next report would leave them counted used). As [`try_take`](Self::try_take) otherwise.
    pub(crate) fn try_take_held(&self, units: u64, now: i64) -> super::Take {
        let mut locked = self.locked();
        let take = self.try_take(units, now);
        if let super::Take::Taken { tag, .. } = take {
            let current = self.of_current(Some(tag));
            locked.change_holds(units, true, current, false);
        }
        take
    }

    /// Takes `units` past the limit from the current period's lease for a hold (shadow mode,
    /// [`force_take`](Self::force_take)) and counts them held in one step, as
    /// [`try_take_held`](Self::try_take_held) does.
    pub(crate) fn force_take_held(&self, units: u64, now: i64) -> Option<u16> {
        let mut locked = self.locked();
        let tag = self.force_take(units, now);
        if let Some(tag) = tag {
            let current = self.of_current(Some(tag));
            locked.change_holds(units, true, current, false);
        }
        tag
    }

    /// `units` a hold held, taken from the lease of the period tagged `tag`, no longer held:
    /// counted with `locked` held, the guard its give-back returns them to the lease under
    /// (as [`try_take_held`](Self::try_take_held) counts them).
    pub(crate) fn uncount_held(&self, locked: &mut Locked, units: u64, tag: Option<u16>) {
        let current = self.of_current(tag);
        locked.change_holds(units, false, current, false);
    }

    /// `units` more held (`true`) or no longer held (`false`) by a job's reservation: counted
    /// held, and apart as jobs'.
    pub(crate) fn count_jobs(&self, units: u64, more: bool, tag: Option<u16>) {
        let mut locked = self.locked();
        let current = self.of_current(tag);
        locked.change_holds(units, more, current, true);
    }

    /// What this node keeps of the current period's counter, as it tells the store with each
    /// call: the lease's unused units (and spare ones going back), the units its requests'
    /// holds hold, and its jobs' reservations. With `debt`, a lease in debt (units used past
    /// it, not owed to the store yet) takes its debt from the holds' units: those units are
    /// used, and a store that gives the holds back at an expiry must keep them. A lease given
    /// back (eviction, reload, shutdown) keeps its open holds as holds: they come back as they
    /// settle, or, the node killed first, at the reservation's expiry (no call renews a
    /// returned cell; a hold still open past it records its units as owed, as any sender's
    /// whose reservation expired).
    pub(crate) fn kept(&self, locked: &Locked, debt: bool, returned: bool) -> crate::store::Kept {
        let Holds { held, jobs, .. } = locked.holds();
        if returned {
            return crate::store::Kept::new(0, held.saturating_sub(jobs), jobs);
        }
        let left = self.lease();
        let lease = u64::try_from(left.max(0)).unwrap_or(0).saturating_add(self.spare());
        let mut holds = held.saturating_sub(jobs);
        if debt {
            holds = holds.saturating_sub(left.min(0).unsigned_abs());
        }
        crate::store::Kept::new(lease, holds, jobs)
    }

    /// Whether what this node keeps of the counter is to be told to the store at `now`: it
    /// changed since the last call said it, or that call renewed it more than half of
    /// `expiry` ago. `Some(true)`: the reservation is within `skew` of its expiry, and the
    /// lease must not be spent until a call renews it.
    pub(crate) fn report_due(&self, now: i64, expiry: i64, skew: i64) -> Option<bool> {
        let locked = self.locked();
        let kept = self.kept(&locked, true, locked.returned);
        let at = self.cold().reported_at.load(Ordering::Acquire);
        let reported = locked.reported();
        let keeps = kept.total() > 0 || reported.total() > 0;
        if at > 0 && keeps && now >= at.saturating_add(expiry - skew) {
            return Some(true);
        }
        (kept != reported || (keeps && now >= at.saturating_add(expiry / 2))).then_some(false)
    }

    /// Whether the reservation of what this node keeps was last renewed `expiry − skew` ago
    /// or more (the store could not be reached): its lease must not be spent until a call
    /// renews it.
    pub(crate) fn stale(&self, now: i64, expiry: i64, skew: i64) -> bool {
        let at = self.cold().reported_at.load(Ordering::Acquire);
        at > 0 && now >= at.saturating_add(expiry - skew) && self.lease() > 0
    }

    /// Records that a call sent at `at` told the store `kept` (what it now counts this node
    /// keeps). Call with the lock held.
    pub(crate) fn reported(&self, kept: crate::store::Kept, at: i64) {
        self.locked().set_reported(kept);
        self.cold().reported_at.store(at, Ordering::Release);
    }

    /// Forgets what the store was told of the period that ended (its counter's record was
    /// settled by the roll's call).
    pub(crate) fn forget_reported(&self) {
        self.locked().set_reported(crate::store::Kept::default());
        self.cold().reported_at.store(0, Ordering::Release);
    }

    /// When the last call renewed what this node keeps (0: none).
    pub(crate) fn reported_at(&self) -> i64 {
        self.cold().reported_at.load(Ordering::Acquire)
    }

    /// What the store was last told this node keeps.
    pub(crate) fn reported_kept(&self) -> crate::store::Kept {
        self.locked().reported()
    }

    /// The store gave back what this node kept of the current period's counter (its
    /// reservation expired: the node was cut off or paused past it): the lease and spare
    /// units are dropped, and the units its requests' holds hold become a debt (what they
    /// record is owed again; what they give back pays it). After a call that took the lease's
    /// debt from the holds (`debt`), the debt and the holds are one: the lease owes the larger;
    /// after a refill, which owed the debt, it owes both. Returns the lease units dropped.
    /// Call with the lock held.
    pub(crate) fn drop_kept(&self, debt: bool) -> u64 {
        let cold = self.cold();
        let Holds { held, jobs, .. } = self.locked().holds();
        let holds = held.saturating_sub(jobs);
        let holds = i64::try_from(holds).unwrap_or(Lease::MAX).min(Lease::MAX);
        let mut word = self.hot.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            let owed = left.min(0).saturating_neg();
            let owes = if debt { -(owed.max(holds)) } else { -(owed.saturating_add(holds)) };
            let next = Lease::word(Lease::tag(word), owes.max(-Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // After the lease: a stash meanwhile finds nothing to move.
                    if let Some(rare) = cold.rare() {
                        rare.spare.store(0, Ordering::Release);
                    }
                    cold.stopped.store(false, Ordering::Release);
                    return u64::try_from(left.max(0)).unwrap_or(0);
                }
                Err(w) => word = w,
            }
        }
    }
}

/// The holds of the current period become an earlier period's (at a roll, under the
/// bookkeeping mutex that the period changed under).
pub(super) fn age_holds(locked: &mut Locked) {
    if let Some(h) = locked.rare.as_deref_mut().map(|r| &mut r.holds) {
        h.held_old = h.held_old.saturating_add(std::mem::take(&mut h.held));
        h.jobs_old = h.jobs_old.saturating_add(std::mem::take(&mut h.jobs));
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::tenant::state::test_support::state;

    /// A quota's open holds are counted in storage made by the first hold, moved to the
    /// earlier period at a roll, and let go once no hold holds anything.
    #[test]
    fn holds_are_counted_in_storage_made_on_first_use_and_let_go() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let made = |q: &QuotaRef<'_>| q.locked().rare.is_some();
        assert!(!made(&q), "no hold, nothing made");
        q.count_held(5, true, None);
        q.count_jobs(2, true, None);
        assert!(made(&q));
        assert_eq!((q.held(), q.kept(&q.locked(), false, false).held), (7, 5));
        let midnight = 1_700_006_400;
        q.roll_period(midnight, midnight + 86_400);
        assert_eq!(q.held(), 7, "of the day before now");
        assert_eq!(q.kept(&q.locked(), false, false).held, 0, "never told to the new day");
        let before = PeriodBits::tag(PeriodBits::pack(midnight - 86_400, midnight));
        q.count_held(5, false, Some(before));
        q.count_jobs(2, false, Some(before));
        assert_eq!(q.held(), 0);
        assert!(!made(&q), "let go once nothing is held");
    }

    /// What the store was last told of holds lives with the holds: it keeps their storage
    /// until the store is told they are gone, and reads back whole.
    #[test]
    fn what_the_store_was_told_of_holds_keeps_their_storage_until_it_is_told_none() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let made = |q: &QuotaRef<'_>| q.locked().rare.is_some();
        let kept = |q: &QuotaRef<'_>| q.kept(&q.locked(), false, false);
        q.reported(crate::store::Kept::new(9, 0, 0), 1_700_000_000);
        assert!(!made(&q), "a lease alone makes nothing");
        assert_eq!(q.reported_kept(), crate::store::Kept::new(9, 0, 0));
        q.count_held(5, true, None);
        q.count_jobs(2, true, None);
        let told = kept(&q);
        q.reported(told, 1_700_000_001);
        assert_eq!(q.reported_kept(), crate::store::Kept::new(0, 5, 2));
        q.count_held(5, false, None);
        q.count_jobs(2, false, None);
        assert_eq!(q.held(), 0);
        assert!(made(&q), "the store still counts the holds: kept to compare with");
        assert_eq!(q.report_due(1_700_000_002, 60, 5), Some(false), "what it keeps changed");
        let told = kept(&q);
        q.reported(told, 1_700_000_002);
        assert!(!made(&q), "let go once the store was told");
        assert_eq!(q.reported_kept(), crate::store::Kept::default());
        assert_eq!(q.report_due(1_700_000_003, 60, 5), None, "nothing to tell");
        q.count_held(1, true, None);
        let told = kept(&q);
        q.reported(told, 1_700_000_003);
        assert_eq!(q.reported_kept(), crate::store::Kept::new(0, 1, 0));
        q.forget_reported();
        assert_eq!(q.reported_kept(), crate::store::Kept::default(), "forgotten at a roll");
        assert!(made(&q), "the hold is still open");
    }
}
