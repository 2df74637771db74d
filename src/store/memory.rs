use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;

use super::{
    ApiKeyRecord, CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, ExportSend, FlushId, Grant,
    IdempotencyClaim, IdempotencySettle, IdempotencyState, PlanChange, PlanChangeOutcome, QuotaKey, Reservation,
    ReserveToken, Store, StoreError, StoreInspect, TenantRecord, UsageAggregate, UsageBatch, UsageEvent,
};
use crate::{
    config::{MeterId, TenantId},
    tenant::KeyHash,
};

/// How many flush ids are remembered to make retried flushes no-ops. A retry comes within
/// seconds of the first try, so the last 65,536 flushes are plenty.
const FLUSH_IDS_KEPT: usize = 1 << 16;
/// Fully exported aggregates are dropped this long after their window started.
const EXPORTED_RETENTION_SECS: i64 = 2 * 86_400;
/// Any aggregate is dropped this long after its window started, exported or not: a billing
/// system no longer takes usage that old (Stripe: 35 days), and without a sink nothing else
/// would ever drop it.
const RETENTION_SECS: i64 = 35 * 86_400;

/// The embedded store: everything in this process's memory, nothing to run.
///
/// It is the default of [`Tollgate::builder`](crate::Tollgate::builder). Its state lives as
/// long as the process; a fleet of nodes needs a shared store instead.
///
/// Memory stays bounded: old quota periods are dropped when a new one is reserved, exported
/// aggregates are dropped two days after their window and all aggregates after 35 days
/// (unexported ones with a warning), and only recent flush ids are kept.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Drawn when the store is made: see [`Store::identifier_salt`].
    salt: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let mut bytes = [0u8; 8];
        // Without the OS generator, the time: distinct enough between two processes.
        if getrandom::fill(&mut bytes).is_err() {
            bytes = (crate::store::unix_now() as u64 ^ u64::from(std::process::id())).to_be_bytes();
        }
        Self { inner: Mutex::default(), salt: u64::from_be_bytes(bytes) }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (tenant, meter) -> its counters, one per period still of use.
    quotas: HashMap<(TenantId, MeterId), Counters>,
    usage: BTreeMap<ExportKey, Aggregate>,
    flushes: HashSet<FlushId>,
    flush_order: VecDeque<FlushId>,
    keys: HashMap<KeyHash, ApiKeyRecord>,
    tenants: BTreeMap<TenantId, TenantRecord>,
    customers: HashMap<String, TenantId>,
    /// Usage event ids and webhook event ids seen, with the time kept by (an event's time, a
    /// webhook event's creation), in the order they came.
    events: Seen,
    webhooks: Seen,
    /// `Idempotency-Key` bindings, at most [`IDEMPOTENCY_KEYS_MAX`].
    idempotency: HashMap<String, Binding>,
    /// The newest window committed, and when aggregates were last pruned against it.
    newest_window: i64,
    pruned_at: i64,
}

/// The most `Idempotency-Key` bindings held: past it, expired ones are dropped, then the ones
/// expiring first.
const IDEMPOTENCY_KEYS_MAX: usize = 1 << 20;

/// One `Idempotency-Key` binding.
#[derive(Debug)]
struct Binding {
    request: String,
    owner: u64,
    completed: bool,
    in_flight_until: i64,
    expires_at: i64,
}

impl Binding {
    /// Whether the binding still holds at `now`.
    fn live(&self, now: i64) -> bool {
        now < self.expires_at && (self.completed || now < self.in_flight_until)
    }
}

impl Inner {
    fn make_room_for_binding(&mut self, now: i64) {
        if self.idempotency.len() < IDEMPOTENCY_KEYS_MAX {
            return;
        }
        self.idempotency.retain(|_, b| b.live(now));
        if self.idempotency.len() >= IDEMPOTENCY_KEYS_MAX {
            // Live bindings only: the sixteenth expiring first goes at once, so that the scan
            // above happens at most once per that many claims.
            let mut by_expiry: Vec<(i64, String)> =
                self.idempotency.iter().map(|(k, b)| (b.expires_at, k.clone())).collect();
            let cut = by_expiry.len() / 16;
            by_expiry.select_nth_unstable(cut);
            for (_, k) in &by_expiry[..=cut] {
                self.idempotency.remove(k);
            }
        }
    }

    /// Drops aggregates past [`RETENTION_SECS`], at most once an hour of window time.
    fn prune(&mut self) {
        if self.newest_window - self.pruned_at < 3600 {
            return;
        }
        self.pruned_at = self.newest_window;
        let horizon = self.newest_window - RETENTION_SECS;
        let mut unexported = 0u64;
        self.usage.retain(|k, a| {
            let keep = k.window_start >= horizon;
            if !keep && a.dead.is_none() {
                unexported += a.quantity - a.exported;
            }
            keep
        });
        if unexported > 0 {
            tracing::warn!(units = unexported, "usage older than 35 days was never exported and is dropped");
        }
    }
}

/// The counters of one (tenant, meter): a few periods at most (the current one, the one
/// before, and another kind of period after a plan change).
#[derive(Debug, Default)]
struct Counters {
    periods: Vec<Counter>,
    /// Periods that ended before this have been dropped: calls for them change nothing.
    dropped_before: i64,
}

#[derive(Debug)]
struct Counter {
    key: QuotaKey,
    reserved: u64,
    /// Per node: the sequence number of its last call applied, and that call's grant.
    applied: HashMap<u64, (u64, Grant)>,
}

impl Counters {
    /// The counter of `key`, created if its period is still of use; drops the periods that
    /// ended before `key`'s started.
    fn get(&mut self, key: &QuotaKey) -> Option<&mut Counter> {
        if key.end <= self.dropped_before {
            return None;
        }
        if let Some(i) = self.periods.iter().position(|c| c.key == *key) {
            return Some(&mut self.periods[i]);
        }
        let start = key.start;
        let before = self.periods.len();
        let mut dropped = self.dropped_before;
        self.periods.retain(|c| {
            let keep = c.key.end >= start;
            if !keep {
                dropped = dropped.max(c.key.end);
            }
            keep
        });
        debug_assert!(self.periods.len() <= before);
        self.dropped_before = dropped;
        self.periods.push(Counter { key: key.clone(), reserved: 0, applied: HashMap::new() });
        self.periods.last_mut()
    }

    fn find(&self, key: &QuotaKey) -> Option<&Counter> {
        self.periods.iter().find(|c| c.key == *key)
    }
}

/// The senders whose last call a counter remembers. A sender is one quota cell of one engine
/// (a tenant state): a tenant evicted and seen again many times in a period makes many. Past
/// this, the sender with the oldest call is forgotten (its calls were answered long ago).
const SENDERS_KEPT: usize = 64;

impl Counter {
    /// Records the answer to `token`'s call.
    fn applied(&mut self, token: ReserveToken, grant: Grant) {
        self.applied.insert(token.node, (token.seq, grant));
        if self.applied.len() > SENDERS_KEPT {
            if let Some(oldest) = self.applied.iter().min_by_key(|(_, (seq, _))| *seq).map(|(n, _)| *n) {
                self.applied.remove(&oldest);
            }
        }
    }

    /// Whether a call with `token` was applied already; `Some(grant)` answers it again.
    fn seen(&self, token: ReserveToken) -> Option<Grant> {
        match self.applied.get(&token.node) {
            Some((seq, grant)) if token.seq <= *seq => {
                Some(if token.seq == *seq { *grant } else { Grant::new(0, self.reserved) })
            }
            _ => None,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Aggregate {
    quantity: u64,
    exported: u64,
    revision: u32,
    in_flight: Option<u64>,
    send: Option<ExportSend>,
    /// Why the export was refused for good, if it was.
    dead: Option<String>,
    attempts: u32,
    unknown_failures: u32,
    first_attempt_at: Option<i64>,
    /// (node, until) of the export's claim.
    claim: Option<(u64, i64)>,
}

/// How long usage event ids and webhook event ids are remembered after their time: no billing
/// system takes usage older than 35 days (Stripe), and Stripe retries a webhook for 3 days.
const EVENT_IDS_KEPT_SECS: i64 = 35 * 86_400;
/// The most ids remembered at once (the oldest go first past it).
const EVENT_IDS_MAX: usize = 1 << 20;

/// Ids seen, bounded and expiring.
#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<(i64, String)>,
    newest: i64,
}

impl Seen {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: &str, at: i64) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back((at, id.to_owned()));
            self.newest = self.newest.max(at);
        }
        while let Some((at, _)) = self.order.front() {
            if *at >= self.newest - EVENT_IDS_KEPT_SECS && self.order.len() <= EVENT_IDS_MAX {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

impl Aggregate {
    fn view(&self, key: &ExportKey, tenants: &BTreeMap<TenantId, TenantRecord>) -> UsageAggregate {
        let mut a = UsageAggregate::new(key.clone(), self.quantity);
        a.exported = self.exported;
        a.revision = self.revision;
        a.in_flight = self.in_flight;
        a.send = self.send.clone();
        a.customer = tenants.get(&key.tenant).and_then(|t| t.customer.clone());
        a.attempts = self.attempts;
        a.unknown_failures = self.unknown_failures;
        a.first_attempt_at = self.first_attempt_at;
        a.claimed_until = self.claim.map(|(_, until)| until);
        a
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole store, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let mut inner = self.lock();
        let counters = inner.quotas.entry((r.key.tenant.clone(), r.key.meter.clone())).or_default();
        let Some(c) = counters.get(&r.key) else {
            // A late call for a period long over: nothing is left to reserve in it.
            return Ok(Grant::new(0, 0));
        };
        if let Some(grant) = c.seen(r.token) {
            return Ok(grant);
        }
        c.reserved = c.reserved.saturating_add(r.owed);
        let granted = match r.limit {
            Some(limit) => r.grant_for(limit.saturating_sub(c.reserved)),
            None => r.units,
        };
        c.reserved = c.reserved.saturating_add(granted);
        let grant = Grant::new(granted, c.reserved);
        c.applied(r.token, grant);
        Ok(grant)
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let counters = inner.quotas.entry((key.tenant.clone(), key.meter.clone())).or_default();
        if let Some(c) = counters.get(key) {
            if c.seen(token).is_none() {
                c.reserved = c.reserved.saturating_sub(units);
                let grant = Grant::new(0, c.reserved);
                c.applied(token, grant);
            }
        }
        Ok(())
    }

    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        let mut inner = self.lock();
        if inner.flushes.contains(&batch.id) {
            return Ok(CommitOutcome::AlreadyApplied);
        }
        for r in &batch.records {
            let key = ExportKey { tenant: r.tenant.clone(), meter: r.meter.clone(), window_start: r.window_start };
            let agg = inner.usage.entry(key).or_default();
            agg.quantity = agg.quantity.saturating_add(r.quantity);
            inner.newest_window = inner.newest_window.max(r.window_start);
        }
        inner.prune();
        inner.flushes.insert(batch.id.clone());
        inner.flush_order.push_back(batch.id.clone());
        while inner.flush_order.len() > FLUSH_IDS_KEPT {
            if let Some(old) = inner.flush_order.pop_front() {
                inner.flushes.remove(&old);
            }
        }
        Ok(CommitOutcome::Applied)
    }

    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        use std::ops::Bound;
        let mut inner = self.lock();
        if after.is_none() {
            let horizon = window_start_before.min(inner.newest_window) - EXPORTED_RETENTION_SECS;
            inner.usage.retain(|k, a| {
                !(k.window_start < horizon && a.exported == a.quantity && a.in_flight.is_none() && a.dead.is_none())
            });
        }
        let Inner { usage, tenants, .. } = &*inner;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(usage
            .range((from, Bound::Unbounded))
            .filter(|(k, a)| {
                k.window_start < window_start_before
                    && (a.quantity > a.exported || a.in_flight.is_some())
                    && a.dead.is_none()
            })
            .take(limit)
            .map(|(k, a)| a.view(k, tenants))
            .collect())
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let mut inner = self.lock();
        let Inner { usage, tenants, .. } = &mut *inner;
        match usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.dead.is_none() => {
                if let Some((node, until)) = a.claim {
                    if node != claim.node && until > claim.now {
                        return Ok(None);
                    }
                }
                a.claim = Some((claim.node, claim.until));
                a.attempts += 1;
                a.first_attempt_at.get_or_insert(claim.now);
                if a.in_flight.is_none() {
                    a.in_flight = Some(aggregate.quantity.min(a.quantity));
                    a.send = Some(send.clone());
                }
                Ok(Some(a.view(&aggregate.key, tenants)))
            }
            _ => Ok(None),
        }
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        unknown: bool,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.dead.is_none() && a.in_flight.is_some() => {
                if a.claim.is_some_and(|(node, until)| node != claim.node && until > claim.now) {
                    return Ok(false);
                }
                a.claim = Some((claim.node, claim.until));
                a.unknown_failures += u32::from(unknown);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn finish_export(&self, aggregate: &UsageAggregate) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.in_flight.is_some() => {
                a.exported = a.in_flight.take().unwrap_or(a.exported);
                a.send = None;
                a.dead = None;
                a.revision += 1;
                a.attempts = 0;
                a.unknown_failures = 0;
                a.first_attempt_at = None;
                a.claim = None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        if let Some(a) = self.lock().usage.get_mut(&aggregate.key).filter(|a| a.revision == aggregate.revision) {
            a.dead = Some(reason.to_owned());
        }
        Ok(())
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .usage
            .range((from, Bound::Unbounded))
            .filter_map(|(k, a)| {
                a.dead.as_ref().map(|reason| {
                    let mut d = DeadLetter::new(k.clone(), a.quantity - a.exported, reason.clone());
                    d.revision = a.revision;
                    d.send = a.send.clone();
                    d
                })
            })
            .take(limit)
            .collect())
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.usage.get_mut(key).filter(|a| a.dead.is_some()) else {
            return Ok(false);
        };
        a.dead = None;
        a.in_flight = None;
        a.send = None;
        a.claim = None;
        a.attempts = 0;
        a.unknown_failures = 0;
        a.first_attempt_at = None;
        a.revision += 1;
        Ok(true)
    }

    fn is_durable(&self) -> bool {
        false
    }

    fn identifier_salt(&self) -> Option<u64> {
        Some(self.salt)
    }

    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let mut inner = self.lock();
        if let Some(b) = inner.idempotency.get(&c.key) {
            if b.live(c.now) {
                return Ok(if b.request != c.request {
                    IdempotencyState::Mismatch
                } else if b.completed {
                    IdempotencyState::Completed
                } else {
                    IdempotencyState::InFlight
                });
            }
        }
        inner.make_room_for_binding(c.now);
        let binding = Binding {
            request: c.request.clone(),
            owner: c.owner,
            completed: false,
            in_flight_until: c.in_flight_until,
            expires_at: c.expires_at,
        };
        inner.idempotency.insert(c.key.clone(), binding);
        Ok(IdempotencyState::Claimed)
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let held = inner.idempotency.get(key).is_some_and(|b| b.owner == owner && !b.completed);
        if held {
            match how {
                IdempotencySettle::Completed => {
                    if let Some(b) = inner.idempotency.get_mut(key) {
                        b.completed = true;
                    }
                }
                IdempotencySettle::Released => {
                    inner.idempotency.remove(key);
                }
            }
        }
        Ok(())
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if inner.events.contains(&e.id) {
                out.push(EventOutcome::Duplicate);
                continue;
            }
            let r = &e.record;
            let key = ExportKey::new(r.tenant.clone(), r.meter.clone(), r.window_start);
            let agg = inner.usage.entry(key).or_default();
            agg.quantity = agg.quantity.saturating_add(r.quantity);
            inner.newest_window = inner.newest_window.max(r.window_start);
            inner.events.insert(&e.id, e.at);
            out.push(EventOutcome::Applied);
        }
        inner.prune();
        Ok(out)
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .usage
            .iter()
            .filter(|(k, _)| k.tenant == *tenant && k.window_start >= from && k.window_start < to)
            .map(|(k, a)| a.view(k, &inner.tenants))
            .collect())
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from: Bound<&TenantId> = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner.tenants.range::<TenantId, _>((from, Bound::Unbounded)).take(limit).map(|(_, r)| r.clone()).collect())
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.customers.get(customer).and_then(|t| inner.tenants.get(t)).cloned())
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        let mut inner = self.lock();
        if inner.webhooks.contains(&change.event_id) {
            return Ok(PlanChangeOutcome::Duplicate);
        }
        let Some(id) = inner.customers.get(&change.customer).cloned() else {
            return Ok(PlanChangeOutcome::UnknownCustomer);
        };
        inner.webhooks.insert(&change.event_id, change.created);
        let Some(record) = inner.tenants.get_mut(&id) else {
            return Ok(PlanChangeOutcome::UnknownCustomer);
        };
        if record.last_event_at.is_some_and(|last| last > change.created) {
            return Ok(PlanChangeOutcome::Stale);
        }
        record.plan = change.plan.clone();
        record.last_event_at = Some(change.created);
        Ok(PlanChangeOutcome::Applied(record.clone()))
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let inner = self.lock();
        let now = super::unix_now();
        Ok(inner.keys.get(key).filter(|k| k.is_live(now)).and_then(|k| inner.tenants.get(&k.tenant)).cloned())
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        Ok(self.lock().tenants.get(id).cloned())
    }

    async fn set_overrides(&self, tenant: &TenantId, overrides: Option<&str>) -> Result<bool, StoreError> {
        Ok(match self.lock().tenants.get_mut(tenant) {
            Some(t) => {
                t.overrides = overrides.map(str::to_owned);
                true
            }
            None => false,
        })
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(old) = inner.tenants.insert(record.id.clone(), record.clone()) {
            // The tenant's old customer leaves it (unless another tenant has it since).
            if let Some(c) = old.customer {
                if inner.customers.get(&c) == Some(&record.id) {
                    inner.customers.remove(&c);
                }
            }
        }
        if let Some(c) = &record.customer {
            // A billing customer belongs to one tenant: given to this one, it leaves any other.
            if let Some(other) = inner.customers.insert(c.clone(), record.id.clone()) {
                if other != record.id {
                    if let Some(t) = inner.tenants.get_mut(&other) {
                        t.customer = None;
                    }
                }
            }
        }
        let now = super::unix_now();
        for key in keys {
            inner
                .keys
                .entry(*key)
                .and_modify(|k| k.tenant = record.id.clone())
                .or_insert_with(|| ApiKeyRecord::new(*key, record.id.clone(), now));
        }
        Ok(())
    }

    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.keys.get(&key.hash).is_some_and(|k| k.tenant != key.tenant) {
            return Err(StoreError::Conflict("the API key, held by another tenant"));
        }
        inner.keys.insert(key.hash, key.clone());
        Ok(())
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut keys: Vec<_> = self.lock().keys.values().filter(|k| &k.tenant == tenant).cloned().collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        self.lock().keys.remove(key);
        Ok(())
    }
}

#[async_trait]
impl StoreInspect for MemoryStore {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        let inner = self.lock();
        let counters = inner.quotas.get(&(key.tenant.clone(), key.meter.clone()));
        Ok(counters.and_then(|c| c.find(key)).map_or(0, |c| c.reserved))
    }

    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let inner = self.lock();
        Ok(inner.usage.get(key).map(|a| a.view(key, &inner.tenants)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UsageRecord;

    fn qk(p: i64) -> QuotaKey {
        QuotaKey::new("t".into(), "requests".into(), crate::config::Period::Day, p, p + 86_400)
    }

    fn r(key: QuotaKey, units: u64, limit: Option<u64>, seq: u64) -> Reservation {
        Reservation::new(key, units, 0, limit, ReserveToken::new(1, seq))
    }

    #[tokio::test]
    async fn hard_reservations_never_pass_the_limit() {
        let s = MemoryStore::new();
        assert_eq!(s.reserve(&r(qk(0), 7, Some(10), 1)).await.unwrap(), Grant::new(7, 7));
        assert_eq!(s.reserve(&r(qk(0), 7, Some(10), 2)).await.unwrap(), Grant::new(3, 10));
        assert_eq!(s.reserve(&r(qk(0), 1, Some(10), 3)).await.unwrap().granted, 0);
        s.release(&qk(0), 4, ReserveToken::new(1, 4)).await.unwrap();
        assert_eq!(s.reserve(&r(qk(0), 9, Some(10), 5)).await.unwrap().granted, 4);
        // A new period starts from zero; the one before is kept until the next starts.
        assert_eq!(s.reserve(&r(qk(86_400), 9, Some(10), 6)).await.unwrap().granted, 9);
        assert_eq!(s.reserved(&qk(0)).await.unwrap(), 10);
        assert_eq!(s.reserve(&r(qk(2 * 86_400), 1, Some(10), 7)).await.unwrap().granted, 1);
        assert_eq!(s.reserve(&r(qk(0), 1, Some(10), 8)).await.unwrap().granted, 0, "dropped");
        assert_eq!(s.reserved(&qk(0)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_retried_call_is_applied_once_and_owed_units_pass_the_limit() {
        let s = MemoryStore::new();
        let first = r(qk(0), 6, Some(10), 1);
        assert_eq!(s.reserve(&first).await.unwrap(), Grant::new(6, 6));
        assert_eq!(s.reserve(&first).await.unwrap(), Grant::new(6, 6), "the same answer, applied once");
        assert_eq!(s.reserved(&qk(0)).await.unwrap(), 6);
        s.release(&qk(0), 2, ReserveToken::new(1, 2)).await.unwrap();
        s.release(&qk(0), 2, ReserveToken::new(1, 2)).await.unwrap();
        assert_eq!(s.reserved(&qk(0)).await.unwrap(), 4);
        // Another node's calls have their own sequence.
        let owed = Reservation::new(qk(0), 5, 9, Some(10), ReserveToken::new(2, 1));
        assert_eq!(s.reserve(&owed).await.unwrap(), Grant::new(0, 13), "owed units pass the limit");
        // Another kind of period is another counter.
        let month = QuotaKey::new(
            "t".into(),
            "requests".into(),
            crate::config::Period::Month { anchor_day: 1 },
            0,
            31 * 86_400,
        );
        assert_eq!(s.reserve(&r(month, 3, Some(10), 3)).await.unwrap(), Grant::new(3, 3));
    }

    #[tokio::test]
    async fn aggregates_older_than_the_retention_are_dropped_without_a_sink() {
        let s = MemoryStore::new();
        let batch = |id: &str, window_start: i64| UsageBatch {
            id: FlushId::new(id),
            records: vec![UsageRecord { tenant: "t".into(), meter: "requests".into(), window_start, quantity: 1 }],
        };
        let key = |w| ExportKey { tenant: "t".into(), meter: "requests".into(), window_start: w };
        s.commit_usage(&batch("a", 0)).await.unwrap();
        s.commit_usage(&batch("b", RETENTION_SECS - 3600)).await.unwrap();
        assert!(s.usage(&key(0)).await.unwrap().is_some(), "within 35 days");
        s.commit_usage(&batch("c", RETENTION_SECS + 3600)).await.unwrap();
        assert!(s.usage(&key(0)).await.unwrap().is_none(), "past 35 days");
        assert!(s.usage(&key(RETENTION_SECS - 3600)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_counter_remembers_a_bounded_number_of_senders() {
        let s = MemoryStore::new();
        for sender in 1..=200u64 {
            let r = Reservation::new(qk(0), 1, 0, None, ReserveToken::new(sender, sender));
            s.reserve(&r).await.unwrap();
        }
        let inner = s.lock();
        let counters = &inner.quotas[&(TenantId::from("t"), MeterId::from("requests"))];
        assert_eq!(counters.periods[0].applied.len(), SENDERS_KEPT);
        assert_eq!(counters.periods[0].reserved, 200);
    }

    fn send() -> ExportSend {
        ExportSend::new(5, 3599, Some("cus_1".into()), "requests")
    }

    #[tokio::test]
    async fn an_export_claim_holds_off_other_nodes_until_it_expires() {
        let s = MemoryStore::new();
        let rec = UsageRecord { tenant: "t".into(), meter: "requests".into(), window_start: 0, quantity: 5 };
        s.commit_usage(&UsageBatch { id: FlushId::new("f"), records: vec![rec] }).await.unwrap();
        let agg = s.pending_exports(3600, None, 10).await.unwrap().remove(0);
        let mine = s.begin_export(&agg, &ExportClaim::new(1, 100, 400), &send()).await.unwrap().unwrap();
        assert_eq!((mine.attempts, mine.first_attempt_at, mine.claimed_until), (1, Some(100), Some(400)));
        assert!(
            s.begin_export(&agg, &ExportClaim::new(2, 200, 500), &send()).await.unwrap().is_none(),
            "held by node 1"
        );
        let theirs = s.begin_export(&agg, &ExportClaim::new(2, 400, 700), &send()).await.unwrap().unwrap();
        assert_eq!((theirs.attempts, theirs.first_attempt_at, theirs.in_flight), (2, Some(100), Some(5)));
        assert!(s.finish_export(&theirs).await.unwrap());
        let done = s.usage(&agg.key).await.unwrap().unwrap();
        assert_eq!((done.attempts, done.first_attempt_at, done.claimed_until, done.revision), (0, None, None, 1));
    }

    #[tokio::test]
    async fn events_apply_once_per_id() {
        let s = MemoryStore::new();
        let ev = |id: &str, q| {
            UsageEvent::new(
                id,
                UsageRecord { tenant: "t".into(), meter: "requests".into(), window_start: 0, quantity: q },
                10,
            )
        };
        let out = s.commit_events(&[ev("a", 5), ev("b", 2), ev("a", 5)]).await.unwrap();
        assert_eq!(out, [EventOutcome::Applied, EventOutcome::Applied, EventOutcome::Duplicate]);
        assert_eq!(s.commit_events(&[ev("b", 2)]).await.unwrap(), [EventOutcome::Duplicate]);
        let range = s.usage_range(&"t".into(), 0, 3600).await.unwrap();
        assert_eq!(range.len(), 1);
        assert_eq!(range[0].quantity, 7);
        assert!(s.usage_range(&"t".into(), 3600, 7200).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn plan_changes_apply_once_and_in_order() {
        let s = MemoryStore::new();
        for (id, customer) in [("a", "cus_a"), ("b", "cus_b")] {
            s.put_tenant(&TenantRecord::new(id.into(), "free".into()).with_customer(customer), &[]).await.unwrap();
        }
        let listed: Vec<String> =
            s.list_tenants(None, 10).await.unwrap().into_iter().map(|t| t.id.to_string()).collect();
        assert_eq!(listed, ["a", "b"]);
        assert_eq!(s.list_tenants(Some(&"a".into()), 10).await.unwrap().len(), 1);
        assert_eq!(s.tenant_by_customer("cus_b").await.unwrap().unwrap().id.as_str(), "b");
        let change = |id: &str, at, plan: &str| PlanChange::new(id, "cus_a", at, plan.into());
        match s.apply_plan_change(&change("evt_2", 200, "metered")).await.unwrap() {
            PlanChangeOutcome::Applied(r) => assert_eq!((r.plan.as_str(), r.last_event_at), ("metered", Some(200))),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.apply_plan_change(&change("evt_2", 200, "metered")).await.unwrap(), PlanChangeOutcome::Duplicate);
        assert_eq!(s.apply_plan_change(&change("evt_1", 100, "free")).await.unwrap(), PlanChangeOutcome::Stale);
        assert_eq!(s.tenant(&"a".into()).await.unwrap().unwrap().plan.as_str(), "metered");
        let unknown = PlanChange::new("evt_3", "cus_zz", 300, "free".into());
        assert_eq!(s.apply_plan_change(&unknown).await.unwrap(), PlanChangeOutcome::UnknownCustomer);
    }

    #[tokio::test]
    async fn a_batch_commits_once_and_exports_move_by_revision() {
        let s = MemoryStore::new();
        let batch = UsageBatch {
            id: FlushId::new("f1"),
            records: vec![UsageRecord { tenant: "t".into(), meter: "requests".into(), window_start: 0, quantity: 5 }],
        };
        assert_eq!(s.commit_usage(&batch).await.unwrap(), CommitOutcome::Applied);
        assert_eq!(s.commit_usage(&batch).await.unwrap(), CommitOutcome::AlreadyApplied);
        let pending = s.pending_exports(3600, None, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].quantity, pending[0].exported, pending[0].revision), (5, 0, 0));
        let fixed = s.begin_export(&pending[0], &ExportClaim::new(1, 0, 300), &send()).await.unwrap().unwrap();
        assert_eq!(fixed.in_flight, Some(5));
        // Late usage does not change what the in-flight revision exports.
        let late = UsageBatch {
            id: FlushId::new("f2"),
            records: vec![UsageRecord { tenant: "t".into(), meter: "requests".into(), window_start: 0, quantity: 2 }],
        };
        s.commit_usage(&late).await.unwrap();
        assert_eq!(
            s.begin_export(&pending[0], &ExportClaim::new(1, 0, 300), &send()).await.unwrap().unwrap().in_flight,
            Some(5)
        );
        assert!(s.finish_export(&fixed).await.unwrap());
        assert!(!s.finish_export(&fixed).await.unwrap(), "stale revision");
        let next = s.pending_exports(3600, None, 10).await.unwrap();
        assert_eq!((next[0].quantity, next[0].exported, next[0].revision, next[0].in_flight), (7, 5, 1, None));
    }
}
