//! `Tallies`: the requests this node admitted and refused, and the money its tenants spent,
//! counted per tenant and day and per minute of the fleet, waiting for the flush to add them to
//! the usage store's tallies ([`Tally`]) in batches of their own, each exactly once under its
//! own id. Every node's tallies added up are the fleet's: what the dashboard's overview reads.
//!
//! Counted where the decision is made: a refusal by the admission part's `count` (a short
//! lock, on the refusal path only), a request admitted by its tenant's state (one atomic add on
//! the request path, drained by the flush with the tenant's usage), money from the `spend`
//! meter's usage as the flush drains it. Bounded: at most [`STAGED_TENANTS`] tenants' days and
//! [`STAGED_MINUTES`] of the fleet's minutes wait at once (a store down for days), past which
//! a tenant's counts go to the fleet's minutes alone and the oldest minutes are let go, both
//! counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::base::{RejectionKind, TenantId};
use crate::store::contract::TALLY_KEPT_SECS;
use crate::store::{FlushId, Tally, TallyScope, UsageBatch, TALLY_ADMITTED, TALLY_SPENT};

/// The most (tenant, day) tallies a node keeps waiting for the store.
pub(crate) const STAGED_TENANTS: usize = 10_000;

/// The most minutes of the fleet's tallies a node keeps waiting for the store in each of its
/// [`SHARDS`]: three days'.
pub(crate) const STAGED_MINUTES: usize = 3 * 1_440;

/// The staged tallies' locks: a tenant's refusals take its own shard's (by its id's hash), so
/// that a tenant refused in a flood holds up few others.
const SHARDS: usize = 16;

/// Counts by outcome: outcomes are the crate's own names.
type Counts = BTreeMap<&'static str, u64>;

/// What waits for the store.
#[derive(Debug, Default)]
struct Staged {
    /// The fleet's counts, by minute.
    fleet: BTreeMap<i64, Counts>,
    /// Each tenant's counts, by (tenant, day).
    tenants: HashMap<(TenantId, i64), Counts>,
}

/// The tallies of this node not yet in the store: staged, and batches formed and not
/// committed (retried first, in order, under their own ids, each with when it was formed).
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    staged: [Mutex<Staged>; SHARDS],
    pending: Mutex<VecDeque<(Arc<UsageBatch>, i64)>>,
    /// Refusals of requests that named no tenant (an unknown or missing key), by reason
    /// ([`RejectionKind::ALL`]'s order): counted without a lock (a flood of them is a client's
    /// choice), added to the fleet's minute of the flush that seals them.
    spill: [AtomicU64; RejectionKind::ALL.len()],
    /// Counts that found no room (tenants' counts kept only in the fleet's minutes, minutes
    /// let go, batches past their time), logged by the flush.
    pub(crate) overflowed: AtomicU64,
}

fn add(counts: &mut Counts, outcome: &'static str, n: u64) {
    let c = counts.entry(outcome).or_default();
    *c = c.saturating_add(n);
}

impl Tallies {
    fn staged(&self, shard: usize) -> MutexGuard<'_, Staged> {
        self.staged[shard % SHARDS].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every shard's staged tallies, taken: the fleet's minutes merged.
    fn take_staged(&self) -> Staged {
        let mut all = Staged::default();
        for shard in 0..SHARDS {
            let staged = std::mem::take(&mut *self.staged(shard));
            for (minute, counts) in staged.fleet {
                let into = all.fleet.entry(minute).or_default();
                for (outcome, n) in counts {
                    add(into, outcome, n);
                }
            }
            all.tenants.extend(staged.tenants);
        }
        all
    }

    /// The shard of `tenant` (the fleet's own counts: the first).
    fn shard_of(tenant: Option<&TenantId>) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault};
        tenant.map_or(0, |t| {
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(t.as_str()) as usize
        })
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<(Arc<UsageBatch>, i64)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `n` of `outcome` at `at` (Unix seconds): in the fleet's minute, and in the
    /// tenant's day when there is a tenant (an unknown key has none).
    pub(crate) fn count(&self, tenant: Option<&TenantId>, outcome: &'static str, n: u64, at: i64) {
        if n == 0 {
            return;
        }
        let minute = at - at.rem_euclid(60);
        let day = at - at.rem_euclid(86_400);
        let mut staged = self.staged(Self::shard_of(tenant));
        if !staged.fleet.contains_key(&minute) && staged.fleet.len() >= STAGED_MINUTES {
            // The oldest minute goes (the store has taken none for days).
            if let Some((_, counts)) = staged.fleet.pop_first() {
                let lost: u64 = counts.values().sum();
                self.overflowed.fetch_add(lost, Relaxed);
            }
        }
        add(staged.fleet.entry(minute).or_default(), outcome, n);
        if let Some(tenant) = tenant {
            let key = (tenant.clone(), day);
            let room = staged.tenants.len() < STAGED_TENANTS / SHARDS;
            match staged.tenants.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut e) => add(e.get_mut(), outcome, n),
                std::collections::hash_map::Entry::Vacant(e) if room => add(e.insert(Counts::new()), outcome, n),
                std::collections::hash_map::Entry::Vacant(_) => {
                    self.overflowed.fetch_add(n, Relaxed);
                }
            }
        }
    }

    /// A refusal of `kind` at `at`, of `tenant` if it was identified (a request that named
    /// none takes no lock: it is counted in the minute of the flush that seals it).
    pub(crate) fn refused(&self, tenant: Option<&TenantId>, kind: RejectionKind, at: i64) {
        match tenant {
            Some(_) => self.count(tenant, kind.label(), 1, at),
            None => {
                let i = RejectionKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
                self.spill[i].fetch_add(1, Relaxed);
            }
        }
    }

    /// `n` requests of `tenant` admitted, drained at `at`.
    pub(crate) fn admitted(&self, tenant: &TenantId, n: u64, at: i64) {
        self.count(Some(tenant), TALLY_ADMITTED, n, at);
    }

    /// `nanos` of money spent by `tenant`, drained at `at`.
    pub(crate) fn spent(&self, tenant: &TenantId, nanos: u64, at: i64) {
        self.count(Some(tenant), TALLY_SPENT, nanos, at);
    }

    /// The batches to commit now (`now`: the engine clock's Unix seconds), in order: those
    /// formed before and not committed (but those formed longer ago than the store keeps
    /// tallies, let go and counted), else the staged tallies sealed in batches of at most
    /// `max` tallies each, under ids `id` makes.
    pub(crate) fn batches(&self, max: usize, now: i64, mut id: impl FnMut() -> FlushId) -> Vec<Arc<UsageBatch>> {
        let mut pending = self.pending();
        while pending.front().is_some_and(|(_, formed)| now.saturating_sub(*formed) > TALLY_KEPT_SECS) {
            if let Some((old, _)) = pending.pop_front() {
                let n = old.tallies.iter().flat_map(|t| t.counts.iter()).fold(0u64, |a, (_, n)| a.saturating_add(*n));
                self.overflowed.fetch_add(n, Relaxed);
            }
        }
        if pending.is_empty() {
            // The refusals that named no tenant, in this minute.
            for (i, spilled) in self.spill.iter().enumerate() {
                let n = spilled.swap(0, Relaxed);
                self.count(None, RejectionKind::ALL[i].label(), n, now);
            }
            let staged = self.take_staged();
            let counts = |c: Counts| c.into_iter().map(|(o, n)| (o.to_owned(), n)).collect::<Vec<_>>();
            let mut tallies: Vec<Tally> =
                staged.fleet.into_iter().map(|(m, c)| Tally::new(TallyScope::Fleet, m, counts(c))).collect();
            let mut tenants: Vec<_> = staged.tenants.into_iter().collect();
            // In key order: concurrent batches of several nodes touch shared rows in one order.
            tenants.sort_unstable_by(|a, b| (a.0 .1, &a.0 .0).cmp(&(b.0 .1, &b.0 .0)));
            tallies.extend(tenants.into_iter().map(|((t, d), c)| Tally::new(TallyScope::Tenant(t), d, counts(c))));
            for chunk in tallies.chunks(max.max(1)) {
                pending.push_back((Arc::new(UsageBatch::new(id(), Vec::new()).with_tallies(chunk.to_vec())), now));
            }
        }
        pending.iter().map(|(b, _)| b.clone()).collect()
    }

    /// Forgets the tallies staged (a process restored from a snapshot: each copy has them).
    pub(crate) fn forget_staged(&self) {
        let forgotten = self.take_staged();
        let spilled: u64 = self.spill.iter().map(|s| s.swap(0, Relaxed)).sum();
        let n = forgotten.fleet.values().flat_map(|c| c.values()).fold(spilled, |a, b| a.saturating_add(*b));
        self.overflowed.fetch_add(n, Relaxed);
    }

    /// The batch `id` was committed (or is past use): it leaves the queue.
    pub(crate) fn committed(&self, id: &FlushId) {
        let mut pending = self.pending();
        if pending.front().is_some_and(|(b, _)| b.id == *id) {
            pending.pop_front();
        }
    }

    /// Batches formed and not committed.
    pub(crate) fn waiting_batches(&self) -> usize {
        self.pending().len()
    }

    /// Tallies waiting: (staged fleet minutes, staged tenants' days, batches formed).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> (usize, usize, usize) {
        let (mut minutes, mut tenants) = (std::collections::BTreeSet::new(), 0);
        for shard in 0..SHARDS {
            let staged = self.staged(shard);
            minutes.extend(staged.fleet.keys().copied());
            tenants += staged.tenants.len();
        }
        (minutes.len(), tenants, self.pending().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_to_the_fleets_minute_and_the_tenants_day_in_bounded_room() {
        let tallies = Tallies::default();
        let (a, b) = (TenantId::from("a"), TenantId::from("b"));
        tallies.admitted(&a, 3, 86_400 + 61);
        tallies.refused(Some(&a), RejectionKind::QuotaExceeded, 86_400 + 62);
        tallies.refused(None, RejectionKind::UnknownCredentials, 86_400 + 125);
        tallies.spent(&b, 500, 86_400 + 1);
        let mut n = 0;
        let batches = tallies.batches(2, 86_400 + 125, || {
            n += 1;
            FlushId::new(format!("t{n}"))
        });
        let all: Vec<_> = batches.iter().flat_map(|b| b.tallies.clone()).collect();
        assert_eq!(batches.len(), 3, "three minutes and two tenants' days, two a batch");
        assert!(batches.iter().all(|b| b.records.is_empty()));
        let fleet: Vec<_> = all.iter().filter(|t| t.scope == TallyScope::Fleet).map(|t| t.start).collect();
        assert_eq!(fleet, [86_400, 86_400 + 60, 86_400 + 120]);
        assert_eq!(all.iter().find(|t| t.scope == TallyScope::Tenant(b.clone())).unwrap().count("spent_nanos"), 500);
        let of_a = all.iter().find(|t| t.scope == TallyScope::Tenant(a.clone())).unwrap();
        assert_eq!((of_a.start, of_a.count("admitted"), of_a.count("quota_exceeded")), (86_400, 3, 1));
        let minute = all.iter().find(|t| t.scope == TallyScope::Fleet && t.start == 86_400 + 60).unwrap();
        assert_eq!((minute.count("admitted"), minute.count("quota_exceeded")), (3, 1));
        // Pending until committed: the same batches again, nothing new sealed.
        tallies.admitted(&a, 1, 86_400 + 61);
        let again = tallies.batches(2, 86_400 + 130, || FlushId::new("never"));
        let ids = ["t1", "t2", "t3"].map(FlushId::new);
        assert_eq!(again.iter().map(|b| b.id.clone()).collect::<Vec<_>>(), ids);
        tallies.committed(&ids[1]);
        assert_eq!(tallies.waiting().2, 3, "only the front leaves");
        for id in &ids {
            tallies.committed(id);
        }
        let next = tallies.batches(10, 86_400 + 61, || FlushId::new("t4"));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].tallies.len(), 2, "the minute and a's day");

        // Bounded: past the tenants' room, the fleet still counts.
        let full = Tallies::default();
        let n = 2 * STAGED_TENANTS;
        for i in 0..n {
            full.admitted(&TenantId::from(format!("t{i}")), 1, 0);
        }
        let (minutes, tenants, _) = full.waiting();
        assert_eq!(minutes, 1);
        assert!(tenants <= STAGED_TENANTS && tenants > STAGED_TENANTS * 9 / 10, "{tenants}: each shard's room");
        let over = full.overflowed.load(Relaxed) as usize;
        assert_eq!(over + tenants, n, "what found no room is counted");
        let batches = full.batches(usize::MAX, 0, || FlushId::new("x"));
        assert_eq!(batches[0].tallies[0].count("admitted"), n as u64, "the fleet counts them all");
        for m in 0..STAGED_MINUTES as i64 + 2 {
            full.count(None, "rate_limited", 1, m * 60);
        }
        assert_eq!(full.waiting().0, STAGED_MINUTES, "the fleet's own shard");

        // A batch the store never takes is let go once the store would no longer keep it;
        // staged tallies are forgotten at a restore, counted.
        let stuck = Tallies::default();
        stuck.admitted(&a, 5, 0);
        assert_eq!(stuck.batches(10, 0, || FlushId::new("s1")).len(), 1);
        assert_eq!(stuck.batches(10, TALLY_KEPT_SECS, || FlushId::new("s2"))[0].id, FlushId::new("s1"));
        stuck.refused(None, RejectionKind::UnknownCredentials, 0);
        let later = stuck.batches(10, TALLY_KEPT_SECS + 1, || FlushId::new("s3"));
        assert_eq!(later.iter().map(|b| b.id.clone()).collect::<Vec<_>>(), [FlushId::new("s3")]);
        assert_eq!(later[0].tallies[0].count("unknown_credentials"), 1, "a refusal of no tenant, without a lock");
        assert_eq!(stuck.overflowed.load(Relaxed), 10, "the fleet's 5 and the tenant's 5 let go");
        stuck.admitted(&a, 2, 0);
        stuck.forget_staged();
        assert_eq!(stuck.waiting().0, 0);
        assert_eq!(stuck.overflowed.load(Relaxed), 12);
    }
}
