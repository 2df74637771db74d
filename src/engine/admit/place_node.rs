//! This node's places of fleet concurrencies ([`PlacesNode`], `concurrency_scope = "fleet"`):
//! each tenant's places leased from the places role's store, taken by requests, leased one
//! more when none is free; a place freed is given back at once, or kept as the node's one
//! spare: marked so in the store (another node's acquire takes it before it is refused, and
//! this node uses it again only through an acquire), and given back after a second; the node
//! renews its places while they are held.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};

use dashmap::DashMap;

use crate::engine::{shared::Shared, store_calls::Counted, table::TenantTable};
use crate::{
    base::TenantId,
    config::StoreErrorPolicy,
    plan::Runtime,
    response::{Rejection, RejectionKind},
    store::{PlaceCall, PlaceStoreExt, Places, ReserveToken},
    tenant::{InFlightCounts, Slot, Tenant},
};

/// How long a spare place (held, no request on it) is kept before it is given back.
const SPARE_NANOS: i64 = 1_000_000_000;

/// How long a node keeps its one free place unmarked between its requests, reused or not,
/// and how fresh the reading that allows it must be: past it, the next request's end marks
/// the place (another node may take it) and the node's next request acquires again, which
/// reads the row afresh. So an unmarked place keeps at most one place per node from the
/// others, for at most this long, for two writes a second where marking it at each request's
/// end wrote two a request.
const UNMARKED_NANOS: i64 = 1_000_000_000;

/// The most tenants whose places the worker's pass renews or gives back at once.
const TENDED_AT_ONCE: usize = 64;

/// How long a node serves a fail-open fleet concurrency from its own count once the places
/// store failed, before it asks the store again.
const FALLBACK_NANOS: i64 = 1_000_000_000;

/// How long after the store is asked again a node that counted alone keeps to its share: its
/// worker's passes (one a second) count the requests it admitted meanwhile in its places, as
/// the other nodes' count theirs, before any node's new requests take places beside them.
const SETTLE_NANOS: i64 = 2_000_000_000;

/// This node's places of each tenant with a fleet concurrency, while it holds some or has a
/// request on one (the map is bounded by the tenants with requests in flight, and those
/// whose places wait to be given back).
pub(crate) struct PlacesNode {
    shared: Arc<Shared>,
    /// The tenant table: a renewal asks within the limit of the plan in force.
    table: Arc<TenantTable>,
    /// The requests in flight per tenant, which count the node's own share while the store is
    /// taken as down.
    in_flight: InFlightCounts,
    map: DashMap<TenantId, Arc<TenantPlaces>>,
    /// The sender id of this node's places calls, for every tenant (0: not drawn yet): a
    /// tenant's entry comes and goes with its requests, and a sender drawn for each would
    /// leave one more holder of none in the tenant's row each time (kept for a TTL).
    sender: AtomicU64,
    /// Releases under way (in the background, after a request's body went).
    releasing: AtomicUsize,
    released: tokio::sync::Notify,
}

/// One tenant's places on this node.
#[derive(Debug)]
pub(crate) struct TenantPlaces {
    tenant: TenantId,
    local: Mutex<Local>,
    /// One store call at a time for this tenant on this node (their sequence numbers in order).
    lock: tokio::sync::Mutex<()>,
}

impl Local {
    /// Whether the fleet had room to spare at the last reading, within `fresh` nanoseconds of
    /// `now`: at least an eighth of the limit, and two places, not taken by requests (this
    /// node's free place counted as taken; other nodes' unmarked ones too). Then other nodes
    /// acquire places of their own, and this node's one free place needs no mark for a while
    /// ([`UNMARKED_NANOS`]).
    fn room(&self, now: i64, fresh: i64) -> bool {
        let margin = (self.limit / 8).max(2);
        now < self.read_at.saturating_add(fresh) && self.limit.saturating_sub(self.taken) >= margin
    }

    /// Marks since when the node holds a spare place (none: unmarked).
    fn note_spare(&mut self, now: i64) {
        if self.held <= self.in_flight {
            self.spare_since = 0;
        } else if self.spare_since == 0 {
            self.spare_since = now;
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Local {
    /// Places this node holds in the store.
    held: u32,
    /// Requests on them.
    in_flight: u32,
    /// Places held that the store has marked as spares (or may have, a call failing): another
    /// node may have taken them, so no request takes one without an acquire.
    marked: u32,
    /// Until then the places held may take requests (Unix nanoseconds): two thirds of the
    /// TTL after their last acquire or renewal, so that a node that cannot renew stops
    /// admitting on them well before they expire in the store.
    valid_until: i64,
    /// When they were last acquired or renewed.
    renewed_at: i64,
    /// Since when the node holds a spare place (0: none).
    spare_since: i64,
    /// Since when its one free place has been kept unmarked (0: it is not), reused or not:
    /// past [`UNMARKED_NANOS`] the next request's end marks it.
    unmarked_since: i64,
    /// The places every node held for requests (spares not counted: an acquire takes them),
    /// as the last call read them, and when.
    taken: u32,
    read_at: i64,
    /// The tenant's limit, as its last acquire gave it (its renewals ask within it).
    limit: u32,
    /// Until then the store is taken as down and the node counts alone (fail-open).
    fallback_until: i64,
    /// Requests waiting for a place (one acquire asks for all of them).
    waiting: u32,
}

/// What a call of [`PlacesNode::set`] sets.
#[derive(Debug, Clone, Copy)]
enum Set {
    /// Gives back down to this many (never below the requests on them).
    ReleaseTo(u32),
    /// Gives back the spares (down to the requests on them).
    Spares,
    /// Renews what is held.
    Renew,
}

impl TenantPlaces {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a request at `now`, if a held one is free and still valid.
    /// A place for a request at `now`, if a held one is free and still valid, within the
    /// tenant's `limit` as its plan says now (the limit the node's calls carry from now on).
    /// `outage` requests admitted while the store was down still run here: they take places
    /// first (the outage's share replaces the node's places, never adds to them).
    fn enter(&self, now: i64, limit: u32, outage: u32) -> bool {
        let mut l = self.local();
        l.limit = limit;
        let busy = l.in_flight.saturating_add(outage);
        if now < l.valid_until && busy < l.held.saturating_sub(l.marked).min(limit) {
            l.in_flight += 1;
            l.note_spare(now);
            return true;
        }
        false
    }

    /// A request left its place at `now`: the places to keep (its requests' and one spare,
    /// marked as such in the store: the rest given back at once), when a free place is to be
    /// marked or given back. `outage` requests admitted while the store was down still run
    /// here. **One free place stays unmarked, with no call,** while the fleet had room to
    /// spare at a reading of the last second ([`Local::room`]), for at most a second
    /// ([`UNMARKED_NANOS`]): the node's next request takes it again without a call, where
    /// marking it and acquiring it again wrote the tenant's row twice a request. Other nodes
    /// acquire places of their own meanwhile; near the limit (or on an older reading, or
    /// after the second) the spare is marked at once, so that another node short of one takes
    /// it (a sequential client over two nodes).
    fn leave(&self, now: i64, outage: u32) -> Option<u32> {
        let mut l = self.local();
        l.in_flight = l.in_flight.saturating_sub(1);
        // The one spare left goes after a second.
        l.note_spare(now);
        let busy = l.in_flight.saturating_add(outage);
        let unmarked = l.held.saturating_sub(busy.saturating_add(l.marked));
        let kept_since = if l.unmarked_since == 0 { now } else { l.unmarked_since };
        let keep_unmarked =
            unmarked == 1 && l.room(now, UNMARKED_NANOS) && now < kept_since.saturating_add(UNMARKED_NANOS);
        if keep_unmarked {
            l.unmarked_since = kept_since;
            return None;
        }
        l.unmarked_since = 0;
        (unmarked > 0).then_some(busy + 1)
    }

    /// What the store said this node holds, at `now`, valid `valid` nanoseconds.
    fn answered(&self, p: Places, now: i64, valid: i64) {
        let mut l = self.local();
        l.held = p.held;
        // The acquire marked none of them spare.
        l.marked = 0;
        l.unmarked_since = 0;
        l.taken = p.busy();
        l.read_at = now;
        l.renewed_at = now;
        l.valid_until = now.saturating_add(valid);
        l.fallback_until = 0;
        l.note_spare(now);
    }
}

impl std::fmt::Debug for PlacesNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacesNode").field("tenants", &self.map.len()).finish_non_exhaustive()
    }
}

impl PlacesNode {
    pub(crate) fn new(shared: Arc<Shared>, table: Arc<TenantTable>, in_flight: InFlightCounts) -> Self {
        Self {
            shared,
            table,
            in_flight,
            map: DashMap::default(),
            sender: AtomicU64::new(0),
            releasing: AtomicUsize::new(0),
            released: tokio::sync::Notify::new(),
        }
    }

    fn of(&self, tenant: &TenantId) -> Arc<TenantPlaces> {
        if let Some(p) = self.map.get(tenant) {
            return p.clone();
        }
        self.map
            .entry(tenant.clone())
            .or_insert_with(|| {
                Arc::new(TenantPlaces {
                    tenant: tenant.clone(),
                    local: Mutex::default(),
                    lock: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }
}

/// A request counted among its tenant's waiters on this node until [`done`](Self::done) (or
/// dropped: its future dropped).
struct Waiting<'a>(Option<&'a TenantPlaces>);

impl<'a> Waiting<'a> {
    fn new(places: &'a TenantPlaces) -> Self {
        places.local().waiting += 1;
        Self(Some(places))
    }

    fn done(&mut self) {
        if let Some(places) = self.0.take() {
            let mut l = places.local();
            l.waiting = l.waiting.saturating_sub(1);
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// What a request's lease of a place came to.
pub(crate) enum Leased {
    /// Its place.
    Place(Box<Slot>),
    /// None free: every place of the fleet taken (or, while the store is taken as down, the
    /// node's share of them).
    NoneFree,
    /// The store failed and the plan fails closed: 503.
    Refused(Rejection),
}

/// What an acquire came to.
enum Acquired {
    /// A place for the request.
    Place,
    /// None free among the fleet's.
    Full,
    /// The store is taken as down (fail-open): the node counts alone.
    Fallback,
}

impl PlacesNode {
    /// The TTL of places and how long an acquire or renewal keeps them valid here.
    fn times(rt: &Runtime) -> (i64, i64) {
        let ttl = i64::try_from(rt.config.limits.place_ttl.as_nanos()).unwrap_or(i64::MAX);
        (ttl, ttl / 3 * 2)
    }

    /// A place among the tenant's requests in flight across the fleet, from those this node
    /// holds: `Ok(Some)`; `Ok(None)` when none is free (while the store is taken as down and
    /// the node counts alone, its share of the limit, fail-open); `Err` when the node must
    /// lease one first.
    pub(crate) fn enter(self: &Arc<Self>, state: &Tenant) -> Result<Option<Box<Slot>>, ()> {
        let places = self.of(&state.id);
        let now = self.shared.clock().unix_nanos();
        if Self::in_outage(&places, now) {
            return Ok(self.node_share(state, &places));
        }
        if places.enter(now, state.plan.concurrency, self.outage_running(&state.id)) {
            return Ok(Some(self.slot(places)));
        }
        // Every place taken as last read (within a second): refused without asking the store.
        if Self::read_full(&places, state.plan.concurrency, now) {
            return Ok(None);
        }
        Err(())
    }

    /// Requests of the tenant admitted while the places store was taken as down, still running
    /// on this node (counted on its own, never in its places).
    fn outage_running(&self, tenant: &TenantId) -> u32 {
        self.in_flight.get(tenant).map_or(0, |n| *n)
    }

    /// Whether the node counts the tenant's requests alone: the store taken as down (for a
    /// second after a failure), and [`SETTLE_NANOS`] more while the nodes count the requests
    /// they admitted meanwhile in their places (the worker's passes). An outage's share
    /// replaces the node's places, never adds to them: within it the requests on places count
    /// toward the share, and after it the requests it admitted take places first (a request
    /// enters only when the node's places cover them and it; its calls ask for them too).
    fn in_outage(places: &TenantPlaces, now: i64) -> bool {
        let until = places.local().fallback_until;
        until != 0 && now < until.saturating_add(SETTLE_NANOS)
    }

    /// Whether the store's last answer (within a second) found every place taken by requests
    /// (spares are not: an acquire takes them).
    fn read_full(places: &TenantPlaces, limit: u32, now: i64) -> bool {
        let l = places.local();
        l.taken >= limit && now < l.read_at.saturating_add(1_000_000_000)
    }

    /// The node's own count while the places store is down: `concurrency / fleet_size_hint`
    /// (at least one), the requests still running on its places of the fleet counted in it;
    /// refused past it.
    fn node_share(&self, state: &Tenant, places: &TenantPlaces) -> Option<Box<Slot>> {
        let n = self.shared.runtime().load().config.limits.fleet_size_hint.max(1);
        let limit = (state.plan.concurrency / n).max(1).saturating_sub(places.local().in_flight);
        Slot::enter(&self.in_flight, &state.id, limit)
    }

    /// A slot on one of `places`, freed (and given back when more than one is spare) when the
    /// request's body has gone.
    fn slot(self: &Arc<Self>, places: Arc<TenantPlaces>) -> Box<Slot> {
        let node = self.clone();
        Slot::on_drop(Box::new(move || {
            let now = node.shared.clock().unix_nanos();
            if let Some(keep) = places.leave(now, node.outage_running(&places.tenant)) {
                node.release_later(places, keep);
            }
        }))
    }

    /// Gives places back in the background (the node then holds `keep`), counted until done
    /// ([`released`](Self::released)).
    fn release_later(self: &Arc<Self>, places: Arc<TenantPlaces>, keep: u32) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        self.releasing.fetch_add(1, Ordering::AcqRel);
        let node = self.clone();
        rt.spawn(async move {
            node.set(&places, Set::ReleaseTo(keep)).await;
            if node.releasing.fetch_sub(1, Ordering::AcqRel) == 1 {
                node.released.notify_waiters();
            }
        });
    }

    /// Gives back or renews this node's places of a tenant, under the tenant's lock (waited
    /// for within `usage.store_timeout`), the count read under it. A release lowers the places
    /// held here before the store is asked: no request takes one of them meanwhile (the store
    /// may answer after another node took them), and a release that fails leaves them given up
    /// here (they expire in the store). A renewal that fails changes nothing: the places stop
    /// being valid here two thirds of the TTL after the last one.
    async fn set(&self, places: &TenantPlaces, set: Set) {
        let rt = self.shared.runtime().load_full();
        let (ttl, valid) = Self::times(&rt);
        let limit_wait = rt.config.usage.store_timeout;
        let tenant = &places.tenant;
        let Ok(_one) = tokio::time::timeout(limit_wait, places.lock.lock()).await else {
            tracing::debug!(tenant = %tenant, "places not set: their lock did not come in time");
            return;
        };
        let now = self.shared.clock().unix_nanos();
        // A renewal asks within the tenant's limit as its plan says now (a plan changed since
        // the node's last request would otherwise renew within the old one).
        let current = self.table.state(tenant).map(|s| s.plan.concurrency).filter(|c| *c > 0);
        let outage = self.outage_running(tenant);
        let (count, spare, limit) = {
            let mut l = places.local();
            if let Some(c) = current {
                l.limit = c;
            }
            // The requests running here: on places, and admitted while the store was down.
            let busy = l.in_flight.saturating_add(outage);
            let (count, spare) = match set {
                // Never fewer than the requests on them; what is kept past them is spare.
                Set::ReleaseTo(keep) => {
                    let count = keep.max(busy).min(l.held);
                    (count, count - busy.min(count))
                }
                Set::Spares => (busy.min(l.held), 0),
                // A renewal also asks for places for the requests admitted while the store
                // was down: the fleet counts them from then on.
                Set::Renew => (l.held.max(busy), l.marked.min(l.held)),
            };
            if matches!(set, Set::Renew) && count == 0 {
                return;
            }
            if !matches!(set, Set::Renew) {
                if count == l.held && spare == l.marked {
                    return;
                }
                // Marked before the call: a request here takes a spare only through an
                // acquire from now on (another node may take it once the call lands).
                l.held = count;
                l.marked = spare;
                l.unmarked_since = 0;
                l.note_spare(now);
            }
            (count, spare, l.limit)
        };
        let sender = self.sender();
        let token = ReserveToken::new(sender, self.shared.ids().next_seq()).at(now.div_euclid(1_000_000_000));
        let call = PlaceCall::new(tenant.clone(), count, limit, ttl, now, token).with_spare(spare);
        let stores = self.shared.stores();
        let answer = match set {
            Set::Renew => stores.within(stores.request().places.renew_places(&call)).await,
            _ => stores.within(stores.request().places.release_places(&call)).await,
        };
        match answer {
            Ok(p) => {
                let mut l = places.local();
                l.taken = p.busy();
                l.read_at = now;
                match set {
                    // Renewed: what the store says is held (fewer, if some expired and were
                    // taken meanwhile), valid from now.
                    Set::Renew => {
                        if l.held > 0 && now > l.renewed_at.saturating_add(ttl) {
                            tracing::warn!(tenant = %tenant, "places renewed after they expired in the store: \
                                renewals run late (a slow store, or many tenants holding places)");
                        }
                        l.held = p.held;
                        l.renewed_at = now;
                        l.valid_until = now.saturating_add(valid);
                    }
                    _ => l.held = l.held.min(p.held),
                }
                // Spares another node took are no longer held.
                let free = l.held.saturating_sub(l.in_flight);
                l.marked = l.marked.min(free);
                l.note_spare(now);
            }
            Err(e) => tracing::debug!(tenant = %tenant, error = %e, "places could not be set"),
        }
    }

    /// A place for a request of `state`'s tenant, leased when the node holds none free: its
    /// slot, none free, or the store's failure answered as the plan says.
    pub(crate) async fn lease(self: &Arc<Self>, state: &Tenant, rt: &Arc<Runtime>) -> Leased {
        let places = self.of(&state.id);
        let limit = state.plan.concurrency;
        let (ttl, valid) = Self::times(rt);
        let timeout = rt.config.usage.store_timeout;
        let mut waiting = Waiting::new(&places);
        let acquired = async {
            // The wait for the other waiters' call is not a store failure: past it, busy.
            let Ok(_one) = tokio::time::timeout(timeout, places.lock.lock()).await else {
                return Ok(Acquired::Full);
            };
            let now = self.shared.clock().unix_nanos();
            if Self::in_outage(&places, now) {
                waiting.done();
                return Ok(Acquired::Fallback);
            }
            let outage = self.outage_running(&state.id);
            if places.enter(now, limit, outage) {
                waiting.done();
                return Ok(Acquired::Place);
            }
            // Another waiter's call just found every place taken.
            if Self::read_full(&places, limit, now) {
                waiting.done();
                return Ok(Acquired::Full);
            }
            // As many as its requests in flight and every request waiting: one call serves
            // them all.
            let count = {
                let mut l = places.local();
                l.limit = limit;
                l.in_flight.saturating_add(outage).saturating_add(l.waiting.max(1))
            };
            let sender = self.sender();
            let token = ReserveToken::new(sender, self.shared.ids().next_seq()).at(now.div_euclid(1_000_000_000));
            let call = PlaceCall::new(state.id.clone(), count, limit, ttl, now, token);
            let stores = self.shared.stores();
            // A request's own call: it fails fast while the store is taken as down, and its
            // timeouts count toward that.
            let answer = stores.guarded(stores.request().places.acquire_places(&call)).await;
            stores.answered(Counted::Places, &answer);
            // No longer waiting, before the lock goes: the next caller counts it no more.
            waiting.done();
            places.answered(answer?, now, valid);
            Ok(if places.enter(now, limit, outage) { Acquired::Place } else { Acquired::Full })
        }
        .await;
        drop(waiting);
        let free = |slot: Option<Box<Slot>>| slot.map_or(Leased::NoneFree, Leased::Place);
        match acquired {
            Ok(Acquired::Place) => Leased::Place(self.slot(places)),
            Ok(Acquired::Fallback) => free(self.node_share(state, &places)),
            Ok(Acquired::Full) => Leased::NoneFree,
            // The tenant's row written (or locked) by other nodes all along: busy.
            Err(e) if !self.shared.stores().down(&e, Counted::Places) => {
                tracing::debug!(tenant = %state.id, error = %e, "a fleet concurrency's row stayed contended");
                Leased::NoneFree
            }
            Err(e) => {
                tracing::debug!(tenant = %state.id, error = %e, "the places store failed");
                if state.plan.on_store_error_set && state.plan.on_store_error == StoreErrorPolicy::FailClosed {
                    let r = Rejection::new(RejectionKind::StoreUnavailable, "the places store did not answer in time");
                    return Leased::Refused(r.with_retry_after(1).for_tenant(state));
                }
                places.local().fallback_until = self.shared.clock().unix_nanos().saturating_add(FALLBACK_NANOS);
                free(self.node_share(state, &places))
            }
        }
    }

    /// The worker's pass over this node's places: renews those held (every third of the
    /// TTL), gives back a spare held longer than a second, and forgets tenants with no place
    /// and no request.
    pub(crate) async fn tend(&self) {
        let rt = self.shared.runtime().load_full();
        let (ttl, _) = Self::times(&rt);
        let now = self.shared.clock().unix_nanos();
        let entries: Vec<Arc<TenantPlaces>> = self.map.iter().map(|e| e.value().clone()).collect();
        // Tenants together, a few dozen calls at a time: one after another, a slow store
        // would delay the last tenants' renewals past their places' expiry.
        let tend = |places: Arc<TenantPlaces>| async move {
            let tenant = places.tenant.clone();
            let l = *places.local();
            if l.held > l.in_flight && l.spare_since != 0 && now >= l.spare_since.saturating_add(SPARE_NANOS) {
                self.set(&places, Set::Spares).await;
            }
            let l = *places.local();
            // Requests admitted while the store was down, once it may answer again: counted
            // in the node's places at once.
            let outage = self.outage_running(&tenant);
            let uncounted = l.fallback_until <= now && l.held < l.in_flight.saturating_add(outage);
            if (l.held > 0 && now >= l.renewed_at.saturating_add(ttl / 3)) || uncounted {
                self.set(&places, Set::Renew).await;
            }
            let l = *places.local();
            if l.held == 0 && l.in_flight == 0 && self.outage_running(&tenant) == 0 {
                // Only while nobody else holds it (a request taking a place, a release under
                // way): a later request then makes a new entry, never a second one beside it.
                drop(places);
                self.map.remove_if(&tenant, |_, p| {
                    let l = p.local();
                    Arc::strong_count(p) == 1 && l.held == 0 && l.in_flight == 0
                });
            }
        };
        futures_util::StreamExt::for_each_concurrent(futures_util::stream::iter(entries), TENDED_AT_ONCE, tend).await;
    }

    /// Gives every place this node holds back (shutdown): the other nodes may take them at
    /// once rather than after their TTL.
    pub(crate) async fn release_all(&self) {
        let entries: Vec<Arc<TenantPlaces>> = self.map.iter().map(|e| e.value().clone()).collect();
        let release = |places: Arc<TenantPlaces>| async move {
            if places.local().held > 0 {
                self.set(&places, Set::ReleaseTo(0)).await;
            }
        };
        futures_util::StreamExt::for_each_concurrent(futures_util::stream::iter(entries), TENDED_AT_ONCE, release)
            .await;
    }

    /// Forgets every place this node holds, without a store call (a process restored from a
    /// snapshot: its copies share them and their sender); they expire in the store.
    pub(crate) fn forget(&self) {
        self.map.clear();
        self.sender.store(0, Ordering::Relaxed);
    }

    /// This node's sender id for places calls, drawn on the first call.
    fn sender(&self) -> u64 {
        let sender = &self.sender;
        match sender.load(Ordering::Relaxed) {
            0 => {
                let drawn = self.shared.ids().new_sender().max(1);
                match sender.compare_exchange(0, drawn, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => drawn,
                    Err(other) => other,
                }
            }
            s => s,
        }
    }

    /// Waits, at most `limit`, for the places given back in the background (after requests'
    /// bodies went) to reach the store, the node's spare marked: `true` when none is left. A
    /// front door whose process is frozen after each response (Lambda on-demand) awaits them
    /// before it returns, so that the other nodes get the places at once (a marked spare is
    /// theirs to take).
    pub(crate) async fn released(&self, limit: std::time::Duration) -> bool {
        let node = self;
        // Free places not yet marked: given back but one, marked spare (a process frozen after
        // the invocation would otherwise keep them from the others until their TTL).
        let spares: Vec<Arc<TenantPlaces>> = node
            .map
            .iter()
            .filter(|e| {
                let l = e.value().local();
                l.held > l.in_flight
            })
            .map(|e| e.value().clone())
            .collect();
        let release = futures_util::StreamExt::for_each_concurrent(
            futures_util::stream::iter(spares),
            TENDED_AT_ONCE,
            |places| async move {
                let keep = {
                    let l = places.local();
                    l.in_flight.saturating_add(self.outage_running(&places.tenant)) + 1
                };
                self.set(&places, Set::ReleaseTo(keep)).await;
            },
        );
        if tokio::time::timeout(limit, release).await.is_err() {
            return false;
        }
        let wait = async {
            loop {
                let notified = node.released.notified();
                if node.releasing.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}
