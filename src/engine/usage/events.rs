//! Usage from outside a request: events of jobs and queues, each with its own time and id,
//! stored at most once per id in the window of its own time, and checked against the hard
//! quotas of its own period. Record them with [`Tollgate::record_event`],
//! [`Tollgate::record_events`] or, for queue messages of the documented JSON shape,
//! [`Tollgate::record_messages`]; the [events guide](crate::guide::events) explains them.
//!
//! [`Tollgate::record_event`]: crate::Tollgate::record_event
//! [`Tollgate::record_events`]: crate::Tollgate::record_events
//! [`Tollgate::record_messages`]: crate::Tollgate::record_messages

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::engine::store_calls::StoreCalls;
use crate::engine::usage::{
    held::OpenHolds,
    lease::Leases,
    spend::{charge_units, cost_of},
    taken::{Prefetcher, Source, Taken},
};
use crate::{
    config::{MeterId, TenantId},
    metrics::{Metrics, ProcessedAs, Totals},
    store::{EventOutcome, StoreError, UsageEvent},
    tenant::Tenant,
};

/// How old an event's billing window may be: Stripe takes meter events up to 35 days old,
/// and the export keeps an hour of margin; an hour more is
/// left for the export to send the event's window before that.
pub const MAX_AGE: Duration = Duration::from_secs(35 * 86_400 - 2 * 3600);

/// The most event ids a node remembers as stored (their redeliveries answered at once).
const STORED_IDS_MAX: u64 = 10_000;

/// The largest quantity of one event (2⁴⁶ − 1: what a quota lease can hold).
pub(crate) const MAX_QUANTITY: u64 = (1 << 46) - 1;

/// The longest event id, in bytes.
pub(crate) const EVENT_ID_MAX_LEN: usize = 256;

/// A usage event from outside a request: a job or a queue message saying that `tenant` used
/// `quantity` units of `meter` at `at`. Recorded with [`Tollgate::record_event`](crate::Tollgate::record_event).
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use tollgate::{config::TenantId, events::Event};
/// let at = UNIX_EPOCH + Duration::from_millis(1_590_074_184_000);
/// let event = Event::new("evt_1", TenantId::parse("sub|1234").unwrap(), "requests".into(), 5, at);
/// assert_eq!(event.quantity, 5);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The event's id: its own id when it has one, else the queue message's id (an SQS
    /// `messageId`, an EventBridge `id`). Never a hash of its contents: two identical events
    /// are two events. 1 to 256 bytes.
    pub id: String,
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// How many units.
    pub quantity: u64,
    /// When the usage happened: it picks the usage window (and the quota period).
    pub at: SystemTime,
}

impl Event {
    /// An event.
    pub fn new(id: impl Into<String>, tenant: TenantId, meter: MeterId, quantity: u64, at: SystemTime) -> Self {
        Self { id: id.into(), tenant, meter, quantity, at }
    }
}

/// Why an event was not recorded. Only [`is_retryable`](Self::is_retryable) errors change
/// with a retry: the others are final, and a queue message carrying one should be
/// acknowledged (reported, not redelivered).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The id is empty or longer than 256 bytes.
    #[error("the event id is empty or longer than 256 bytes")]
    InvalidId,
    /// No tenant has this id.
    #[error("no tenant `{0}`")]
    UnknownTenant(TenantId),
    /// The configuration has no such meter.
    #[error("no meter `{0}` in the configuration")]
    UnknownMeter(MeterId),
    /// The event is older than billing accepts ([`MAX_AGE`]).
    #[error("the event is {age_secs} s old: billing takes usage up to 35 days old (less a two-hour margin)")]
    TooOld {
        /// How old it is, in seconds.
        age_secs: u64,
    },
    /// The event's time is in the future, beyond `events.max_skew` (a producer's clock ahead).
    /// Retryable: the work was done, so the message is not dropped; redelivered, it is applied
    /// once its time has come, or it reaches the queue's dead-letter queue.
    #[error("the event's time is {ahead_secs} s in the future (events.max_skew is {max_skew_secs} s)")]
    InFuture {
        /// How far ahead, in seconds.
        ahead_secs: u64,
        /// The configured tolerance, in seconds.
        max_skew_secs: u64,
    },
    /// The tenant's hard quota of the event's period does not have the units: only
    /// [`Tollgate::reserve_event`](crate::Tollgate::reserve_event) refuses so (work already
    /// done is recorded and billed past the limit).
    #[error("the {period} quota of {limit} {meter} on plan `{plan}` is spent")]
    QuotaExceeded {
        /// The meter.
        meter: MeterId,
        /// The quota's period (`day`, `month`).
        period: &'static str,
        /// Its limit.
        limit: u64,
        /// The tenant's plan.
        plan: crate::config::PlanId,
    },
    /// A queue message that is not a usage event of the documented shape ([`UsageMessage`]).
    #[error("malformed usage event: {0}")]
    Malformed(String),
    /// A queue message naming a product code `[events.products]` does not map. Retryable: the
    /// work was done, so the message is not dropped; it is redelivered (applied once the code
    /// is mapped and the configuration reloaded) or reaches the queue's dead-letter queue.
    #[error("no meter for the product code `{0}` in [events.products]")]
    UnknownProduct(String),
    /// The store did not answer (or failed). The write may have landed (a timeout): a retry
    /// applies the event, or answers `Duplicate` if it did.
    #[error("the store did not record the event: {0}")]
    Store(#[source] StoreError),
    /// The node has `limits.max_holds` holds open (requests' and jobs' reservations): only
    /// [`Tollgate::reserve_event`](crate::Tollgate::reserve_event) refuses so. Retryable, once
    /// some settle.
    #[error("this node has {max} holds open (limits.max_holds)")]
    HoldsFull {
        /// `limits.max_holds`.
        max: usize,
    },
    /// The engine is shutting down: only [`Tollgate::reserve_event`](crate::Tollgate::reserve_event)
    /// refuses so (its units would be leased after the leases went back). Retryable, on
    /// another node.
    #[error("the engine is shutting down: reserve on another node")]
    ShuttingDown,
    /// The event's time is in a quota period that has not begun on this node's clock (within
    /// `events.max_skew`): its quota cannot be checked yet. Retryable: delivered again once
    /// the period has begun, it is applied there.
    #[error("the event's quota period begins in {starts_in_secs} s: retry then")]
    PeriodNotStarted {
        /// Seconds until the period begins.
        starts_in_secs: u64,
    },
    /// The hard quota of the tenant's organization (`[orgs.NAME]`) for the event's period does
    /// not have the units: only [`Tollgate::reserve_event`](crate::Tollgate::reserve_event)
    /// refuses so (work already done is recorded, and counted there past the limit).
    #[error("the {period} quota of {limit} {meter} of organization `{org}`, which its tenants share, is spent")]
    OrgQuotaExceeded {
        /// The organization.
        org: crate::config::OrgId,
        /// The meter.
        meter: MeterId,
        /// The quota's period (`day`, `month`).
        period: &'static str,
        /// Its limit.
        limit: u64,
    },
}

impl EventError {
    /// Whether a retry may succeed (the store failed, a period or an event's time not come
    /// yet, a product code not mapped yet): a queue message carrying one is not acknowledged,
    /// so it is redelivered or reaches the dead-letter queue. The other errors are final.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Store(_)
                | Self::PeriodNotStarted { .. }
                | Self::InFuture { .. }
                | Self::UnknownProduct(_)
                | Self::HoldsFull { .. }
                | Self::ShuttingDown
        )
    }

    /// A short name for logs and metrics: `invalid`, `unknown_product`, `too_old`,
    /// `in_future`, `quota`, `store_error`, `not_yet`, `holds_full`, `shutting_down`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidId | Self::UnknownTenant(_) | Self::UnknownMeter(_) | Self::Malformed(_) => "invalid",
            Self::UnknownProduct(_) => "unknown_product",
            Self::TooOld { .. } => "too_old",
            Self::InFuture { .. } => "in_future",
            Self::QuotaExceeded { .. } | Self::OrgQuotaExceeded { .. } => "quota",
            Self::Store(_) => "store_error",
            Self::PeriodNotStarted { .. } => "not_yet",
            Self::HoldsFull { .. } => "holds_full",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// A queue message carrying a usage event: its body, and the id of the message (an SQS
/// `messageId`, an EventBridge `id`), used when the body has no `EventID` of its own.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct QueueMessage<'a> {
    /// The JSON body (an SQS message body, an EventBridge event's `detail`).
    pub body: &'a [u8],
    /// The message's id.
    pub id: Option<&'a str>,
}

impl<'a> QueueMessage<'a> {
    /// A message with this body and id.
    #[must_use]
    pub fn new(body: &'a [u8], id: Option<&'a str>) -> Self {
        Self { body, id }
    }
}

/// The JSON shape of a usage event in a queue message (SQS) or an EventBridge event's
/// `detail`:
///
/// ```json
/// { "TenantID": "sub|1234", "ProductCode": "example-billing-event", "Quantity": 5, "Timestamp": 1590074184000 }
/// ```
///
/// `Timestamp` is in milliseconds since the Unix epoch; `ProductCode` is mapped to a meter by
/// `[events.products]`; an optional `EventID` is the event's own id (else the message's id
/// is used). Other fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[non_exhaustive]
pub struct UsageMessage {
    /// The tenant.
    #[serde(rename = "TenantID")]
    pub tenant: String,
    /// The product code, mapped to a meter.
    #[serde(rename = "ProductCode")]
    pub product: String,
    /// How many units.
    #[serde(rename = "Quantity")]
    pub quantity: u64,
    /// When, in milliseconds since the Unix epoch.
    #[serde(rename = "Timestamp")]
    pub timestamp_ms: i64,
    /// The event's own id, if it has one.
    #[serde(rename = "EventID", default)]
    pub event_id: Option<String>,
}

impl UsageMessage {
    /// Reads a message into an event.
    pub(crate) fn read(m: &QueueMessage<'_>, settings: &crate::config::EventSettings) -> Result<Event, EventError> {
        let msg: UsageMessage = serde_json::from_slice(m.body)
            .map_err(|e| EventError::Malformed(format!("the body is not a usage event: {e}")))?;
        let tenant = TenantId::parse(&msg.tenant).map_err(|e| EventError::Malformed(format!("TenantID: {e}")))?;
        let meter = settings.meter_of(&msg.product).ok_or_else(|| EventError::UnknownProduct(msg.product.clone()))?;
        let id = match (msg.event_id, m.id) {
            (Some(id), _) => id,
            (None, Some(id)) => id.to_owned(),
            (None, None) => return Err(EventError::Malformed("no EventID and no message id".into())),
        };
        let at = if msg.timestamp_ms >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_millis(msg.timestamp_ms as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_millis(msg.timestamp_ms.unsigned_abs())
        };
        Ok(Event::new(id, tenant, meter.clone(), msg.quantity, at))
    }
}

/// An event checked and charged to its quota, waiting for its store write.
pub(crate) struct Prepared {
    /// Its place in the batch.
    pub(crate) index: usize,
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
    pub(crate) quantity: u64,
    /// Its units taken anew (those of a reservation of the work are its own for good): given
    /// back if the write does not apply them.
    pub(crate) units: EventUnits,
    /// Its spend charged already, by an earlier attempt whose write may have landed: not
    /// charged again when this one applies.
    pub(crate) charged: bool,
    /// When they were taken (the clock, not the event's time).
    pub(crate) taken_at: i64,
    pub(crate) event: UsageEvent,
    /// The state of its tenant's organization's counters, when the organization limits its
    /// meter, with the units to count there (those a reservation did not hold there): counted
    /// once it applies (or once its write may have landed), as its spend is charged.
    pub(crate) org: Option<(Tenant, u64)>,
}

/// The usage events of this engine: the store write of a batch, the quota units held for the
/// retry of an event whose write may have landed, and the counting of outcomes.
pub(crate) struct EventRecorder {
    /// Quota units of usage events whose write may have landed, held for their retry (keyed by
    /// tenant and event id; bounded, expiring).
    held: moka::sync::Cache<String, HeldUnits>,
    /// Quota units reserved for work not done yet ([`Tollgate::reserve_event`]), keyed as
    /// `held`; given back if the event is not recorded within its hold (bounded, expiring).
    reserved: moka::sync::Cache<String, Arc<Reserved>>,
    /// Events this node saw stored (applied or duplicate), keyed as `held`: their
    /// redeliveries answer `Duplicate` without taking units or writing (bounded, kept an
    /// hour: the store keeps an id 35 days past its event's time, and refuses events older
    /// than that less two hours, so an id known here is still in the store).
    stored: moka::sync::Cache<String, ()>,
    stores: Arc<StoreCalls>,
    metrics: Arc<Metrics>,
    totals: Arc<Totals>,
    /// The node's open holds: each reservation is one (a job's hold) while it holds units.
    holds: Arc<OpenHolds>,
    /// Applied events of priced meters charge the spend, which may ask for a refill.
    prefetcher: Prefetcher,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder").field("held", &self.held.entry_count()).finish_non_exhaustive()
    }
}

impl EventRecorder {
    pub(crate) fn new(
        stores: Arc<StoreCalls>,
        metrics: Arc<Metrics>,
        totals: Arc<Totals>,
        holds: Arc<OpenHolds>,
        prefetcher: Prefetcher,
    ) -> Self {
        // Only events whose write failed ambiguously are held: a few, while the store is in
        // trouble.
        // Least recently used first: past the bound, the oldest go (moka's default admission
        // would refuse every newcomer of a cache that is never read, keeping the oldest).
        let held = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .time_to_live(Duration::from_secs(3600))
            .build();
        // Expired, or evicted past the bound (the least recently reserved first), unrecorded:
        // the units stay spent. The event may have been recorded by another process (a queue's
        // consumer), which charged it there: giving them back could pass the limit. A job that
        // abandons its work releases them (`release_event`).
        // Each reservation is one of the node's open holds (a job's) until it goes, however it
        // goes: its units are counted held meanwhile.
        let jobs = holds.clone();
        let reserved = moka::sync::Cache::builder()
            .max_capacity(RESERVATIONS_MAX)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(HoldFor)
            .eviction_listener(move |_, r: Arc<Reserved>, cause| {
                jobs.job_left(&r.state.id, r.held(), matches!(cause, moka::notification::RemovalCause::Expired));
                if let Some(cell) = r.state.quota(r.meter) {
                    cell.count_jobs(r.held(), false, r.tag());
                }
                r.count_org_jobs(false);
            })
            .build();
        let stored = moka::sync::Cache::builder()
            .max_capacity(STORED_IDS_MAX)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .time_to_live(Duration::from_secs(3600))
            .build();
        Self { held, reserved, stored, stores, metrics, totals, holds, prefetcher }
    }

    /// Whether this node saw the event `id` (of its tenant) stored within the hour.
    pub(crate) fn known_stored(&self, id: &str) -> bool {
        self.stored.contains_key(id)
    }

    /// Opens a job's hold of `tenant`, if fewer than `max` holds are open on the node and
    /// fewer than `per_tenant` of the tenant's (counted refused when not). Opened, it is closed
    /// by its reservation's end, or by [`close_job`](Self::close_job) when no reservation comes
    /// of it.
    pub(crate) fn open_job(&self, tenant: &TenantId, max: usize, per_tenant: usize) -> bool {
        self.reserved.run_pending_tasks();
        if self.holds.open_job(tenant, max, per_tenant).is_ok() {
            return true;
        }
        self.holds.refused_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.hold(crate::metrics::HoldOutcome::RefusedFull).increment(1);
        false
    }

    /// Forgets every reservation without giving its units back (they stay spent): a process
    /// restored from a snapshot shares them with every other copy.
    pub(crate) fn forget_reserved(&self) {
        self.reserved.invalidate_all();
        self.reserved.run_pending_tasks();
        // Their expiry runs on the process's clock, which a restore from a snapshot skips.
        self.stored.invalidate_all();
    }

    /// A job's hold of `tenant` opened for the same work reserved again.
    pub(crate) fn reopen_job(&self, tenant: &TenantId) {
        self.holds.reopen_job(tenant);
    }

    /// A job's hold of `tenant` opened and not reserved (its units were refused).
    pub(crate) fn close_job(&self, tenant: &TenantId) {
        self.holds.job_left(tenant, 0, false);
    }

    /// Holds the units of a reservation under the event's `id` until it is recorded,
    /// released, or its hold ends: its job's hold was opened first.
    pub(crate) fn reserve(&self, id: String, reserved: Arc<Reserved>) {
        if let Some(cell) = reserved.state.quota(reserved.meter) {
            cell.count_jobs(reserved.held(), true, reserved.tag());
        }
        reserved.count_org_jobs(true);
        self.holds.job_holds(reserved.held());
        self.reserved.insert(id, reserved);
        self.reserved.run_pending_tasks();
    }

    /// Drops the reservations whose hold ended (their units stay spent); run by the sweep and
    /// at each reservation.
    pub(crate) fn sweep(&self) {
        self.reserved.run_pending_tasks();
    }

    /// The units reserved for the event `id`, taken out (they become the event's).
    pub(crate) fn take_reserved(&self, id: &str) -> Option<Arc<Reserved>> {
        let taken = self.reserved.remove(id);
        // Its listener runs now: the hold is no longer counted open.
        self.reserved.run_pending_tasks();
        taken
    }

    /// The units held for the event `id` (of its tenant) by an earlier attempt, taken out.
    pub(crate) fn take_held(&self, id: &str) -> Option<HeldUnits> {
        self.held.remove(id)
    }

    /// Writes the events prepared (their units taken) in one store call, within
    /// `events.store_timeout`,
    /// and sets each one's outcome in `out`. Returns whether units were given back
    /// (duplicates). When the write may have landed (a timeout, a batch applied in part), the
    /// units stay taken, so a hard quota is never passed, and are held for the event's retry on
    /// this node (which reuses them; a retry of an event already stored answers `Duplicate`).
    ///
    /// Returns the cells duplicates gave units back to (their lease, or what is owed): the
    /// store counts those units used until the node's next call says otherwise.
    pub(crate) async fn commit(
        &self,
        leases: &Arc<Leases>,
        ready: Vec<Prepared>,
        out: &mut [Option<Result<EventOutcome, EventError>>],
    ) -> Vec<(Tenant, usize)> {
        let mut returned: Vec<(Tenant, usize)> = Vec::new();
        if !ready.is_empty() {
            let batch: Vec<UsageEvent> = ready.iter().map(|p| p.event.clone()).collect();
            // From the write on, the units are the events' whatever comes (a write cut off,
            // this future dropped, may have landed): they go back only on an answer that says
            // the write did not apply them.
            let mut ready = ready;
            let units: Vec<Writing> = ready.iter_mut().map(|p| std::mem::take(&mut p.units).writing()).collect();
            // Until the store answers, each write may have landed: if this future is dropped
            // (its caller gone) or the answer is an error, the guard charges the events'
            // spend and holds what they took for their retry on this node.
            let mut unsure = Unsure {
                recorder: self,
                events: ready
                    .iter()
                    .zip(&units)
                    .map(|(p, units)| Pending {
                        state: p.state.clone(),
                        meter: p.meter,
                        quantity: p.quantity,
                        taken_at: p.taken_at,
                        id: p.event.id.clone(),
                        units: !matches!(units, Writing::None),
                        charged: p.charged,
                        org: p.org.clone(),
                    })
                    .collect(),
            };
            match self.stores.events().commit_events(&batch).await {
                Ok(outcomes) if outcomes.len() == ready.len() => {
                    unsure.events.clear();
                    let mut duplicates = Vec::new();
                    for ((p, units), outcome) in ready.into_iter().zip(units).zip(outcomes) {
                        self.stored.insert(p.event.id.clone(), ());
                        if outcome == EventOutcome::Applied {
                            // A priced meter feeds the spend, as work done (rounded per event,
                            // past a hard cap if need be: counted), unless an earlier attempt
                            // charged it.
                            if !p.charged {
                                charge_units(&p.state, p.meter, p.quantity, p.taken_at, &self.prefetcher);
                                count_at_org(p.org.as_ref(), p.meter, p.taken_at);
                            }
                            if matches!(units, Writing::Taken { past_limit: true, .. }) {
                                self.totals.events_past_limit.add(1);
                                tracing::info!(tenant = %p.state.id, quantity = p.quantity,
                                    "usage event charged past its hard quota: the work was done (reserve_event asks first)");
                            }
                        } else if let Writing::Taken { source, units, .. } = units {
                            // Not applied (a duplicate): its units go back to where they came
                            // from (below, once every outcome is applied).
                            duplicates.push(Taken::new(&p.state, p.meter, units, source, p.taken_at));
                            let known = returned.iter().any(|(t, m)| *m == p.meter && t.id == p.state.id);
                            if units > 0 && !known {
                                returned.push((p.state.clone(), p.meter));
                            }
                        }
                        out[p.index] = Some(Ok(outcome));
                    }
                    // The duplicates' units back where they came from, which the store is told
                    // of next (`returned`). Their lease given back meanwhile (a reload, an
                    // eviction while the write was out), they go to the store itself: back in
                    // that lease, no call would tell it. Every release is sent before any is
                    // awaited (each runs on, this future dropped meanwhile), and awaited
                    // together.
                    let sent: Vec<_> = duplicates
                        .into_iter()
                        .filter_map(|taken| taken.give_back_started(leases, &self.prefetcher))
                        .collect();
                    for told in futures_util::future::join_all(sent).await {
                        if !told.unwrap_or(false) {
                            self.totals.give_backs_untold.add(1);
                        }
                    }
                }
                answer => {
                    let e = match answer {
                        Err(e) => e,
                        Ok(_) => {
                            let e = StoreError::Backend("the store answered for another number of events".into());
                            self.stores.policy().failed("record usage events", &e);
                            e
                        }
                    };
                    // The write may have landed (a timeout, a batch applied in part): the
                    // units stay taken, so a hard quota is never passed, and the spend is
                    // charged, as work done (its retry answers `Duplicate` if it landed); the
                    // guard does both as it drops.
                    for p in &ready {
                        out[p.index] = Some(Err(EventError::Store(clone_error(&e))));
                    }
                    drop(unsure);
                }
            }
        }
        returned
    }

    /// Counts an event's outcome, and logs a final refusal.
    pub(crate) fn count(&self, id: &str, e: Option<&Event>, outcome: &Result<EventOutcome, EventError>) {
        let totals = &self.totals;
        let metrics = &self.metrics;
        match outcome {
            Ok(EventOutcome::Applied) => totals.event(metrics, ProcessedAs::Applied),
            Ok(_) => totals.event(metrics, ProcessedAs::Duplicate),
            Err(err) => {
                totals.event(metrics, ProcessedAs::Refused(err.label()));
                if !err.is_retryable() {
                    tracing::warn!(
                        id,
                        tenant = e.map(|e| e.tenant.as_str()),
                        meter = e.map(|e| e.meter.as_str()),
                        quantity = e.map(|e| e.quantity),
                        reason = err.label(),
                        "usage event refused: {err}"
                    );
                }
            }
        }
    }
}

/// The most reservations held at once on a node (past it, the least recently reserved go, their
/// units spent: bounded, whatever jobs ask).
const RESERVATIONS_MAX: u64 = 100_000;

/// Quota units reserved for an event's work, until it is recorded or its hold ends. Let go
/// of (its hold ended, evicted past the bound, forgotten), its units stay spent: the event may
/// have been recorded by another process, which charged it there, so giving them back could
/// pass the limit. They go back only when the work is abandoned ([`give_back`](Self::give_back)).
pub(crate) struct Reserved {
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
    pub(crate) quantity: u64,
    /// The units it holds of a quota (none on a meter without one), taken at `taken_at`.
    units: std::sync::Mutex<Taken>,
    /// The units it holds of its tenant's organization's quota (a tenant in an organization
    /// that limits the meter), going where its own go.
    org: std::sync::Mutex<Taken>,
    /// Of them: the organization's state, and the organization's period they were taken in.
    org_held: Option<(Tenant, (i64, i64))>,
    /// How many it holds there, as counted held by a job at the organization's cell (none
    /// once given back).
    org_units: std::sync::atomic::AtomicU64,
    held: u64,
    pub(crate) taken_at: i64,
    pub(crate) hold: Duration,
    /// The quota period the units were taken in (`None`: the meter has no quota).
    pub(crate) period: Option<(i64, i64)>,
}

impl Reserved {
    /// The tag of the quota period its units were taken in.
    pub(crate) fn tag(&self) -> Option<u16> {
        self.period.map(|(start, end)| crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(start, end)))
    }

    pub(crate) fn new(
        state: Tenant,
        meter: usize,
        quantity: u64,
        units: Taken,
        taken_at: i64,
        hold: Duration,
        period: Option<(i64, i64)>,
    ) -> Self {
        let held = units.units();
        let org = std::sync::Mutex::new(Taken::none());
        Self {
            state,
            meter,
            quantity,
            units: std::sync::Mutex::new(units),
            org,
            org_held: None,
            org_units: std::sync::atomic::AtomicU64::new(0),
            held,
            taken_at,
            hold,
            period,
        }
    }

    /// The same, holding `org` of its tenant's organization's quota too (`state`, the
    /// organization's counters' state; `period`, the organization's period they were taken in).
    pub(crate) fn with_org(mut self, state: Tenant, org: Taken, period: (i64, i64)) -> Self {
        let units = org.units();
        if units > 0 {
            self.org_held = Some((state, period));
            self.org_units = std::sync::atomic::AtomicU64::new(units);
        }
        *self.org.lock().unwrap_or_else(|e| e.into_inner()) = org;
        self
    }

    /// The organization's counters' state and period it holds units in, if any.
    pub(crate) fn org_period(&self) -> Option<(&crate::config::TenantId, (i64, i64))> {
        let (state, period) = self.org_held.as_ref()?;
        (self.org_units.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some((&state.id, *period))
    }

    /// Whether it holds units of its tenant's organization's quota for the organization's
    /// period `period` (the one of the event recorded with it).
    pub(crate) fn holds_org_in(&self, org: Option<(&crate::config::TenantId, (i64, i64))>) -> bool {
        org.is_some() && self.org_period() == org
    }

    /// The cells whose units it gave back, for the store to hear of at once: its tenant's
    /// (when it took any) and its organization's.
    pub(crate) fn given_back_cells(&self) -> Vec<(Tenant, usize)> {
        let mut out = Vec::new();
        if self.took() {
            out.push((self.state.clone(), self.meter));
        }
        if let Some(org) = self.org_state() {
            out.push((org.clone(), self.meter));
        }
        out
    }

    /// The state of its tenant's organization's counters, when it holds units there.
    pub(crate) fn org_state(&self) -> Option<&Tenant> {
        self.org_held.as_ref().map(|(state, _)| state)
    }

    /// Tells the organization's cell that its units are held by a job (`on`), or no longer:
    /// those it holds now (none once given back), as it is reserved and as it leaves the
    /// reservations, in pairs.
    fn count_org_jobs(&self, on: bool) {
        let units = self.org_units.load(std::sync::atomic::Ordering::Relaxed);
        if let (Some((state, (start, end))), true) = (&self.org_held, units > 0) {
            if let Some(cell) = state.quota(self.meter) {
                let tag = crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(*start, *end));
                cell.count_jobs(units, on, Some(tag));
            }
        }
    }

    /// Gives back what it holds at its tenant's organization alone (the work recorded falls in
    /// another period of the organization's). Called once it left the reservations (its
    /// units no longer counted held), as every give-back is.
    pub(crate) fn give_back_org(&self, leases: &Arc<Leases>, prefetcher: &Prefetcher) {
        self.org_units.store(0, std::sync::atomic::Ordering::Relaxed);
        self.take_org().give_back(leases, prefetcher);
    }

    fn take_org(&self) -> Taken {
        std::mem::take(&mut *self.org.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The same work reserved again, for `hold` from now: its units move to the new
    /// reservation.
    pub(crate) fn again(&self, hold: Duration) -> Self {
        let units = self.take();
        let held = units.units();
        Self {
            state: self.state.clone(),
            meter: self.meter,
            quantity: self.quantity,
            units: std::sync::Mutex::new(units),
            org: std::sync::Mutex::new(self.take_org()),
            org_held: self.org_held.clone(),
            org_units: std::sync::atomic::AtomicU64::new(self.org_units.load(std::sync::atomic::Ordering::Relaxed)),
            held,
            taken_at: self.taken_at,
            hold,
            period: self.period,
        }
    }

    fn take(&self) -> Taken {
        std::mem::take(&mut *self.units.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The units it holds of a quota (none on a meter without one).
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    /// Whether it took units of a quota.
    pub(crate) fn took(&self) -> bool {
        self.held > 0
    }

    /// Gives the units back (the work was not recorded): to their lease, or to the store once
    /// the lease was given back (a release after shutdown began, or after a reload).
    pub(crate) fn give_back(&self, leases: &Arc<Leases>, prefetcher: &Prefetcher) {
        self.take().give_back(leases, prefetcher);
        self.take_org().give_back(leases, prefetcher);
    }

    /// Gives `units` of it back (the work recorded took fewer than were reserved); the rest
    /// are the event's for good.
    pub(crate) fn give_back_part(&self, units: u64, leases: &Arc<Leases>, prefetcher: &Prefetcher) {
        let mut taken = self.take();
        taken.split(units).give_back(leases, prefetcher);
        taken.keep();
        let mut org = self.take_org();
        org.split(units).give_back(leases, prefetcher);
        org.keep();
    }

    /// The units are the event's for good.
    pub(crate) fn keep(&self) {
        self.take().keep();
        self.take_org().keep();
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // Let go of unrecorded and unreleased: the units stay spent, at every scope.
        self.take().keep();
        self.take_org().keep();
    }
}

/// Each reservation expires after its own hold.
struct HoldFor;

impl moka::Expiry<String, Arc<Reserved>> for HoldFor {
    fn expire_after_create(&self, _: &String, r: &Arc<Reserved>, _: std::time::Instant) -> Option<Duration> {
        Some(r.hold)
    }

    fn expire_after_update(
        &self,
        _: &String,
        r: &Arc<Reserved>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(r.hold)
    }
}

/// The events of a write not answered yet ([`EventRecorder::commit`]): dropped with events
/// left (an error, or the future dropped with its write under way), each may have landed, so
/// its spend is charged now (once: an earlier attempt's charge is not repeated) and what it
/// took is held for its retry on this node, which does not take or charge again.
struct Unsure<'a> {
    recorder: &'a EventRecorder,
    events: Vec<Pending>,
}

struct Pending {
    state: Tenant,
    meter: usize,
    quantity: u64,
    taken_at: i64,
    id: String,
    units: bool,
    charged: bool,
    org: Option<(Tenant, u64)>,
}

impl Drop for Unsure<'_> {
    fn drop(&mut self) {
        for p in self.events.drain(..) {
            let priced = cost_of(&p.state, p.meter, p.quantity).is_some();
            if priced && !p.charged {
                charge_units(&p.state, p.meter, p.quantity, p.taken_at, &self.recorder.prefetcher);
            }
            // Counted at its organization as it may have landed (its retry, applied or a
            // duplicate, counts nothing there again).
            let org = p.org.is_some();
            if org && !p.charged {
                count_at_org(p.org.as_ref(), p.meter, p.taken_at);
            }
            // Held only when there is something to hold: its units, its charge or its count.
            if p.units || priced || org {
                self.recorder.held.insert(p.id, HeldUnits { quantity: p.quantity, units: p.units });
            }
        }
    }
}

/// Counts the units of `meter` of an event's work done at its tenant's organization (`org`:
/// its counters' state, given only for an event in the organization's period in force, and
/// the units) at `at` (the clock's): past the organization's limit if need be, as the work
/// was done.
fn count_at_org(org: Option<&(Tenant, u64)>, meter: usize, at: i64) {
    if let Some((cell, units)) = org.and_then(|(o, units)| Some((o.quota(meter)?, *units))) {
        if units > 0 {
            cell.force_take(units, at);
        }
    }
}

/// What an event whose write may have landed took, held for its retry: its quota units
/// (never given back: they belong to the event, stored or about to be) and its spend, charged
/// (not charged again).
#[derive(Clone, Copy)]
pub(crate) struct HeldUnits {
    pub(crate) quantity: u64,
    /// Whether it took quota units (else its meter has no quota, or its period was over).
    pub(crate) units: bool,
}

/// An event's quota units taken anew (for work done, or a reservation). Dropped before its
/// write (a later event of the batch refused, the caller gone), units taken anew go back.
#[derive(Default)]
pub(crate) enum EventUnits {
    /// None taken: a meter without a quota, a period already over.
    #[default]
    None,
    /// Taken for it: given back if its write does not apply them. `past_limit`: work done past
    /// the hard quota, charged all the same (from the lease as a debt, or owed to the store).
    Taken { taken: Taken, past_limit: bool },
    /// Held from an earlier attempt whose write may have landed (a `Duplicate` now most
    /// likely is that write), or reserved for the work: never given back.
    Held,
}

impl EventUnits {
    /// The units taken, as a reservation holds them (none held from an earlier attempt).
    pub(crate) fn into_taken(self) -> Taken {
        match self {
            Self::Taken { taken, .. } => taken,
            Self::None | Self::Held => Taken::none(),
        }
    }

    /// The units as the write carries them: plain data, kept whatever becomes of the write
    /// unless its answer gives them back.
    fn writing(self) -> Writing {
        match self {
            Self::Taken { taken, past_limit } => {
                let units = taken.units();
                match taken.into_source() {
                    Some(source) => Writing::Taken { source, units, past_limit },
                    None => Writing::None,
                }
            }
            Self::Held => Writing::Held,
            Self::None => Writing::None,
        }
    }
}

/// An event's units while its write is in flight ([`EventUnits`] handed over to it).
enum Writing {
    None,
    Taken { source: Source, units: u64, past_limit: bool },
    Held,
}

fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Timeout(d) => StoreError::Timeout(*d),
        other => StoreError::Backend(other.to_string().into()),
    }
}
