//! Units a quota cell took outside any lease (forced in shadow mode, or while the store was
//! out), owed by period until a call carries them to the store; and units given back, to the
//! lease they came from or as late refunds.

use std::sync::atomic::Ordering;

use super::{Lease, PeriodBits, QuotaRef, UNLEASED_PERIODS};

impl QuotaRef<'_> {
    /// Takes `quantity` units even if that leaves the lease negative (usage that already
    /// happened: reported by a handler, or admitted while the store was unreachable). The next
    /// store call owes the debt, past a hard limit if need be. Returns the tag of the period
    /// whose lease took them, if one did.
    pub(crate) fn force_take(&self, quantity: u64, now: i64) -> Option<u16> {
        let h = self.hot;
        let bits = h.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        let tag = PeriodBits::tag(bits);
        let quantity = i64::try_from(quantity).unwrap_or(i64::MAX);
        if now >= start && now < end {
            let mut word = h.lease.load(Ordering::Acquire);
            while Lease::tag(word) == tag {
                let left = Lease::value(word);
                let taken = quantity.min(left.saturating_add(Lease::MAX));
                let next = Lease::word(tag, left - taken);
                match h.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        if taken < quantity {
                            self.owe_unleased(now, (quantity - taken) as u64);
                        }
                        return Some(tag);
                    }
                    Err(w) => word = w,
                }
            }
        }
        self.owe_unleased(now, quantity as u64);
        None
    }

    /// Records `units` used at `now` outside any lease, owed to the period holding `now`.
    fn owe_unleased(&self, now: i64, units: u64) {
        let (start, end) = self.window(now);
        let bits = PeriodBits::pack(start, end);
        let mut guard = self.cold().rare_made().unleased();
        let owed = guard.make();
        match owed.iter_mut().find(|(b, _)| *b == bits) {
            Some((_, u)) => *u = u.saturating_add(units),
            None => owed.push((bits, units)),
        }
        if owed.len() > UNLEASED_PERIODS {
            // Periods without a single store call in between: the oldest is folded into the
            // next one (its counter is long over).
            let (_, oldest) = owed.remove(0);
            owed[0].1 = owed[0].1.saturating_add(oldest);
        }
    }

    /// Units used outside any lease, not yet owed to the store.
    pub(crate) fn unleased(&self) -> u64 {
        self.cold().rare().map_or(0, |r| r.unleased().list().iter().map(|(_, u)| *u).sum())
    }

    /// Gives back units taken outside any lease at `at` ([`force_take`](Self::force_take)
    /// returned `None`) by a request that is not billed, if the store has not been told yet.
    pub(crate) fn refund_unleased(&self, cost: u64, at: i64) {
        let (start, end) = self.window(at);
        let bits = PeriodBits::pack(start, end);
        let Some(rare) = self.cold().rare() else { return };
        let mut owed = rare.unleased();
        if let Some(i) = owed.list().iter().position(|(b, _)| *b == bits) {
            let left = owed.list()[i].1.saturating_sub(cost);
            if left == 0 {
                owed.remove(i);
            } else {
                owed.make()[i].1 = left;
            }
        }
    }

    /// Takes the units owed to a period other than the lease's current one (any, when no
    /// lease is held): `(start, end, units)`. Call with the lock held.
    pub(crate) fn pop_unleased_elsewhere(&self) -> Option<(i64, i64, u64)> {
        let current = self.hot.period.load(Ordering::Acquire);
        let mut owed = self.cold().rare()?.unleased();
        let i = owed.list().iter().position(|(b, _)| *b != current)?;
        let (bits, units) = owed.remove(i);
        let (start, end) = PeriodBits::bounds(bits);
        Some((start, end, units))
    }

    /// Gives back units of a request that is not billed to the lease of the period they were
    /// taken from; after that period's roll, to that period's counter in the store.
    pub(crate) fn refund(&self, cost: u64, tag: u16) {
        let cold = self.cold();
        if cold.stopped.load(Ordering::Acquire) && tag == PeriodBits::tag(self.hot.period.load(Ordering::Acquire)) {
            // Not spendable until a call renews the reservation: waiting with the spare units.
            self.add_spare(tag, cost);
            return;
        }
        let mut word = self.hot.lease.load(Ordering::Acquire);
        while Lease::tag(word) == tag {
            let cost = i64::try_from(cost).unwrap_or(i64::MAX);
            let next = Lease::word(tag, Lease::value(word).saturating_add(cost).min(Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    cold.exhausted.store(false, Ordering::Release);
                    return;
                }
                Err(w) => word = w,
            }
        }
        if cold.prev_tag.load(Ordering::Acquire) == u32::from(tag) && cost > 0 {
            cold.rare_made().late_refunds.fetch_add(cost, Ordering::AcqRel);
        }
    }

    /// Usage owed by the next store call of the current period: what was taken outside any
    /// lease in it. Call with the lock held.
    pub(crate) fn take_unleased(&self) -> u64 {
        let current = self.hot.period.load(Ordering::Acquire);
        let Some(rare) = self.cold().rare() else { return 0 };
        let mut owed = rare.unleased();
        match owed.list().iter().position(|(b, _)| *b == current) {
            Some(i) => owed.remove(i).1,
            None => 0,
        }
    }

    /// Forgets every unit owed outside a lease (state left in a snapshot).
    pub(crate) fn forget_unleased(&self) {
        if let Some(rare) = self.cold().rare() {
            rare.unleased().clear();
        }
    }

    /// Units refunded to the previous period since the last call. Call with the lock held.
    pub(crate) fn take_late_refunds(&self) -> u64 {
        self.cold().rare().map_or(0, |r| r.late_refunds.swap(0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::tenant::state::test_support::state;

    /// Units taken outside any lease are owed per period, at most four periods (the oldest
    /// folded into the next), a period refunded to nothing is gone, and the storage is let go
    /// once everything owed was taken.
    #[test]
    fn units_owed_outside_a_lease_fold_refund_and_let_go() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let day = |d: i64| 1_700_006_400 + d * 86_400; // midnight UTC, then d days on
        let owed = |q: &QuotaRef<'_>| q.cold().rare().map(|r| r.unleased().list().to_vec()).unwrap_or_default();
        assert!(q.cold().rare().is_none(), "nothing owed, nothing made");
        for d in 0..5 {
            assert_eq!(q.force_take(1, day(d) + 60), None, "no lease: owed");
        }
        assert_eq!(q.unleased(), 5);
        let list = owed(&q);
        assert_eq!(list.len(), UNLEASED_PERIODS);
        assert_eq!(list[0], (PeriodBits::pack(day(1), day(2)), 2), "the oldest folded into the next");
        q.refund_unleased(1, day(2) + 60);
        assert_eq!(q.unleased(), 4);
        assert!(!owed(&q).iter().any(|(b, _)| *b == PeriodBits::pack(day(2), day(3))), "refunded to nothing: gone");
        let mut popped = 0;
        while let Some((_, _, units)) = q.pop_unleased_elsewhere() {
            popped += units;
        }
        assert_eq!(popped, 4);
        assert!(q.cold().rare().unwrap().unleased().0.is_none(), "let go once empty");
    }
}
