//! A tenant's cells of its fleet rate (`rate_scope = "fleet"`) held by this node: a lease of
//! the shared bucket (the rate role's store), spent locally with no store call per request,
//! dropped once its time is up.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};

/// The longest a leased cell may wait to be spent: past it, it is dropped (the other nodes
/// then under-admit by it for at most this long).
pub(crate) const CELL_LIFE_NANOS: i64 = 50_000_000;

/// A fleet rate's parameters, as the plan compiled them: one cell's time and the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FleetBucket {
    /// One cell's time, in nanoseconds (T).
    pub(crate) interval: u64,
    /// The most cells free at once.
    pub(crate) burst: u32,
}

/// The cells of one tenant's fleet rate this node holds, and what it knows of the shared
/// bucket.
#[derive(Debug, Default)]
pub(crate) struct FleetCells {
    local: Mutex<Local>,
    /// One lease call at a time for this tenant on this node: the requests that wait share
    /// its cells.
    lock: tokio::sync::Mutex<()>,
    /// The sender id of this tenant's rate calls (0: not drawn yet).
    sender: AtomicU64,
}

/// A lease of cells, as this node spends it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Local {
    /// Which lease (from 1; 0: none yet): a refused request's cells go back only to the lease
    /// they came from, while it lasts.
    pub(crate) generation: u32,
    /// Cells leased and not spent.
    pub(crate) cells: u32,
    /// They are spent before this (Unix nanoseconds), else dropped.
    pub(crate) expires: i64,
    /// The virtual end of the lease in the shared bucket (its TAT after the grant).
    pub(crate) lease_end: i64,
    /// The shared bucket's TAT as the last call read it.
    pub(crate) tat: i64,
    /// The size of the last lease, and when it was granted.
    pub(crate) granted: u32,
    pub(crate) granted_at: i64,
    /// The size of the next lease: follows the tenant's pace on this node.
    pub(crate) next: u32,
    /// Until then the store is taken as down and the plan's own bucket (rate / N) serves
    /// (a fail-open fleet rate whose store failed).
    pub(crate) fallback_until: i64,
}

impl FleetCells {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `cost` cells of the lease at `now` (Unix nanoseconds): the lease they came from,
    /// or `None` when it cannot cover them (spent, or past its time).
    pub(crate) fn take(&self, cost: u32, now: i64) -> Option<u32> {
        let mut l = self.local();
        if now < l.expires && l.cells >= cost {
            l.cells -= cost;
            return Some(l.generation);
        }
        None
    }

    /// The cells of the lease left (none once past its time at `now`) and the bucket's TAT as
    /// last read.
    pub(crate) fn peek(&self, now: i64) -> (u32, i64) {
        let l = self.local();
        (if now < l.expires { l.cells } else { 0 }, l.tat)
    }

    /// Gives back `cost` cells a refused request took from the lease `generation`: they go
    /// on serving it while it lasts; a later lease never gets them (it was granted its own).
    pub(crate) fn give_back(&self, cost: u32, generation: u32) {
        let mut l = self.local();
        if generation != 0 && generation == l.generation {
            l.cells = l.cells.saturating_add(cost).min(l.granted);
        }
    }

    /// Whether the shared bucket, as last read, cannot give `cost` cells at `now` (its TAT
    /// only moves forward, but for cells given back): the request is refused without asking.
    /// The TAT read.
    pub(crate) fn refused_by_reading(&self, cost: u32, now: i64, bucket: FleetBucket) -> Option<i64> {
        let tat = self.local().tat;
        let t = i128::from(bucket.interval);
        let wait = i128::from(tat.max(now)) + i128::from(cost) * t - i128::from(bucket.burst) * t - i128::from(now);
        (wait > 0).then_some(tat)
    }

    /// Whether the plan's own bucket serves now, the store having failed (fail-open).
    pub(crate) fn in_fallback(&self, now: i64) -> bool {
        now < self.local().fallback_until
    }

    /// The store failed: the plan's own bucket serves until `until`.
    pub(crate) fn fall_back(&self, until: i64) {
        self.local().fallback_until = until;
    }

    /// The lock one lease call at a time holds.
    pub(crate) fn lock(&self) -> &tokio::sync::Mutex<()> {
        &self.lock
    }

    /// This tenant's sender id for rate calls, drawn by `draw` on the first call.
    pub(crate) fn sender(&self, draw: impl FnOnce() -> u64) -> u64 {
        match self.sender.load(Ordering::Relaxed) {
            0 => {
                let drawn = draw().max(1);
                match self.sender.compare_exchange(0, drawn, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => drawn,
                    Err(other) => other,
                }
            }
            s => s,
        }
    }

    /// How many cells to ask for at `now`, the request waiting needing `need`: as many as
    /// the tenant spent here in about [`CELL_LIFE_NANOS`] (its pace), at least `need`, at most
    /// the burst.
    pub(crate) fn want(&self, need: u32, now: i64, bucket: FleetBucket) -> u32 {
        let mut l = self.local();
        if l.granted > 0 && now >= l.expires.saturating_add(CELL_LIFE_NANOS) {
            // Quiet for longer than a cell's life: the pace starts again.
            l.next = 1;
        } else if l.granted > 0 {
            let spent = l.granted.saturating_sub(if now < l.expires { l.cells } else { l.cells.min(l.granted) });
            let life = (l.expires - l.granted_at).max(1);
            let took = (now.min(l.expires) - l.granted_at).max(1);
            l.next = if now < l.expires && l.cells < need {
                // Ran out within its life: twice as many next time.
                l.granted.saturating_mul(2)
            } else {
                // Expired: what was spent over the life, scaled to a whole life.
                let scaled = i128::from(spent) * i128::from(CELL_LIFE_NANOS) / i128::from(took.max(life).max(1));
                u32::try_from(scaled).unwrap_or(u32::MAX).max(1)
            };
        }
        l.next.max(need).max(1).min(bucket.burst.max(need))
    }

    /// A lease of `granted` cells came at `now` (the bucket's TAT then `tat`); `cost` of them
    /// are the waiting request's. What the previous lease had left (fewer than a request
    /// costs) is dropped: a lease's cells live at most its own life. Returns its generation.
    pub(crate) fn leased(&self, granted: u32, cost: u32, tat: i64, now: i64, bucket: FleetBucket) -> u32 {
        let mut l = self.local();
        let life = i128::from(granted) * i128::from(bucket.interval);
        l.generation = l.generation.wrapping_add(1).max(1);
        l.cells = granted.saturating_sub(cost);
        l.expires = now.saturating_add(life.min(i128::from(CELL_LIFE_NANOS)) as i64);
        l.lease_end = tat;
        l.tat = tat;
        l.granted = granted;
        l.granted_at = now;
        l.fallback_until = 0;
        l.generation
    }

    /// The bucket's TAT as a refused call read it.
    pub(crate) fn read(&self, tat: i64) {
        self.local().tat = tat;
    }

    /// The cells unspent and the lease's end, for a return (taken out: the lease ends), when
    /// some of its time is still ahead at `now`.
    pub(crate) fn take_unspent(&self, now: i64) -> Option<(u32, i64)> {
        let mut l = self.local();
        let cells = std::mem::take(&mut l.cells).min(l.granted);
        let alive = now < l.expires;
        // The lease ends; the pace starts again (a state let go with requests waiting leases
        // no more than they need).
        l.expires = 0;
        l.granted = 0;
        l.next = 1;
        // The reading counted this lease's cells as taken: forgotten, so that no request is
        // refused by cells now given back (the next one asks the store).
        l.tat = 0;
        l.generation = l.generation.wrapping_add(1).max(1);
        (alive && cells > 0 && l.lease_end > now).then_some((cells, l.lease_end))
    }

    /// What a response reports of the rate at `now`, having `left` cells of the lease and
    /// the bucket's TAT `tat` as last read: the cells left here plus those the shared bucket
    /// still has (at most the burst).
    pub(crate) fn remaining(left: u32, tat: i64, now: i64, bucket: FleetBucket) -> u32 {
        let t = i128::from(bucket.interval.max(1));
        let horizon = i128::from(now) + i128::from(bucket.burst) * t;
        let free = ((horizon - i128::from(tat.max(now))) / t).max(0);
        u32::try_from(free).unwrap_or(u32::MAX).saturating_add(left).min(bucket.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: FleetBucket = FleetBucket { interval: 10_000_000, burst: 20 };
    const NOW: i64 = 1_000_000_000_000;

    /// A refused request's cells go back to the lease they came from while it lasts; a later
    /// lease never gets them (it was granted its own), nor does a lease past its time give them
    /// out.
    #[test]
    fn cells_go_back_only_to_their_own_lease() {
        let f = FleetCells::default();
        let first = f.leased(5, 1, NOW + 50_000_000, NOW, B);
        let taken = f.take(2, NOW).unwrap();
        assert_eq!((taken, f.peek(NOW).0), (first, 2));
        f.give_back(2, taken);
        assert_eq!(f.peek(NOW).0, 4, "back to its lease");
        f.give_back(9, taken);
        assert_eq!(f.peek(NOW).0, 5, "never more than the lease was granted");
        let taken = f.take(3, NOW).unwrap();
        // A new lease (the first one spent or gone): the late give-back does not reach it.
        let later = NOW + 60_000_000;
        let second = f.leased(4, 1, later + 40_000_000, later, B);
        assert_ne!(second, first);
        f.give_back(3, taken);
        assert_eq!(f.peek(later).0, 3, "the second lease keeps its own 3");
        // Leftovers of a lease are not carried into the next one.
        assert!(f.take(3, later).is_some());
        assert_eq!(f.peek(later + 50_000_000).0, 0, "past its time: nothing to spend");
    }

    /// A lease's life is min(50 ms, k·T); its size follows the pace and starts again after a
    /// quiet spell, or once the lease was given back (a state let go).
    #[test]
    fn leases_follow_the_pace_and_start_again() {
        let f = FleetCells::default();
        assert_eq!(f.want(1, NOW, B), 1);
        f.leased(1, 1, NOW + 10_000_000, NOW, B);
        // Spent at once, expired 10 ms later: its pace fills 50 ms with 5.
        assert_eq!(f.want(1, NOW + 10_000_000, B), 5);
        f.leased(5, 1, NOW + 60_000_000, NOW + 10_000_000, B);
        // Spent within its life: twice as many.
        for _ in 0..4 {
            f.take(1, NOW + 20_000_000).unwrap();
        }
        assert_eq!(f.want(1, NOW + 20_000_000, B), 10);
        // Quiet longer than a cell's life: from one again.
        assert_eq!(f.want(1, NOW + 10_000_000_000, B), 1);
        // Given back (a state let go): from one again, and a give-back of it reaches nothing.
        let g = f.leased(20, 1, NOW + 11_000_000_000, NOW + 10_000_000_000, B);
        assert_eq!(f.take_unspent(NOW + 10_000_000_000), Some((19, NOW + 11_000_000_000)));
        f.give_back(1, g);
        assert_eq!(f.peek(NOW + 10_000_000_000).0, 0);
        assert_eq!(f.want(1, NOW + 10_000_000_000, B), 1);
    }
}
