//! `RecentRejections`: the last refusals of identified tenants on this node, for the operator
//! dashboard: a ring of fixed size, written only on a refusal, never waited on.

use std::sync::Mutex;

use crate::base::{RejectionKind, TenantId};

/// How many refusals the ring keeps: the dashboard shows a tenant's among the last this many of
/// the node.
pub(crate) const RECENT_REJECTIONS: usize = 1024;

/// The last [`RECENT_REJECTIONS`] refusals of identified tenants on this node.
#[derive(Debug, Default)]
pub(crate) struct RecentRejections {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: Vec<(TenantId, RejectionKind, i64)>,
    /// Where the next entry goes once the ring is full.
    next: usize,
}

impl RecentRejections {
    /// Notes a refusal of `tenant` at `at` (Unix seconds). A refusal that meets the ring busy
    /// is not noted: a flood of refusals never waits on a lock.
    pub(crate) fn note(&self, tenant: &TenantId, kind: RejectionKind, at: i64) {
        let Ok(mut ring) = self.ring.try_lock() else { return };
        let entry = (tenant.clone(), kind, at);
        if ring.entries.len() < RECENT_REJECTIONS {
            ring.entries.push(entry);
        } else {
            let i = ring.next;
            ring.entries[i] = entry;
            ring.next = (i + 1) % RECENT_REJECTIONS;
        }
    }

    /// `tenant`'s refusals among those kept, by kind (in [`RejectionKind::ALL`]'s order, kinds
    /// with none left out), with the time of the oldest refusal kept of any tenant (`None`:
    /// none kept).
    pub(crate) fn of(&self, tenant: &TenantId) -> (Vec<(RejectionKind, u64)>, Option<i64>) {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut counts = vec![0u64; RejectionKind::ALL.len()];
        for (t, kind, _) in &ring.entries {
            if t == tenant {
                if let Some(i) = RejectionKind::ALL.iter().position(|k| k == kind) {
                    counts[i] += 1;
                }
            }
        }
        let since = ring.entries.iter().map(|e| e.2).min();
        let by_kind = RejectionKind::ALL.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(k, n)| (*k, n)).collect();
        (by_kind, since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_refusals_and_counts_one_tenants_by_kind() {
        let recent = RecentRejections::default();
        let (a, b) = (TenantId::from("a"), TenantId::from("b"));
        for i in 0..RECENT_REJECTIONS as i64 {
            recent.note(&a, RejectionKind::RateLimited, i);
        }
        recent.note(&b, RejectionKind::QuotaExceeded, 5000);
        recent.note(&b, RejectionKind::RateLimited, 5001);
        let (of_a, since) = recent.of(&a);
        assert_eq!(of_a, vec![(RejectionKind::RateLimited, RECENT_REJECTIONS as u64 - 2)]);
        assert_eq!(since, Some(2), "the two oldest were written over");
        let (of_b, _) = recent.of(&b);
        assert_eq!(of_b, vec![(RejectionKind::RateLimited, 1), (RejectionKind::QuotaExceeded, 1)]);
        assert_eq!(recent.ring.lock().unwrap().entries.len(), RECENT_REJECTIONS, "bounded");
        assert!(recent.of(&TenantId::from("c")).0.is_empty());
    }
}
