//! The directory lookups of API keys, limited per client address and for the node as a whole
//! (`identify.unknown_key_rate`): an unknown key costs a store read, so a flood of them must
//! not cost one each.

use std::sync::Arc;

use crate::tenant::lru;

/// The directory lookups of API keys (`identify.unknown_key_rate`).
///
/// - **Per client address**, when the address is the client's own ([`Client::identifies`](crate::tenant::Client::identifies)): a
///   GCRA bucket per address key, in a bounded map (`limits.max_clients`, least recently used
///   first). A lookup takes a cell before the directory is asked; one that finds its tenant
///   (or that the store does not answer) gives it back, so only unknown keys count. A lookup
///   that finds the bucket empty while lookups of its address are in flight waits for them
///   (their cells may come back), so a burst of valid keys is never refused; it is refused
///   (429) only once none is in flight.
/// - **Shared by the node** for every other request (behind a load balancer that is not a
///   trusted proxy, every client has its address): at most [`SHARED_IN_FLIGHT`] lookups at
///   once. A node cannot tell a valid key from a random one before it looks it up (after a
///   restart it knows none), so no lookup waits on the budget of unknown keys: the budget
///   ([`SHARED_UNKNOWN_RATE`] a second, a burst of as many) is charged by each lookup that
///   found nothing, and while it is spent the lookups run [`SPENT_IN_FLIGHT`] at a time (a
///   flood's store reads held to a few at once, a valid key's lookup still taking its turn at
///   the store's pace). **Newest first, issued keys first** ([`Turns`]): a freed turn goes to
///   the newest waiting lookup of a key shaped as tollgate issues them, its check right
///   (`base::key::issued_shape`), else to the newest other one. A flood faster than the store
///   answers would otherwise fill the queue, and every lookup behind it (a valid key the node
///   does not know yet) would wait its whole second and get 503: the newest waiter is the one
///   whose client still waits, and random bytes rarely carry a key's check. A lookup waits
///   for its turn at most [`SHARED_WAIT`], in a queue of at most [`SHARED_WAITING`] (past it
///   the oldest waiter of the lowest lane is turned away: memory and waits are bounded
///   whatever a flood sends).
/// - **Keys found valid before on this node** (most of the recent ones, [`KnownKeys`]) take
///   neither: a tenant evicted while idle, or after a reload, is looked up at once whatever
///   others send. (After a restart the node knows none yet.)
pub(crate) struct KeyLookups {
    cells: moka::sync::Cache<u64, Arc<AddressLookups>>,
    /// Digests of API keys the directory knew, as the tenant table keys them.
    known: KnownKeys,
    /// The shared budget's turns.
    turns: Turns,
    /// The theoretical arrival time of the shared budget's unknown keys (the runtime's
    /// clock: a budget of the store's load, not of billing time).
    shared_tat: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The most directory lookups of API keys in flight at once in the node's shared budget.
pub(crate) const SHARED_IN_FLIGHT: usize = 64;
/// Store reads of unknown API keys a second in the node's shared budget (and its burst).
pub(crate) const SHARED_UNKNOWN_RATE: u32 = 100;
/// The most lookups waiting for the shared budget.
pub(crate) const SHARED_WAITING: usize = 4096;
/// The most lookups in flight at once in the shared budget while its unknown keys are spent.
pub(crate) const SPENT_IN_FLIGHT: usize = 4;
/// The longest a lookup waits for its turn in the shared budget.
pub(crate) const SHARED_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// The slots of API keys remembered as found valid (a power of two): 1 MiB.
pub(crate) const KNOWN_KEYS: usize = 1 << 17;

/// API keys found valid lately, by their table digest: one slot per key in a direct-mapped
/// table of [`KNOWN_KEYS`] fingerprints (the digest's low word picks the slot, its high word
/// is kept there), a later key taking an earlier one's slot. 8 bytes a slot, 1 MiB fixed,
/// where an LRU cache of the last 100,000 keys took about 230 bytes each (23 MB, 23 bytes
/// per tenant at a million). Recent keys are held by chance rather than all: a key found
/// valid n keys ago is still held with probability about e^(−n/131,072) (93% at 10,000, 47%
/// at 100,000).
///
/// What it grants is small, so what it may get wrong is too: a key it holds is looked up at
/// once, ahead of the shared budget, and looked up all the same. A key pushed out of its slot
/// waits in the budget, as after a restart; a key whose digest's slot and high word match a
/// remembered one by chance (about 2⁻⁶³ for a key nobody chose: the digest is keyed by
/// secrets drawn at start-up) is looked up at once.
struct KnownKeys(Box<[std::sync::atomic::AtomicU64]>);

impl KnownKeys {
    fn new() -> Self {
        Self((0..KNOWN_KEYS).map(|_| std::sync::atomic::AtomicU64::new(0)).collect())
    }

    /// The slot of `digest` and what it holds when the key is remembered (never 0: empty).
    fn slot(&self, digest: (u64, u64)) -> (&std::sync::atomic::AtomicU64, u64) {
        // Truncation intended: the slot is the digest's low bits.
        #[allow(clippy::cast_possible_truncation)]
        let i = digest.0 as usize & (KNOWN_KEYS - 1);
        (&self.0[i], digest.1 | 1)
    }

    fn contains(&self, digest: (u64, u64)) -> bool {
        let (slot, mark) = self.slot(digest);
        slot.load(std::sync::atomic::Ordering::Relaxed) == mark
    }

    fn insert(&self, digest: (u64, u64)) {
        let (slot, mark) = self.slot(digest);
        slot.store(mark, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets `digest`, if its slot still holds it.
    fn remove(&self, digest: (u64, u64)) {
        let (slot, mark) = self.slot(digest);
        let _ =
            slot.compare_exchange(mark, 0, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A lookup's turn in the node's shared budget ([`KeyLookups::shared_turn`]), until dropped:
/// then the newest waiter of the highest lane takes it.
pub(crate) struct SharedTurn<'a> {
    lookups: &'a KeyLookups,
}

impl Drop for SharedTurn<'_> {
    fn drop(&mut self) {
        let mut t = self.lookups.turns.lock();
        t.in_flight -= 1;
        t.fill(self.lookups.width());
    }
}

/// A lookup waiting for its turn ([`KeyLookups::shared_turn`]). Dropped without it (its wait
/// over, or its request's future dropped: the client gone, an outer timeout), a turn handed to
/// it meanwhile is given on to the next waiter, never lost.
struct Waiter<'a> {
    rx: Option<tokio::sync::oneshot::Receiver<()>>,
    lookups: &'a KeyLookups,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            // Closed first: no turn is handed to it after this.
            rx.close();
            if rx.try_recv().is_ok() {
                drop(SharedTurn { lookups: self.lookups });
            }
        }
    }
}

/// The lanes of lookups waiting for a turn: keys shaped as tollgate issues them, then the
/// others.
const LANES: usize = 2;

/// The shared budget's turns: lookups in flight, and those waiting in their lanes, oldest
/// first (each a sender its lookup's turn is handed through).
#[derive(Default)]
struct Turns(std::sync::Mutex<TurnsState>);

#[derive(Default)]
struct TurnsState {
    in_flight: usize,
    waiting: [std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>; LANES],
}

impl Turns {
    fn lock(&self) -> std::sync::MutexGuard<'_, TurnsState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TurnsState {
    /// Hands turns to waiters while fewer than `width` are in flight: the newest of the
    /// highest lane first. A waiter that gave up (its wait over) is passed over.
    fn fill(&mut self, width: usize) {
        for lane in 0..LANES {
            while self.in_flight < width {
                let Some(next) = self.waiting[lane].pop_back() else { break };
                if next.send(()).is_ok() {
                    self.in_flight += 1;
                }
            }
        }
    }

    fn queued(&self) -> usize {
        self.waiting.iter().map(std::collections::VecDeque::len).sum()
    }
}

/// One client address's lookups: its bucket's theoretical arrival time (Unix nanoseconds),
/// the lookups in flight, and a wake-up when one ends.
#[derive(Default)]
pub(crate) struct AddressLookups {
    tat: std::sync::atomic::AtomicI64,
    in_flight: std::sync::atomic::AtomicU32,
    ended: tokio::sync::Notify,
}

/// A lookup of one client address in flight: counted until dropped.
pub(crate) struct InFlight(Arc<AddressLookups>);

impl InFlight {
    /// Gives back the cell of a lookup that found its tenant, or that the store did not answer.
    pub(crate) fn give_back(&self, rate: crate::config::Rate) {
        let (t, _) = KeyLookups::shape(rate);
        self.0.tat.fetch_sub(t, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

impl KeyLookups {
    pub(crate) fn new(capacity: u64) -> Self {
        Self {
            cells: lru(capacity).build(),
            known: KnownKeys::new(),
            turns: Turns::default(),
            shared_tat: std::sync::Mutex::new(None),
        }
    }

    /// Takes a cell of `address`'s bucket at `now()` (Unix nanoseconds), at once (concurrent
    /// lookups from one address cannot all pass a check made before any is charged), and
    /// counts the lookup in flight; while the bucket is empty and other lookups of the address
    /// are in flight, waits for them. `Err` with the seconds until a cell comes back when the
    /// bucket is empty and none is in flight.
    pub(crate) async fn take(
        &self,
        address: u64,
        rate: crate::config::Rate,
        now: impl Fn() -> i64,
    ) -> Result<InFlight, u64> {
        use std::sync::atomic::Ordering;
        let (t, tolerance) = Self::shape(rate);
        let cell = self.cells.get_with(address, || Arc::new(AddressLookups::default()));
        // Once none was in flight: one more try (a lookup may have given its cell back
        // between this one's take and its count), then the refusal.
        let mut last_try = false;
        loop {
            let ended = cell.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            // Counted in flight before the take: a lookup that finds the bucket empty sees
            // every other one that took a cell.
            cell.in_flight.fetch_add(1, Ordering::AcqRel);
            let now = now();
            let taken = cell.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let from = tat.max(now);
                (from - now <= tolerance).then(|| from.saturating_add(t))
            });
            let tat = match taken {
                Ok(_) => return Ok(InFlight(cell.clone())),
                Err(tat) => tat,
            };
            let others = cell.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
            if others > 0 {
                // Woken when one of them ends; "others" may also be lookups counted for a
                // moment, as this one was, that then gave up: so never for long.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), ended).await;
            } else if !last_try {
                last_try = true;
            } else {
                return Err(u64::try_from(tat - tolerance - now).unwrap_or(1).max(1).div_ceil(1_000_000_000));
            }
        }
    }

    /// Whether the key of this digest was found valid lately: looked up at once.
    pub(crate) fn is_known(&self, digest: (u64, u64)) -> bool {
        self.known.contains(digest)
    }

    /// Remembers (or, when the directory no longer knows it, forgets) a key found valid.
    pub(crate) fn found(&self, digest: (u64, u64), valid: bool) {
        if valid {
            self.known.insert(digest);
        } else {
            self.known.remove(digest);
        }
    }

    /// A turn in the node's shared budget: one of [`SHARED_IN_FLIGHT`] lookups (one of
    /// [`SPENT_IN_FLIGHT`] while the unknown keys read lately passed [`SHARED_UNKNOWN_RATE`]),
    /// newest first, `issued` keys (shaped as tollgate issues them) before others; `None`
    /// when the turn did not come within [`SHARED_WAIT`], or when [`SHARED_WAITING`] lookups
    /// wait already and this one is the oldest of the lowest lane.
    pub(crate) async fn shared_turn(&self, issued: bool) -> Option<SharedTurn<'_>> {
        let lane = usize::from(!issued);
        let mut turn = {
            let mut t = self.turns.lock();
            let width = self.width();
            t.fill(width);
            if t.in_flight < width {
                t.in_flight += 1;
                return Some(SharedTurn { lookups: self });
            }
            if t.queued() >= SHARED_WAITING {
                // The oldest of the lowest lane that has one goes (its lookup answered 503),
                // or this one, if it would be that.
                let lowest = (0..LANES).rev().find(|l| !t.waiting[*l].is_empty()).unwrap_or(lane);
                if lowest < lane {
                    return None;
                }
                t.waiting[lowest].pop_front();
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            t.waiting[lane].push_back(tx);
            Waiter { rx: Some(rx), lookups: self }
        };
        match tokio::time::timeout(SHARED_WAIT, turn.rx.as_mut().expect("waiting")).await {
            Ok(Ok(())) => {
                turn.rx = None;
                Some(SharedTurn { lookups: self })
            }
            Ok(Err(_)) => None,
            // The wait ran out; a turn handed meanwhile is given on by the waiter's drop.
            Err(_) => None,
        }
    }

    /// How many lookups the shared budget runs at once now: fewer while its unknown keys are
    /// spent.
    fn width(&self) -> usize {
        let (_, tolerance) = Self::shared_shape();
        let now = tokio::time::Instant::now();
        let tat = *self.shared_tat.lock().unwrap_or_else(|e| e.into_inner());
        if tat.is_some_and(|tat| tat > now + tolerance) {
            SPENT_IN_FLIGHT
        } else {
            SHARED_IN_FLIGHT
        }
    }

    /// Counts a store read of an unknown key in the node's shared budget: never more than one
    /// cell past spent, so that the budget is whole again a second after a flood ends,
    /// however long it lasted.
    pub(crate) fn shared_unknown(&self) {
        let (t, tolerance) = Self::shared_shape();
        let now = tokio::time::Instant::now();
        let mut tat = self.shared_tat.lock().unwrap_or_else(|e| e.into_inner());
        let next = tat.map_or(now, |tat| tat.max(now)) + t;
        *tat = Some(next.min(now + tolerance + t + t));
    }

    fn shared_shape() -> (std::time::Duration, std::time::Duration) {
        let t = std::time::Duration::from_secs(1) / SHARED_UNKNOWN_RATE;
        (t, t * (SHARED_UNKNOWN_RATE - 1))
    }

    /// The emission interval of `rate` and the bucket's tolerance (its count at once).
    fn shape(rate: crate::config::Rate) -> (i64, i64) {
        let t = i64::try_from(rate.interval().as_nanos()).unwrap_or(i64::MAX);
        (t, t.saturating_mul(i64::from(rate.count().get()) - 1))
    }
}

impl std::fmt::Debug for KeyLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLookups").field("addresses", &self.cells.entry_count()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key is remembered in its slot until forgotten or pushed out by a later key of the
    /// same slot; forgetting a key pushed out leaves the later one.
    #[test]
    fn known_keys_hold_the_latest_key_of_each_slot() {
        let known = KnownKeys::new();
        let (a, b, c) = ((7, 1), (7 + KNOWN_KEYS as u64, 2), (8, 1));
        assert!(!known.contains(a), "nothing remembered yet");
        known.insert(a);
        known.insert(c);
        assert!(known.contains(a) && known.contains(c));
        assert!(!known.contains((7, 4)), "another key of the slot is not taken for it");
        known.insert(b);
        assert!(known.contains(b) && !known.contains(a), "the later key of the slot");
        known.remove(a);
        assert!(known.contains(b), "forgetting the key pushed out leaves the later one");
        known.remove(b);
        assert!(!known.contains(b) && known.contains(c));
        assert!(!known.contains((9, 0)), "an empty slot holds no key, not even a zero one");
    }
}
