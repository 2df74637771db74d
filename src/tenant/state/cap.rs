//! A quota cell's limit in force: the plan's, a tenant's own spend cap within it (as the store
//! last said), a prepaid balance's grants; a balance's open recharge.

use std::sync::atomic::Ordering;

use super::{QuotaRef, CAP_LIMIT_MAX, CAP_SOFT, CAP_UNKNOWN};
use crate::config::QuotaMode;

impl QuotaRef<'_> {
    #[inline]
    pub(crate) fn hard(&self) -> bool {
        // A spend cap: hard when the tenant set a hard cap of its own, or may have (not known
        // yet). A soft one of its own never makes the plan's hard cap soft
        // (`store::capped_limit`).
        self.spec.mode() == QuotaMode::Hard || (self.spec.capped && self.hard_cap())
    }

    /// Whether this spend cap's quota is hard by the tenant's own cap ([`hard`](Self::hard)):
    /// out of line, as only spend caps ask.
    #[cold]
    #[inline(never)]
    fn hard_cap(&self) -> bool {
        let cap = self.cold().rare_load(|r| &r.cap);
        cap == CAP_UNKNOWN || (cap != 0 && cap & CAP_SOFT == 0)
    }

    /// The tenant's own cap on this spend cap's quota, as the store last said.
    pub(crate) fn tenant_cap(&self) -> Option<crate::store::SpendCap> {
        match self.cold().rare_load(|r| &r.cap) {
            0 | CAP_UNKNOWN => None,
            cap => Some(crate::store::SpendCap::new(cap & !CAP_SOFT, cap & CAP_SOFT == 0)),
        }
    }

    /// The tenant's own cap, as the store last said, when it is the one in force
    /// ([`QuotaSpec::own_in_force`](crate::config::QuotaSpec)).
    pub(crate) fn own_cap_in_force(&self) -> Option<crate::store::SpendCap> {
        self.spec.own_in_force(self.tenant_cap())
    }

    /// The tenant's own cap was just set (or removed) through this node: known at once, and
    /// the store asked again at the next request rather than a refusal kept to the second.
    pub(crate) fn cap_changed(&self, cap: Option<crate::store::SpendCap>) {
        self.capped_by(cap);
        self.cold().exhausted.store(false, Ordering::Release);
    }

    /// Records the tenant's own cap the store's answer carried (a spend cap's quota). Call
    /// with the lock held, before [`granted`](Self::granted).
    pub(crate) fn capped_by(&self, cap: Option<crate::store::SpendCap>) {
        if !self.spec.capped {
            return;
        }
        let word = cap.map_or(0, |c| c.limit.clamp(1, CAP_LIMIT_MAX) | if c.hard { 0 } else { CAP_SOFT });
        self.cold().rare_made().cap.store(word, Ordering::Relaxed);
    }

    /// Records what the store's answer to a call watching this balance's recharge said is
    /// open: recharge `n` (0: none).
    pub(crate) fn recharge_open(&self, n: u64) {
        if self.prepaid() && !self.spec.capped {
            self.cold().rare_made().cap.store(n, Ordering::Relaxed);
        }
    }

    /// The recharge of this balance open as the store last said (a request finding the balance
    /// empty meanwhile is told to come back in a few seconds).
    pub(crate) fn recharge_pending(&self) -> Option<u64> {
        if !self.prepaid() || self.spec.capped {
            return None;
        }
        Some(self.cold().rare_load(|r| &r.cap)).filter(|n| *n != 0)
    }

    /// The limit: the spec's, or for a prepaid balance the units of its open grants as the
    /// store last said (0 before the first answer).
    #[inline]
    pub(crate) fn limit(&self) -> u64 {
        if self.prepaid() {
            self.cold().rare_load(|r| &r.balance)
        } else if let Some(cap) = self.spec.capped.then(|| self.own_cap_in_force()).flatten() {
            // As the store holds it (`store::capped_limit`): a hard cap of the tenant's within
            // the maximum in force; a soft one on a plan whose cap is soft (its warnings).
            cap.limit
        } else {
            self.spec.limit().get()
        }
    }
}
