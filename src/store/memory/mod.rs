use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;

use super::contract::{EVENT_IDS_KEPT_SECS, EVENT_IDS_MAX, IDEMPOTENCY_KEYS_MAX, MEMORY_FLUSH_IDS, USAGE_KEPT_SECS};
use super::{
    ApiKeyRecord, CommitOutcome, CreditBalance, CreditClosure, CreditGrant, DeadLetter, Deferral, DirectoryStore,
    EventOutcome, ExportClaim, ExportKey, ExportSend, ExportStore, FlushId, Grant, GrantOutcome, IdempotencyClaim,
    IdempotencySettle, IdempotencyState, IdempotencyStore, LedgerEntry, LedgerStore, PlanChange, PlanChangeOutcome,
    QuotaStore, Reservation, StoreError, Tally, TallyQuery, TallyScope, TenantRecord, TenantUpdate, UpdateWhen,
    UsageAggregate, UsageBatch, UsageEvent, UsageStore, LEDGER_KEPT_SECS,
};
use crate::base::{KeyHash, MeterId, TenantId};

mod audit;
mod directory;
mod export;
mod idempotency;
mod ledger;
mod outbox;
mod place;
mod quota;
mod rate;
mod usage;
mod values;

/// The embedded store: everything in this process's memory, nothing to run.
///
/// It is the default of [`Tollgate::builder`](crate::Tollgate::builder). Its state lives as
/// long as the process; a fleet of nodes needs a shared store instead.
///
/// Memory stays bounded: old quota periods are dropped when a new one is reserved, aggregates
/// (exported or not) 63 days after their window (unexported ones with a warning; dead letters
/// are kept until requeued or confirmed), and only the
/// last 65,536 flush ids are kept. Export listings walk an index of the windows not yet
/// exported (and one of the dead letters), and a tenant's usage its own windows only, so the
/// 63 days of exported windows kept cost memory, not time under the store's lock.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        // Drawn for each store: a restarted process, whose windows start at revision 0 again,
        // never reuses an identifier it sent before.
        let inner = Inner { namespace: super::draw_namespace(), ..Inner::default() };
        Self { inner: Mutex::new(inner) }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// See [`ExportStore::identifier_namespace`].
    namespace: String,
    /// Tenants' quotas: every meter's counters, caps, recharges and credit grants.
    quota: HashMap<TenantId, crate::store::tenant_quota::TenantQuota>,
    /// Refunds that came before their grant, by payment.
    kept_refunds: BTreeMap<String, crate::store::CreditRefund>,
    /// Tenants' payments rows, as JSON (`store/payments.rs`).
    payments: HashMap<TenantId, String>,
    usage: BTreeMap<ExportKey, Aggregate>,
    /// The keys of the aggregates the export has yet to send (or has in flight), and of those
    /// parked as dead letters: a listing walks these, not 63 days of exported windows.
    pending: BTreeSet<ExportKey>,
    parked: BTreeSet<ExportKey>,
    flushes: HashSet<FlushId>,
    flush_order: VecDeque<FlushId>,
    keys: HashMap<KeyHash, ApiKeyRecord>,
    tenants: BTreeMap<TenantId, TenantRecord>,
    customers: HashMap<String, TenantId>,
    /// The feed of tenants changed (`store/changes.rs`).
    changes: crate::store::Changes,
    /// Usage event ids and webhook event ids seen, with the time kept by (an event's time, a
    /// webhook event's creation), in the order they came.
    events: Seen,
    webhooks: Seen,
    /// `Idempotency-Key` bindings, at most [`IDEMPOTENCY_KEYS_MAX`].
    idempotency: HashMap<String, Binding>,
    /// Bytes of stored responses per bucket of the idempotency window (the last two kept).
    response_bytes: std::collections::BTreeMap<i64, u64>,
    /// The export ledger by (hour, key, revision), and the order its entries came in (their
    /// time, for pruning).
    ledger: BTreeMap<(i64, ExportKey, u32), LedgerEntry>,
    ledger_order: VecDeque<(i64, (i64, ExportKey, u32))>,
    /// The newest window committed, and when aggregates were last pruned against it.
    newest_window: i64,
    pruned_at: i64,
    /// Tenants' shared rates (`rate_scope = "fleet"`): their buckets, dropped once full again
    /// and quiet.
    rates: HashMap<TenantId, crate::store::RateRow>,
    /// When the buckets were last pruned (the callers' clock, Unix nanoseconds).
    rates_pruned: i64,
    /// Tenants' places (`concurrency_scope = "fleet"`), while a node holds some or gave its
    /// last back within a TTL.
    places: HashMap<TenantId, crate::store::PlaceRow>,
    /// When the places were last pruned (the callers' clock, Unix nanoseconds).
    places_pruned: i64,
    /// The alerts outbox, by key.
    alerts: std::collections::BTreeMap<crate::store::AlertKey, crate::store::OutboxEntry>,
    /// Tenants' values of open dimensions, by (tenant, meter, dimension, period).
    values: HashMap<(TenantId, MeterId, String, i64), crate::store::ValueRow>,
    /// The latest period start a values call named when rows were last pruned.
    values_pruned: i64,
    /// The audit of tenants' settings, by (tenant, number), and each tenant's last number.
    audit: BTreeMap<(TenantId, i64), crate::store::AuditRecord>,
    audit_heads: HashMap<TenantId, i64>,
    /// The tallies of requests admitted and refused, by (window start, scope): each outcome's
    /// count.
    tallies: BTreeMap<(i64, crate::store::TallyScope), BTreeMap<String, u64>>,
}

/// One `Idempotency-Key` binding.
#[derive(Debug)]
struct Binding {
    request: String,
    owner: u64,
    completed: bool,
    in_flight_until: i64,
    expires_at: i64,
    /// The response of a completed request.
    response: Option<std::sync::Arc<crate::store::StoredResponse>>,
}

impl Binding {
    /// Whether the binding still holds at `now`.
    fn live(&self, now: i64) -> bool {
        now < self.expires_at && (self.completed || now < self.in_flight_until)
    }
}

impl Inner {
    /// Whether a new binding fits under `max_keys` (and [`IDEMPOTENCY_KEYS_MAX`]): bindings
    /// past their window go first; a binding not past it is never forgotten.
    fn make_room_for_binding(&mut self, now: i64, max_keys: u64) -> bool {
        let cap = usize::try_from(max_keys).unwrap_or(usize::MAX).min(IDEMPOTENCY_KEYS_MAX);
        if self.idempotency.len() < cap {
            return true;
        }
        self.idempotency.retain(|_, b| now < b.expires_at);
        self.idempotency.len() < cap
    }

    /// Files the aggregate at `key` in [`Inner::pending`] or [`Inner::parked`] (or neither),
    /// after any change to it.
    /// Keeps `entry` in the ledger, and lets entries older than [`LEDGER_KEPT_SECS`] go.
    fn put_ledger(&mut self, entry: LedgerEntry, now: i64) {
        while let Some((at, _)) = self.ledger_order.front() {
            if *at >= now - LEDGER_KEPT_SECS {
                break;
            }
            let Some((at, slot)) = self.ledger_order.pop_front() else { break };
            // Only if it was not written again since.
            if self.ledger.get(&slot).is_some_and(|e| e.exported_at.or(e.lacking_since).unwrap_or(at) <= at) {
                self.ledger.remove(&slot);
            }
        }
        let slot = (entry.hour(), entry.key.clone(), entry.revision);
        self.ledger_order.push_back((now, slot.clone()));
        self.ledger.insert(slot, entry);
    }

    fn index(&mut self, key: &ExportKey) {
        let (pending, parked) = match self.usage.get(key) {
            Some(a) if a.dead.is_some() => (false, true),
            Some(a) => (a.billable && (a.quantity > a.exported || a.in_flight.is_some()), false),
            None => (false, false),
        };
        for (set, member) in [(&mut self.pending, pending), (&mut self.parked, parked)] {
            if member {
                if !set.contains(key) {
                    set.insert(key.clone());
                }
            } else {
                set.remove(key);
            }
        }
    }

    /// Drops aggregates past [`USAGE_KEPT_SECS`], at most once an hour of window time.
    fn prune(&mut self) {
        if self.newest_window - self.pruned_at < 3600 {
            return;
        }
        self.pruned_at = self.newest_window;
        let horizon = self.newest_window - USAGE_KEPT_SECS;
        let mut unexported = 0u64;
        // Dead letters are kept until requeued or confirmed: never dropped unseen.
        self.usage.retain(|k, a| {
            let keep = k.window_start >= horizon || a.dead.is_some();
            if !keep && a.billable {
                unexported += a.quantity - a.exported;
            }
            keep
        });
        let usage = &self.usage;
        self.pending.retain(|k| usage.contains_key(k));
        if unexported > 0 {
            tracing::warn!(units = unexported, "usage older than 63 days was never exported and is dropped");
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Aggregate {
    quantity: u64,
    /// Whether a billable record was committed to it: an export candidate.
    billable: bool,
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

/// Ids seen, expiring by age only and bounded: at the cap a new one is refused.
#[derive(Debug)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<(i64, String)>,
    newest: i64,
    cap: usize,
}

impl Default for Seen {
    fn default() -> Self {
        Self { ids: HashSet::new(), order: VecDeque::new(), newest: i64::MIN, cap: EVENT_IDS_MAX }
    }
}

impl Seen {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Whether a new id at `at` may be kept: ids past their horizon go first, and at the cap
    /// it is refused (never a younger one forgotten).
    fn has_room(&mut self, at: i64) -> bool {
        // Never later than the wall clock: a time in the future must not age the rest out.
        let newest = self.newest.max(at).min(crate::store::unix_now());
        while let Some((old, _)) = self.order.front() {
            if *old >= newest.saturating_sub(EVENT_IDS_KEPT_SECS) {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        self.ids.len() < self.cap
    }

    /// Marks `id` seen; the caller checked [`has_room`](Self::has_room).
    fn insert(&mut self, id: &str, at: i64) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back((at, id.to_owned()));
            self.newest = self.newest.max(at);
        }
    }
}

impl Aggregate {
    fn view(&self, key: &ExportKey) -> UsageAggregate {
        let mut a = UsageAggregate::new(key.clone(), self.quantity);
        a.exported = self.exported;
        a.revision = self.revision;
        a.in_flight = self.in_flight;
        a.send = self.send.clone();
        a.attempts = self.attempts;
        a.unknown_failures = self.unknown_failures;
        a.first_attempt_at = self.first_attempt_at;
        a.claimed_until = self.claim.map(|(_, until)| until);
        a
    }
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole store, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lowers the most usage event ids and webhook event ids kept (each; by default
    /// [`EVENT_IDS_MAX`](crate::store::contract::EVENT_IDS_MAX)), to reach the cap in a test.
    /// Feature `test-util`.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn set_event_id_cap(&self, cap: usize) {
        let mut inner = self.lock();
        inner.events.cap = cap;
        inner.webhooks.cap = cap;
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for MemoryStore {
    async fn reserved(&self, key: &crate::store::QuotaKey) -> Result<u64, StoreError> {
        let inner = self.lock();
        Ok(inner.quota.get(&key.tenant).map_or(0, |q| q.reserved(key)))
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::UsageInspect for MemoryStore {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let inner = self.lock();
        Ok(inner.usage.get(key).map(|a| a.view(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        contract::SENDERS_KEPT, QuotaInspect, QuotaKey, QuotaStoreExt, ReserveToken, UsageInspect, UsageRecord,
    };

    fn qk(p: i64) -> QuotaKey {
        QuotaKey::new("t".into(), "requests".into(), crate::base::Period::Day, p, p + 86_400)
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
        s.release_units(&qk(0), 4, ReserveToken::new(1, 4)).await.unwrap();
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
        s.release_units(&qk(0), 2, ReserveToken::new(1, 2)).await.unwrap();
        s.release_units(&qk(0), 2, ReserveToken::new(1, 2)).await.unwrap();
        assert_eq!(s.reserved(&qk(0)).await.unwrap(), 4);
        // Another node's calls have their own sequence.
        let owed = Reservation::new(qk(0), 5, 9, Some(10), ReserveToken::new(2, 1));
        assert_eq!(s.reserve(&owed).await.unwrap(), Grant::new(0, 13), "owed units pass the limit");
        // Another kind of period is another counter.
        let month =
            QuotaKey::new("t".into(), "requests".into(), crate::base::Period::Month { anchor_day: 1 }, 0, 31 * 86_400);
        assert_eq!(s.reserve(&r(month, 3, Some(10), 3)).await.unwrap(), Grant::new(3, 3));
    }

    #[tokio::test]
    async fn aggregates_older_than_the_retention_are_dropped_without_a_sink() {
        let s = MemoryStore::new();
        let batch = |id: &str, window_start: i64| {
            UsageBatch::new(FlushId::new(id), vec![UsageRecord::new("t".into(), "requests".into(), window_start, 1)])
        };
        let key = |w| ExportKey { tenant: "t".into(), meter: "requests".into(), window_start: w };
        s.commit_usage(&batch("a", 0)).await.unwrap();
        s.commit_usage(&batch("b", USAGE_KEPT_SECS - 3600)).await.unwrap();
        assert!(s.usage(&key(0)).await.unwrap().is_some(), "within 63 days");
        s.commit_usage(&batch("c", USAGE_KEPT_SECS + 3600)).await.unwrap();
        assert!(s.usage(&key(0)).await.unwrap().is_none(), "past 63 days");
        assert!(s.usage(&key(USAGE_KEPT_SECS - 3600)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_counter_remembers_a_bounded_number_of_senders() {
        let s = MemoryStore::new();
        for sender in 1..=200u64 {
            let at = i64::try_from(sender).unwrap() * 1000;
            let r = Reservation::new(qk(0), 1, 0, None, ReserveToken::new(sender, sender).at(at));
            s.reserve(&r).await.unwrap();
        }
        let inner = s.lock();
        let counters = inner.quota[&TenantId::from("t")].counters_of(&MeterId::from("requests"));
        assert_eq!(counters.periods[0].applied.len(), SENDERS_KEPT);
        assert_eq!(counters.periods[0].reserved, 200);
    }

    fn send() -> ExportSend {
        ExportSend::new(5, 3599, Some("cus_1".into()), "requests")
    }

    #[tokio::test]
    async fn an_export_claim_holds_off_other_nodes_until_it_expires() {
        let s = MemoryStore::new();
        let rec = UsageRecord::new("t".into(), "requests".into(), 0, 5);
        s.commit_usage(&UsageBatch::new(FlushId::new("f"), vec![rec])).await.unwrap();
        let agg = s.pending_exports(3600, None, 10).await.unwrap().remove(0);
        let mine = s.begin_export(&agg, &ExportClaim::new(1, 100, 400), &send()).await.unwrap().unwrap();
        assert_eq!((mine.attempts, mine.first_attempt_at, mine.claimed_until), (1, Some(100), Some(400)));
        assert!(
            s.begin_export(&agg, &ExportClaim::new(2, 200, 500), &send()).await.unwrap().is_none(),
            "held by node 1"
        );
        let theirs = s.begin_export(&agg, &ExportClaim::new(2, 400, 700), &send()).await.unwrap().unwrap();
        assert_eq!((theirs.attempts, theirs.first_attempt_at, theirs.in_flight), (2, Some(100), Some(5)));
        assert!(s.finish_export(&theirs, 1_000).await.unwrap());
        let done = s.usage(&agg.key).await.unwrap().unwrap();
        assert_eq!((done.attempts, done.first_attempt_at, done.claimed_until, done.revision), (0, None, None, 1));
    }

    /// The export listings' indexes hold exactly the aggregates pending (or in flight) and
    /// those parked, through every change an aggregate goes through.
    #[tokio::test]
    async fn the_export_indexes_follow_every_change_of_an_aggregate() {
        fn check(s: &MemoryStore) -> (usize, usize) {
            let inner = s.lock();
            let pending: BTreeSet<ExportKey> = inner
                .usage
                .iter()
                .filter(|(_, a)| a.dead.is_none() && (a.quantity > a.exported || a.in_flight.is_some()))
                .map(|(k, _)| k.clone())
                .collect();
            let parked: BTreeSet<ExportKey> =
                inner.usage.iter().filter(|(_, a)| a.dead.is_some()).map(|(k, _)| k.clone()).collect();
            assert_eq!(inner.pending, pending);
            assert_eq!(inner.parked, parked);
            (pending.len(), parked.len())
        }
        let s = MemoryStore::new();
        let rec = |t: &str, w: i64| UsageRecord::new(t.into(), "requests".into(), w, 2);
        let commit = |id: &str, records| UsageBatch::new(FlushId::new(id), records);
        s.commit_usage(&commit("1", vec![rec("a", 0), rec("b", 0), rec("c", 0)])).await.unwrap();
        assert_eq!(check(&s), (3, 0));
        let listed = s.pending_exports(3600, None, 10).await.unwrap();
        let (a, b) = (&listed[0], &listed[1]);
        let a = s.begin_export(a, &ExportClaim::new(1, 100, 400), &send()).await.unwrap().unwrap();
        assert_eq!(check(&s), (3, 0), "in flight: still listed");
        assert!(s.finish_export(&a, 1_000).await.unwrap());
        assert_eq!(check(&s), (2, 0));
        s.dead_letter(b, "refused").await.unwrap();
        assert_eq!(check(&s), (1, 1));
        assert_eq!(s.dead_letters(None, 10).await.unwrap().len(), 1);
        assert!(s.requeue_dead_letter(&b.key).await.unwrap());
        assert_eq!(check(&s), (2, 0));
        // New usage in an exported window: pending again, as its next revision.
        s.commit_events(&[UsageEvent::new("e", rec("a", 0), 10)]).await.unwrap();
        assert_eq!(check(&s), (3, 0));
        let listed = s.pending_exports(3600, Some(&a.key), 10).await.unwrap();
        assert_eq!(listed.iter().map(|l| l.key.tenant.as_str()).collect::<Vec<_>>(), ["b", "c"], "after the cursor");
        assert!(s.pending_exports(0, None, 10).await.unwrap().is_empty(), "windows from the bound on are left out");
        // Past the retention, dropped from the indexes with the aggregates; the dead letter is
        // kept until requeued or confirmed.
        s.dead_letter(&listed[0], "refused").await.unwrap();
        s.commit_usage(&commit("2", vec![rec("d", USAGE_KEPT_SECS + 3600)])).await.unwrap();
        assert_eq!(check(&s), (1, 1));
        assert_eq!(s.usage_range(&"d".into(), 0, i64::MAX).await.unwrap().len(), 1);
        assert!(s.usage_range(&"a".into(), 0, i64::MAX).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn events_apply_once_per_id() {
        let s = MemoryStore::new();
        let ev = |id: &str, q| UsageEvent::new(id, UsageRecord::new("t".into(), "requests".into(), 0, q), 10);
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
        let batch = UsageBatch::new(FlushId::new("f1"), vec![UsageRecord::new("t".into(), "requests".into(), 0, 5)]);
        assert_eq!(s.commit_usage(&batch).await.unwrap(), CommitOutcome::Applied);
        assert_eq!(s.commit_usage(&batch).await.unwrap(), CommitOutcome::AlreadyApplied);
        let pending = s.pending_exports(3600, None, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].quantity, pending[0].exported, pending[0].revision), (5, 0, 0));
        let fixed = s.begin_export(&pending[0], &ExportClaim::new(1, 0, 300), &send()).await.unwrap().unwrap();
        assert_eq!(fixed.in_flight, Some(5));
        // Late usage does not change what the in-flight revision exports.
        let late = UsageBatch::new(FlushId::new("f2"), vec![UsageRecord::new("t".into(), "requests".into(), 0, 2)]);
        s.commit_usage(&late).await.unwrap();
        assert_eq!(
            s.begin_export(&pending[0], &ExportClaim::new(1, 0, 300), &send()).await.unwrap().unwrap().in_flight,
            Some(5)
        );
        assert!(s.finish_export(&fixed, 1_000).await.unwrap());
        assert!(!s.finish_export(&fixed, 1_000).await.unwrap(), "stale revision");
        let next = s.pending_exports(3600, None, 10).await.unwrap();
        assert_eq!((next[0].quantity, next[0].exported, next[0].revision, next[0].in_flight), (7, 5, 1, None));
    }
}
