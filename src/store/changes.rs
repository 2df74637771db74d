//! The directory role's feed of tenants changed: what lets every node of a fleet serve a plan
//! change, a revoked key or new overrides within a second, without reading each tenant again.
//!
//! Whoever changes a tenant in the directory (`Admin`, the CLI, a Stripe webhook) tells the
//! feed ([`ChangeCall::Tell`]) after its write; every node reads the whole feed once a second
//! ([`ChangeCall::Read`]) and reads again the tenants it holds whose stamp moved. The feed is
//! one bounded row set: each tenant's last change, at most [`CHANGES_KEPT`] tenants, each
//! stamped by the store with the feed's next sequence number (one more than any stamp it holds
//! or dropped), the oldest dropped first with the highest stamp dropped kept as the feed's
//! `floor`: a node that saw no stamp as high as `floor` may have missed a change, and reads
//! every tenant it holds again. No clock decides it. A tell lost (its writer killed between its write and the tell)
//! leaves the change to the nodes' revalidation within `limits.directory_ttl`, as before.

use crate::base::TenantId;

/// At most this many tenants' last changes are kept in the feed; the oldest go first.
pub const CHANGES_KEPT: usize = 256;

/// What [`DirectoryStore::changes`](super::DirectoryStore::changes) does.
///
/// Not `#[non_exhaustive]`, on purpose: a new mode breaks a store's build rather than being
/// taken for another at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeCall<'a> {
    /// `tenant` changed at `at` (Unix milliseconds, the writer's clock: for people and for a
    /// node's first read): its entry is written with the feed's next stamp (replacing its
    /// last), and the oldest entries past [`CHANGES_KEPT`] dropped ([`Changes::tell`]).
    /// Answers an empty feed.
    Tell {
        /// The tenant changed.
        tenant: &'a TenantId,
        /// When (Unix milliseconds).
        at: i64,
    },
    /// The whole feed, read consistently.
    Read,
}

/// A tenant's last change in the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantChange {
    /// The tenant.
    pub tenant: TenantId,
    /// When it was told (Unix milliseconds, the writer's clock).
    pub at: i64,
    /// The feed's sequence number given to the change: unique, higher than every change
    /// told before it.
    pub stamp: i64,
}

impl TenantChange {
    /// An entry of the feed.
    #[must_use]
    pub fn new(tenant: TenantId, at: i64, stamp: i64) -> Self {
        Self { tenant, at, stamp }
    }
}

/// The feed as read: at most [`CHANGES_KEPT`] entries, one per tenant, and the highest stamp
/// dropped (0: none ever was).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Changes {
    /// Each tenant's last change, in no order.
    pub tenants: Vec<TenantChange>,
    /// The highest stamp of an entry dropped to keep the feed bounded.
    pub floor: i64,
}

impl Changes {
    /// A feed as a store read it.
    #[must_use]
    pub fn new(tenants: Vec<TenantChange>, floor: i64) -> Self {
        Self { tenants, floor }
    }

    /// The highest stamp the feed holds or dropped: what a reader saw all changes up to.
    #[must_use]
    pub fn head(&self) -> i64 {
        self.tenants.iter().map(|c| c.stamp).fold(self.floor, i64::max)
    }

    /// The one rule every store applies to a tell: `tenant`'s entry replaced by this change,
    /// stamped [`head`](Self::head) + 1, then the oldest entries (by stamp) dropped while more
    /// than [`CHANGES_KEPT`] remain, `floor` raised to each one dropped. Returns the stamp
    /// given and the tenants dropped (the stores that write entry by entry delete them).
    pub fn tell(&mut self, tenant: &TenantId, at: i64) -> (i64, Vec<TenantId>) {
        let stamp = self.head().saturating_add(1);
        match self.tenants.iter_mut().find(|c| c.tenant == *tenant) {
            Some(entry) => {
                entry.at = at;
                entry.stamp = stamp;
            }
            None => self.tenants.push(TenantChange::new(tenant.clone(), at, stamp)),
        }
        let mut dropped = Vec::new();
        while self.tenants.len() > CHANGES_KEPT {
            let oldest =
                (0..self.tenants.len()).min_by_key(|&i| self.tenants[i].stamp).expect("more than CHANGES_KEPT entries");
            let gone = self.tenants.swap_remove(oldest);
            self.floor = self.floor.max(gone.stamp);
            dropped.push(gone.tenant);
        }
        (stamp, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tell_replaces_the_tenants_entry_and_drops_the_oldest_past_the_bound() {
        let mut feed = Changes::default();
        let t = |i: usize| TenantId::new(format!("t{i}"));
        for i in 0..CHANGES_KEPT {
            assert_eq!(feed.tell(&t(i), 1_000 + i as i64), (i as i64 + 1, vec![]));
        }
        // The same tenant again: replaced with the next stamp, nothing dropped.
        let again = CHANGES_KEPT as i64 + 1;
        assert_eq!(feed.tell(&t(0), 5_000), (again, vec![]));
        assert_eq!(feed.tenants.len(), CHANGES_KEPT);
        assert_eq!(feed.floor, 0);
        // A new one drops the oldest, t1 (stamp 2; t0 was told again since).
        assert_eq!(feed.tell(&t(CHANGES_KEPT), 6_000), (again + 1, vec![t(1)]));
        assert_eq!((feed.floor, feed.head()), (2, again + 1));
        assert_eq!(feed.tenants.len(), CHANGES_KEPT);
        assert!(feed.tenants.iter().any(|c| c.tenant == t(0) && c.stamp == again));
    }
}
