//! Quota leases: every store call of a quota cell, made with the cell's lock held, carrying a
//! token so that a call retried after a timeout is applied once.

use std::sync::Arc;

use crate::engine::{node::NodeIds, store_calls::StoreCalls, usage::thresholds::Thresholds};
use crate::{
    clock::Clock,
    config::QuotaMode,
    plan::Runtime,
    store::{CapMode, Grant, QuotaStoreExt, Reservation, ReserveToken, StoreError, SHRINK},
    tenant::{Call, CallKind, QuotaRef, Tenant},
};

/// After this many attempts a call still unanswered is logged as an error (once); it is kept,
/// and sent again with its token, until the store answers. One the store answered with an
/// error this many times is given up (logged with its units): it did not apply it, and it must
/// not hold the counter for good.
const MAX_ATTEMPTS: u32 = 20;

/// What a refill did for the request that waited on it.
pub(crate) enum Refill {
    /// The request's units were reserved for it from the store's answer, in the period
    /// tagged `tag` that starts at `start`.
    Taken { tag: u16, start: i64 },
    /// The store has fewer units left than the request costs (a hard quota is spent).
    Short,
    /// Nothing was asked for a request (a prefetch).
    Done,
}

/// What a call readied by [`Leases::begin`] says.
#[derive(Clone, Copy)]
struct Sent {
    kept: crate::store::Kept,
    expires_at: i64,
    /// When it was first sent (this node's clock).
    at: i64,
    /// When it is sent this time (this node's clock): a store on its own clock moves the
    /// call's times by how far its clock is ahead of this.
    now: i64,
    /// Whether it is of the cell's current period's counter.
    current: bool,
    /// Whether it is a refill (which owes the lease's debt).
    refill: bool,
}

/// The most releases one batch of lease returns sends (DynamoDB writes at most 100 items in
/// a transaction).
const RETURN_BATCH: usize = 100;

/// How many batches of lease returns are in flight at once.
const RETURN_AT_ONCE: usize = 4;

/// How many cells a flush tends at once.
const TEND_AT_ONCE: usize = 64;
/// After this many store timeouts, a flush tends no more cells (the next flush does).
const TEND_TIMEOUTS: u32 = 3;

/// A lease asked for a hold holds at least this many of its estimates (within the cell's
/// largest lease).
pub(crate) const LEASE_PER_HOLD: u64 = 4;

/// Units taken for a request or a hold with the cell's lock held ([`Leases::take_locked`]).
pub(crate) struct Took {
    /// The tag of the period they came from.
    pub(crate) tag: u16,
    /// The units left in the lease after them.
    pub(crate) left: i64,
    /// The start of the period a refill took them from (`None`: from the lease as it was).
    pub(crate) start: Option<i64>,
}

/// Whether the store's answer says the hard limit is reached: nothing left to lease. (A grant
/// smaller than asked does not say it: near the limit, grants shrink.)
fn spent(limit: Option<u64>, grant: &Grant) -> bool {
    limit.is_some_and(|l| grant.reserved >= l)
}

/// Applies the store's answer to `cell`'s view of its counter: the reserved total, a
/// balance's granted units, a spend cap's tenant-set cap, and whether the limit the call was
/// held to (`limit`, the call's; else the balance's or the tenant's cap) is reached.
fn answered(cell: QuotaRef<'_>, grant: &Grant, limit: Option<u64>) {
    let limit = match grant.cap {
        // The tenant's own hard cap held the call, within the plan's maximum.
        Some(cap) if cap.hard => crate::store::capped_limit(limit, Some(cell.spec.cap_max), Some(cap)),
        _ => grant.limit.or(limit),
    };
    cell.capped_by(grant.cap);
    cell.granted(grant.reserved, grant.limit, spent(limit, grant));
}

/// Units drained from a cell's lease for the request a refill is made for: back to the lease
/// unless the refill's answer is applied ([`applied`](Self::applied)), however the call ends
/// (an error, a timeout, or the caller's future dropped, its client gone). Dropped with the
/// call in flight, they were lost: its next sending, answered, left the node holding them less.
struct Drained<'a> {
    cell: QuotaRef<'a>,
    units: u64,
}

impl Drained<'_> {
    /// The answer came: it says what becomes of them.
    fn applied(mut self) {
        self.units = 0;
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if self.units > 0 {
            self.cell.credit(self.units);
        }
    }
}

/// A batch's answers, one per release of `n` (a store answering fewer: the rest unanswered).
fn one_each(mut got: Vec<Result<(), StoreError>>, n: usize) -> Vec<Option<Result<(), StoreError>>> {
    got.truncate(n);
    let mut got: Vec<_> = got.into_iter().map(Some).collect();
    got.resize_with(n, || None);
    got
}

/// The quota leases of this engine's tenants: every call of a quota cell to the quota store,
/// numbered by this node, and the threshold notifications its answers trigger.
#[derive(Debug)]
pub(crate) struct Leases {
    stores: Arc<StoreCalls>,
    ids: Arc<NodeIds>,
    thresholds: Thresholds,
    clock: Clock,
    /// The engine is shutting down: a lease given back is not taken again.
    stopped: std::sync::atomic::AtomicBool,
    /// `limits.reservation_expiry`, in seconds: how long what a call says this node keeps
    /// stays reserved without another call.
    expiry: std::sync::atomic::AtomicI64,
    /// The longest a hold may stay open under any configuration this node ran (the largest
    /// `limits.hold_timeout` or route `hold_timeout`), in seconds: what a returned cell's open
    /// holds are reserved for (no later call renews it).
    hold_horizon: std::sync::atomic::AtomicI64,
    /// The recharge part's queue, where this node's refills put the recharges they claimed
    /// (handed by the builder; the engine holds the part).
    recharges: Arc<crate::engine::recharge::Recharges>,
    /// The earliest renewal of a resident cell's reservation: the stale-lease pass visits the
    /// tenants only once one may have lapsed.
    renewals: Renewals,
    /// How many give-backs of units whose lease went back first (a hold settled after its
    /// tenant's state was let go) are on their way to the store, each in a task of its own
    /// ([`release_late`](Self::release_late)): a shutdown waits for them, or the process would
    /// exit with their units reserved until their period ends.
    late: tokio::sync::watch::Sender<usize>,
}

/// One give-back on its way to the store in a task of its own, counted by
/// [`Leases::late_begun`] until it drops (ended, panicked or cancelled).
pub(crate) struct LateRelease(Arc<Leases>);

impl Drop for LateRelease {
    fn drop(&mut self) {
        self.0.late.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A lower bound of the times the calls of this node's resident cells last renewed their
/// reservations ([`QuotaRef::reported_at`]), so that the per-second pass stopping stale
/// leases ([`Renewals::pass`]) visits every tenant only when a reservation may have lapsed,
/// not every second at a million tenants.
///
/// Each answered call lowers it after it wrote its cell's time; each pass that visits counts
/// it again, from what it saw and what calls said meanwhile. A pass that starts beside one
/// under way visits every cell and publishes nothing; a pass after one that panicked counts
/// again from scratch.
#[derive(Debug)]
pub(crate) struct Renewals {
    /// Unix seconds; `i64::MAX`: no renewal known.
    earliest: std::sync::atomic::AtomicI64,
    /// Held by the pass that counts.
    counting: std::sync::Mutex<()>,
}

impl Default for Renewals {
    fn default() -> Self {
        Self { earliest: std::sync::atomic::AtomicI64::new(i64::MAX), counting: std::sync::Mutex::new(()) }
    }
}

impl Renewals {
    /// A call renewed a cell's reservation at `at` (its cell's time already written).
    fn renewed(&self, at: i64) {
        if at > 0 {
            self.earliest.fetch_min(at, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Runs `visit` over the resident cells unless none can be stale at `now`: every
    /// reservation was renewed less than `lapse` seconds ago. `visit` returns the earliest
    /// renewal it saw (`i64::MAX`: none). Returns whether it ran.
    pub(crate) fn pass(&self, now: i64, lapse: i64, visit: impl FnOnce() -> i64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let (guard, trusted) = match self.counting.try_lock() {
            Ok(guard) => (guard, true),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                // The pass before panicked midway: what it left is not a bound.
                self.counting.clear_poison();
                (p.into_inner(), false)
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                // Beside a pass that counts (and may have reset the bound): every cell.
                visit();
                return true;
            }
        };
        if trusted && now < self.earliest.load(SeqCst).saturating_add(lapse) {
            return false;
        }
        // Counted afresh: calls answered from here lower it as well. (A swap, not a store:
        // it reads the last call's lowering, and with it that call's cell time.)
        self.earliest.swap(i64::MAX, SeqCst);
        let seen = visit();
        self.earliest.fetch_min(seen, SeqCst);
        drop(guard);
        true
    }
}

impl Leases {
    pub(crate) fn new(
        stores: Arc<StoreCalls>,
        ids: Arc<NodeIds>,
        thresholds: Thresholds,
        recharges: Arc<crate::engine::recharge::Recharges>,
        clock: Clock,
        config: &crate::config::Config,
    ) -> Self {
        let leases = Self {
            stores,
            ids,
            thresholds,
            clock,
            stopped: std::sync::atomic::AtomicBool::new(false),
            expiry: std::sync::atomic::AtomicI64::new(0),
            hold_horizon: std::sync::atomic::AtomicI64::new(0),
            recharges,
            renewals: Renewals::default(),
            late: tokio::sync::watch::Sender::new(0),
        };
        leases.configure(config);
        leases
    }

    /// Takes `limits.reservation_expiry` of `config` (at the start and at each reload).
    pub(crate) fn configure(&self, config: &crate::config::Config) {
        let secs = i64::try_from(config.limits.reservation_expiry.as_secs()).unwrap_or(i64::MAX);
        self.expiry.store(secs, std::sync::atomic::Ordering::Relaxed);
        let longest = config
            .routes
            .iter()
            .filter_map(|r| r.hold.as_ref().and_then(|h| h.timeout))
            .fold(config.limits.hold_timeout, std::cmp::Ord::max);
        let longest = i64::try_from(longest.as_secs()).unwrap_or(i64::MAX);
        // Never shorter: holds opened under an earlier configuration keep their deadlines.
        self.hold_horizon.fetch_max(longest, std::sync::atomic::Ordering::Relaxed);
    }

    /// The earliest renewal of a resident cell's reservation, for the stale-lease pass.
    pub(crate) fn renewals(&self) -> &Renewals {
        &self.renewals
    }

    /// `limits.reservation_expiry` and the clock skew it tolerates, in seconds.
    pub(crate) fn expiry(&self) -> (i64, i64) {
        let expiry = self.expiry.load(std::sync::atomic::Ordering::Relaxed);
        (expiry, expiry / 10)
    }

    /// Shutdown began: from now on a cell whose lease was given back is not leased again (no
    /// one would give the new lease back: its units would stay leased until the period ends).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next token of `cell`'s calls. The sender is the cell itself (this engine's node
    /// id mixed with a number drawn for the cell on its first call): two states of one tenant
    /// on one node (a retired one and its replacement) send to the same key under their own
    /// locks, so each must have its own sequence there.
    fn token(&self, cell: QuotaRef<'_>) -> ReserveToken {
        let sender = cell.sender(|| self.ids.new_sender());
        ReserveToken::new(sender, self.ids.next_seq()).at(self.clock.unix_secs())
    }

    /// A new call of `cell` to the counter `key`, with the cell's next token.
    fn call(&self, cell: QuotaRef<'_>, key: crate::store::QuotaKey, kind: CallKind) -> Call {
        Call { key, token: self.token(cell), kind, attempts: 0, errors: 0, keeping: None, holding: 0 }
    }

    /// Readies `call` of `cell` to be sent: counts the attempt, fixes what it says the node
    /// keeps of the counter (at its first send), and records it as in flight: if the sending
    /// future is dropped (a timeout) or the store fails, the next call of the cell sends it
    /// again, with the same token and the same record, before anything else.
    fn begin(&self, cell: QuotaRef<'_>, call: &mut Call) -> Sent {
        call.attempts = call.attempts.saturating_add(1);
        if call.attempts == MAX_ATTEMPTS {
            // Never given up: the store may have applied it (an answer lost, a timeout), and a
            // dropped call would strand its units (leased and never used nor given back, so a
            // hard quota under-admits for the rest of its period). The cell waits for it;
            // its requests follow `on_store_error` meanwhile.
            tracing::error!(key = ?call.key, kind = ?call.kind,
                "a quota call has failed {MAX_ATTEMPTS} times; it is kept and sent again until the store answers");
        }
        // What this node keeps of the counter after the call, renewed for the expiry: of the
        // current period's counter (a call settling another period keeps nothing of it). A
        // refill pays the lease's debt, so its holds are all reserved after it; any other
        // call leaves the debt, which the holds' units go to first. Fixed at the first send.
        let (start, end) = cell.period();
        let current = end != 0 && call.key == cell.key(start, end);
        let refill = matches!(call.kind, CallKind::Reserve { refill: true, .. });
        let holding = call.holding;
        let (kept, expires_at, at) = *call.keeping.get_or_insert_with(|| {
            let now = self.clock.unix_secs();
            if current {
                let locked = cell.locked();
                let (expiry, skew) = self.expiry();
                // A returned cell's open holds are reserved until the last of them must have
                // settled (no later call renews it): a live node's long stream keeps its units,
                // a killed node's come back then.
                let expiry = if locked.returned {
                    expiry.max(self.hold_horizon.load(std::sync::atomic::Ordering::Relaxed).saturating_add(skew))
                } else {
                    expiry
                };
                let mut kept = cell.kept(&locked, !refill, locked.returned);
                kept.held = kept.held.saturating_add(holding);
                (kept, now.saturating_add(expiry), now)
            } else {
                (crate::store::Kept::default(), 0, now)
            }
        });
        cell.locked().set_inflight(Some(call.clone()));
        Sent { kept, expires_at, at, now: self.clock.unix_secs(), current, refill }
    }

    /// The release `call` (readied by [`begin`](Self::begin)) sends.
    fn release_of(call: &Call, sent: &Sent) -> crate::store::Release {
        let units = match call.kind {
            CallKind::Release { units } => units,
            CallKind::Reserve { .. } => 0,
        };
        crate::store::Release::new(call.key.clone(), units, call.token)
            .keeping(sent.kept, sent.expires_at)
            .sent_at(sent.now)
    }

    /// What a call watching `cell`'s recharge saw: the open one is marked on the cell, a claim
    /// queued for the worker.
    fn recharge_seen(&self, cell: QuotaRef<'_>, seen: crate::store::RechargeSeen) {
        use crate::store::RechargeSeen;
        let totals = self.stores.policy().totals();
        match seen {
            RechargeSeen::Claimed { n, packs, amount } => {
                totals.recharge(crate::metrics::RechargeOutcome::Claimed);
                cell.recharge_open(n);
                self.recharges.claimed(crate::engine::recharge::Claimed {
                    tenant: cell.tenant().clone(),
                    meter: cell.meter_id().clone(),
                    n,
                    packs,
                    amount,
                });
            }
            RechargeSeen::Open { n } => cell.recharge_open(n),
            RechargeSeen::LimitReached { month, first } => {
                // Counted once per month across the fleet (the store's `first`); alerted by
                // each node that sees it, once (one id: written once), so that a first answer
                // lost loses nothing.
                if first {
                    totals.recharge(crate::metrics::RechargeOutcome::Limited);
                }
                self.thresholds.recharge_limited(crate::engine::alerts::RechargeAlert {
                    tenant: cell.tenant().clone(),
                    meter: cell.meter_id().clone(),
                    event: crate::engine::alerts::RechargeEvent::LimitReached { month },
                    at: self.clock.unix_secs(),
                });
                cell.recharge_open(0);
            }
            _ => cell.recharge_open(0),
        }
    }

    /// Sends one store call of `cell` ([`begin`](Self::begin), then [`finish`](Self::finish)).
    async fn send(&self, cell: QuotaRef<'_>, mut call: Call) -> Result<Grant, StoreError> {
        let sent = self.begin(cell, &mut call);
        let store = &self.stores.request().quota;
        let answer = match call.kind {
            CallKind::Reserve { units, owed, limit, at_least, taking, .. } => {
                let r = Reservation::new(call.key.clone(), units, owed, limit, call.token)
                    .shrinking(at_least)
                    .keeping(sent.kept, sent.expires_at)
                    .taking(taking)
                    .sent_at(sent.now);
                // A spend cap's counters are held to the tenant's own cap when it set one.
                let r = if cell.spec.capped { r.capped(CapMode::Stored).cap_within(cell.spec.cap_max) } else { r };
                // A balance the plan recharges: each call watches the tenant's recharge (the
                // store claims one when the balance it leaves is below the tenant's `below`).
                let watch = cell.spec.recharged && cell.prepaid();
                let r = if watch { r.recharging(crate::store::RechargeMode::Watch { now: call.token.at }) } else { r };
                let answer = store.reserve(&r).await;
                if let (true, Ok(grant)) = (watch, &answer) {
                    self.recharge_seen(cell, grant.recharge);
                }
                answer
            }
            CallKind::Release { .. } => {
                store.release_one(Self::release_of(&call, &sent)).await.map(|()| Grant::new(0, 0))
            }
        };
        self.finish(cell, &call, &sent, &answer);
        answer
    }

    /// Applies the store's answer to a call of `cell` to what the cell knows of it.
    fn finish(&self, cell: QuotaRef<'_>, call: &Call, sent: &Sent, answer: &Result<Grant, StoreError>) {
        let Sent { kept, at, current, refill, .. } = *sent;
        match answer {
            Ok(grant) => {
                cell.locked().set_inflight(None);
                if grant.expired && current {
                    // The store gave back what this node kept before this call (it was cut
                    // off or paused past its expiry): the lease is dropped, and its holds'
                    // units are owed again as they record.
                    let dropped = cell.drop_kept(!refill);
                    tracing::warn!(key = ?call.key, dropped,
                        "the store no longer holds this node's reservation: expired (limits.reservation_expiry; \
                         the node was cut off or paused past it), or lost with its row (the store says so): \
                         its lease is dropped");
                }
                if current {
                    // As the store now counts it: a refill's grant joins the lease, but for
                    // what the waiting request takes of it; an expired sender keeps its jobs.
                    let taking = match call.kind {
                        CallKind::Reserve { taking, .. } => grant.granted.min(taking),
                        CallKind::Release { .. } => 0,
                    };
                    let reported = if grant.expired {
                        crate::store::Kept::new(grant.granted - taking, 0, kept.jobs)
                    } else {
                        crate::store::Kept::new(kept.lease.saturating_add(grant.granted - taking), kept.held, kept.jobs)
                    };
                    cell.reported(reported, at);
                    self.renewals.renewed(at);
                }
                // Every answer of a spend cap's reservation says the tenant's own cap: a node
                // learns it from its debts' calls too, not only from its refills.
                if matches!(call.kind, CallKind::Reserve { .. }) {
                    cell.capped_by(grant.cap);
                }
            }
            // No answer: it may have been applied. Kept.
            Err(StoreError::Timeout(_)) => {}
            Err(e) => {
                let mut locked = cell.locked();
                let given_up = locked.inflight_mut().is_some_and(|kept| {
                    kept.errors += 1;
                    // Only a call every attempt of which was answered with an error: one that
                    // ever timed out may have been applied, and is kept.
                    let given_up = kept.errors >= MAX_ATTEMPTS && kept.errors == kept.attempts;
                    if given_up {
                        tracing::error!(key = ?kept.key, kind = ?kept.kind, error = %e,
                            "the store refused a quota call {MAX_ATTEMPTS} times; given up");
                    }
                    given_up
                });
                if given_up {
                    locked.set_inflight(None);
                }
            }
        }
    }

    /// Sends again the call left in flight by a timeout or a failure, and applies its answer.
    /// A call in flight always belongs to the cell's current period: nothing else is sent, and
    /// so no period rolls, until it is answered.
    pub(crate) async fn settle_inflight(&self, cell: QuotaRef<'_>) -> Result<(), StoreError> {
        let Some(call) = cell.locked().inflight().cloned() else {
            return Ok(());
        };
        // Sent again after the node's reservation lapsed (it was cut off past the expiry): the
        // store may answer it as first applied ("not expired") though it gave those units
        // back since. Told before the send, which records the call's own (first) time.
        // The reservation was last renewed by the last call answered, or by this one (sent
        // before, perhaps applied).
        let (expiry, skew) = self.expiry();
        let at = cell.reported_at().max(call.keeping.map_or(0, |(_, _, at)| at));
        let lapsed = at > 0 && self.clock.unix_secs() >= at.saturating_add(expiry - skew);
        let grant = self.send(cell, call.clone()).await?;
        if let CallKind::Reserve { refill: true, repay, limit, .. } = call.kind {
            if lapsed {
                // They wait, as a stopped lease does, for a new call to renew the reservation
                // (or find it given back): never in the lease, where requests take without the
                // lock. What the call repaid pays the lease's debt, which stays the lease's.
                cell.credit(repay);
                cell.credit_stopped(grant.granted);
            } else {
                cell.credit(grant.granted + repay);
            }
            answered(cell, &grant, limit);
            if !lapsed {
                self.report_if_changed(cell).await?;
            }
        }
        Ok(())
    }

    /// Tells the store what `cell` keeps if it differs from what its record says, at once (a
    /// release of no units). After a refill answered only when sent again: the store applied
    /// it as first sent, counting the units its request was to take as used and those it
    /// drained from the lease as gone, while that request failed and the units are in the
    /// lease (answered expired, the record keeps the grant less those units). Told by the next
    /// flush, a node killed meanwhile would leave them counted used for the rest of the period
    /// (its expiry gives back only what the record says). A report that fails is in flight,
    /// as any call: the work waiting on the cell follows `on_store_error`.
    /// Call with the cell's lock held.
    async fn report_if_changed(&self, cell: QuotaRef<'_>) -> Result<(), StoreError> {
        let (start, end) = cell.period();
        let changed = {
            let locked = cell.locked();
            end != 0 && !locked.returned && cell.kept(&locked, true, false) != locked.reported()
        };
        if changed {
            let call = self.call(cell, cell.key(start, end), CallKind::Release { units: 0 });
            self.send(cell, call).await?;
        }
        Ok(())
    }

    /// Settles what the cell owes the store outside its lease: refunds of the previous period
    /// that came in after its roll.
    async fn settle_previous(&self, cell: QuotaRef<'_>) -> Result<(), StoreError> {
        let late = cell.take_late_refunds();
        if late == 0 {
            return Ok(());
        }
        let prev = cell.locked().prev();
        if let Some((start, end)) = prev {
            let key = cell.key(start, end);
            let call = self.call(cell, key, CallKind::Release { units: late });
            self.send(cell, call).await?;
        }
        Ok(())
    }

    /// Owes the units taken outside any lease in periods other than the cell's current one to
    /// their own periods' counters (units used late in a period, settled in the next one),
    /// one call each. Call with the cell's lock held.
    async fn settle_unleased_elsewhere(&self, cell: QuotaRef<'_>) -> Result<(), StoreError> {
        while let Some((start, end, units)) = cell.pop_unleased_elsewhere() {
            let kind = CallKind::Reserve {
                units: 0,
                owed: units,
                limit: None,
                refill: false,
                repay: 0,
                at_least: 0,
                taking: 0,
            };
            // Recorded in flight first: if it fails, the next call of the cell sends it again.
            let call = self.call(cell, cell.key(start, end), kind);
            self.send(cell, call).await?;
        }
        Ok(())
    }

    /// Moves the cell to the period holding `now` if its lease belongs to one that is over,
    /// and settles the old period with the store: its unused units go back, its debt is
    /// owed. Call with the cell's lock held.
    async fn roll_if_over(&self, cell: QuotaRef<'_>, now: i64) -> Result<(), StoreError> {
        let (_, end) = cell.period();
        if now < end {
            return Ok(());
        }
        self.settle_previous(cell).await?;
        let (start, end) = cell.window(now);
        let Some((old, left)) = cell.roll_period(start, end) else {
            return Ok(());
        };
        // The old counter's record of what this node keeps is settled by this call (it keeps
        // nothing of it now); the new one has none yet. (A balance's windows share a counter.)
        let told = !cell.prepaid() && cell.reported_kept().total() > 0;
        if !cell.prepaid() {
            cell.forget_reported();
        }
        let kind = if left > 0 {
            CallKind::Release { units: left as u64 }
        } else if left == 0 && told {
            CallKind::Release { units: 0 }
        } else if left < 0 {
            CallKind::Reserve {
                units: 0,
                owed: left.unsigned_abs(),
                limit: None,
                refill: false,
                repay: 0,
                at_least: 0,
                taking: 0,
            }
        } else {
            return Ok(());
        };
        self.send(cell, self.call(cell, old, kind)).await.map(drop)
    }

    /// Reserves a new lease for `cell` in the period holding `now`, of at least `min_lease`
    /// units (a hold's few estimates; 0: the cell's own size); with `need`, that many units of
    /// it are reserved for the request waiting (they never pass through the lease, so no
    /// other request can take them first). Owes what the lease and the reports owe.
    /// Call with the cell's lock held.
    pub(crate) async fn refill_locked(
        &self,
        rt: &Runtime,
        cell: QuotaRef<'_>,
        now: i64,
        need: u64,
        min_lease: u64,
        used_at_once: bool,
    ) -> Result<Refill, StoreError> {
        // Shutdown gave this lease back (under the cell's lock, which this call holds): a new
        // one would stay leased for good. The work waiting on it (a request, a hold, a job's
        // reservation still in flight) is answered as a store that cannot serve it.
        if cell.locked().returned && self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("the engine is shutting down: its leases were given back".into()));
        }
        // Leased again: units given back go to the lease.
        cell.locked().returned = false;
        self.settle_inflight(cell).await?;
        // Units given back past the lease's cap are this node's still: they serve first. Not
        // those of a reservation not renewed in time: they serve once this call renews it.
        let (expiry, skew) = self.expiry();
        if cell.stale(self.clock.unix_secs(), expiry, skew) {
            // Not renewed in time: its lease waits for this call's answer, not spent first.
            cell.stash();
        }
        let stale = cell.stopped();
        if !stale {
            let spare = cell.take_spare();
            if spare > 0 {
                cell.credit(spare);
            }
        }
        self.roll_if_over(cell, now).await?;
        self.settle_previous(cell).await?;
        self.settle_unleased_elsewhere(cell).await?;
        let (start, end) = cell.period();
        let repay = (-cell.lease()).max(0) as u64;
        let owed = repay + cell.take_unleased();
        let now_nanos = self.clock.unix_nanos();
        // A lease asked for a hold holds a few of its estimates (`min_lease`), within the
        // cell's largest lease: holds ride the lease instead of asking the store each.
        let size = cell.next_size(now_nanos).max(min_lease.min(cell.lease_cap()));
        // A prepaid balance is held by the store to its grants, whatever the call says: 0 is
        // what a balance holds before its first grant. A spend cap's call says the plan's
        // limit: the store holds it to the tenant's own cap instead when one is set.
        let limit = Self::limit_of(cell);
        // Near a hard limit, leases shrink (the store grants at most an eighth of what is
        // left, never less than the waiting request needs): asked that way already from what
        // the last answer said was left, so the store's rule rarely has to cut the ask. (A
        // balance's limit is the last one the store gave: a top-up since is seen on this call.)
        let size = match limit {
            // A balance before its first answer: nothing is known of it; the store's rule alone.
            Some(_) if cell.limit() == 0 && cell.known_reserved() == 0 => size,
            Some(_) => size.min(cell.limit().saturating_sub(cell.known_reserved()).div_ceil(SHRINK).max(1)),
            None => size,
        };
        // What the lease holds serves the waiting request first: the store is asked for what
        // it lacks, never for the whole of it again (a hold's estimate asked anew each time
        // would leave most of the limit reserved and unused).
        // The lease is drained for the caller while the store answers: a request reading it
        // meanwhile, its clock in the second of an earlier answer that said "spent", must
        // ask (after this call), not take the drained lease for a spent quota.
        if need > 0 {
            cell.forget_spent();
        }
        let have = cell.drain(need);
        let lacking = need - have;
        if need > 0 && lacking == 0 && owed == 0 {
            let tag = crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(start, end));
            return Ok(Refill::Taken { tag, start });
        }
        // Work waiting for this cell's lock wants units too (requests and holds queued behind
        // this call; jobs' reservations do not say): asked in the same call, and held to no shrinking share (they are
        // wanted now, not a lease ahead of need), so that one store call serves them all, each
        // taking its units from the lease once its turn comes, rather than one call each (a
        // busy tenant's queue near a limit, where leases shrink, made dozens). The store grants
        // what is left if less, which still covers this call's own need whenever what is left
        // does: a waiter never costs the caller its units. A waiter gone before its turn (its
        // client away) leaves its units in the lease, spent by the next request or given back
        // as spares. The lease's size, which paces the next ones, is what it would have been.
        let asking = cell.asking();
        let others = cell.wanted().saturating_sub(need);
        let wanted_now = lacking.saturating_add(others);
        let units = size.max(wanted_now);
        // What the waiting request takes of the grant is used at once (a request's units, a
        // job's, which stay spent by rule); a hold's stay kept (held, given back at an expiry).
        let taking = if used_at_once { lacking } else { 0 };
        let kind = CallKind::Reserve { units, owed, limit, refill: true, repay, at_least: wanted_now.max(1), taking };
        let mut call = self.call(cell, cell.key(start, end), kind);
        // What a hold drained from the lease is held from now on: the call says it is kept,
        // so that a node killed before its next report has those units given back at its
        // expiry (they were kept by its last call, as lease; left out, they stayed used).
        if !used_at_once {
            call.holding = have;
        }
        // Answered here: applied below. Answered only when sent again (after a timeout): the
        // whole grant goes to the lease then.
        // Not answered (an error, a timeout, or this future dropped: a client gone), the
        // units taken from the lease go back to it.
        let drained = Drained { cell, units: have };
        let grant = self.send(cell, call).await?;
        drained.applied();
        if stale && !grant.expired {
            // Renewed: what waited serves again.
            cell.resume();
        }
        cell.leased(size.min(grant.granted.max(1)), now_nanos);
        // The grant reaches the lease before the answer can say "spent": a request reading
        // the cell between the two finds the units this node holds, never an empty lease of
        // a spent quota (what it drained for the caller comes back with the grant when the
        // grant falls short).
        let covered = need > 0 && grant.granted >= lacking;
        cell.credit(if covered { grant.granted - lacking + repay } else { grant.granted + repay + have });
        if grant.expired && !used_at_once && have > 0 {
            // The store gave back the lease those units came from, and took this call's word
            // that they are kept (it owes nothing for them): the hold's units are owed again.
            cell.force_take(have, now);
        }
        answered(cell, &grant, limit);
        // Less than the waiters want (the store grants them all whenever that much is left):
        // nothing is left, and the waiters it asked for are refused without asking again.
        cell.answered_asking(asking, grant.granted < wanted_now);
        // A balance's thresholds belong to the balance, not to its lease's window.
        let (from, to) = if cell.prepaid() { crate::base::Period::Prepaid.bounds(0) } else { (start, end) };
        self.thresholds.check(rt, now, cell, grant.reserved, grant.used, from, to);
        let tag = crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(start, end));
        if covered {
            Ok(Refill::Taken { tag, start })
        } else {
            if need == 0 {
                return Ok(Refill::Done);
            }
            // Fewer units than the request costs were left in the store, but with units given
            // back to the lease meanwhile they may cover it.
            Ok(match cell.try_take(need, now.max(start)) {
                crate::tenant::Take::Taken { tag, .. } => Refill::Taken { tag, start },
                _ => {
                    // Refused: the node keeps no more than its cap of what it cannot use; the
                    // rest goes back now, for the fleet's other nodes.
                    self.release_spare(cell, tag).await?;
                    // What this call drained for a request or a job is back in the lease (with
                    // what it was granted), while the call told the store it was theirs, used
                    // at once: past the cap it went back just now; what is left (at most the
                    // cap, a unit at a reached limit) is told now, or a node killed before its
                    // next report would leave it spent. A hold's drained units were said held:
                    // nothing to tell. At most one call a second per quota at a reached limit
                    // (refusals read the answer's "spent" until then). Not told (the call
                    // fails), it is in flight: the next call, or the next flush, sends it.
                    if used_at_once {
                        if let Err(e) = self.report_if_changed(cell).await {
                            tracing::debug!(key = ?cell.key(start, end), error = %e,
                                "units a refused request drained were not told to the store: the cell's next call tells it");
                        }
                    }
                    Refill::Short
                }
            })
        }
    }

    /// Takes `units` of `cell` at `at` for a request or a hold, with the cell's lock held by
    /// the caller: from the lease if a refill came in meanwhile, else straight from a new
    /// reservation (asking at least `units`, in a lease of at least `min_lease`), so that no
    /// other request can take them first.
    /// `None`: the limit cannot cover them. A waiter (`wanted`, said before it waited for the
    /// lock) that a refill asked for, whose answer found nothing left, is refused without
    /// asking again: a busy tenant's queue past its limit costs one call, not one each.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn take_locked(
        &self,
        rt: &Runtime,
        cell: QuotaRef<'_>,
        at: i64,
        units: u64,
        min_lease: u64,
        used_at_once: bool,
        wanted: Option<&crate::tenant::Wanted<'_>>,
    ) -> Result<Option<Took>, StoreError> {
        match cell.try_take(units, at) {
            crate::tenant::Take::Taken { tag, left } => return Ok(Some(Took { tag, left, start: None })),
            crate::tenant::Take::Exhausted => return Ok(None),
            crate::tenant::Take::NeedLease => {}
        }
        // Only within the period the answer was about: a waiter already in the next one asks.
        if at < cell.period().1 && wanted.is_some_and(|w| w.refused(cell)) {
            return Ok(None);
        }
        Ok(match self.refill_locked(rt, cell, at, units, min_lease, used_at_once).await? {
            Refill::Taken { tag, start } => Some(Took { tag, left: cell.lease(), start: Some(start) }),
            Refill::Short | Refill::Done => None,
        })
    }

    /// Readies the return of `cell`'s lease (on eviction, reload and shutdown), with its lock
    /// held by the caller: what must go first goes (a call in flight, the period before's late
    /// refunds, usage taken outside a lease in other periods), the lease is emptied and marked
    /// given back, and the one call that gives back its rest and owes its debt is returned
    /// (`None`: nothing to send).
    async fn prepare_return(&self, cell: QuotaRef<'_>) -> Result<Option<Call>, StoreError> {
        self.settle_inflight(cell).await?;
        // Spare units come back to the lease, given back with it (those of the period
        // before join its late refunds, settled next).
        let spare = cell.take_spare();
        cell.credit(spare);
        self.settle_previous(cell).await?;
        // Units taken outside a lease go to their own periods (all of them, for a cell that
        // never held a lease).
        self.settle_unleased_elsewhere(cell).await?;
        let left = {
            // Marked under the same lock a hold's give-back takes: its units come to
            // the lease before this empties it, or go to the store after.
            let mut locked = cell.locked();
            locked.returned = true;
            let spare = i64::try_from(cell.take_spare()).unwrap_or(i64::MAX);
            cell.take_all().saturating_add(spare)
        };
        let owed = cell.take_unleased();
        let (start, end) = cell.period();
        if end == 0 {
            return Ok(None);
        }
        // Usage outside the lease is owed and the rest of the lease given back: one call.
        let net = i128::from(left) - i128::from(owed);
        let kind = match net.cmp(&0) {
            std::cmp::Ordering::Greater => CallKind::Release { units: net as u64 },
            std::cmp::Ordering::Less => CallKind::Reserve {
                units: 0,
                owed: (-net) as u64,
                limit: None,
                refill: false,
                repay: 0,
                at_least: 0,
                taking: 0,
            },
            // Nothing to give back or owe: what it keeps is told if the store's record of it
            // differs, or if holds are open (the call reserves them until the longest hold
            // may settle, where the last report reserved them for the expiry alone).
            std::cmp::Ordering::Equal if Self::told(cell) => return Ok(None),
            std::cmp::Ordering::Equal => CallKind::Release { units: 0 },
        };
        let call = self.call(cell, cell.key(start, end), kind);
        Ok(Some(call))
    }

    /// Whether the store's record of what `cell` keeps is what it keeps once its lease is
    /// given back.
    fn told(cell: QuotaRef<'_>) -> bool {
        let locked = cell.locked();
        let kept = cell.kept(&locked, true, true);
        kept.held == 0 && locked.reported() == kept
    }

    /// Logs a lease that could not be given back (a retired state keeps it, and a later flush
    /// sends it again: [`return_leases`](Self::return_leases)).
    fn unreturned(cell: QuotaRef<'_>, e: &StoreError) {
        tracing::debug!(error = %e, "a lease could not be given back");
        if let Some(call) = cell.locked().inflight().cloned() {
            // Reported: until it lands the store counts its units, and at the expiry gives back
            // what the cell's last call that landed said it keeps.
            tracing::warn!(key = ?call.key, kind = ?call.kind, attempts = call.attempts,
                "a quota call is still unanswered as the lease is given back: the store counts its units \
                 (a retired tenant state's call is sent again by the next flush)");
        }
    }

    /// Tells the store at once what `state`'s cell of `meter` keeps, if that changed since
    /// its last call said it: after a job's reservation gave units back to the lease (its
    /// work recorded fewer, or was abandoned), or a duplicate event did. Until told, the store
    /// counts them as the job's (spent at the node's expiry) or as used: a node killed before
    /// its next flush would leave them spent for the rest of the period. Never waits for the
    /// cell: one busy (a call under way, which may have read what it keeps before), or whose
    /// reservation is stale or stopped (only a reservation's answer may renew it), is left to
    /// the worker's tend: `false`, ask it at once. A report that fails is in flight, sent
    /// again by the cell's next call, or by the worker's tend: `false` too.
    pub(crate) async fn report_now(&self, state: &Tenant, meter: usize) -> bool {
        let Some(cell) = state.quota(meter) else { return true };
        let (expiry, skew) = self.expiry();
        let lapsing = cell.stopped() || cell.stale(self.clock.unix_secs(), expiry, skew);
        let guard = if lapsing { None } else { cell.lock().try_lock() };
        let Some(_guard) = guard else { return false };
        let told = self
            .stores
            .within(async {
                self.settle_inflight(cell).await?;
                self.report_if_changed(cell).await
            })
            .await;
        match told {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(tenant = %state.id, error = %e,
                    "units given back were not told to the store: the cell's next call tells it");
                false
            }
        }
    }

    /// Counts a give-back about to be spawned ([`release_late`](Self::release_late)), until the
    /// guard drops: counted before the spawn, so that a shutdown begun after it waits for it.
    pub(crate) fn late_begun(self: &Arc<Self>) -> LateRelease {
        self.late.send_modify(|n| *n += 1);
        LateRelease(self.clone())
    }

    /// Waits, until `deadline`, for the give-backs on their way to the store
    /// ([`late_begun`](Self::late_begun)): `true` once none is left.
    pub(crate) async fn late_done(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.late.subscribe();
        let none_left = async { rx.wait_for(|n| *n == 0).await.is_ok() };
        tokio::time::timeout_at(deadline, none_left).await.unwrap_or(false)
    }

    /// Gives `units` back to the counter of the period `[start, end)` of `cell` (a hold's,
    /// settled after its lease was given back), with the cell's lock taken here.
    pub(crate) async fn release_late(
        &self,
        cell: QuotaRef<'_>,
        start: i64,
        end: i64,
        units: u64,
        held: Option<u16>,
    ) -> Result<(), StoreError> {
        let _guard = cell.lock().lock().await;
        // A hold's units (taken from the lease of the period tagged `held`) stay counted held
        // until the release that gives them back says the node no longer keeps them: no call
        // between finds them in neither. Counted no longer held however it ends.
        let uncounted = std::sync::atomic::AtomicBool::new(held.is_none());
        let uncount = || {
            if !uncounted.swap(true, std::sync::atomic::Ordering::Relaxed) {
                cell.uncount_held(&mut cell.locked(), units, held);
            }
        };
        let result = self
            .stores
            .within(async {
                self.settle_inflight(cell).await?;
                uncount();
                let kind = CallKind::Release { units };
                let call = self.call(cell, cell.key(start, end), kind);
                self.send(cell, call).await.map(drop)
            })
            .await;
        uncount();
        result
    }

    /// Trims the lease of the period tagged `tag` to its cap and gives the spare units back
    /// to the store (its cell's next call). Call with the cell's lock held.
    pub(crate) async fn release_spare(&self, cell: QuotaRef<'_>, tag: u16) -> Result<(), StoreError> {
        cell.trim(tag);
        let units = cell.take_spare();
        if units == 0 {
            return Ok(());
        }
        let (start, end) = cell.period();
        let call = self.call(cell, cell.key(start, end), CallKind::Release { units });
        self.send(cell, call).await?;
        // The store's count as this node knows it, less what went back.
        cell.released(units);
        Ok(())
    }

    /// Tends these states' cells with the cell's lock taken here, one call each: spare units
    /// (given back past a lease's cap, no call of the cell took them yet) go back to the
    /// store, and a lease in debt (work recorded past it), or one whose refill a request asked
    /// for (the worker's queue may not have run it, or dropped it), is refilled: its debt
    /// owed, the store's count and a spend cap's own cap read again.
    ///
    /// What the cell keeps (lease, holds, jobs) is told to the store when it changed since
    /// the last call said it, or that call is half its expiry old (a report, renewing the
    /// reservation). A reservation within the clock-skew bound of its expiry (the store could
    /// not be reached to renew it) stops being spent: its lease waits as spare units, and
    /// a refill renews it, or learns that the store gave it back.
    pub(crate) async fn tend(&self, rt: &Runtime, states: Vec<Tenant>) {
        use futures_util::StreamExt as _;
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            // Shutting down: every lease goes back next, in one call each.
            return;
        }
        let now = self.clock.unix_secs();
        let (expiry, skew) = self.expiry();
        // A lease not renewed in time stops being spent first, with no store call (one that
        // cannot be reached must not keep it spendable): it waits as spare units.
        for state in &states {
            for cell in state.quotas().filter(|c| c.stale(now, expiry, skew)) {
                cell.stash();
            }
        }
        // The longest unrenewed first: a pass cut short by timeouts reaches them next time.
        let mut cells: Vec<(i64, Tenant, usize)> = states
            .iter()
            .flat_map(|s| {
                s.quotas()
                    .enumerate()
                    .filter(|(_, c)| Self::needs_tending(*c, now, expiry, skew))
                    .map(|(i, c)| (c.reported_at(), s.clone(), i))
                    .collect::<Vec<_>>()
            })
            .collect();
        cells.sort_by_key(|(at, _, _)| *at);
        // A store that does not answer: the other cells wait for the next flush.
        let timeouts = std::sync::atomic::AtomicU32::new(0);
        // Reports whose answer nothing reads, sent together after (`report_together`).
        let together = std::sync::Mutex::new(Vec::new());
        futures_util::stream::iter(cells)
            .for_each_concurrent(TEND_AT_ONCE, |(_, state, i)| {
                let (timeouts, together) = (&timeouts, &together);
                async move {
                    if timeouts.load(std::sync::atomic::Ordering::Relaxed) >= TEND_TIMEOUTS {
                        return;
                    }
                    let Some(cell) = state.quotas().nth(i) else { return };
                    // A cell busy past the store's time limit (its lease going back) is tended
                    // next time: a flush never waits on one for long.
                    let result =
                        self.stores.under_lock_or_busy(cell.lock(), self.tend_cell(rt, &state, cell, now)).await;
                    match result {
                        Ok(Some(true)) => together.lock().unwrap_or_else(|e| e.into_inner()).push((state.clone(), i)),
                        Ok(_) => {}
                        Err(e) => {
                            if matches!(e, StoreError::Timeout(_)) {
                                timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            tracing::debug!(tenant = %state.id, error = %e,
                                "a cell could not be tended: its next call does it");
                        }
                    }
                }
            })
            .await;
        let together = together.into_inner().unwrap_or_else(|e| e.into_inner());
        self.report_together(together, &timeouts).await;
    }

    /// Tells the store what these cells keep, [`RETURN_BATCH`] to a store call (a release of
    /// no units each: [`QuotaStore::release`](crate::store::QuotaStore::release)), each cell's
    /// lock held while its batch is out. For cells whose report's answer nothing reads: no
    /// threshold or alert watches them, no spend cap's own cap is read from it, and their
    /// reservation is renewed in time (a stale one's report is a reservation, whose answer
    /// says whether it expired). A store that gave a cell's reservation back meanwhile tells
    /// its next call (`store::quota::mark::TELL`).
    async fn report_together(&self, cells: Vec<(Tenant, usize)>, timeouts: &std::sync::atomic::AtomicU32) {
        use futures_util::StreamExt as _;
        use std::sync::atomic::Ordering::Relaxed;
        // A batch's cells are locked only while their batch is out; a store that does not
        // answer stops the pass (the tending's timeouts and these together), as it stops the
        // tending: the usage waits on neither for long.
        futures_util::stream::iter(cells.chunks(RETURN_BATCH))
            .for_each_concurrent(RETURN_AT_ONCE, |batch| async move {
                if timeouts.load(Relaxed) >= TEND_TIMEOUTS {
                    return;
                }
                if !self.report_batch(batch).await {
                    timeouts.fetch_add(1, Relaxed);
                }
            })
            .await;
    }

    /// One batch of [`report_together`](Self::report_together): the cells still due and not
    /// busy, in one store call; `false` when the store did not answer in time.
    async fn report_batch(&self, cells: &[(Tenant, usize)]) -> bool {
        let now = self.clock.unix_secs();
        let (expiry, skew) = self.expiry();
        let mut ready = Vec::new();
        for (state, i) in cells {
            let Some(cell) = state.quotas().nth(*i) else { continue };
            // A cell busy meanwhile (a request's call tells the store) is passed over.
            let Some(guard) = cell.lock().try_lock() else { continue };
            // Still due, and nothing in flight (its next call sends that first).
            if cell.locked().inflight().is_some() || cell.locked().returned || cell.stale(now, expiry, skew) {
                continue;
            }
            if cell.report_due(now, expiry, skew) != Some(false) {
                continue;
            }
            let (start, end) = cell.period();
            let call = self.call(cell, cell.key(start, end), CallKind::Release { units: 0 });
            ready.push((cell, guard, call));
        }
        if ready.is_empty() {
            return true;
        }
        let sent: Vec<Sent> = ready.iter_mut().map(|(cell, _, call)| self.begin(*cell, call)).collect();
        let releases: Vec<_> = ready.iter().zip(&sent).map(|((_, _, call), s)| Self::release_of(call, s)).collect();
        let store = self.stores.background().quota.clone();
        let answers = store.release(&releases).await;
        let answered = !answers.iter().any(|a| matches!(a, Err(StoreError::Timeout(_))));
        let answers = one_each(answers, releases.len());
        for (((cell, guard, call), s), answer) in ready.into_iter().zip(&sent).zip(answers) {
            // Unanswered: in flight, sent again by the cell's next call.
            let answer = answer.unwrap_or_else(|| Err(StoreError::Timeout(std::time::Duration::ZERO)));
            self.finish(cell, &call, s, &answer.map(|()| Grant::new(0, 0)));
            drop(guard);
        }
        answered
    }

    /// Whether nothing reads the answer to `cell`'s report: no threshold or alert watches it,
    /// and no spend cap's own cap is read from it.
    fn unwatched(&self, rt: &Runtime, cell: QuotaRef<'_>) -> bool {
        !cell.spec.capped && !self.thresholds.watches(rt, cell)
    }

    /// [`tend`](Self::tend)'s work on one cell, with its lock held: `true` when its report is
    /// left to be sent with others' ([`report_together`](Self::report_together)).
    async fn tend_cell(&self, rt: &Runtime, state: &Tenant, cell: QuotaRef<'_>, now: i64) -> Result<bool, StoreError> {
        let (expiry, skew) = self.expiry();
        self.settle_inflight(cell).await?;
        let returned = cell.locked().returned;
        if (cell.stopped() || cell.stale(now, expiry, skew)) && !returned {
            // Renewed first (or found given back): its spare units serve again only then.
            self.report(rt, cell, now).await?;
        }
        let (start, end) = cell.period();
        let tag = crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(start, end));
        self.release_spare(cell, tag).await?;
        // In debt, or asked to refill ahead of need (the worker's job may not have run yet:
        // done here, it finds nothing to do).
        let asked = cell.prefetch_pending();
        let due = cell.lease() < 0 || (asked && cell.lease() < cell.low());
        if due && !state.is_evicted() && !returned {
            self.refill_locked(rt, cell, now, 0, 0, false).await?;
        }
        if asked {
            // Done: the worker's job for it finds nothing asked.
            cell.prefetch_done();
        }
        match cell.report_due(now, expiry, skew) {
            Some(false) if end != 0 && !cell.locked().returned && self.unwatched(rt, cell) => return Ok(true),
            Some(_) if end != 0 => self.report(rt, cell, now).await?,
            _ => {}
        }
        Ok(false)
    }

    /// Tells the store what `cell` keeps (it changed since its last call said it, or is to be
    /// renewed), asking nothing and giving nothing back: a reservation of no units, whose
    /// answer says what the fleet has used (thresholds crossed by use are seen here too, not
    /// only at refills) and whether the store gave this node's reservation back meanwhile.
    /// Call with the cell's lock held.
    async fn report(&self, rt: &Runtime, cell: QuotaRef<'_>, now: i64) -> Result<(), StoreError> {
        let (start, end) = cell.period();
        let limit = Self::limit_of(cell);
        let kind = CallKind::Reserve { units: 0, owed: 0, limit, refill: false, repay: 0, at_least: 0, taking: 0 };
        let call = self.call(cell, cell.key(start, end), kind);
        let grant = self.send(cell, call).await?;
        if !grant.expired {
            // Renewed: units waiting while it was not serve again (given back past the
            // lease's cap by the tending after).
            cell.resume();
        }
        answered(cell, &grant, limit);
        let (from, to) = if cell.prepaid() { crate::base::Period::Prepaid.bounds(0) } else { (start, end) };
        self.thresholds.check(rt, now, cell, grant.reserved, grant.used, from, to);
        Ok(())
    }

    /// The limit a call of `cell` says: a hard quota's (a prepaid balance's: 0, the store
    /// holds it to its grants; a spend cap's: the plan's, the store holding it to the
    /// tenant's own cap when one is set); none for a soft one.
    fn limit_of(cell: QuotaRef<'_>) -> Option<u64> {
        (cell.spec.mode() == QuotaMode::Hard).then(|| {
            if cell.prepaid() {
                0
            } else if cell.spec.capped {
                cell.spec.limit().get()
            } else {
                cell.limit()
            }
        })
    }

    /// Whether `cell` has anything for [`tend`](Self::tend) to do at `now`: among them, a call
    /// left in flight (its answer lost), sent again by the flush rather than left for the
    /// cell's next request, which may come much later (the store may have applied it: what it
    /// counts used that the node still keeps is told once it is answered).
    pub(crate) fn needs_tending(cell: QuotaRef<'_>, now: i64, expiry: i64, skew: i64) -> bool {
        cell.spare() > 0
            || cell.lease() < 0
            || cell.prefetch_pending()
            || cell.report_due(now, expiry, skew).is_some()
            || cell.locked().inflight().is_some()
    }

    /// Gives the unused units of these states' current leases back to the store, and owes
    /// what they used beyond them: the states with a lease the store did not take (a call of
    /// theirs still unanswered, sent again by their next call).
    ///
    /// The returns go in batches of [`RETURN_BATCH`] releases, one store call each
    /// ([`QuotaStore::release`](crate::store::QuotaStore::release)), [`RETURN_AT_ONCE`] batches
    /// at a time; a lease that owes more
    /// than it gives back goes alone (a reservation). One release of a batch that fails (its
    /// condition, a busy row) leaves the others returned: it is sent again alone, with its
    /// token. A batch the store does not answer in time is sent again one release at a time.
    ///
    /// The states go in one order (by address), each once: two returns at once (a sweep and a
    /// shutdown) take their cells' locks in the same order. A release readied is recorded in
    /// flight at once, so that a return dropped before its batch is sent (a flush cut short)
    /// leaves it for the cell's next call. Once the store timed out [`TEND_TIMEOUTS`] times in
    /// a row, the cells left are not tried: their states are answered as not returned, so that
    /// a store that hangs costs a few time limits, not one per cell.
    pub(crate) async fn return_leases(&self, mut states: Vec<Tenant>) -> Vec<Tenant> {
        states.sort_unstable_by_key(Tenant::addr);
        states.dedup_by(|a, b| Tenant::ptr_eq(a, b));
        let mut failed = vec![false; states.len()];
        let mut ready = Vec::new();
        let mut timeouts = 0;
        for (n, state) in states.iter().enumerate() {
            for cell in state.quotas() {
                if timeouts >= TEND_TIMEOUTS {
                    failed[n] = true;
                    continue;
                }
                let guard = cell.lock().lock().await;
                let error = match self.stores.within(self.prepare_return(cell)).await {
                    Ok(None) => None,
                    Ok(Some(mut call)) if matches!(call.kind, CallKind::Release { .. }) => {
                        let sent = self.begin(cell, &mut call);
                        ready.push((n, cell, guard, call, sent));
                        None
                    }
                    Ok(Some(call)) => self.stores.within(self.send(cell, call)).await.err(),
                    Err(e) => Some(e),
                };
                match error {
                    Some(e) => {
                        timeouts = if matches!(e, StoreError::Timeout(_)) { timeouts + 1 } else { 0 };
                        failed[n] = true;
                        Self::unreturned(cell, &e);
                    }
                    None => timeouts = 0,
                }
            }
        }
        // A batch is background work: held to `limits.background_timeout`, not to a request's.
        let store = self.stores.background().quota.clone();
        // (A store may lock the counters of a batch in its order: see the PostgreSQL store.)
        let releases: Vec<_> = ready.iter().map(|(_, _, _, call, s)| Self::release_of(call, s)).collect();
        let answers: Vec<Vec<Result<(), StoreError>>> = {
            use futures_util::StreamExt as _;
            let calls: Vec<_> = releases.chunks(RETURN_BATCH).map(|batch| store.release(batch)).collect();
            futures_util::stream::iter(calls).buffered(RETURN_AT_ONCE).collect().await
        };
        // Each batch's answers, one per release (a store answering fewer: the rest unanswered).
        let answers =
            answers.into_iter().zip(releases.chunks(RETURN_BATCH)).flat_map(|(got, batch)| one_each(got, batch.len()));
        for ((n, cell, guard, call, s), answer) in ready.into_iter().zip(answers) {
            match answer {
                Some(Ok(())) => self.finish(cell, &call, &s, &Ok(Grant::new(0, 0))),
                other => {
                    if let Some(Err(e)) = other {
                        self.finish(cell, &call, &s, &Err(e));
                    }
                    // That one alone, again with its token (the others are returned); not
                    // once the store stopped answering.
                    let result = if timeouts < TEND_TIMEOUTS {
                        self.stores.within(self.settle_inflight(cell)).await
                    } else {
                        Err(StoreError::Timeout(std::time::Duration::ZERO))
                    };
                    match result {
                        Err(e) => {
                            timeouts = if matches!(e, StoreError::Timeout(_)) { timeouts + 1 } else { 0 };
                            failed[n] = true;
                            Self::unreturned(cell, &e);
                        }
                        Ok(()) => timeouts = 0,
                    }
                }
            }
            // Answered: the cell serves again at once.
            drop(guard);
        }
        for state in &states {
            self.return_cells(state).await;
        }
        states.into_iter().zip(failed).filter_map(|(state, failed)| failed.then_some(state)).collect()
    }

    /// Gives the unspent cells of a tenant's fleet rate lease back to the shared bucket (the
    /// part of the lease still ahead); a return that fails leaves them spent (the fleet
    /// under-admits by them until the lease's end).
    async fn return_cells(&self, state: &Tenant) {
        let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) else { return };
        let _one = fleet.lock().lock().await;
        let now = self.clock.unix_nanos();
        let Some((cells, lease_end)) = fleet.take_unspent(now) else { return };
        let sender = fleet.sender(|| self.ids.new_sender());
        let token = ReserveToken::new(sender, self.ids.next_seq()).at(now.div_euclid(1_000_000_000));
        let call = crate::store::CellReturn::new(state.id.clone(), cells, rate.bucket.interval, lease_end, now, token);
        if let Err(e) = self.stores.within(self.stores.request().rate.return_cells(&call)).await {
            tracing::debug!(tenant = %state.id, error = %e, "unspent fleet rate cells could not be given back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Renewals;
    use std::cell::Cell;

    #[test]
    fn a_pass_skips_until_the_earliest_renewal_may_have_lapsed_then_counts_it_again() {
        let r = Renewals::default();
        let visits = Cell::new(0);
        let visit = |seen: i64| {
            visits.set(visits.get() + 1);
            seen
        };
        assert!(!r.pass(1_000, 100, || visit(i64::MAX)), "no renewal known: nothing can be stale");
        r.renewed(500);
        r.renewed(700);
        assert!(!r.pass(599, 100, || visit(i64::MAX)), "the earliest, 500, lapses at 600");
        assert_eq!(visits.get(), 0);
        // The visit finds 500 renewed since (at 650): the earliest is now 650.
        assert!(r.pass(600, 100, || visit(650)));
        assert_eq!(visits.get(), 1);
        assert!(!r.pass(749, 100, || visit(i64::MAX)));
        assert!(r.pass(750, 100, || visit(i64::MAX)), "lapsed at 750");
        // That visit saw nothing: the bound is gone until a renewal says one.
        assert!(!r.pass(10_000, 100, || visit(i64::MAX)));
        assert_eq!(visits.get(), 2);
    }

    #[test]
    fn a_renewal_the_counting_pass_did_not_see_is_kept() {
        let r = Renewals::default();
        r.renewed(100);
        // A cell first renewed (at 150) while the pass visits, after the pass read it.
        assert!(r.pass(1_000, 100, || {
            r.renewed(150);
            i64::MAX
        }));
        assert!(!r.pass(249, 100, || i64::MAX), "150 is the earliest");
        assert!(r.pass(250, 100, || i64::MAX));
    }

    #[test]
    fn a_pass_beside_another_visits_every_cell_and_one_after_a_panic_counts_again() {
        let r = Renewals::default();
        r.renewed(100);
        let mut inner = false;
        assert!(r.pass(1_000, 100, || {
            // Beside the counting pass, whose bound is reset: it visits, publishing nothing.
            inner = r.pass(101, 100, || 5);
            100
        }));
        assert!(inner, "a pass beside one under way visits");
        assert!(!r.pass(199, 100, || i64::MAX), "the counting pass's bound stands, not the inner one's 5");

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            r.pass(1_000, 100, || panic!("a visit that panics"));
        }));
        assert!(panicked.is_err());
        // Its bound was reset midway: the next pass counts again, whatever the time.
        assert!(r.pass(0, 100, || 900), "after a panic, a pass counts again");
        assert!(!r.pass(999, 100, || i64::MAX));
        assert!(r.pass(1_000, 100, || i64::MAX));
    }
}
