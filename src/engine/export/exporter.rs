//! The billing export: aggregates of closed windows (or, at shutdown on a store that does not
//! outlive the process, of every window) become meter events, sent exactly once per (tenant,
//! meter, window, revision).
//!
//! It runs apart from the usage pipeline (the flush never waits for the billing system), one
//! pass at a time per node, with bounded concurrency, one call in flight per (customer,
//! meter), and a paced call rate. Export state lives in the store: any node may export; a claim with
//! an expiry keeps two nodes off one aggregate; what an export sends is fixed when it begins,
//! so every retry (on any node, after any crash) sends the same parameters under the same
//! identifier.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hasher,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{sync::Mutex, task::JoinSet, time::Instant};

use crate::engine::{node::NodeIds, store_calls::StoreCalls};
use crate::{
    base::{CustomerField, SinkKind, SinkLimits},
    billing::{identifier_in, BillingSink, MeterEvent, SinkError},
    clock::Clock,
    config::{MeterAggregation, MeterId, TenantId},
    metrics::{Metrics, Totals},
    plan::Runtime,
    store::{Deferral, ExportClaim, ExportKey, ExportSend, StoreError, UsageAggregate},
};

/// What one [`Tollgate::export`](crate::Tollgate::export) pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportReport {
    /// Events accepted by the sink.
    pub events: usize,
    /// Units in them (for a pre-aggregated meter, the running totals sent).
    pub units: u64,
    /// Aggregates parked: refused for good, never confirmed, or too old to send.
    pub dead_letters: usize,
    /// Attempts that failed in a way worth retrying; each is retried at its next-attempt time.
    pub retries: usize,
    /// Windows of tenants without a billing customer, skipped (the sink needs one).
    pub unbillable: usize,
    /// Windows left pending for a later pass because their tenant's billing customer could not
    /// be read: the directory failed for the tenant, or neither it nor the file knows it.
    pub waiting: usize,
    /// Windows left pending because their tenant's plan is `billed` and the tenant has no
    /// billing customer yet: exported once it has one.
    pub awaiting_customer: usize,
    /// Whether the sink asked to retry anything later.
    pub deferred: bool,
    /// Whether the pass stopped early because the sink refused everything (its credentials).
    pub halted: bool,
}

impl ExportReport {
    fn merge(&mut self, other: ExportReport) {
        self.events += other.events;
        self.units += other.units;
        self.dead_letters += other.dead_letters;
        self.retries += other.retries;
        self.unbillable += other.unbillable;
        self.waiting += other.waiting;
        self.awaiting_customer += other.awaiting_customer;
        self.deferred |= other.deferred;
        self.halted |= other.halted;
    }
}

/// How many aggregates one store call lists.
const PAGE: usize = 100;
/// The most aggregates one store call lists for a sink taking batches.
const MAX_PAGE: usize = 1000;
/// The longest wait before a retry.
const MAX_BACKOFF_SECS: u64 = 3600;

/// Spaces calls to the billing system at most `rate` a second, across the lanes of a pass and
/// the reads of reconciliation (one pacer per engine).
#[derive(Debug)]
pub(crate) struct Pacer {
    next: Mutex<Instant>,
}

impl Pacer {
    fn new() -> Self {
        Self { next: Mutex::new(Instant::now()) }
    }

    pub(crate) async fn wait(&self, rate: u32) {
        let every = Duration::from_secs(1) / rate.max(1);
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + every;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// What the directory (or the file) says of a tenant's billing customer, in one pass.
#[derive(Debug, Clone)]
enum Customer {
    /// Known, with its billing customer if it has one, and whether its plan is `billed`.
    Known(Option<String>, bool),
    /// Neither the directory nor the file knows the tenant: its windows stay pending (a
    /// directory kept in another store may lag, or not hold it yet), never written off.
    Unknown,
    /// The directory failed for the tenant in this pass: its windows wait for the next.
    Unreadable,
}

/// The billing customers of the tenants one pass meets, each read from the directory once.
///
/// Bounded: past [`Customers::MAX`] tenants the cache starts again (a pass over more tenants
/// reads some twice).
#[derive(Debug)]
struct Customers {
    /// Which of a tenant's customers the sink bills.
    field: CustomerField,
    cache: HashMap<TenantId, Customer>,
    /// Directory reads failed in a row.
    failures: u32,
}

impl Customers {
    const MAX: usize = 1 << 16;
    /// Directory reads failing in a row that end the pass: the directory is down rather than
    /// one record bad, and each further tenant would wait out its own timeout.
    const MAX_FAILURES: u32 = 3;

    fn new(field: CustomerField) -> Self {
        Self { field, cache: HashMap::new(), failures: 0 }
    }

    /// The tenant's billing customer: the directory's, else the file's for a static tenant.
    /// The directory is asked within `limits.background_timeout`; a failure is counted and logged,
    /// and leaves the tenant [`Customer::Unreadable`] for the rest of the pass.
    ///
    /// # Errors
    /// The directory's error once [`Customers::MAX_FAILURES`] reads in a row have failed.
    async fn of(&mut self, deps: &Deps, rt: &Runtime, tenant: &TenantId) -> Result<Customer, StoreError> {
        if let Some(c) = self.cache.get(tenant) {
            return Ok(c.clone());
        }
        let customer = match deps.stores.background().directory.tenant(tenant).await {
            Ok(record) => {
                self.failures = 0;
                match (record, rt.static_tenants.get(tenant)) {
                    (None, None) if tenant.as_str() != crate::config::ANONYMOUS_TENANT => Customer::Unknown,
                    (record, file) => {
                        let plan = record.as_ref().map(|t| &t.plan).or(file.map(|t| &t.plan));
                        let billed = plan.and_then(|p| rt.config.plan(p)).is_some_and(|p| p.billed());
                        let of_file = |t: &crate::plan::StaticTenant| match self.field {
                            CustomerField::Metronome => t.metronome_customer.clone(),
                            _ => t.customer.clone(),
                        };
                        Customer::Known(
                            record
                                .and_then(|t| t.customer_in(self.field).map(str::to_owned))
                                .or_else(|| file.and_then(of_file)),
                            billed,
                        )
                    }
                }
            }
            Err(e) => {
                self.failures += 1;
                if self.failures >= Self::MAX_FAILURES {
                    return Err(e);
                }
                tracing::warn!(%tenant, error = %e,
                    "the tenant's windows wait for the next export pass: its directory record could not be read");
                Customer::Unreadable
            }
        };
        if self.cache.len() >= Self::MAX {
            self.cache.clear();
        }
        self.cache.insert(tenant.clone(), customer.clone());
        Ok(customer)
    }
}

/// The aggregates of one (customer, meter), in window order, each with the customer it is billed
/// to unless its export is in flight.
type Lane = Vec<(UsageAggregate, Option<String>)>;

/// An export begun (claimed, its parameters fixed) and ready to send.
struct Ready {
    agg: UsageAggregate,
    event: MeterEvent,
    /// Whether this attempt began the export's count of attempts that may have reached the
    /// billing system.
    first_attempt: bool,
}

/// The windows of Stripe's meter error reports waiting for their reconciliation, behind the
/// one under way.
#[derive(Debug, Default)]
pub(crate) struct MeterErrorQueue {
    /// A reconciliation is under way (its task takes the queued windows before it ends).
    pub(super) running: bool,
    /// Windows `(from, to)` queued, at most [`MeterErrorQueue::MAX`]: past it, a window is
    /// merged into the queued one nearest it (a wider pass, never a lost one).
    pub(super) queued: Vec<(i64, i64)>,
}

impl MeterErrorQueue {
    /// The most windows queued.
    pub(super) const MAX: usize = 16;

    /// Queues `(from, to)`: merged with a queued window it overlaps or, past the bound, with
    /// the nearest one.
    pub(super) fn push(&mut self, from: i64, to: i64) {
        let overlaps = self.queued.iter().position(|(f, t)| from <= *t && *f <= to);
        let at = overlaps.or_else(|| {
            (self.queued.len() >= Self::MAX)
                .then(|| {
                    self.queued.iter().enumerate().min_by_key(|(_, (f, t))| (from - t).max(f - to)).map(|(i, _)| i)
                })
                .flatten()
        });
        match at {
            Some(i) => {
                let (f, t) = self.queued[i];
                self.queued[i] = (f.min(from), t.max(to));
            }
            None => self.queued.push((from, to)),
        }
    }
}

/// The billing export of this engine: its sink, one pass at a time, and what a pass calls.
pub(crate) struct Exporter {
    pub(super) sink: Option<Arc<dyn BillingSink>>,
    /// Calls to the sink, the export's and reconciliation's, at most `export.calls_per_second`.
    pub(super) pacer: Arc<Pacer>,
    /// One export pass at a time on this node (apart from the pipeline: the billing system's
    /// latency never delays a flush).
    pass: Mutex<()>,
    /// Reconciliations after Stripe's meter error reports: one under way at a time, the
    /// windows of the reports that came meanwhile queued behind it.
    pub(super) meter_errors: std::sync::Mutex<MeterErrorQueue>,
    pub(super) deps: Deps,
}

impl Exporter {
    /// Queues the window `(from, to)` of a Stripe meter error report: `true` when no
    /// reconciliation after such a report is under way (the caller starts one, which takes the
    /// queue with [`next_meter_error`](Self::next_meter_error)), `false` when one is (it takes
    /// this window too before it ends).
    pub(crate) fn after_meter_error(&self, from: i64, to: i64) -> bool {
        let mut queue = self.meter_errors.lock().unwrap_or_else(|e| e.into_inner());
        queue.push(from, to);
        !std::mem::replace(&mut queue.running, true)
    }

    /// The next window queued for the reconciliation under way; `None` ends it (a later
    /// report starts another).
    pub(crate) fn next_meter_error(&self) -> Option<(i64, i64)> {
        let mut queue = self.meter_errors.lock().unwrap_or_else(|e| e.into_inner());
        if queue.queued.is_empty() {
            queue.running = false;
            return None;
        }
        Some(queue.queued.remove(0))
    }

    /// The reconciliation under way ended without emptying the queue (its task panicked): a
    /// later report starts another.
    pub(crate) fn meter_errors_abandoned(&self) {
        self.meter_errors.lock().unwrap_or_else(|e| e.into_inner()).running = false;
    }
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("sink", &self.sink).finish_non_exhaustive()
    }
}

/// What the exporter and its lanes call: the stores (usage and export, the directory for
/// customers), this node's id for claims, the clock and the counters.
#[derive(Clone)]
pub(super) struct Deps {
    pub(super) stores: Arc<StoreCalls>,
    pub(super) ids: Arc<NodeIds>,
    pub(super) clock: Clock,
    pub(super) metrics: Arc<Metrics>,
    pub(super) totals: Arc<Totals>,
}

/// What a lane of a pass shares.
struct Pass {
    deps: Deps,
    sink: Arc<dyn BillingSink>,
    rt: Arc<Runtime>,
    pacer: Arc<Pacer>,
    /// The store's identifier namespace, read when the pass began: exports begun in it send
    /// under identifiers of this namespace (kept with them in the store).
    namespace: String,
    /// What the sink's billing system takes, with `export.unconfirmed_after` held within it.
    limits: SinkLimits,
    /// Set when the sink refuses everything: the lanes stop.
    halted: AtomicBool,
}

impl Exporter {
    pub(crate) fn new(
        sink: Option<Arc<dyn BillingSink>>,
        stores: Arc<StoreCalls>,
        ids: Arc<NodeIds>,
        clock: Clock,
        metrics: Arc<Metrics>,
        totals: Arc<Totals>,
    ) -> Self {
        Self {
            sink,
            pacer: Arc::new(Pacer::new()),
            pass: Mutex::new(()),
            meter_errors: std::sync::Mutex::default(),
            deps: Deps { stores, ids, clock, metrics, totals },
        }
    }

    /// Whether there is a sink to export to.
    pub(crate) fn has_sink(&self) -> bool {
        self.sink.is_some()
    }

    /// Whether the sink reads back what the billing system holds (reconciliation compares).
    pub(crate) fn reads_back(&self) -> bool {
        self.sink.as_ref().is_some_and(|s| s.reads_back())
    }

    /// What the sink's billing system takes (without a sink, that of the sink the
    /// configuration names), with `export.unconfirmed_after` held within its de-duplication.
    fn limits(&self, rt: &Runtime) -> SinkLimits {
        let mut limits = match &self.sink {
            Some(sink) => sink.limits(),
            None => rt.config.export.sink.map(SinkKind::limits).unwrap_or_default(),
        };
        limits.max_unconfirmed = limits.max_unconfirmed.min(rt.config.export.unconfirmed_after);
        limits
    }

    /// Which of a tenant's customers the sink bills (without a sink, the configured one's).
    fn customer_field(&self, rt: &Runtime) -> CustomerField {
        match &self.sink {
            Some(sink) => sink.customer_field(),
            None => rt.config.export.sink.map(SinkKind::customer_field).unwrap_or_default(),
        }
    }

    /// What the next [`export`](Self::export) would send, without sending or claiming
    /// anything: an export already in flight with its fixed parameters, the others as they
    /// would be fixed now. Windows of tenants that are not billable are left out.
    ///
    /// # Errors
    /// A store error.
    pub(crate) async fn preview(&self, rt: &Runtime) -> Result<Vec<MeterEvent>, StoreError> {
        // Without a sink (a dry run), Stripe's rule if the configuration has `[stripe]`.
        let needs_customer = self.sink.as_ref().map_or_else(|| rt.config.sink_needs_customer(), |s| s.needs_customer());
        let now = self.deps.clock.unix_secs();
        let namespace = self.deps.stores.background().usage.identifier_namespace().await?;
        let limits = self.limits(rt);
        let mut out = Vec::new();
        let mut customers = Customers::new(self.customer_field(rt));
        let mut after: Option<ExportKey> = None;
        loop {
            let page = self
                .deps
                .stores
                .background()
                .usage
                .pending_exports(listing_bound(rt, now), after.as_ref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for agg in page {
                if !closed(rt, &agg.key, now, false) || agg.claimed_until.is_some_and(|t| t > now) {
                    continue;
                }
                let send = match agg.send.clone() {
                    Some(send) => send,
                    None => match customers.of(&self.deps, rt, &agg.key.tenant).await? {
                        // A billed plan's tenant without a customer waits for one.
                        Customer::Known(None, true) if needs_customer => continue,
                        Customer::Known(customer, _) => plan_send(rt, &limits, &agg, now, customer, &namespace),
                        // Unknown to the directory, or unreadable: not sent now.
                        Customer::Unknown | Customer::Unreadable => continue,
                    },
                };
                // What the pass would park, or skip as not billable, is not sent.
                let attempted = agg.first_attempt_at.is_some();
                if park_reason(rt, &limits, &agg, &send, now, attempted).is_some()
                    || (needs_customer && send.customer.is_none())
                {
                    continue;
                }
                out.push(meter_event(rt, &agg, &send));
            }
        }
        Ok(out)
    }

    /// [`export`](Self::export); with `all`, windows still open count as closed (the final
    /// export of a store that does not outlive the process), with timestamps no later than
    /// now.
    pub(crate) async fn export_pass(
        &self,
        runtime: &arc_swap::ArcSwap<Runtime>,
        all: bool,
    ) -> Result<ExportReport, StoreError> {
        let Some(sink) = self.sink.clone() else {
            return Ok(ExportReport::default());
        };
        let _pass = self.pass.lock().await;
        // The configuration in force once the pass is ours.
        let rt = runtime.load_full();
        let settings = rt.config.export.clone();
        let now = self.deps.clock.unix_secs();
        let namespace = self.deps.stores.background().usage.identifier_namespace().await?;
        let limits = self.limits(&rt);
        let field = sink.customer_field();
        let pass = Arc::new(Pass {
            deps: self.deps.clone(),
            sink,
            rt: rt.clone(),
            pacer: self.pacer.clone(),
            namespace,
            limits,
            halted: AtomicBool::new(false),
        });
        let max_age = limits.max_age.as_secs() as i64;
        let days = limits.max_age.as_secs().div_ceil(86_400);
        let bound = if all { i64::MAX } else { listing_bound(&rt, now) };
        let mut report = ExportReport::default();
        let mut customers = Customers::new(field);
        // A cursor: aggregates that cannot progress (held by another node, waiting for their
        // next attempt) are passed over, never starving the rest.
        let mut after: Option<ExportKey> = None;
        loop {
            // A sink taking batches gets a page that fills one batch per lane of concurrency.
            let page_size = if pass.limits.max_batch > 1 {
                (pass.limits.max_batch * settings.concurrency).min(MAX_PAGE)
            } else {
                PAGE
            };
            let page = self.deps.stores.background().usage.pending_exports(bound, after.as_ref(), page_size).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            // One lane per (customer, meter), so this node has one call in flight per
            // customer's meter; at most `export.concurrency` lanes at once; a lane that must
            // wait stops for this pass without holding the others.
            // (A meter's series share its event name, and Stripe's lock: one lane, its meter's.)
            let mut lanes: BTreeMap<(String, MeterId), Lane> = BTreeMap::new();
            for agg in page {
                // The final export of a store that does not outlive the process is not held
                // back by this node's claims or next-attempt times (nothing would export
                // later); another node's claim still refuses it at `begin_export`.
                if !closed(&rt, &agg.key, now, all) || (!all && agg.claimed_until.is_some_and(|t| t > now)) {
                    continue;
                }
                // An export in flight keeps the customer fixed when it began. A meter kept out
                // of the export needs none: it is parked at its begin, whatever its tenant.
                let customer = match agg.send.as_ref() {
                    Some(send) => send.customer.clone(),
                    None if !rt.config.exports_meter(&agg.key.meter) => None,
                    None => match customers.of(&self.deps, &rt, &agg.key.tenant).await? {
                        Customer::Known(None, true) if pass.sink.needs_customer() => {
                            // A billed plan's tenant without a customer: never begun (that would
                            // fix "no customer" for the revision), kept pending until it has
                            // one; parked once too old to send, so it is listed, not pruned.
                            if agg.key.window_start < now - max_age {
                                let reason = format!(
                                    "no customer: its tenant's plan is billed but the tenant had no billing \
                                     customer within the {days} days the billing system takes: bill it by hand \
                                     (an invoice item), then confirm it"
                                );
                                // Begun (what it would send fixed, no customer) so that it can be
                                // confirmed once billed by hand.
                                let planned = plan_send(&rt, &pass.limits, &agg, now, None, &pass.namespace);
                                let until = now + settings.claim.as_secs() as i64;
                                let claim = ExportClaim::new(self.deps.ids.node(), now, until);
                                let usage = &self.deps.stores.background().usage;
                                if let Some(begun) = usage.begin_export(&agg, &claim, &planned).await? {
                                    pass.park(&begun, &reason, &mut report).await?;
                                }
                            } else {
                                report.awaiting_customer += 1;
                                self.deps.totals.waiting_windows.add(1);
                            }
                            continue;
                        }
                        Customer::Known(customer, _) => customer,
                        // Kept pending (a directory in another store may lag, a record may be
                        // mended): never marked exported without a call; parked once too old
                        // to send, so that it is listed rather than pruned unseen.
                        waiting @ (Customer::Unknown | Customer::Unreadable) => {
                            if let Customer::Unknown = waiting {
                                tracing::warn!(tenant = %agg.key.tenant, meter = %agg.key.meter,
                                    window = agg.key.window_start,
                                    "window not exported: the tenant is in neither the directory nor the file");
                            }
                            if agg.key.window_start < now - max_age {
                                let why = match waiting {
                                    Customer::Unknown => "in neither the directory nor the file",
                                    _ => "its directory record could not be read",
                                };
                                let reason = format!(
                                    "too old: its tenant's billing customer was never found ({why}) within the \
                                     {days} days the billing system takes; mend the directory, then requeue"
                                );
                                pass.park(&agg, &reason, &mut report).await?;
                                continue;
                            }
                            report.waiting += 1;
                            self.deps.totals.waiting_windows.add(1);
                            continue;
                        }
                    },
                };
                let lane = customer.clone().unwrap_or_else(|| format!("tenant:{}", agg.key.tenant));
                // (Its meter read from its id: a series no longer declared too.)
                let meter = match agg.key.meter.as_str().split_once('{') {
                    Some((family, _)) => MeterId::new(family),
                    None => agg.key.meter.clone(),
                };
                lanes.entry((lane, meter)).or_default().push((agg, customer));
            }
            let mut tasks = JoinSet::new();
            let mut first_error = None;
            // A sink taking several events a call gets them in batches (a lane's windows stay
            // together, in order); one taking one event a call, lane by lane.
            let batch = pass.limits.max_batch;
            let mut units: Vec<(bool, Lane)> = Vec::new();
            if batch > 1 {
                let all: Lane = lanes.into_values().flatten().collect();
                let mut all = all.into_iter().peekable();
                while all.peek().is_some() {
                    units.push((true, all.by_ref().take(batch).collect()));
                }
            } else {
                units.extend(lanes.into_values().map(|lane| (false, lane)));
            }
            for (batched, unit) in units {
                if tasks.len() >= settings.concurrency {
                    if let Some(done) = tasks.join_next().await {
                        collect(done, &mut report, &mut first_error);
                    }
                }
                let pass = pass.clone();
                let lane = async move {
                    if batched {
                        pass.batch(unit).await
                    } else {
                        pass.lane(unit).await
                    }
                };
                // Feature `otel`: each lane's calls stay children of the pass's span.
                #[cfg(feature = "otel")]
                let lane = opentelemetry::context::FutureExt::with_current_context(lane);
                tasks.spawn(lane);
            }
            while let Some(done) = tasks.join_next().await {
                collect(done, &mut report, &mut first_error);
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if pass.halted.load(Ordering::Relaxed) {
                report.halted = true;
                break;
            }
        }
        Ok(report)
    }
}

fn collect(
    done: Result<Result<ExportReport, StoreError>, tokio::task::JoinError>,
    report: &mut ExportReport,
    first_error: &mut Option<StoreError>,
) {
    match done {
        Ok(Ok(r)) => report.merge(r),
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) => {
            first_error.get_or_insert(StoreError::Backend(Box::new(e)));
        }
    }
}

impl Pass {
    /// The aggregates of one (customer, meter), in window order, one call at a time.
    async fn lane(&self, lane: Lane) -> Result<ExportReport, StoreError> {
        let mut report = ExportReport::default();
        for (agg, customer) in lane {
            if self.halted.load(Ordering::Relaxed) {
                break;
            }
            let Some(ready) = self.begin(agg, customer, &mut report).await? else { continue };
            let result = self.call(std::slice::from_ref(&ready)).await;
            let Some(result) = result else {
                self.let_go(&ready.agg, ready.first_attempt).await?;
                break;
            };
            if !self.settle(ready, &result, &mut report).await? {
                break;
            }
        }
        Ok(report)
    }

    /// Up to [`SinkLimits::max_batch`] aggregates in one call. A refusal for good of several
    /// is bisected: the halves are sent again under the same identifiers until the refused
    /// aggregate is found and parked alone.
    async fn batch(&self, batch: Lane) -> Result<ExportReport, StoreError> {
        let mut report = ExportReport::default();
        let mut ready = Vec::with_capacity(batch.len());
        for (agg, customer) in batch {
            if self.halted.load(Ordering::Relaxed) {
                break;
            }
            match self.begin(agg, customer, &mut report).await {
                Ok(Some(r)) => ready.push(r),
                Ok(None) => {}
                Err(e) => {
                    // The store failed: the exports begun are let go untried (best effort;
                    // otherwise their claims expire), not held until then.
                    for r in &ready {
                        let _ = self.let_go(&r.agg, r.first_attempt).await;
                    }
                    return Err(e);
                }
            }
        }
        // Groups still to send, the next last.
        let mut groups = vec![ready];
        while let Some(mut group) = groups.pop() {
            if group.is_empty() {
                continue;
            }
            let Some(result) = self.call(&group).await else {
                for r in group.into_iter().chain(groups.drain(..).flatten()) {
                    self.let_go(&r.agg, r.first_attempt).await?;
                }
                break;
            };
            if group.len() > 1 && matches!(result, Err(SinkError::Permanent(_))) {
                if let Err(SinkError::Permanent(reason)) = &result {
                    tracing::info!(%reason, events = group.len(),
                        "the billing system refused a batch: its halves are sent again to find the refused event");
                }
                let second = group.split_off(group.len() / 2);
                groups.push(second);
                groups.push(group);
                continue;
            }
            for r in group {
                self.settle(r, &result, &mut report).await?;
            }
        }
        Ok(report)
    }

    /// Begins the export of one aggregate, billed to `customer` unless an export of it is in
    /// flight (that one keeps what was fixed when it began): the event to send, or `None` when
    /// there is nothing to send (another node holds it, it is not billable, or it was parked).
    async fn begin(
        &self,
        agg: UsageAggregate,
        customer: Option<String>,
        report: &mut ExportReport,
    ) -> Result<Option<Ready>, StoreError> {
        let shared = &self.deps;
        let store = &shared.stores.background().usage;
        let settings = &self.rt.config.export;
        // The clock is read for each aggregate: a claim and a next-attempt time count from the
        // call, however long the pass has run.
        let now = shared.clock.unix_secs();
        let planned = plan_send(&self.rt, &self.limits, &agg, now, customer, &self.namespace);
        let claim = ExportClaim::new(shared.ids.node(), now, now + settings.claim.as_secs() as i64);
        let Some(agg) = store.begin_export(&agg, &claim, &planned).await? else {
            return Ok(None);
        };
        let send = agg.send.clone().unwrap_or(planned);
        // Whether this attempt is the one that began the export's count of attempts that may
        // have reached the billing system (no earlier one may have).
        let first_attempt = agg.first_attempt_at == Some(claim.now);
        // A meter kept out of the export, never attempted: parked as such before anything
        // else (not skipped as unbillable, nor parked for its customer).
        if first_attempt && !self.rt.config.exports_meter(&agg.key.meter) {
            if let Some(reason) = park_reason(&self.rt, &self.limits, &agg, &send, now, false) {
                self.park(&agg, &reason, report).await?;
                return Ok(None);
            }
        }
        if send.customer.is_none() && self.sink.needs_customer() {
            // Not billable: marked done without a call, counted.
            if store.finish_export(&agg, now).await? {
                report.unbillable += 1;
                shared.totals.unbillable_windows.add(1);
                tracing::debug!(tenant = %agg.key.tenant, meter = %agg.key.meter, window = agg.key.window_start,
                    "window skipped: the tenant has no billing customer");
            }
            return Ok(None);
        }
        if let Some(reason) = park_reason(&self.rt, &self.limits, &agg, &send, now, !first_attempt) {
            if reason.starts_with("unconfirmed") {
                shared.totals.unconfirmed_exports.add(1);
            }
            self.park(&agg, &reason, report).await?;
            return Ok(None);
        }
        let event = meter_event(&self.rt, &agg, &send);
        Ok(Some(Ready { agg, event, first_attempt }))
    }

    /// One call to the sink with these events, paced; `None` if the sink was found refusing
    /// everything meanwhile (the call is not made).
    async fn call(&self, ready: &[Ready]) -> Option<Result<(), SinkError>> {
        // Only calls are paced (a window skipped or parked takes no slot); the wait is short
        // (at most `concurrency / calls_per_second`) next to the claim.
        self.pacer.wait(self.rt.config.export.calls_per_second).await;
        if self.halted.load(Ordering::Relaxed) {
            // Another lane found the sink refusing everything: the claims go, untried.
            return None;
        }
        let send = async {
            match ready {
                [one] => self.sink.send(&one.event).await,
                many => {
                    let events: Vec<MeterEvent> = many.iter().map(|r| r.event.clone()).collect();
                    self.sink.send_batch(&events).await
                }
            }
        };
        // Feature `otel`: under the pass's span, the call is its child (the sink named).
        #[cfg(feature = "otel")]
        {
            use opentelemetry::{context::FutureExt as _, KeyValue};
            let sink = self.rt.config.export.sink.map_or("custom", crate::base::SinkKind::as_str);
            let span = crate::base::trace::CallSpan::start(format!("{sink} send"), || {
                vec![
                    KeyValue::new("tollgate.sink", sink),
                    KeyValue::new("tollgate.events", i64::try_from(ready.len()).unwrap_or(i64::MAX)),
                ]
            });
            if let Some(cx) = span.context().cloned() {
                let result = send.with_context(cx).await;
                span.end(if result.is_ok() { "ok" } else { "error" });
                return Some(result);
            }
        }
        Some(send.await)
    }

    /// Settles one aggregate by the answer to the call that carried it. Returns whether its
    /// lane may go on.
    async fn settle(
        &self,
        ready: Ready,
        result: &Result<(), SinkError>,
        report: &mut ExportReport,
    ) -> Result<bool, StoreError> {
        let Ready { agg, event, first_attempt } = ready;
        let shared = &self.deps;
        let store = &shared.stores.background().usage;
        let settings = &self.rt.config.export;
        let now = shared.clock.unix_secs();
        // Only this store sends identifiers of its namespace: when an earlier attempt of this
        // very send (its parameters fixed then) may have reached the billing system, "already
        // held" is that attempt's, delivered (a re-send after Stripe forgot its idempotency key).
        let delivered = match result {
            Ok(()) => true,
            Err(SinkError::AlreadyHeld(message))
                if !first_attempt
                    && !self.namespace.is_empty()
                    && event.identifier
                        == identifier_in(
                            &self.namespace,
                            &agg.key.tenant,
                            &agg.key.meter,
                            agg.key.window_start,
                            agg.revision,
                        ) =>
            {
                tracing::info!(%message, identifier = %event.identifier,
                    "the billing system already holds the meter event: marked exported");
                true
            }
            Err(_) => false,
        };
        if delivered {
            if store.finish_export(&agg, now).await? {
                if is_late(&self.rt, &self.limits, event.window_end, now) {
                    shared.totals.late_revisions.add(1);
                    tracing::info!(tenant = %agg.key.tenant, meter = %agg.key.meter, window = agg.key.window_start,
                        revision = agg.revision, timestamp = event.timestamp,
                        "revision exported after the invoice grace: stamped at export time if it began late \
                         (a sum meter), else in its window (invoiced only if the window's period is still open)");
                }
                report.events += 1;
                report.units += event.value;
                shared.totals.exported_events.add(1);
                Totals::add(&shared.totals.exported_units, event.value);
            }
            return Ok(true);
        }
        let Err(e) = result else { unreachable!("delivered above") };
        match e {
            SinkError::Permanent(reason) => {
                self.park(&agg, &format!("refused: {reason}"), report).await?;
                Ok(true)
            }
            SinkError::AlreadyHeld(message) => {
                // A first attempt (a restored backup or a copy of the store, whose value may
                // differ from what was sent), or an identifier of the empty namespace (another
                // deployment may share it): what the billing system holds proves nothing of it.
                let reason = format!(
                    "unsettled: the billing system already holds an event under its identifier ({message}), \
                     sent by an earlier copy of this store or another deployment: reconcile before \
                     confirming or requeueing"
                );
                self.park(&agg, &reason, report).await?;
                Ok(true)
            }
            SinkError::Unsettled(reason) => {
                let reason = format!(
                    "unsettled: {reason}; the billing system may hold it under its identifier: reconcile \
                     before requeueing"
                );
                self.park(&agg, &reason, report).await?;
                Ok(true)
            }
            SinkError::Unknown(e) if agg.unknown_failures + 1 >= settings.max_unknown_failures => {
                let reason = format!(
                    "failed {} times without a status (last: {e}); it may or may not have been taken: \
                     reconcile before requeueing",
                    agg.unknown_failures + 1
                );
                self.park(&agg, &reason, report).await?;
                Ok(false)
            }
            SinkError::Halt(reason) => {
                // Nothing can go through (the credentials were refused): the pass stops,
                // nothing is parked, and this one is free for the next pass (one call a pass
                // until the key is fixed).
                if !self.halted.swap(true, Ordering::Relaxed) {
                    tracing::error!(%reason, "billing sink refuses every call; export pass stopped");
                }
                self.let_go(&agg, first_attempt).await?;
                report.deferred = true;
                Ok(false)
            }
            e => {
                let (asked, deferral) = match e {
                    SinkError::Retryable { retry_after, .. } => (*retry_after, Deferral::Failed),
                    SinkError::NotTaken { retry_after, .. } => (*retry_after, never_sent(first_attempt, agg.attempts)),
                    _ => (None, Deferral::Unknown),
                };
                let wait = backoff(&event.identifier, agg.attempts, asked);
                let next = now + wait.as_secs() as i64;
                tracing::warn!(error = %e, identifier = %event.identifier, attempts = agg.attempts, retry_in = ?wait,
                    "billing sink failed; retried later with the same identifier");
                store.defer_export(&agg, &ExportClaim::new(shared.ids.node(), now, next), deferral).await?;
                report.retries += 1;
                report.deferred = true;
                shared.totals.export_retries.add(1);
                Ok(false)
            }
        }
    }

    /// Lets the claim on `agg` go at once, untried (the pass stops): free for the next pass, as
    /// never sent if this attempt was the first that may have reached the billing system.
    async fn let_go(&self, agg: &UsageAggregate, first_attempt: bool) -> Result<(), StoreError> {
        let now = self.deps.clock.unix_secs();
        let claim = ExportClaim::new(self.deps.ids.node(), now, now);
        self.deps.stores.background().usage.defer_export(agg, &claim, never_sent(first_attempt, agg.attempts)).await?;
        Ok(())
    }

    async fn park(&self, agg: &UsageAggregate, reason: &str, report: &mut ExportReport) -> Result<(), StoreError> {
        let shared = &self.deps;
        tracing::error!(%reason, tenant = %agg.key.tenant, meter = %agg.key.meter, window = agg.key.window_start,
            revision = agg.revision, units = agg.quantity.saturating_sub(agg.exported),
            "meter event dead-lettered (tollgate export --dead-letters lists it)");
        shared.stores.background().usage.dead_letter(agg, reason).await?;
        report.dead_letters += 1;
        shared.totals.dead_letters.add(1);
        Ok(())
    }
}

/// How an attempt the billing system did not take is deferred: as never sent if it was the
/// first attempt that may have reached it (none before may have), so `unconfirmed_after`
/// counts from the first call that may be taken.
fn never_sent(first_attempt: bool, attempts: u32) -> Deferral {
    if first_attempt {
        Deferral::NeverSent(attempts)
    } else {
        Deferral::Failed
    }
}

/// The length of `meter`'s windows as exported: the billing meter's for a pre-aggregated one.
pub(crate) fn meter_window(rt: &Runtime, meter: &MeterId) -> i64 {
    aggregation(rt, meter).window_secs().unwrap_or(rt.config.usage.window.as_secs() as i64)
}

fn aggregation(rt: &Runtime, meter: &MeterId) -> MeterAggregation {
    rt.config.meters.iter().find(|m| &m.id == meter).map_or(MeterAggregation::Sum, |m| m.aggregation)
}

/// Windows starting before this may be closed (the shortest windows are `usage.window`).
fn listing_bound(rt: &Runtime, now: i64) -> i64 {
    let grace = rt.config.usage.grace.as_secs() as i64;
    now - grace - rt.config.usage.window.as_secs() as i64 + 1
}

fn closed(rt: &Runtime, key: &ExportKey, now: i64, all: bool) -> bool {
    all || key.window_start + meter_window(rt, &key.meter) + rt.config.usage.grace.as_secs() as i64 <= now
}

/// What the export of the aggregate's current revision sends if it begins now: up to what is
/// in flight if an export that may have reached the billing system is (its parameters were
/// lost: a row of an older schema), else up to the quantity read.
fn plan_send(
    rt: &Runtime,
    limits: &SinkLimits,
    agg: &UsageAggregate,
    now: i64,
    customer: Option<String>,
    namespace: &str,
) -> ExportSend {
    let key = &agg.key;
    let window = meter_window(rt, &key.meter);
    // An export in flight that may have reached the billing system keeps what it sends up to;
    // one nothing of which may have (no first attempt recorded) is planned anew, up to all.
    let upto = match (agg.in_flight, agg.first_attempt_at) {
        (Some(f), Some(_)) => f,
        _ => agg.quantity,
    };
    let (value, timestamp) = match aggregation(rt, &key.meter) {
        MeterAggregation::Sum => {
            let last_second = key.window_start + window - 1;
            // Past the invoice grace the window's period may be invoiced already: stamped now,
            // so the delta reaches an open invoice rather than one Stripe finalized.
            let stamp = if is_late(rt, limits, key.window_start + window, now) { now } else { last_second.min(now) };
            (upto.saturating_sub(agg.exported), stamp)
        }
        // The billing meter keeps the newest event of its window: each revision sends the
        // running total, one second later than the last, inside the window.
        _ => (upto, key.window_start + i64::from(agg.revision)),
    };
    // A series no longer declared is its meter's, if that is (its values are in its id).
    let family = key.meter.as_str().split_once('{').map(|(f, _)| f);
    let event_name = rt
        .config
        .meters
        .iter()
        .find(|m| m.id == key.meter)
        .or_else(|| rt.config.meters.iter().find(|m| Some(m.id.as_str()) == family))
        .map_or_else(|| family.unwrap_or(key.meter.as_str()).to_owned(), |m| m.event_name.clone());
    let identifier = identifier_in(namespace, &key.tenant, &key.meter, key.window_start, agg.revision);
    ExportSend::new(value, timestamp, customer, event_name).with_identifier(identifier)
}

/// Whether a window ending at `window_end` is exported later than Stripe's invoice grace
/// (`stripe.invoice_grace`) after it: its period's invoice may be final. Never without
/// `[stripe]`, nor for a sink that keeps events in their window (Metronome).
fn is_late(rt: &Runtime, limits: &SinkLimits, window_end: i64, now: i64) -> bool {
    limits.restamp_late && rt.config.stripe().is_some_and(|s| now > window_end + s.invoice_grace.as_secs() as i64)
}

/// Why an export must be parked rather than sent, if it must. `attempted`: an earlier attempt
/// of this revision began, which may have reached the billing system.
fn park_reason(
    rt: &Runtime,
    limits: &SinkLimits,
    agg: &UsageAggregate,
    send: &ExportSend,
    now: i64,
    attempted: bool,
) -> Option<String> {
    // A meter kept out of the export (`export = false`), never attempted: parked, listed, never
    // sent. One attempted before the setting changed may be held: it goes on as begun.
    if !attempted && !rt.config.exports_meter(&agg.key.meter) {
        return Some(format!(
            "never exported: [meters.{}] export = false keeps this meter out of every export \
             (confirm it, or requeue it once the meter is exported)",
            agg.key.meter
        ));
    }
    // Sent before but never confirmed, and the billing system may have forgotten its
    // identifier: never sent again (it could be billed twice).
    if let Some(first) = agg.first_attempt_at {
        if agg.in_flight.is_some() && first + limits.max_unconfirmed.as_secs() as i64 <= now {
            return Some(format!(
                "unconfirmed: {} attempts since {first} (Unix seconds) were never confirmed; \
                 reconcile with the billing system, then confirm or requeue",
                // Less the claim taken to park it.
                agg.attempts.saturating_sub(1)
            ));
        }
    }
    if aggregation(rt, &agg.key.meter) != MeterAggregation::Sum
        && i64::from(agg.revision) >= meter_window(rt, &agg.key.meter)
    {
        return Some(format!("too many revisions ({}) for one window of the billing meter", agg.revision));
    }
    // By the window, not the stamp: usage of a window the billing system no longer takes is
    // not moved into the current invoice by a late stamp.
    let last_second = agg.key.window_start + meter_window(rt, &agg.key.meter) - 1;
    if send.timestamp.min(last_second) < now - limits.max_age.as_secs() as i64 {
        // An earlier attempt of this revision may have been taken (no answer, a 5xx): the
        // billing system may hold it, so it is never billed by hand unchecked.
        if let Some(first) = agg.first_attempt_at.filter(|_| attempted && agg.in_flight.is_some()) {
            return Some(format!(
                "unconfirmed: {} attempts since {first} (Unix seconds) were never confirmed, and the window is \
                 now too old to send again; the billing system may hold it: reconcile with it, then confirm or \
                 requeue",
                agg.attempts.saturating_sub(1)
            ));
        }
        return Some(format!(
            "too old: its window ended more than {} days ago (timestamp {}), which the billing system refuses; \
             bill it by hand",
            limits.max_age.as_secs().div_ceil(86_400),
            send.timestamp.min(last_second)
        ));
    }
    None
}

fn meter_event(rt: &Runtime, agg: &UsageAggregate, send: &ExportSend) -> MeterEvent {
    let key = &agg.key;
    MeterEvent {
        // Fixed when the export began; an export begun before namespaces had none.
        identifier: send
            .identifier
            .clone()
            .unwrap_or_else(|| identifier_in("", &key.tenant, &key.meter, key.window_start, agg.revision)),
        event_name: send.event_name.clone(),
        tenant: key.tenant.clone(),
        customer: send.customer.clone(),
        meter: key.meter.clone(),
        window_start: key.window_start,
        window_end: key.window_start + meter_window(rt, &key.meter),
        value: send.value,
        revision: agg.revision,
        timestamp: send.timestamp,
        aggregation: aggregation(rt, &key.meter),
        // A series' values are in its id, whatever the configuration now declares: a
        // retry sends what the first attempt sent.
        dimensions: crate::config::series_values(&key.meter),
    }
}

/// The wait before attempt `attempts + 1`: exponential from 2 s, capped at an hour, with
/// "equal jitter" (half fixed, half spread by a hash of the identifier and attempt, so
/// aggregates that failed together do not retry together), and never less than asked.
fn backoff(identifier: &str, attempts: u32, asked: Option<Duration>) -> Duration {
    let full = (1u64 << attempts.clamp(1, 12)).min(MAX_BACKOFF_SECS);
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x7467, 0x6261);
    h.write(identifier.as_bytes());
    h.write_u32(attempts);
    let spread = h.finish() % (full / 2 + 1);
    let wait = Duration::from_secs(full / 2 + spread);
    asked.map_or(wait, |a| wait.max(Duration::from_secs(a.as_secs_f64().ceil() as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_spreads_and_honours_retry_after() {
        let waits: Vec<u64> = (1..=14).map(|a| backoff("tg_x", a, None).as_secs()).collect();
        for (i, w) in waits.iter().enumerate() {
            let full = (1u64 << (i as u32 + 1).min(12)).min(MAX_BACKOFF_SECS);
            assert!((full / 2..=full).contains(w), "attempt {}: {w} not in {}..={full}", i + 1, full / 2);
        }
        let spread: std::collections::HashSet<u64> =
            (0..50).map(|i| backoff(&format!("tg_{i}"), 10, None).as_secs()).collect();
        assert!(spread.len() > 10, "jitter spreads retries: {spread:?}");
        assert_eq!(backoff("tg_x", 1, Some(Duration::from_millis(7500))), Duration::from_secs(8));
    }

    #[test]
    fn meter_error_windows_queue_bounded_and_merge_rather_than_drop() {
        let mut q = MeterErrorQueue::default();
        q.push(100, 200);
        q.push(150, 250);
        assert_eq!(q.queued, [(100, 250)], "overlapping: one pass");
        for i in 0..40 {
            q.push(1_000 + i * 1_000, 1_010 + i * 1_000);
        }
        assert_eq!(q.queued.len(), MeterErrorQueue::MAX);
        let covered = |t: i64| q.queued.iter().any(|(f, to)| *f <= t && t <= *to);
        assert!((0..40).all(|i| covered(1_000 + i * 1_000)) && covered(100), "{:?}", q.queued);
    }
}
