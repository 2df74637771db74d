//! A tenant's cells of its fleet rate (`rate_scope = "fleet"`) held by this node: a lease of
//! the shared bucket (the rate role's store), spent locally with no store call per request,
//! dropped once its time is up.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, MutexGuard,
};

/// The longest a leased cell may wait to be spent: past it, it is dropped (the other nodes
/// then under-admit by it for at most this long). Also the window the node's pace is
/// measured over.
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
    /// The token of the lease call sent and not answered (its answer lost: a timeout, an
    /// error): the next call goes with it, before any other, so that the cells the store
    /// granted it serve this node while their time is ahead.
    unanswered: Mutex<Option<crate::store::ReserveToken>>,
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
    /// The tenant's pace on this node: the cells it spent in the window that began at
    /// `window_from` (Unix nanoseconds), and in the whole window of [`CELL_LIFE_NANOS`]
    /// before it (0 when that one was quiet).
    pub(crate) window_from: i64,
    pub(crate) window_spent: u32,
    pub(crate) last_window: u32,
    /// Whether the last lease was sized on a measured pace: its cells live the whole
    /// [`CELL_LIFE_NANOS`] (the pace spends them over it), not only `k·T`.
    pub(crate) paced: bool,
    /// Until then the store is taken as down and the plan's own bucket (rate / N) serves
    /// (a fail-open fleet rate whose store failed).
    pub(crate) fallback_until: i64,
}

impl Local {
    /// Moves the pace's window on to `now`: a whole window past, it becomes the last one (a
    /// quiet one, two windows past: none spent).
    fn roll(&mut self, now: i64) {
        let age = now.saturating_sub(self.window_from);
        if age >= CELL_LIFE_NANOS {
            self.last_window = if age >= 2 * CELL_LIFE_NANOS { 0 } else { self.window_spent };
            self.window_spent = 0;
            self.window_from = now;
        }
    }

    /// `cost` cells spent at `now`: counted in the pace.
    fn spent(&mut self, cost: u32, now: i64) {
        self.roll(now);
        self.window_spent = self.window_spent.saturating_add(cost);
    }
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
            l.spent(cost, now);
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

    /// The token of the next lease call (under the lock): the one whose answer was lost, if
    /// any (`true`), else `new()`'s; kept as sent until [`answered`](Self::answered).
    pub(crate) fn token(&self, new: impl FnOnce() -> crate::store::ReserveToken) -> (crate::store::ReserveToken, bool) {
        let mut unanswered = self.unanswered.lock().unwrap_or_else(|e| e.into_inner());
        match *unanswered {
            Some(token) => (token, true),
            None => (*unanswered.insert(new()), false),
        }
    }

    /// The lease call sent was answered.
    pub(crate) fn answered(&self) {
        *self.unanswered.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Of `granted` cells of a lease ending at `tat` (the bucket's TAT after it), those whose
    /// time is still ahead at `now`: a lease answered late serves no cell whose time passed.
    pub(crate) fn ahead(granted: u32, tat: i64, now: i64, bucket: FleetBucket) -> u32 {
        let t = i128::from(bucket.interval.max(1));
        let left = (i128::from(tat) - i128::from(now) + t - 1).div_euclid(t).max(0);
        u32::try_from(left).unwrap_or(u32::MAX).min(granted)
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

    /// How many cells to ask for at `now`, the request waiting needing `need`: what the
    /// tenant spent here over the last [`CELL_LIFE_NANOS`] or so (its pace, measured over whole
    /// windows of that time: a clump is counted with the quiet after it, never taken for the
    /// pace itself) beside `need`; twice the last lease when it ran out within its life faster
    /// than the pace says (a pace rising); at most the burst.
    pub(crate) fn want(&self, need: u32, now: i64, bucket: FleetBucket) -> u32 {
        let mut l = self.local();
        l.roll(now);
        let pace = l.last_window.max(l.window_spent);
        let ran_out = l.granted > 0 && now < l.expires && l.cells < need;
        let mut next = pace.saturating_add(need);
        if ran_out {
            next = next.max(l.granted.saturating_mul(2));
        }
        // Sized on a pace the lease's cells live the window it is measured over; the first
        // lease (or the first after a quiet spell) lives its own time, k·T.
        l.paced = pace > 0 || ran_out;
        next.max(need).max(1).min(bucket.burst.max(need))
    }

    /// A lease of `granted` cells came at `now` (the bucket's TAT then `tat`); `cost` of them
    /// are the waiting request's. What the previous lease had left (fewer than a request
    /// costs) is dropped: a lease's cells live at most its own life. Returns its generation.
    pub(crate) fn leased(&self, granted: u32, cost: u32, tat: i64, now: i64, bucket: FleetBucket) -> u32 {
        let mut l = self.local();
        let own = i128::from(granted) * i128::from(bucket.interval);
        let life = if l.paced { i128::from(CELL_LIFE_NANOS) } else { own.min(i128::from(CELL_LIFE_NANOS)) };
        l.generation = l.generation.wrapping_add(1).max(1);
        l.cells = granted.saturating_sub(cost);
        l.spent(cost.min(granted), now);
        l.expires = now.saturating_add(life as i64);
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
        l.window_spent = 0;
        l.last_window = 0;
        l.paced = false;
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

    /// A lease's size follows the pace over whole windows of 50 ms (a clump counted with the
    /// quiet after it), doubles when the lease ran out within its life, and starts again after a
    /// quiet spell, or once the lease was given back (a state let go). The first lease lives
    /// its own time (k·T); one sized on a pace lives the window.
    #[test]
    fn leases_follow_the_pace_and_start_again() {
        let f = FleetCells::default();
        assert_eq!(f.want(1, NOW, B), 1);
        f.leased(1, 1, NOW + 10_000_000, NOW, B);
        assert_eq!(f.local().expires, NOW + 10_000_000, "its own time: 1 × 10 ms");
        // A clump of 4 at 20 ms (the lease spent): one call for the first, the pace so far 1.
        assert_eq!(f.want(1, NOW + 20_000_000, B), 2);
        f.leased(2, 1, NOW + 40_000_000, NOW + 20_000_000, B);
        assert_eq!(f.local().expires, NOW + 70_000_000, "sized on a pace: the window");
        f.take(1, NOW + 20_000_000).unwrap();
        // Ran out within its life: twice the last lease at least.
        assert_eq!(f.want(1, NOW + 20_000_000, B), 4);
        f.leased(4, 1, NOW + 60_000_000, NOW + 20_000_000, B);
        f.take(1, NOW + 20_000_000).unwrap();
        // The clump is measured with the quiet after it: 5 spent in the window that ends at
        // 50 ms, and nothing more until 90 ms: the pace is 5, not the clump's rate.
        assert_eq!(f.want(1, NOW + 90_000_000, B), 6);
        // Quiet for two windows: from one again.
        assert_eq!(f.want(1, NOW + 10_000_000_000, B), 1);
        // Given back (a state let go): from one again, and a give-back of it reaches nothing.
        let g = f.leased(20, 1, NOW + 11_000_000_000, NOW + 10_000_000_000, B);
        assert_eq!(f.take_unspent(NOW + 10_000_000_000), Some((19, NOW + 11_000_000_000)));
        f.give_back(1, g);
        assert_eq!(f.peek(NOW + 10_000_000_000).0, 0);
        assert_eq!(f.want(1, NOW + 10_000_000_000, B), 1);
    }
}
