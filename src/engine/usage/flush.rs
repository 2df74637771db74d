//! Flushing: usage drained from the tenants' counters every flush (even while the store is
//! down, so no counter slot is ever reused by a later window), merged per (tenant, meter,
//! window), and committed to the store in batches, each exactly once under its own id.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use crate::engine::{store_calls::StoreCalls, table::TenantTable, usage::lease::Leases};
use crate::{
    clock::Clock,
    config::{MeterId, StoreErrorPolicy, TenantId},
    metrics::Totals,
    plan::Runtime,
    store::{CommitOutcome, FlushId, StoreError, UsageBatch, UsageRecord},
    tenant::Tenant,
};

/// The usage pipeline: usage drained from the tenants' counters, held until the store takes
/// it, committed in batches exactly once each. One flush at a time (`batches` is its lock);
/// what it holds is in `queue`, behind a lock no store call is made under, so that a reader
/// of the usage not stored yet ([`unstored_of`](Self::unstored_of)) never waits for a flush.
/// Claims of open values that fail in one flush's pass before it stops claiming (the values
/// wait for the next flush).
const CLAIM_FAILURES_MAX: usize = 3;

pub(crate) struct Pipeline {
    batches: tokio::sync::Mutex<Batches>,
    queue: std::sync::Mutex<Queue>,
    /// Batches committed by this node (bumped after the store took one, as it leaves the
    /// queue): a read of the store is known to miss none of them if it is the same before the
    /// read and when the queue is read after it.
    commits: std::sync::atomic::AtomicU64,
    /// The usage buffer is at `usage.max_buffered_records`: fail-closed tenants are refused.
    buffer_full: AtomicBool,
    stores: Arc<StoreCalls>,
    totals: Arc<Totals>,
    clock: Clock,
    /// Whether the billing sink needs a customer (`None`: no sink on this node, so Stripe's
    /// rule if the configuration has `[stripe]`, for a `tollgate export` job elsewhere).
    sink_needs_customer: Option<bool>,
    /// Requests admitted and refused and money spent, waiting to be added to the store's
    /// tallies after the usage.
    tallies: super::tally::Tallies,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("buffer_full", &self.buffer_full).finish_non_exhaustive()
    }
}

/// The flush's own: the ids its batches are formed with.
pub(crate) struct Batches {
    seq: u64,
    /// The last tallies' batch's number (their ids are `NODE-tSEQ`).
    tally_seq: u64,
    node: String,
}

/// Usage drained but not yet committed: formed batches (retried first, in order, with their
/// own ids) and usage not yet in a batch.
#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// (units, billable) per (tenant, meter, window).
    staged: HashMap<(TenantId, MeterId, i64), (u64, bool)>,
}

/// A batch formed and not committed yet.
struct Pending {
    batch: Arc<UsageBatch>,
    /// When it was formed (engine clock, Unix seconds).
    formed: i64,
    /// Whether it was sent to the store (it may be there, though no answer said so).
    sent: bool,
}

impl Batches {
    fn new() -> Self {
        Self { seq: 0, tally_seq: 0, node: Self::draw_node() }
    }

    fn draw_node() -> String {
        format!("{:016x}", crate::tenant::draw_u64())
    }

    /// Draws a new node id for the batches formed from now on (after a SnapStart restore).
    /// Batches already formed keep theirs: retried by every copy, the store takes one.
    pub(crate) fn renew_node(&mut self) {
        self.node = Self::draw_node();
        self.seq = 0;
        self.tally_seq = 0;
    }
}

impl Queue {
    /// Records drained and not committed.
    fn records(&self) -> usize {
        self.pending.iter().map(|p| p.batch.records.len()).sum::<usize>() + self.staged.len()
    }

    /// (records, units) drained and not committed.
    fn held(&self) -> (usize, u64) {
        let batches = self.pending.iter().flat_map(|p| p.batch.records.iter().map(|r| r.quantity));
        let (n, units) = batches.fold((0, 0u64), |(n, u), q| (n + 1, u + q));
        (n + self.staged.len(), units + self.staged.values().map(|(q, _)| q).sum::<u64>())
    }
}

/// The pipeline held ([`Pipeline::lock`]): no flush runs meanwhile.
pub(crate) struct Held<'a> {
    batches: tokio::sync::MutexGuard<'a, Batches>,
    pipeline: &'a Pipeline,
}

impl Held<'_> {
    /// (records, units) drained and not committed.
    pub(crate) fn held(&self) -> (usize, u64) {
        self.pipeline.queue().held()
    }

    /// Draws a new node id for the batches formed from now on (after a SnapStart restore), and
    /// forgets the tallies staged in the snapshot: every copy restored from it has them, and
    /// each would add them under its own ids (batches formed keep theirs: the store takes
    /// each once).
    pub(crate) fn renew_node(&mut self) {
        self.batches.renew_node();
        self.pipeline.tallies.forget_staged();
    }
}

/// What one [`Tollgate::flush`](crate::Tollgate::flush) committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Batches committed.
    pub batches: usize,
    /// Usage records in them.
    pub records: usize,
    /// Units in them (of every meter but `spend`).
    pub units: u64,
    /// Money in them: the reserved meter `spend`, in nano-units of `[billing] currency` (kept
    /// apart from `units`, which it would dwarf).
    pub spend_nanos: u64,
}

const COMMIT_ATTEMPTS: u32 = 3;

/// The longest a batch waits in the buffer to be retried: a day less than the stores keep flush
/// ids ([`FLUSH_IDS_KEPT_SECS`](crate::store::contract::FLUSH_IDS_KEPT_SECS)).
const MAX_BATCH_WAIT_SECS: i64 = crate::store::contract::FLUSH_IDS_KEPT_SECS - 86_400;

impl Pipeline {
    /// Whether the usage buffer is full (the store has not taken what it holds): fail-closed
    /// tenants are refused until a flush empties it.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.buffer_full.load(Relaxed)
    }

    pub(crate) fn new(
        stores: Arc<StoreCalls>,
        totals: Arc<Totals>,
        clock: Clock,
        sink_needs_customer: Option<bool>,
    ) -> Self {
        Self {
            batches: tokio::sync::Mutex::new(Batches::new()),
            queue: std::sync::Mutex::default(),
            commits: std::sync::atomic::AtomicU64::new(0),
            buffer_full: AtomicBool::new(false),
            stores,
            totals,
            clock,
            sink_needs_customer,
            tallies: super::tally::Tallies::default(),
        }
    }

    /// Requests admitted and refused and money spent, waiting for the flush.
    pub(crate) fn tallies(&self) -> &super::tally::Tallies {
        &self.tallies
    }

    /// Whether the usage of `tenant` is billable: always, unless the sink needs a billing
    /// customer, the tenant has none and its plan is not `billed` (a free tier). Its usage is
    /// then stored but not an export candidate.
    pub(crate) fn billable(&self, rt: &Runtime, tenant: &Tenant) -> bool {
        let needs_customer = self.sink_needs_customer.unwrap_or_else(|| rt.config.sink_needs_customer());
        !needs_customer
            || tenant.customer().is_some()
            || rt.config.plan(&tenant.plan.id).is_some_and(crate::config::PlanSpec::billed)
    }

    /// The batches this node committed so far (see [`lock`](Self::lock)).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Holds the pipeline: no flush runs meanwhile.
    pub(crate) async fn lock(&self) -> Held<'_> {
        Held { batches: self.batches.lock().await, pipeline: self }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node's usage of `tenant` that no store call has carried yet, per (meter, window):
    /// drained and not in a batch, or in a batch not sent; with what `also` reads at the same
    /// instant (no drain of a tenant runs meanwhile: the usage still in the tenant's
    /// counters), and the batches committed by then ([`commits`](Self::commits)). Read after
    /// the store was, none of it is in that read. A batch sent and not answered is not among
    /// it (it may be stored already): a reader that read the store before it lands misses it
    /// until it does.
    ///
    /// Never waits for a flush: the lock it takes is held for no store call, and by a drain
    /// for one tenant at a time. `also` must take no lock of the tenant table (a drain takes
    /// this one inside them).
    pub(crate) fn unstored_of<R>(
        &self,
        tenant: &TenantId,
        also: impl FnOnce() -> R,
    ) -> (HashMap<(MeterId, i64), u64>, R, u64) {
        let q = self.queue();
        let mut out: HashMap<(MeterId, i64), u64> = HashMap::new();
        for ((t, meter, window), (units, _)) in &q.staged {
            if t == tenant {
                *out.entry((meter.clone(), *window)).or_default() += units;
            }
        }
        for r in q.pending.iter().filter(|p| !p.sent).flat_map(|p| p.batch.records.iter()) {
            if r.tenant == *tenant {
                *out.entry((r.meter.clone(), r.window_start)).or_default() += r.quantity;
            }
        }
        let also = also();
        let commits = self.commits();
        drop(q);
        (out, also, commits)
    }

    /// Commits all usage recorded so far to the store, exactly once: a batch that fails is
    /// kept and retried first, with the same id, by the next flush. Usage is drained from the
    /// tenants' counters even when the store is down (held in memory, merged per tenant,
    /// meter and window, up to a bound), so an outage longer than a window keeps every
    /// window's usage in its own window.
    ///
    /// # Errors
    /// The store error that stopped the flush; nothing is lost.
    pub(crate) async fn flush(
        &self,
        runtime: &arc_swap::ArcSwap<Runtime>,
        table: &TenantTable,
        leases: &Leases,
        last: bool,
    ) -> Result<FlushReport, StoreError> {
        let mut p = self.batches.lock().await;
        // The configuration in force once the pipeline is ours (a reload may have come while
        // another flush held it).
        let rt = &*runtime.load_full();
        self.clock.resync();
        let mut report = FlushReport::default();
        // Values of open dimensions new to their tenants are claimed first: their usage is
        // drained under them, or under `"other"` when the tenant's row refused them. A quota
        // store in trouble never holds the usage up for long: the pass stops after a few
        // failures, and within two store timeouts (the last flush's, one: what still waits is
        // billed under `"other"`).
        let claims_within = rt.config.usage.store_timeout * if last { 1 } else { 2 };
        let _late = tokio::time::timeout(claims_within, self.claim_open_values(table)).await;
        // The retired states nobody holds any more are let go once their leases are back; one
        // whose lease the store did not take back stays, and the next flush sends it again:
        // forgotten, its give-back would never land, and at the expiry the store would give
        // back what its last call said it keeps, units its requests used since included. (They
        // stay retired meanwhile, so that a flush cut short loses none: shutdown returns them.)
        let (alone, tend) = self.drain(rt, table, last);
        let unreturned = leases.return_leases(alone.clone()).await;
        table.let_go(&alone, &unreturned, rt.config.limits.max_tenants);
        // Units given back past a lease's cap that no call took yet go back now, leases in
        // debt owe it, and what changed in what the cells keep is told, before any usage
        // commits: a store that gives back a dead node's reservation must not give back units
        // whose usage is committed (told after, it would). A quota store in trouble never
        // holds up the usage for long: a pass stops after a few timeouts.
        leases.tend(rt, tend).await;
        let usage = async {
            self.commit_pending(&mut report).await?;
            // Formed in the queue's lock, held for no store call.
            self.form_batches(&mut p);
            self.commit_pending(&mut report).await
        }
        .await;
        if usage.is_ok() {
            // Everything held was taken: the buffer has room again.
            self.buffer_full.store(false, Relaxed);
        }
        // The tallies after the usage, whatever became of it, within a background call's time
        // (`limits.background_timeout`): a failed or late one waits for the next flush (the
        // last flush's, counted lost), and never changes this one's outcome.
        let within = rt.config.limits.background_timeout;
        if tokio::time::timeout(within, self.commit_tallies(&mut p)).await.is_err() {
            let waiting = self.tallies.waiting_batches();
            tracing::warn!(
                batches = waiting,
                last,
                "the tallies of requests admitted and refused took longer than limits.background_timeout to store; \
                 sent again at the next flush"
            );
        }
        usage?;
        if report.batches > 0 {
            tracing::debug!(batches = report.batches, records = report.records, units = report.units, "usage flushed");
        }
        Ok(report)
    }

    /// Seals the staged records in batches, each under its own id.
    fn form_batches(&self, p: &mut Batches) {
        let mut q = self.queue();
        if !q.staged.is_empty() {
            let records: Vec<UsageRecord> = q
                .staged
                .drain()
                .map(|((tenant, meter, window_start), (quantity, billable))| {
                    UsageRecord::new(tenant, meter, window_start, quantity).with_billable(billable)
                })
                .collect();
            let max = self.stores.background().usage.max_batch_records().max(1);
            // Drained, the map keeps its capacity: after a flush of many tenants (a million
            // let go by the idle sweep: about 120 bytes each) it is given back, down to room
            // for 4,096 records.
            q.staged.shrink_to(4096);
            for chunk in records.chunks(max) {
                p.seq += 1;
                let id = FlushId::new(format!("{}-{:010}", p.node, p.seq));
                let batch = Arc::new(UsageBatch::new(id, chunk.to_vec()));
                q.pending.push_back(Pending { batch, formed: self.clock.unix_secs(), sent: false });
            }
        }
    }

    /// Commits the tallies waiting, in batches of their own (no records) under their own ids,
    /// in order: a batch that fails is kept and sent again first by the next flush, with the
    /// same id; one formed longer ago than the store keeps tallies is let go.
    async fn commit_tallies(&self, p: &mut Batches) {
        let store = &self.stores.background().usage;
        let max = store.max_batch_records().max(1);
        let node = p.node.clone();
        let batches = self.tallies.batches(max, self.clock.unix_secs(), || {
            p.tally_seq += 1;
            FlushId::new(format!("{node}-t{:010}", p.tally_seq))
        });
        let lost = self.tallies.overflowed.swap(0, Relaxed);
        if lost > 0 {
            tracing::warn!(
                counts = lost,
                "tallies of requests admitted and refused found no room (the store has not taken them for long, \
                 or too many tenants waited): the overview misses them"
            );
        }
        for batch in batches {
            match store.commit_usage(&batch).await {
                Ok(_) => self.tallies.committed(&batch.id),
                Err(e) => {
                    tracing::warn!(error = %e, tallies = batch.tallies.len(),
                        "the tallies of requests admitted and refused were not stored; sent again at the next flush");
                    return;
                }
            }
        }
    }

    /// Commits the pending batches in order (the caller holds the pipeline: no other flush
    /// changes the queue's front meanwhile).
    async fn commit_pending(&self, report: &mut FlushReport) -> Result<(), StoreError> {
        loop {
            let batch = {
                let mut q = self.queue();
                let Some(front) = q.pending.front_mut() else { break };
                // A batch is retried only while the store surely remembers its id (a retry
                // after the id expired would count it twice); one that waited that long (the
                // store down for weeks) holds windows no billing system takes any more:
                // dropped, counted.
                if self.clock.unix_secs().saturating_sub(front.formed) > MAX_BATCH_WAIT_SECS {
                    let units: u64 = front.batch.records.iter().map(|r| r.quantity).sum();
                    tracing::error!(batch = %front.batch.id, units,
                        "a usage batch waited longer than the store keeps flush ids: dropped, not retried (it could be counted twice)");
                    self.totals.dropped_units.add(units);
                    q.pending.pop_front();
                    continue;
                }
                front.sent = true;
                front.batch.clone()
            };
            let mut attempt = 0;
            let outcome = loop {
                attempt += 1;
                match self.stores.background().usage.commit_usage(&batch).await {
                    Ok(outcome) => break Ok(outcome),
                    Err(e) if attempt < COMMIT_ATTEMPTS => {
                        tracing::debug!(error = %e, attempt, "usage commit failed, retrying");
                        tokio::time::sleep(Duration::from_millis(50 << (2 * attempt))).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(outcome) => {
                    let spend = |r: &&UsageRecord| r.meter.as_str() == crate::money::SPEND_METER;
                    let nanos: u64 = batch.records.iter().filter(spend).map(|r| r.quantity).sum();
                    let units: u64 = batch.records.iter().map(|r| r.quantity).sum::<u64>() - nanos;
                    if outcome == CommitOutcome::Applied {
                        report.units += units;
                        report.spend_nanos += nanos;
                    }
                    report.batches += 1;
                    report.records += batch.records.len();
                    let t = &self.totals;
                    t.flushes.add(1);
                    t.flushed_units.add(units);
                    t.flushed_spend_nanos.add(nanos);
                    let mut q = self.queue();
                    q.pending.pop_front();
                    self.commits.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                Err(e) => {
                    self.totals.flush_errors.add(1);
                    let (records, units) = self.queue().held();
                    tracing::warn!(error = %e, records, units, "usage flush failed; the usage is kept and retried");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Claims the values of open dimensions new to their tenants that have usage (every
    /// state's, retired ones included) in the quota role's rows: one call per tenant, open
    /// meter and month, eight at a time, each value learned held or refused (its usage then
    /// billed under `"other"`). A call that fails leaves its values waiting for the next flush,
    /// a minute at most (`tenant/open.rs`, `CLAIM_PATIENCE_SECS`).
    async fn claim_open_values(&self, table: &TenantTable) {
        use futures_util::StreamExt as _;
        let mut waiting: Vec<(Tenant, crate::tenant::Waiting)> = Vec::new();
        let mut collect = |s: &Tenant| {
            let meters = &s.plan.meters;
            let series_of = |i: u8| meters.open.get(usize::from(i)).and_then(|o| o.as_deref()).map(|o| o.meter);
            if let Some(open) = s.open_values() {
                waiting.extend(open.waiting(&series_of).into_iter().map(|w| (s.clone(), w)));
            }
        };
        table.for_each(&mut collect);
        for s in table.retired().iter() {
            collect(s);
        }
        if waiting.is_empty() {
            return;
        }
        let failures = std::sync::atomic::AtomicUsize::new(0);
        let failures = &failures;
        let claims = waiting.into_iter().map(|(s, w)| async move {
            if failures.load(Relaxed) >= CLAIM_FAILURES_MAX {
                return None;
            }
            let table = &s.plan.meters;
            let spec = table.open.iter().flatten().find(|o| o.meter == w.meter)?;
            let (_, end) = crate::base::Period::Month { anchor_day: 1 }.bounds(w.month);
            // Kept as long as the month's usage is.
            let keep_until = end.saturating_add(crate::store::contract::RETENTION_SECS);
            let call = crate::store::ValueCall::new(
                s.id.clone(),
                table.ids[usize::from(w.meter)].clone(),
                &*spec.dimension,
                w.month,
                spec.cap,
                keep_until,
            )
            .with_values(w.values.iter().cloned());
            let answer = self.stores.background().quota.values(&call, crate::store::ValueMode::Claim).await;
            let held = match answer {
                Ok(held) => held,
                Err(e) => {
                    failures.fetch_add(1, Relaxed);
                    return Some(Err(e));
                }
            };
            let series_of = |i: u8| table.open.get(usize::from(i)).and_then(|o| o.as_deref()).map(|o| o.meter);
            let refused =
                s.open_values().map_or(0, |mut open| open.claimed(w.meter, w.month, &w.values, &held, &series_of));
            Some(Ok(refused))
        });
        let answers: Vec<_> = futures_util::stream::iter(claims).buffer_unordered(8).collect().await;
        let (mut refused, mut failed, mut error) = (0usize, 0usize, None);
        for answer in answers.into_iter().flatten() {
            match answer {
                Ok(n) => refused += n,
                Err(e) => {
                    failed += 1;
                    error.get_or_insert(e);
                }
            }
        }
        if refused > 0 {
            tracing::info!(
                values = refused,
                "values of open dimensions the tenants' rows refused: billed under `other`"
            );
        }
        if let Some(e) = error {
            tracing::warn!(calls = failed, error = %e,
                "values of open dimensions could not be claimed; claimed again at the next flush");
        }
    }

    /// Moves the usage of every tenant (retired ones included) into the staged records, one
    /// per (tenant, meter, window). Returns the retired states no request holds any more
    /// (their leases to go back, then let go, still retired until then), and the states with
    /// cells to tend (spare units to go back, a lease in debt).
    ///
    /// Each tenant's usage moves under the queue's lock, taken for that tenant alone (a reader
    /// of one tenant's usage waits for one tenant's drain at most; the lock is taken inside
    /// the table's and the retired list's, never around them).
    fn drain(&self, rt: &Runtime, table: &TenantTable, last: bool) -> (Vec<Tenant>, Vec<Tenant>) {
        let max = rt.config.usage.max_buffered_records;
        let mut room = max.saturating_sub(self.queue().records());
        let was_full = self.buffer_full.load(Relaxed);
        let (mut full, mut dropped_units) = (false, 0u64);
        // A pre-aggregated meter's usage is aggregated per window of the billing meter (an
        // hour or a day, which `usage.window` divides): its export sends that window's total.
        let coarse: Vec<(&MeterId, i64)> =
            rt.config.meters.iter().filter_map(|m| m.aggregation.window_secs().map(|w| (&m.id, w))).collect();
        let mut add = |staged: &mut HashMap<(TenantId, MeterId, i64), (u64, bool)>,
                       s: &Tenant,
                       meter: &MeterId,
                       window_start: i64,
                       quantity: u64| {
            let window_start = match coarse.iter().find(|(id, _)| *id == meter) {
                Some((_, w)) => window_start - window_start.rem_euclid(*w),
                None => window_start,
            };
            let key = (s.id.clone(), meter.clone(), window_start);
            let billable = self.billable(rt, s) && rt.config.exports_meter(meter);
            if let Some((q, b)) = staged.get_mut(&key) {
                *q = q.saturating_add(quantity);
                *b |= billable;
            } else if room > 0 || s.usage_policy() == StoreErrorPolicy::FailClosed {
                // Fail-closed usage is always kept: its tenants are refused while the buffer
                // is full, so only requests already admitted can pass the bound.
                room = room.saturating_sub(1);
                full |= room == 0;
                staged.insert(key, (quantity, billable));
            } else {
                full = true;
                dropped_units = dropped_units.saturating_add(quantity);
            }
        };
        let mut spare = Vec::new();
        let now = self.clock.unix_secs();
        let expiry = i64::try_from(rt.config.limits.reservation_expiry.as_secs()).unwrap_or(i64::MAX);
        let skew = i64::try_from(rt.config.limits.clock_skew().as_secs()).unwrap_or(i64::MAX);
        let open = |s: &Tenant, series: usize, value: &str| match s.plan.meters.open[series].as_deref() {
            Some(spec) => spec.id(value),
            None => s.plan.meters.ids[series].clone(),
        };
        let spend = |s: &Tenant, m: usize, q: u64| {
            if s.plan.meters.ids[m].as_str() == crate::money::SPEND_METER {
                self.tallies.spent(&s.id, q, now);
            }
        };
        table.for_each(|s| {
            self.tallies.admitted(&s.id, s.take_admitted(), now);
            let mut queue = self.queue();
            s.drain_usage(|m, w, q| {
                spend(s, m, q);
                add(&mut queue.staged, s, &s.plan.meters.ids[m], w, q);
            });
            s.drain_open(now, last, |m, v, w, q| add(&mut queue.staged, s, &open(s, m, v), w, q));
            drop(queue);
            if s.quotas().any(|c| Leases::needs_tending(c, now, expiry, skew)) {
                spare.push(s.clone());
            }
        });
        let mut alone = Vec::new();
        let retired = table.retired();
        for s in retired.iter() {
            // Checked before draining: with no other holder, nothing can record after.
            let sole = Tenant::count(s) == 1;
            self.tallies.admitted(&s.id, s.take_admitted(), now);
            let mut queue = self.queue();
            s.drain_usage(|m, w, q| {
                spend(s, m, q);
                add(&mut queue.staged, s, &s.plan.meters.ids[m], w, q);
            });
            // A retired state no request holds takes nothing more: nothing of it waits.
            s.drain_open(now, last || sole, |m, v, w, q| add(&mut queue.staged, s, &open(s, m, v), w, q));
            drop(queue);
            if sole {
                alone.push(s.clone());
            } else if s.quotas().any(|c| Leases::needs_tending(c, now, expiry, skew)) {
                // Its requests' holds still settle: what it keeps is told as they do.
                spare.push(s.clone());
            }
        }
        drop(retired);
        let full = full || room == 0;
        self.buffer_full.store(full, Relaxed);
        if full {
            self.totals.buffer_full.add(1);
            self.totals.dropped_units.add(dropped_units);
            if !was_full || dropped_units > 0 {
                tracing::error!(
                    max,
                    dropped_units,
                    "the usage buffer is full (usage.max_buffered_records): fail-closed tenants are refused, \
                     fail-open usage past the bound is dropped"
                );
            }
        } else if was_full {
            tracing::warn!("the usage buffer has room again");
        }
        (alone, spare)
    }
}
