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

    /// Takes `cost` cells of the lease at `now` (Unix nanoseconds): the cells left and the
    /// bucket's TAT as last read, or `None` when the lease cannot cover them (spent, or past
    /// its time).
    pub(crate) fn take(&self, cost: u32, now: i64) -> Option<(u32, i64)> {
        let mut l = self.local();
        if now < l.expires && l.cells >= cost {
            l.cells -= cost;
            return Some((l.cells, l.tat));
        }
        None
    }

    /// The cells of the lease left and the bucket's TAT as last read.
    pub(crate) fn peek(&self) -> (u32, i64) {
        let l = self.local();
        (l.cells, l.tat)
    }

    /// Gives back `cost` cells a refused request took (they go on serving the lease, while
    /// it lasts).
    pub(crate) fn give_back(&self, cost: u32) {
        let mut l = self.local();
        l.cells = l.cells.saturating_add(cost);
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
        if l.granted > 0 {
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
    /// are the waiting request's. Cells of the previous lease still alive stay.
    pub(crate) fn leased(&self, granted: u32, cost: u32, tat: i64, now: i64, bucket: FleetBucket) {
        let mut l = self.local();
        let kept = if now < l.expires { l.cells } else { 0 };
        let life = i128::from(granted) * i128::from(bucket.interval);
        l.cells = kept.saturating_add(granted).saturating_sub(cost);
        l.expires = now.saturating_add(life.min(i128::from(CELL_LIFE_NANOS)) as i64);
        l.lease_end = tat;
        l.tat = tat;
        l.granted = granted;
        l.granted_at = now;
        l.fallback_until = 0;
    }

    /// The bucket's TAT as a refused call read it.
    pub(crate) fn read(&self, tat: i64) {
        self.local().tat = tat;
    }

    /// The cells unspent and the lease's end, for a return (taken out: the lease ends), when
    /// some of its time is still ahead at `now`.
    pub(crate) fn take_unspent(&self, now: i64) -> Option<(u32, i64)> {
        let mut l = self.local();
        let cells = std::mem::take(&mut l.cells);
        l.expires = 0;
        (cells > 0 && l.lease_end > now).then_some((cells, l.lease_end))
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
