//! Usage from outside a request: events of jobs and queues, each with its own time and id,
//! stored at most once per id in the window of its own time, and checked against the hard
//! quotas of its own period. Record them with [`Tollgate::record_event`],
//! [`Tollgate::record_events`] or, for queue messages of the documented JSON shape,
//! [`Tollgate::record_messages`]; `docs/events.md` is the guide.

use std::time::{Duration, SystemTime};

use super::{
    engine::{with_timeout, OwnedCredential},
    lease::Refill,
    table::Lookup,
    Tollgate,
};
use crate::{
    config::{MeterId, TenantId},
    metrics::Totals,
    plan::Runtime,
    store::{EventOutcome, StoreError, UsageEvent, UsageRecord},
    tenant::{Take, Tenant},
};

/// How old an event's billing window may be: Stripe takes meter events up to 35 days old,
/// and the export keeps an hour of margin; an hour more is
/// left for the export to send the event's window before that.
pub const MAX_AGE: Duration = Duration::from_secs(35 * 86_400 - 2 * 3600);

/// The largest quantity of one event (2⁴⁶ − 1: what a quota lease can hold).
const MAX_QUANTITY: u64 = (1 << 46) - 1;

/// The longest event id, in bytes.
pub(crate) const EVENT_ID_MAX_LEN: usize = 256;

/// A usage event from outside a request: a job or a queue message saying that `tenant` used
/// `quantity` units of `meter` at `at`. Recorded with [`Tollgate::record_event`].
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
    /// The event's time is in the future, beyond `events.max_skew`.
    #[error("the event's time is {ahead_secs} s in the future (events.max_skew is {max_skew_secs} s)")]
    InFuture {
        /// How far ahead, in seconds.
        ahead_secs: u64,
        /// The configured tolerance, in seconds.
        max_skew_secs: u64,
    },
    /// The tenant's hard quota of the event's period does not have the units.
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
    /// A queue message that is not a usage event of the documented shape ([`UsageMessage`]),
    /// or names a product code `[events.products]` does not map.
    #[error("malformed usage event: {0}")]
    Malformed(String),
    /// The store did not answer (or failed). The write may have landed (a timeout): a retry
    /// applies the event, or answers `Duplicate` if it did.
    #[error("the store did not record the event: {0}")]
    Store(#[source] StoreError),
    /// The event's time is in a quota period that has not begun on this node's clock (within
    /// `events.max_skew`): its quota cannot be checked yet. Retryable: delivered again once
    /// the period has begun, it is applied there.
    #[error("the event's quota period begins in {starts_in_secs} s: retry then")]
    PeriodNotStarted {
        /// Seconds until the period begins.
        starts_in_secs: u64,
    },
}

impl EventError {
    /// Whether a retry may succeed (the store failed); the other errors are final.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store(_) | Self::PeriodNotStarted { .. })
    }

    /// A short name for logs and metrics: `invalid`, `too_old`, `in_future`, `quota`,
    /// `store_error`, `not_yet`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidId | Self::UnknownTenant(_) | Self::UnknownMeter(_) | Self::Malformed(_) => "invalid",
            Self::TooOld { .. } => "too_old",
            Self::InFuture { .. } => "in_future",
            Self::QuotaExceeded { .. } => "quota",
            Self::Store(_) => "store_error",
            Self::PeriodNotStarted { .. } => "not_yet",
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
    fn read(m: &QueueMessage<'_>, settings: &crate::config::EventSettings) -> Result<Event, EventError> {
        let msg: UsageMessage = serde_json::from_slice(m.body)
            .map_err(|e| EventError::Malformed(format!("the body is not a usage event: {e}")))?;
        let tenant = TenantId::parse(&msg.tenant).map_err(|e| EventError::Malformed(format!("TenantID: {e}")))?;
        let meter = settings.meter_of(&msg.product).ok_or_else(|| {
            EventError::Malformed(format!("no meter for the product code `{}` in [events.products]", msg.product))
        })?;
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
struct Prepared {
    /// Its place in the batch.
    index: usize,
    state: Tenant,
    meter: usize,
    quantity: u64,
    /// Where the units were taken from, to give them back if the write does not apply.
    tag: Option<Taken>,
    /// When they were taken (the clock, not the event's time).
    taken_at: i64,
    event: UsageEvent,
}

impl Tollgate {
    /// Records one usage event (from a job, a queue message) and returns once it is stored:
    /// acknowledge the message only then. See [`record_events`](Self::record_events).
    ///
    /// # Errors
    /// Why it was not recorded: [`EventError::is_retryable`] tells a store failure (retry)
    /// from a final refusal (acknowledge the message, it cannot succeed).
    pub async fn record_event(&self, event: Event) -> Result<EventOutcome, EventError> {
        self.record_events(std::slice::from_ref(&event)).await.pop().unwrap_or(Err(EventError::InvalidId))
    }

    /// Records usage events in one store call, each at most once per id, and returns one
    /// outcome per event, in order, once they are stored.
    ///
    /// - **The event's time picks its window**: the usage window holding it (for a meter with
    ///   `aggregation = "hour"` or `"day"`, that hour or day), so an event that arrives late
    ///   still lands in its own window. A window already exported goes out again as a new
    ///   revision (its late units) at the next export.
    /// - **Refused**: an event older than [`MAX_AGE`] (billing would refuse it), one
    ///   more than `events.max_skew` in the future, an unknown tenant or meter, an id that is
    ///   empty or over 256 bytes.
    /// - **Once per id and tenant**: the id is marked seen in the same store write as the
    ///   usage, never before, and kept for 35 days after the event's time (the ids of refused
    ///   events are not marked). A redelivered event answers [`EventOutcome::Duplicate`].
    /// - **Hard quotas** apply in the quota period of the event's time: an event in the
    ///   current period takes its units as a request does, and is refused with
    ///   [`EventError::QuotaExceeded`] when they are not there; a period already over never
    ///   refuses (its units are not counted against it). The units are taken before the
    ///   store is asked about the id, so a redelivered event whose quota is spent meanwhile
    ///   answers `QuotaExceeded` rather than `Duplicate`; it is not counted again either way.
    ///   An event of the batch refused for its quota while a duplicate of the same batch held
    ///   units is tried again once the duplicate gave them back. In shadow mode nothing is
    ///   refused: the units are taken past the limit and the refusal counted.
    /// - **A store failure** ([`EventError::Store`], retryable): the write may have landed (a
    ///   timeout), so the event's quota units stay taken; the retry answers `Duplicate` if it
    ///   did. The whole batch is written within `events.store_timeout`.
    ///
    /// Counted in [`Stats`](crate::Stats) (`events_*`) and the metric
    /// `tollgate_usage_events_total{outcome}`; refusals are logged.
    pub async fn record_events(&self, events: &[Event]) -> Vec<Result<EventOutcome, EventError>> {
        let out = self.record_uncounted(events).await;
        for (e, o) in events.iter().zip(&out) {
            self.count_event(&e.id, Some(e), o);
        }
        out
    }

    /// Records queue messages of the documented JSON shape (see [`UsageMessage`]): each
    /// body is read, its product code mapped to a meter by `[events.products]`, and the
    /// events recorded as [`record_events`](Self::record_events) does. A message that cannot
    /// be read is refused with [`EventError::Malformed`] (final: acknowledge it), counted and
    /// logged.
    pub async fn record_messages(&self, messages: &[QueueMessage<'_>]) -> Vec<Result<EventOutcome, EventError>> {
        let rt = self.shared.runtime.load_full();
        let parsed: Vec<Result<Event, EventError>> =
            messages.iter().map(|m| UsageMessage::read(m, &rt.config.events)).collect();
        let events: Vec<Event> = parsed.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
        let mut recorded = self.record_uncounted(&events).await.into_iter();
        let mut out = Vec::with_capacity(messages.len());
        for (m, p) in messages.iter().zip(parsed) {
            let (event, outcome) = match p {
                Ok(e) => {
                    let o = recorded.next().unwrap_or(Err(EventError::InvalidId));
                    (Some(e), o)
                }
                Err(err) => (None, Err(err)),
            };
            let id = event.as_ref().map_or(m.id.unwrap_or("-"), |e| e.id.as_str());
            self.count_event(id, event.as_ref(), &outcome);
            out.push(outcome);
        }
        out
    }

    async fn record_uncounted(&self, events: &[Event]) -> Vec<Result<EventOutcome, EventError>> {
        let (mut out, returned) = self.record_pass(events).await;
        if returned {
            // Duplicates of this batch gave their units back after the others were charged:
            // an event refused for the quota meanwhile is tried again, once.
            let again: Vec<usize> =
                (0..events.len()).filter(|i| matches!(out[*i], Err(EventError::QuotaExceeded { .. }))).collect();
            if !again.is_empty() {
                let retry: Vec<Event> = again.iter().map(|i| events[*i].clone()).collect();
                let (second, _) = self.record_pass(&retry).await;
                for (i, o) in again.into_iter().zip(second) {
                    out[i] = o;
                }
            }
        }
        out
    }

    /// One pass over a batch: the outcomes, and whether units were given back (duplicates).
    async fn record_pass(&self, events: &[Event]) -> (Vec<Result<EventOutcome, EventError>>, bool) {
        let rt = self.shared.runtime.load_full();
        let timeout = rt.config.events.store_timeout;
        let now = self.shared.clock.unix_secs();
        let mut returned = false;
        let mut out: Vec<Option<Result<EventOutcome, EventError>>> = (0..events.len()).map(|_| None).collect();
        let mut ready: Vec<Prepared> = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            match self.prepare_event(&rt, e, index, now, rt.config.usage.store_timeout).await {
                Ok(p) => ready.push(p),
                Err(err) => out[index] = Some(Err(err)),
            }
        }
        if !ready.is_empty() {
            let batch: Vec<UsageEvent> = ready.iter().map(|p| p.event.clone()).collect();
            match with_timeout(timeout, self.shared.stores.usage.commit_events(&batch)).await {
                Ok(outcomes) if outcomes.len() == ready.len() => {
                    for (p, outcome) in ready.into_iter().zip(outcomes) {
                        if outcome != EventOutcome::Applied {
                            returned |= give_back(&p);
                        }
                        out[p.index] = Some(Ok(outcome));
                    }
                }
                answer => {
                    let e = match answer {
                        Err(e) => e,
                        Ok(_) => StoreError::Backend("the store answered for another number of events".into()),
                    };
                    self.store_error("record usage events", &e);
                    // The write may have landed (a timeout, a batch applied in part): the
                    // units stay taken, so a hard quota is never passed, and are held for the
                    // event's retry on this node (which reuses them; a retry of an event
                    // already stored answers `Duplicate`).
                    for p in ready {
                        if p.tag.is_some() {
                            self.shared.held_events.insert(p.event.id.clone(), HeldUnits { quantity: p.quantity });
                        }
                        out[p.index] = Some(Err(EventError::Store(clone_error(&e))));
                    }
                }
            }
        }
        (out.into_iter().map(|o| o.unwrap_or(Err(EventError::InvalidId))).collect(), returned)
    }

    fn count_event(&self, id: &str, e: Option<&Event>, outcome: &Result<EventOutcome, EventError>) {
        let totals = &self.shared.totals;
        let metrics = &self.shared.metrics;
        match outcome {
            Ok(EventOutcome::Applied) => {
                Totals::add(&totals.events_applied, 1);
                metrics.events(ProcessedAs::Applied).increment(1);
            }
            Ok(_) => {
                Totals::add(&totals.events_duplicate, 1);
                metrics.events(ProcessedAs::Duplicate).increment(1);
            }
            Err(err) => {
                Totals::add(&totals.events_refused, 1);
                metrics.events(ProcessedAs::Refused(err.label())).increment(1);
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

    /// Checks an event, finds its tenant and takes its units from the quota of its period.
    async fn prepare_event(
        &self,
        rt: &Runtime,
        e: &Event,
        index: usize,
        now: i64,
        lookup_timeout: Duration,
    ) -> Result<Prepared, EventError> {
        if e.id.is_empty() || e.id.len() > EVENT_ID_MAX_LEN {
            return Err(EventError::InvalidId);
        }
        if e.quantity > MAX_QUANTITY {
            return Err(EventError::Malformed(format!("the quantity {} is larger than {MAX_QUANTITY}", e.quantity)));
        }
        let at = match e.at.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(_) => return Err(EventError::TooOld { age_secs: u64::MAX }),
        };
        let skew = rt.config.events.max_skew.as_secs() as i64;
        if at > now.saturating_add(skew) {
            return Err(EventError::InFuture { ahead_secs: (at - now) as u64, max_skew_secs: skew as u64 });
        }
        let Some(meter_index) = rt.meters.index(e.meter.as_str()) else {
            return Err(EventError::UnknownMeter(e.meter.clone()));
        };
        // The window billing sends the event in: a pre-aggregated meter's hour or day.
        let window = rt.config.usage.window.as_secs().max(1) as i64;
        let coarse = rt.config.meters.iter().find(|m| m.id == e.meter).and_then(|m| m.aggregation.window_secs());
        let step = coarse.unwrap_or(window);
        let window_start = at - at.rem_euclid(step);
        if window_start < now.saturating_sub(MAX_AGE.as_secs() as i64) {
            return Err(EventError::TooOld { age_secs: now.saturating_sub(at).max(0) as u64 });
        }
        let state = self.known_tenant(&e.tenant, lookup_timeout).await?;
        // A state of another configuration (a reload meanwhile) indexes meters its own way.
        let meter = state.plan.meters.index(e.meter.as_str()).unwrap_or(meter_index);
        state.touch(now);
        // Ids are unique per tenant: two tenants' jobs may use the same ids.
        let id = format!("{}\u{1f}{}", state.id, e.id);
        // Units still held for this event by an attempt whose write may have landed: reused,
        // not taken again (a retry is never refused for the units of its own first attempt).
        let tag = match self.shared.held_events.remove(&id) {
            Some(held) if held.quantity == e.quantity => Some(Taken::Held),
            _ => self.take_for_event(&state, meter, e.quantity, at, now, lookup_timeout).await?,
        };
        let record = UsageRecord::new(state.id.clone(), e.meter.clone(), window_start, e.quantity);
        Ok(Prepared {
            index,
            state,
            meter,
            quantity: e.quantity,
            tag,
            taken_at: now,
            event: UsageEvent::new(id, record, at),
        })
    }

    /// The state of an event's tenant: never the anonymous tenant an unknown one would get.
    pub(crate) async fn known_tenant(&self, id: &TenantId, timeout: Duration) -> Result<Tenant, EventError> {
        if let Some(s) = self.shared.table.get(Lookup::Identity(id.as_str())) {
            if s.id == *id {
                return Ok(s);
            }
        }
        if let Ok(s) = self.lookup(OwnedCredential::Tenant(id.clone())).await {
            if s.id == *id {
                return Ok(s);
            }
        }
        // Unknown, or the directory did not answer: ask once more, to tell which.
        match with_timeout(timeout, self.shared.stores.directory.tenant(id)).await {
            Ok(None) => Err(EventError::UnknownTenant(id.clone())),
            Ok(Some(_)) => Err(EventError::Store(StoreError::Backend("the tenant directory did not answer".into()))),
            Err(e) => Err(EventError::Store(e)),
        }
    }

    /// Takes an event's units from the quota of `meter`, if the event falls in the period in
    /// force: `Some(tag)` of the lease they came from. A period already over takes nothing.
    async fn take_for_event(
        &self,
        state: &Tenant,
        meter: usize,
        quantity: u64,
        at: i64,
        now: i64,
        timeout: Duration,
    ) -> Result<Option<Taken>, EventError> {
        let Some(cell) = state.quota(meter) else {
            return Ok(None);
        };
        let period = cell.spec.period();
        // A period already over never refuses (its counter is left alone).
        let (start, end) = period.bounds(at);
        if quantity == 0 || end <= now {
            return Ok(None);
        }
        // Just ahead of the clock (within `events.max_skew`), in a period that has not begun:
        // its quota cannot be asked yet; a retry once it has begun applies it there.
        if start > now {
            return Err(EventError::PeriodNotStarted { starts_in_secs: (start - now) as u64 });
        }
        let exceeded = || EventError::QuotaExceeded {
            meter: cell.meter_id().clone(),
            period: period.name(),
            limit: cell.spec.limit().get(),
            plan: state.plan.id.clone(),
        };
        match cell.try_take(quantity, now) {
            Take::Taken { tag, .. } => return Ok(Some(Taken::Lease(tag))),
            Take::Exhausted if !state.plan.shadow => return Err(exceeded()),
            Take::Exhausted | Take::NeedLease => {}
        }
        let taken = with_timeout(timeout, async {
            let _guard = cell.lock().lock().await;
            self.settle_inflight(cell).await?;
            match cell.try_take(quantity, now) {
                Take::Taken { tag, .. } => return Ok(Some(tag)),
                Take::Exhausted => return Ok(None),
                Take::NeedLease => {}
            }
            Ok(match self.refill_locked(cell, now, quantity).await? {
                Refill::Taken { tag, .. } => Some(tag),
                Refill::Short | Refill::Done => None,
            })
        })
        .await;
        match taken {
            Ok(Some(tag)) => Ok(Some(Taken::Lease(tag))),
            Ok(None) if state.plan.shadow => {
                // Shadow mode: taken past the limit (owed to the store), the refusal counted.
                self.would_refuse(&self.shadow_quota(state, meter));
                Ok(Some(cell.force_take(quantity, now).map_or(Taken::Unleased, Taken::Lease)))
            }
            Ok(None) => Err(exceeded()),
            Err(e) => {
                self.store_error("reserve quota for an event", &e);
                Err(EventError::Store(e))
            }
        }
    }
}

/// Quota units taken for an event whose write may have landed, held for its retry: never
/// given back (they belong to the event, stored or about to be).
#[derive(Clone, Copy)]
pub(crate) struct HeldUnits {
    quantity: u64,
}

/// Where an event's quota units were taken from.
#[derive(Debug, Clone, Copy)]
enum Taken {
    /// The lease of the period with this tag.
    Lease(u16),
    /// Outside any lease (shadow mode past the limit): owed to the store.
    Unleased,
    /// Held from an earlier attempt whose write may have landed: a `Duplicate` now most
    /// likely is that write, so they are never given back.
    Held,
}

/// Gives an event's units back (its write did not apply them); whether there were any.
fn give_back(p: &Prepared) -> bool {
    let Some(cell) = p.state.quota(p.meter) else { return false };
    match p.tag {
        Some(Taken::Lease(tag)) => cell.refund(p.quantity, tag),
        Some(Taken::Unleased) => cell.refund_unleased(p.quantity, p.taken_at),
        Some(Taken::Held) | None => return false,
    }
    p.quantity > 0
}

fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Timeout(d) => StoreError::Timeout(*d),
        other => StoreError::Backend(other.to_string().into()),
    }
}

/// How an event was processed, for the metric.
pub(crate) enum ProcessedAs {
    Applied,
    Duplicate,
    Refused(&'static str),
}
