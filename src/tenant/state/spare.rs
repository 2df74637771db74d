//! Units a quota cell keeps back from its lease: trimmed to what the node may keep, spare
//! units other requests of the period take first, a cell stopped and resumed.

use std::sync::atomic::Ordering;

use super::{Lease, PeriodBits, QuotaRef};

impl QuotaRef<'_> {
    /// The most units this node keeps in its lease once units come back to it (a hold's,
    /// a job's): the cell's largest lease, and near a hard limit an eighth of what the store
    /// last said was left (as a refill asks), so that the leases other nodes keep never strand
    /// much of what is left.
    pub(crate) fn keep_cap(&self) -> u64 {
        let cap = self.lease_cap();
        let limit = self.limit();
        // Never what the work waiting for the cell's lock wants, while the last refill that
        // asked for it found units left: that call asked them for it (a hold's give-back
        // trimming them would send them back before their turn). Once one found nothing left
        // its waiters are refused, and what the node holds goes back as before.
        let waiting = if self.spent_for_waiters() { 0 } else { self.wanted() };
        if !self.hard() || limit == 0 {
            return cap.max(waiting);
        }
        cap.min(limit.saturating_sub(self.known_reserved()).div_ceil(crate::store::SHRINK)).max(1).max(waiting)
    }

    /// Moves what the lease of the period tagged `tag` holds past [`keep_cap`](Self::keep_cap)
    /// to the cell's spare units, to go back to the store. Returns the units moved.
    pub(crate) fn trim(&self, tag: u16) -> u64 {
        self.trim_to(tag, self.keep_cap())
    }

    /// Moves what the lease of the period tagged `tag` holds past `cap` to the spare units.
    fn trim_to(&self, tag: u16, cap: u64) -> u64 {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let h = self.hot;
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag || left <= cap {
                return 0;
            }
            match h.lease.compare_exchange_weak(word, Lease::word(tag, cap), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(w) => word = w,
            }
        }
        let excess = (Lease::value(word) - cap) as u64;
        self.add_spare(tag, excess);
        excess
    }

    /// Adds `units` of the period tagged `tag` to the spare units.
    pub(super) fn add_spare(&self, tag: u16, excess: u64) {
        let spare = &self.cold().rare_made().spare;
        let mut word = spare.load(Ordering::Acquire);
        loop {
            // Spare units of an older period (not gone back yet) go to that period's late
            // refunds first.
            let next = if Lease::tag(word) == tag || Lease::value(word) == 0 {
                Lease::word(tag, Lease::value(word).saturating_add(excess as i64).min(Lease::MAX))
            } else {
                Lease::word(tag, excess as i64)
            };
            match spare.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(old) => {
                    if Lease::tag(old) != tag && Lease::value(old) > 0 {
                        self.late_spare(Lease::tag(old), Lease::value(old) as u64);
                    }
                    return;
                }
                Err(w) => word = w,
            }
        }
    }

    /// The spare units waiting to go back ([`trim`](Self::trim)).
    #[inline]
    pub(crate) fn spare(&self) -> u64 {
        Lease::value(self.cold().rare_load(|r| &r.spare)).max(0) as u64
    }

    /// Takes the spare units of the current period (those of the period before go to its late
    /// refunds). Call with the lock held.
    pub(crate) fn take_spare(&self) -> u64 {
        let word = self.cold().rare().map_or(0, |r| r.spare.swap(0, Ordering::AcqRel));
        let units = Lease::value(word).max(0) as u64;
        if units == 0 {
            return 0;
        }
        let current = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        if Lease::tag(word) == current {
            return units;
        }
        self.late_spare(Lease::tag(word), units);
        0
    }

    /// Spare units of the period tagged `tag`, no longer the current one: to its counter with
    /// the late refunds, if it is the period before; else (older) its counter is settled.
    fn late_spare(&self, tag: u16, units: u64) {
        let cold = self.cold();
        if cold.prev_tag.load(Ordering::Acquire) == u32::from(tag) && units > 0 {
            cold.rare_made().late_refunds.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Stops spending the lease: its unused units move to the spare ones (they go back to the
    /// store with the next call, or serve again once a call renews the reservation). Call
    /// with the lock held.
    pub(crate) fn stash(&self) -> u64 {
        self.cold().stopped.store(true, Ordering::Release);
        let tag = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        self.trim_to(tag, 0)
    }

    /// Stops the lease ([`stash`](Self::stash)) and adds `units` of the current period to
    /// what waits with it, never to the lease: units a call sent again was answered with
    /// after the node's reservation lapsed. Call with the lock held.
    pub(crate) fn credit_stopped(&self, units: u64) {
        self.stash();
        let tag = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        self.add_spare(tag, units);
    }

    /// Whether the lease is stopped ([`stash`](Self::stash)) until a call renews it.
    pub(crate) fn stopped(&self) -> bool {
        self.cold().stopped.load(Ordering::Acquire)
    }

    /// A call renewed the reservation: the lease may be spent again, with what waited as
    /// spare units. Call with the lock held.
    pub(crate) fn resume(&self) {
        if self.cold().stopped.swap(false, Ordering::AcqRel) {
            let spare = self.take_spare();
            self.credit(spare);
        }
    }
}
