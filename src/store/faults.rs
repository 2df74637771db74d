//! Faults injected into a store's calls, drawn from a seed (feature `test-util`): the audit's
//! store (`tests/audit`). A [`Faults`] store wraps any store in every role it has, as
//! [`Limited`](super::limited) does, so every backend gets the same faults: a call that fails
//! before it reaches the store, one that is applied and whose answer is lost (answered a
//! timeout, as a cut connection is), and one paused before it is sent (a slow store). Which
//! call gets which is drawn from one seeded generator per [`FaultPlan`]; the rates are set per
//! mille, and switched off for an audit's checks.
//!
//! It can also carry one planted [`Defect`]: a fault of the store's rules, not of its
//! transport, that an audit's invariant must catch (so that none of them holds vacuously).
//! The readers of [`QuotaInspect`] and [`UsageInspect`] go to the store untouched: the
//! auditor reads through them.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;

use crate::{
    config::{MeterId, TenantId},
    store::{
        ApiKeyRecord, ChangeCall, Changes, CommitOutcome, CreditBalance, CreditClosure, CreditGrant, CreditRefund,
        DeadLetter, Deferral, DirectoryStore, EventOutcome, ExportClaim, ExportKey, ExportSend, ExportStore, FlushId,
        Grant, GrantOutcome, IdempotencyClaim, IdempotencySettle, IdempotencySettled, IdempotencyState,
        IdempotencyStore, KeyHash, KeyWrite, LedgerEntry, LedgerStore, OutboxStore, PlaceStore, PlanChange,
        PlanChangeOutcome, QuotaCounter, QuotaInspect, QuotaKey, QuotaStore, RateStore, RefundOutcome, Release,
        Reservation, StoreError, TenantRecord, TenantUpdate, UpdateWhen, UsageAggregate, UsageBatch, UsageEvent,
        UsageInspect, UsageStore,
    },
};

/// A fault a [`Faults`] store injects into one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The call fails before it reaches the store: nothing is applied.
    Error,
    /// The call is applied, and its answer is lost: answered a timeout.
    AnswerLost,
    /// The call waits (up to [`FaultPlan::set_pause_max`]) before it is sent.
    Pause,
}

/// A defect planted in a [`Faults`] store's rules, for an audit to catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Defect {
    /// A hard quota's reservations are answered with all they asked, whatever the store
    /// granted (near the limit, it grants less).
    GrantInflated,
    /// Quota give-backs (releases) are answered done and never applied.
    ReleaseDropped,
    /// Each usage batch is committed twice, the second time under another flush id.
    CommitTwice,
    /// Each credit grant is made twice, the second time under another id and of no payment.
    GrantTwice,
    /// Each refund is applied as twice what it refunded.
    RefundTwice,
    /// Each write of alerts names them anew (the last 8 hex digits of their id drawn per
    /// write), so a crossing written by two nodes is two alerts.
    AlertIdPerWrite,
}

/// How many faults a [`FaultPlan`] injected, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultCounts {
    /// Calls failed before the store.
    pub errors: u64,
    /// Calls applied whose answer was lost.
    pub lost: u64,
    /// Calls paused.
    pub pauses: u64,
}

impl FaultCounts {
    /// Every fault injected.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.errors + self.lost + self.pauses
    }
}

/// The faults of the [`Faults`] stores that share it: a seeded generator, the rates of each
/// kind (per mille of calls), whether they are on, what was injected, and a planted defect.
#[derive(Debug)]
pub struct FaultPlan {
    rng: Mutex<u64>,
    /// Per mille of calls: errors, lost answers, pauses.
    rates: [AtomicU32; 3],
    pause_max_ms: AtomicU64,
    on: AtomicBool,
    counts: [AtomicU64; 3],
    defect: Mutex<Option<Defect>>,
    /// Calls served one at a time (a server whose writes are not atomic: moto's).
    serial: AtomicBool,
    turn: tokio::sync::Mutex<()>,
}

impl FaultPlan {
    /// A plan drawing from `seed`, injecting no fault until [`set_rates`](Self::set_rates).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            // xorshift never leaves 0.
            rng: Mutex::new(seed | 1),
            rates: Default::default(),
            pause_max_ms: AtomicU64::new(20),
            on: AtomicBool::new(true),
            counts: Default::default(),
            defect: Mutex::new(None),
            serial: AtomicBool::new(false),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Calls served one at a time (`true`), as a store whose concurrent writes are not atomic
    /// (moto's DynamoDB server) must be for a conservation check; or as they come.
    pub fn set_serial(&self, serial: bool) {
        self.serial.store(serial, Relaxed);
    }

    /// The turn of a call, when calls are served one at a time.
    async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if self.serial.load(Relaxed) {
            Some(self.turn.lock().await)
        } else {
            None
        }
    }

    /// Per mille of calls that fail before the store, lose their answer, or pause.
    pub fn set_rates(&self, error: u32, lost: u32, pause: u32) {
        assert!(error + lost + pause <= 1_000, "rates are per mille of calls");
        for (rate, value) in self.rates.iter().zip([error, lost, pause]) {
            rate.store(value, Relaxed);
        }
    }

    /// The longest pause.
    pub fn set_pause_max(&self, max: Duration) {
        self.pause_max_ms.store(u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1), Relaxed);
    }

    /// Faults injected (`true`) or none (`false`); a planted defect stays.
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Relaxed);
    }

    /// Plants `defect` (or none).
    pub fn plant(&self, defect: Option<Defect>) {
        *self.defect.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = defect;
    }

    /// The faults injected so far.
    #[must_use]
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            errors: self.counts[0].load(Relaxed),
            lost: self.counts[1].load(Relaxed),
            pauses: self.counts[2].load(Relaxed),
        }
    }

    fn planted(&self, defect: Defect) -> bool {
        *self.defect.lock().unwrap_or_else(std::sync::PoisonError::into_inner) == Some(defect)
    }

    fn next(&self) -> u64 {
        let mut x = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// The fault of the next call, if any.
    fn draw(&self) -> Option<Fault> {
        if !self.on.load(Relaxed) {
            return None;
        }
        let mut roll = u32::try_from(self.next() % 1_000).unwrap_or(0);
        for (n, fault) in [Fault::Error, Fault::AnswerLost, Fault::Pause].into_iter().enumerate() {
            let rate = self.rates[n].load(Relaxed);
            if roll < rate {
                self.counts[n].fetch_add(1, Relaxed);
                return Some(fault);
            }
            roll -= rate;
        }
        None
    }

    async fn pause(&self) {
        let ms = self.next() % self.pause_max_ms.load(Relaxed).max(1);
        tokio::time::sleep(Duration::from_millis(ms + 1)).await;
    }
}

/// The error of a call failed before the store.
fn injected(op: &str) -> StoreError {
    StoreError::Backend(format!("{op}: a fault injected before the store").into())
}

/// The answer of a call applied whose answer was lost.
fn lost() -> StoreError {
    StoreError::Timeout(Duration::ZERO)
}

/// A store in every role it has, its calls given the faults of a [`FaultPlan`].
pub struct Faults<S: ?Sized> {
    inner: Arc<S>,
    plan: Arc<FaultPlan>,
}

impl<S: ?Sized> Faults<S> {
    /// `inner`, its calls given the faults of `plan`.
    pub fn new(inner: Arc<S>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    /// The store underneath, without faults.
    #[must_use]
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The plan of its faults.
    #[must_use]
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let _turn = self.plan.turn().await;
        match self.plan.draw() {
            Some(Fault::Error) => Err(injected(op)),
            Some(Fault::AnswerLost) => fut.await.and(Err(lost())),
            Some(Fault::Pause) => {
                self.plan.pause().await;
                fut.await
            }
            None => fut.await,
        }
    }
}

impl<S: ?Sized + std::fmt::Debug> std::fmt::Debug for Faults<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").field("store", &self.inner).field("plan", &self.plan).finish()
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: QuotaStore + ?Sized> QuotaStore for Faults<S> {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let answer = self.call("reserve quota", self.inner.reserve(r)).await;
        match answer {
            Ok(mut grant) if r.limit.is_some() && self.plan.planted(Defect::GrantInflated) => {
                // Planted: answered with all it asked, whatever the store granted.
                grant.granted = grant.granted.max(r.units);
                Ok(grant)
            }
            other => other,
        }
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        let _turn = self.plan.turn().await;
        if self.plan.planted(Defect::ReleaseDropped) {
            // Planted: the give-back answered done, never applied.
            return releases.iter().map(|_| Ok(())).collect();
        }
        match self.plan.draw() {
            Some(Fault::Error) => releases.iter().map(|_| Err(injected("release quota"))).collect(),
            Some(Fault::AnswerLost) => {
                let _applied = self.inner.release(releases).await;
                releases.iter().map(|_| Err(lost())).collect()
            }
            Some(Fault::Pause) => {
                self.plan.pause().await;
                self.inner.release(releases).await
            }
            None => self.inner.release(releases).await,
        }
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        if self.plan.planted(Defect::GrantTwice) {
            // Planted: the grant made again under another id, of no payment.
            let mut again = grant.clone();
            again.id = format!("{}-again", grant.id);
            again.payment = None;
            let _twice = self.inner.grant_credits(&again).await;
        }
        self.call("grant credits", self.inner.grant_credits(grant)).await
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        self.call("read credit grants", self.inner.credit_grants(tenant, meter)).await
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        self.call("close credits", self.inner.close_credits(tenant, meter, id, revoke, now)).await
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        if refund.apart.is_none() && self.plan.planted(Defect::RefundTwice) {
            // Planted: the refund counted twice over (refunds are cumulative: twice the sum).
            let mut twice = refund.clone();
            twice.refunded = (2 * refund.refunded).min(refund.amount);
            twice.units = 2 * refund.units;
            return self.call("refund credits", self.inner.refund_credits(&twice)).await;
        }
        self.call("refund credits", self.inner.refund_credits(refund)).await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        self.call("list expired credits", self.inner.expired_credits(now, limit)).await
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        self.call("read quota counters", self.inner.counters(tenant, meter)).await
    }

    async fn values(
        &self,
        call: &crate::store::ValueCall,
        mode: crate::store::ValueMode,
    ) -> Result<crate::store::HeldValues, StoreError> {
        self.call(mode.name(), self.inner.values(call, mode)).await
    }

    async fn payments(
        &self,
        call: &crate::store::PaymentCall,
        now: i64,
    ) -> Result<crate::store::PaymentAnswer, StoreError> {
        let what =
            if matches!(call, crate::store::PaymentCall::Read { .. }) { "read payments" } else { "record a payment" };
        self.call(what, self.inner.payments(call, now)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: UsageStore + ?Sized> UsageStore for Faults<S> {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        if self.plan.planted(Defect::CommitTwice) {
            // Planted: the batch committed again under another flush id.
            let again = UsageBatch::new(FlushId::new(format!("{}-again", batch.id.as_str())), batch.records.clone());
            let _twice = self.inner.commit_usage(&again).await;
        }
        self.call("flush usage", self.inner.commit_usage(batch)).await
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        self.call("record usage events", self.inner.commit_events(events)).await
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        self.call("read usage", self.inner.usage_range(tenant, from, to)).await
    }

    async fn tallies(&self, query: &crate::store::TallyQuery) -> Result<Vec<crate::store::Tally>, StoreError> {
        self.call("read tallies", self.inner.tallies(query)).await
    }

    fn max_batch_records(&self) -> usize {
        self.inner.max_batch_records()
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: ExportStore + ?Sized> ExportStore for Faults<S> {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        self.call("list pending exports", self.inner.pending_exports(window_start_before, after, limit)).await
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        self.call("begin export", self.inner.begin_export(aggregate, claim, send)).await
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        self.call("defer export", self.inner.defer_export(aggregate, claim, deferral)).await
    }

    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        self.call("finish export", self.inner.finish_export(aggregate, now)).await
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        self.call("dead-letter", self.inner.dead_letter(aggregate, reason)).await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.call("list dead letters", self.inner.dead_letters(after, limit)).await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        self.call("requeue a dead letter", self.inner.requeue_dead_letter(key)).await
    }

    fn is_durable(&self) -> bool {
        self.inner.is_durable()
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        self.call("read the identifier namespace", self.inner.identifier_namespace()).await
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        self.call("set the identifier namespace", self.inner.set_identifier_namespace(current, new)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: LedgerStore + ?Sized> LedgerStore for Faults<S> {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.call("read the ledger", self.inner.ledger(hour, after, limit)).await
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        self.call("note lacking units", self.inner.note_lacking(entry, now)).await
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        self.call("clear lacking units", self.inner.clear_lacking(entry)).await
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        self.call("export again", self.inner.reexport(entry)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: DirectoryStore + ?Sized> DirectoryStore for Faults<S> {
    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        self.call("find key", self.inner.find_key(key)).await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.call("find tenant", self.inner.tenant(id)).await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        self.call("find tenant by customer", self.inner.tenant_by_customer(customer)).await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        self.call("list tenants", self.inner.list_tenants(after, limit)).await
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.call("list keys", self.inner.list_keys(tenant)).await
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.call("read key", self.inner.key(key)).await
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        self.call("put tenant", self.inner.put_tenant(record, keys)).await
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        self.call("put key", self.inner.put_key(key, when)).await
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        self.call("remove key", self.inner.remove_key(key)).await
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let what = match update {
            TenantUpdate::Plan(..) => "set plan",
            TenantUpdate::Customer(..) => "set customer",
            TenantUpdate::MetronomeCustomer(..) => "set Metronome customer",
            TenantUpdate::Overrides(..) => "set overrides",
            TenantUpdate::AlertEndpoint(..) => "set alert endpoint",
        };
        self.call(what, self.inner.update_tenant(update, when)).await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        self.call("apply plan change", self.inner.apply_plan_change(change)).await
    }

    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        let what = match call {
            ChangeCall::Tell { .. } => "tell a tenant changed",
            ChangeCall::Read => "read the tenants changed",
        };
        self.call(what, self.inner.changes(call)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Faults<S> {
    async fn claim_idempotency(&self, claim: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        self.call("claim idempotency key", self.inner.claim_idempotency(claim)).await
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        self.call("read idempotent response", self.inner.read_idempotency(key, request, now)).await
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        self.call("settle idempotency key", self.inner.settle_idempotency(key, owner, how)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: RateStore + ?Sized> RateStore for Faults<S> {
    async fn take_cells(&self, call: &crate::store::CellCall) -> Result<crate::store::CellGrant, StoreError> {
        self.call("take rate cells", self.inner.take_cells(call)).await
    }

    async fn return_cells(&self, call: &crate::store::CellReturn) -> Result<(), StoreError> {
        self.call("return rate cells", self.inner.return_cells(call)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: PlaceStore + ?Sized> PlaceStore for Faults<S> {
    async fn places(
        &self,
        call: &crate::store::PlaceCall,
        mode: crate::store::PlaceMode,
    ) -> Result<crate::store::Places, StoreError> {
        self.call(mode.name(), self.inner.places(call, mode)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: OutboxStore + ?Sized> OutboxStore for Faults<S> {
    async fn put_alerts(&self, entries: &[crate::store::OutboxEntry]) -> Result<usize, StoreError> {
        if self.plan.planted(Defect::AlertIdPerWrite) {
            // Planted: this write's alerts under ids of their own.
            let write = self.plan.next();
            let renamed: Vec<crate::store::OutboxEntry> = entries
                .iter()
                .cloned()
                .map(|mut e| {
                    let kept = e.key.id.len().saturating_sub(8);
                    e.key.id = format!("{}{:08x}", &e.key.id[..kept], write as u32);
                    e
                })
                .collect();
            return self.call("put alerts", self.inner.put_alerts(&renamed)).await;
        }
        self.call("put alerts", self.inner.put_alerts(entries)).await
    }

    async fn claim_alerts(
        &self,
        claim: &crate::store::AlertClaim,
    ) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        self.call("claim alerts", self.inner.claim_alerts(claim)).await
    }

    async fn settle_alert(
        &self,
        key: &crate::store::AlertKey,
        owner: u64,
        outcome: &crate::store::AlertOutcome,
    ) -> Result<bool, StoreError> {
        self.call("settle an alert", self.inner.settle_alert(key, owner, outcome)).await
    }

    async fn list_alerts(
        &self,
        query: &crate::store::AlertQuery,
    ) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        self.call("list alerts", self.inner.list_alerts(query)).await
    }

    async fn requeue_alert(&self, key: &crate::store::AlertKey, now: i64) -> Result<bool, StoreError> {
        self.call("requeue an alert", self.inner.requeue_alert(key, now)).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        self.call("prune alerts", self.inner.prune_alerts(now)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: crate::store::AuditStore + ?Sized> crate::store::AuditStore for Faults<S> {
    async fn append_audit(&self, record: &crate::store::AuditRecord) -> Result<i64, StoreError> {
        self.call("append an audit record", self.inner.append_audit(record)).await
    }

    async fn list_audit(&self, query: &crate::store::AuditQuery) -> Result<Vec<crate::store::AuditRecord>, StoreError> {
        self.call("list audit records", self.inner.list_audit(query)).await
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.call("prune audit records", self.inner.prune_audit(before)).await
    }
}

#[async_trait]
impl<S: QuotaInspect + ?Sized> QuotaInspect for Faults<S> {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        self.inner.reserved(key).await
    }
}

#[async_trait]
impl<S: UsageInspect + ?Sized> UsageInspect for Faults<S> {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        self.inner.usage(key).await
    }
}
