//! Recording usage events: each event checked, its tenant found, its units taken from the
//! quota of its own period, then the batch written once by the event recorder.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::engine::{
    admit::{gate::Gate, stage::OwnedCredential},
    table::Lookup,
    usage::events::{
        Event, EventError, EventUnits, Prepared, QueueMessage, Reserved, UsageMessage, EVENT_ID_MAX_LEN, MAX_AGE,
        MAX_QUANTITY,
    },
    usage::lease::Refill,
    usage::taken::Taken,
    Tollgate,
};
use crate::{
    config::TenantId,
    plan::Runtime,
    store::{EventOutcome, StoreError, UsageEvent, UsageRecord},
    tenant::{Take, Tenant},
};

/// What an event's units are taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum For {
    /// Work done: past the limit, charged all the same.
    Work,
    /// A reservation before the work: past the limit, refused.
    Reserve,
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

    /// Reserves the units of work not done yet, before doing it: the event's units are taken
    /// from the tenant's hard quota of its period as a request's are, and refused with
    /// [`EventError::QuotaExceeded`] when they are not there (do not do the work). They are held
    /// on this engine for `hold` (at most a day): recording the event through this engine (the
    /// same id, meter and quota period, once the work is done) takes them rather than new ones,
    /// for good; an event of fewer units gives the rest back, one of more takes the rest anew as
    /// work done (past the limit if need be, counted in `Stats::events_past_limit`). [`release_event`](Self::release_event) gives them back when the work
    /// is abandoned. Neither recorded here nor released within the hold, they stay spent: the
    /// event may have been recorded by another process (a queue's consumer), which charged it
    /// there, so giving them back could pass the limit (the quota under-admits by them
    /// instead). Reserving the same work again holds it again from now; other work under the
    /// same id gives the earlier units back first. Nothing is written to the store until the
    /// event is recorded.
    ///
    /// On a priced meter of a plan with a hard spend cap, the cap is checked (refused with
    /// [`EventError::QuotaExceeded`] of the meter `spend` when it is spent) but the work's cost
    /// is not held: it is charged when the event is recorded, as work done, past the cap if
    /// need be (counted in `tollgate_spend_past_cap_nanos_total`). For exact spend, hold work
    /// in a request ([`TenantContext::hold_with`](crate::TenantContext::hold_with) with
    /// `Overrun::Refuse`).
    ///
    /// ```no_run
    /// # async fn job(engine: tollgate::Tollgate) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::{Duration, SystemTime};
    /// use tollgate::events::Event;
    /// let event = Event::new("job-42", "acme".into(), "tokens".into(), 1_500, SystemTime::now());
    /// engine.reserve_event(&event, Duration::from_secs(600)).await?; // QuotaExceeded: skip the work
    /// // ... do the work ...
    /// engine.record_event(event).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The checks [`record_events`](Self::record_events) makes, [`EventError::QuotaExceeded`],
    /// a store error while the quota was asked (retryable), [`EventError::HoldsFull`], or
    /// [`EventError::ShuttingDown`] once the engine's shutdown has begun.
    pub async fn reserve_event(&self, event: &Event, hold: Duration) -> Result<(), EventError> {
        if self.shared().stopping().load(std::sync::atomic::Ordering::Relaxed) {
            // Its units would be leased after the leases went back.
            return Err(EventError::ShuttingDown);
        }
        let rt = self.shared().runtime().load_full();
        let now = self.shared().clock().unix_secs();
        let hold = hold.min(Duration::from_secs(86_400));
        let (state, meter, at) = self.check_event(&rt, event, now).await?;
        if event.quantity == 0 {
            return Ok(());
        }
        // A priced meter: the tenant's hard spend cap must have room (the work's spend is
        // charged when its event is recorded, as work done).
        if crate::engine::usage::spend::cost_of(&state, meter, event.quantity).is_some() {
            self.check_spend_room(&rt, &state, now).await?;
        }
        let id = format!("{}\u{1f}{}", state.id, event.id);
        let period = Self::period_of(&state, meter, at);
        // The organization's period of the work, when its organization limits the meter.
        let org = Self::org_limiting(&state, meter).map(|o| self.gate().org_state(o));
        let org_period = org.as_ref().and_then(|o| Some((&o.id, Self::period_of(o, meter, at)?)));
        let events = self.units().events();
        if let Some(held) = events.take_reserved(&id) {
            let same_meter = held.state.plan.meters.ids.get(held.meter) == Some(&event.meter);
            // Held at the organization in its period of the work (or not limited there).
            let same_org = held.org_period() == org_period;
            if held.quantity == event.quantity && same_meter && held.period == period && same_org {
                // The same work reserved again: held again, for `hold` from now.
                events.reopen_job(&held.state.id);
                events.reserve(id, Arc::new(held.again(hold)));
                return Ok(());
            }
            held.give_back(self.units().leases(), self.units().prefetcher());
            let cells = held.given_back_cells();
            if !cells.is_empty() {
                self.report_given_back(cells).await;
            }
        }
        let (max, per_tenant) = (rt.config.limits.max_holds, rt.config.limits.max_holds_per_tenant);
        if !events.open_job(&state.id, max, per_tenant) {
            return Err(EventError::HoldsFull { max });
        }
        // Closed again if no reservation comes of it (refused, failed, or this future dropped).
        let opened = OpenedJob(Some((events, state.id.clone())));
        let units = self.take_for_event(&rt, &state, meter, event.quantity, at, now, For::Reserve).await?;
        // Held at its tenant's organization too, when it limits the meter: refused there, the
        // tenant's units go back (their drop).
        let org = match org {
            None => None,
            Some(org) => {
                let units = self.take_for_event(&rt, &org, meter, event.quantity, at, now, For::Reserve).await?;
                let period = Self::period_of(&org, meter, at);
                Some((org, units, period))
            }
        };
        let reserved = Reserved::new(state, meter, event.quantity, units.into_taken(), now, hold, period);
        let reserved = match org {
            Some((org, units, Some(period))) => reserved.with_org(org, units.into_taken(), period),
            _ => reserved,
        };
        opened.reserve(id, Arc::new(reserved));
        Ok(())
    }

    /// Gives back the units [`reserve_event`](Self::reserve_event) holds for `event`, when its
    /// work is abandoned. Returns whether there were any. A reservation neither recorded nor
    /// released keeps its units spent once its hold ends (the event may have been recorded by
    /// another process, which charged it there).
    pub async fn release_event(&self, event: &Event) -> bool {
        let id = format!("{}\u{1f}{}", event.tenant, event.id);
        match self.units().events().take_reserved(&id) {
            Some(r) => {
                r.give_back(self.units().leases(), self.units().prefetcher());
                let cells = r.given_back_cells();
                if !cells.is_empty() {
                    self.report_given_back(cells).await;
                }
                true
            }
            None => false,
        }
    }

    /// Tells the store at once what these cells keep, units having gone back to their leases
    /// (`Leases::report_now`: a job's reservation recorded fewer or released, a duplicate's
    /// units), each once and together; a cell busy or lapsing, or whose report failed, is
    /// asked of the worker's tend (and counted, `Stats::give_backs_untold`).
    async fn report_given_back(&self, mut cells: Vec<(Tenant, usize)>) {
        cells.sort_by(|a, b| (a.0.id.as_str(), a.1).cmp(&(b.0.id.as_str(), b.1)));
        cells.dedup_by(|a, b| a.1 == b.1 && a.0.id == b.0.id);
        let leases = self.units().leases();
        let told =
            futures_util::future::join_all(cells.iter().map(|(state, meter)| leases.report_now(state, *meter))).await;
        for ((state, meter), told) in cells.iter().zip(told) {
            if !told {
                self.shared().totals().give_backs_untold.add(1);
                self.units().prefetcher().tend(state, *meter);
            }
        }
    }

    /// Whether the tenant's hard spend cap has a unit left in the period in force, asking the
    /// store when the lease cannot tell: refused with [`EventError::QuotaExceeded`] on the
    /// spend meter.
    async fn check_spend_room(&self, rt: &Runtime, state: &Tenant, now: i64) -> Result<(), EventError> {
        let Some(cell) = state.plan.spend.and_then(|s| state.quota(s)) else { return Ok(()) };
        let checked = match cell.check_units(1, now) {
            Err(Take::NeedLease) => self
                .shared()
                .stores()
                .under_lock(cell.lock(), async {
                    self.units().leases().settle_inflight(cell).await?;
                    if let Err(Take::NeedLease) = cell.check_units(1, now) {
                        self.units().leases().refill_locked(rt, cell, now, 0, 0, false).await?;
                    }
                    Ok(cell.check_units(1, now))
                })
                .await
                .map_err(EventError::Store)?,
            other => other,
        };
        match checked {
            Err(Take::Exhausted) if state.plan.shadow => {
                self.gate().would_refuse(&crate::engine::usage::spend::cap_reached(state, now));
                Ok(())
            }
            Err(Take::Exhausted) => Err(EventError::QuotaExceeded {
                meter: cell.meter_id().clone(),
                period: cell.spec.period().name(),
                limit: cell.limit(),
                plan: state.plan.id.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The bounds of the quota period of `meter` holding `at`, if the meter has a quota.
    fn period_of(state: &Tenant, meter: usize, at: i64) -> Option<(i64, i64)> {
        // A balance's one counter, whatever the time.
        state
            .quota(meter)
            .map(|cell| if cell.prepaid() { crate::base::Period::Prepaid.bounds(0) } else { cell.window(at) })
    }

    /// Records usage events in one store call, each at most once per id, and returns one
    /// outcome per event, in order, once they are stored.
    ///
    /// - **The event's time picks its window**: the usage window holding it (for a meter with
    ///   `aggregation = "hour"` or `"day"`, that hour or day), so an event that arrives late
    ///   still lands in its own window. A window already exported goes out again as a new
    ///   revision (its late units) at the next export.
    /// - **Refused**: an event older than [`MAX_AGE`] (billing would refuse it), an unknown
    ///   tenant or meter, an id that is empty or over 256 bytes (final); one more than
    ///   `events.max_skew` in the future ([`EventError::InFuture`], retryable: a producer's
    ///   clock ahead must not drop the work).
    /// - **Once per id and tenant**: the id is marked seen in the same store write as the
    ///   usage, never before, and kept for 35 days after the event's time (the ids of refused
    ///   events are not marked). A redelivered event answers [`EventOutcome::Duplicate`].
    /// - **Work already done is billed.** An event takes its units from the hard quota of its
    ///   period (the current one: a period already over is not counted against) as a request
    ///   does; when they are not there it is recorded all the same, **charged past the limit**
    ///   (the period stays spent; counted in `Stats::events_past_limit`). A job that must
    ///   respect a hard quota asks first with [`reserve_event`](Self::reserve_event): the units
    ///   it holds are the ones the event then takes. The units are taken before the store is
    ///   asked about the id; a duplicate gives them back. In shadow mode, refusals a
    ///   reservation would get are counted, not made.
    /// - **A store failure** ([`EventError::Store`], retryable): the write may have landed (a
    ///   timeout), so the event's quota units stay taken; the retry answers `Duplicate` if it
    ///   did. The whole batch is written within `events.store_timeout`.
    ///
    /// Counted in [`Stats`](crate::report::Stats) (`events_*`) and the metric
    /// `tollgate_usage_events_total{outcome}`; refusals are logged.
    pub async fn record_events(&self, events: &[Event]) -> Vec<Result<EventOutcome, EventError>> {
        let out = self.record_uncounted(events).await;
        for (e, o) in events.iter().zip(&out) {
            self.units().events().count(&e.id, Some(e), o);
        }
        out
    }

    /// Records queue messages of the documented JSON shape (see [`UsageMessage`]): each
    /// body is read, its product code mapped to a meter by `[events.products]`, and the
    /// events recorded as [`record_events`](Self::record_events) does. A message that cannot
    /// be read is refused with [`EventError::Malformed`] (final: acknowledge it), counted and
    /// logged.
    pub async fn record_messages(&self, messages: &[QueueMessage<'_>]) -> Vec<Result<EventOutcome, EventError>> {
        let rt = self.shared().runtime().load_full();
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
            self.units().events().count(id, event.as_ref(), &outcome);
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
        let rt = self.shared().runtime().load_full();
        let now = self.shared().clock().unix_secs();
        let mut out: Vec<Option<Result<EventOutcome, EventError>>> = (0..events.len()).map(|_| None).collect();
        let mut ready: Vec<Prepared> = Vec::with_capacity(events.len());
        let mut given_back = Vec::new();
        for (index, e) in events.iter().enumerate() {
            match self.prepare_event(&rt, e, index, now, &mut given_back).await {
                Ok(Some(p)) => ready.push(p),
                // Seen stored by this node: a redelivery, answered without a write.
                Ok(None) => out[index] = Some(Ok(EventOutcome::Duplicate)),
                Err(err) => out[index] = Some(Err(err)),
            }
        }
        let returned = self.units().events().commit(self.units().leases(), ready, &mut out).await;
        let any = !returned.is_empty();
        // Units back in the leases (reservations' rest, duplicates') while the store counts
        // them spent or used until told: a node killed first would leave them so for the rest
        // of the period. Told at once, after the write.
        given_back.extend(returned);
        if !given_back.is_empty() {
            self.report_given_back(given_back).await;
        }
        (out.into_iter().map(|o| o.unwrap_or(Err(EventError::InvalidId))).collect(), any)
    }

    /// Checks an event, finds its tenant and takes its units from the quota of its period;
    /// `None` for a redelivery of an event this node saw stored, with no reservation or units
    /// of its own (nothing to take or write).
    async fn prepare_event(
        &self,
        rt: &Runtime,
        e: &Event,
        index: usize,
        now: i64,
        given_back: &mut Vec<(Tenant, usize)>,
    ) -> Result<Option<Prepared>, EventError> {
        let (state, meter, at) = self.check_event(rt, e, now).await?;
        let step = Self::event_window(rt, e);
        let window_start = at - at.rem_euclid(step);
        // Ids are unique per tenant: two tenants' jobs may use the same ids.
        let id = format!("{}\u{1f}{}", state.id, e.id);
        // Units still held for this event by an attempt whose write may have landed: reused,
        // not taken again (a retry is never refused for the units of its own first attempt).
        let events = self.units().events();
        let leases = self.units().leases();
        let held = events.take_held(&id).filter(|held| held.quantity == e.quantity);
        let charged = held.is_some();
        // `org_units`: what the work counts at its tenant's organization (what a reservation
        // held there is the work's already).
        let (state, meter, units, org_units) = match held {
            Some(held) => (state, meter, if held.units { EventUnits::Held } else { EventUnits::None }, e.quantity),
            _ => match events.take_reserved(&id) {
                // The units reserved for this work are the event's, for good: even if the event
                // turns out a duplicate (recorded on another node first, which charged it), they
                // are not given back, so a hard quota is never passed through reservations. Work
                // that took fewer gives the rest back; work that took more takes the rest anew,
                // as work done (past the limit if need be).
                Some(r)
                    if r.state.plan.meters.ids.get(r.meter) == Some(&e.meter)
                        && r.period == Self::period_of(&state, meter, at) =>
                {
                    // What it holds at the organization counts for the work only in the
                    // organization's period of the event (another anchor day than the
                    // tenant's may end a period between them): else it goes back, and the
                    // work counts there anew.
                    let org = Self::org_limiting(&state, meter).map(|o| self.gate().org_state(o));
                    let org_period = org.as_ref().and_then(|o| Some((&o.id, Self::period_of(o, meter, at)?)));
                    let org_held = r.holds_org_in(org_period);
                    if !org_held {
                        if let Some(org) = r.org_state() {
                            given_back.push((org.clone(), r.meter));
                        }
                        r.give_back_org(leases, self.units().prefetcher());
                    }
                    if e.quantity <= r.quantity || !r.took() {
                        let units = if r.took() { EventUnits::Held } else { EventUnits::None };
                        let org_units = match org_held {
                            true => e.quantity.saturating_sub(r.quantity),
                            false => e.quantity,
                        };
                        r.give_back_part(r.quantity.saturating_sub(e.quantity), leases, self.units().prefetcher());
                        if e.quantity < r.quantity {
                            given_back.extend(r.given_back_cells());
                        }
                        (state, meter, units, org_units)
                    } else {
                        let more = e.quantity - r.quantity;
                        let units = match self.take_for_event(rt, &state, meter, more, at, now, For::Work).await {
                            Ok(units) => units,
                            Err(err) => {
                                // Not recorded: the reservation is held again for the retry,
                                // which takes from it (its units never leave it meanwhile).
                                events.reopen_job(&r.state.id);
                                events.reserve(id, r);
                                return Err(err);
                            }
                        };
                        let org_units = if org_held { more } else { e.quantity };
                        r.keep();
                        (state, meter, units, org_units)
                    }
                }
                // A redelivery of an event this node saw stored: its units would be taken
                // and held for nothing, kept if its write's answer were lost (a retry
                // answers `Duplicate` either way).
                None if events.known_stored(&id) => return Ok(None),
                other => {
                    // Reserved for other work (another meter or period): given back, taken anew.
                    if let Some(r) = other {
                        r.give_back(leases, self.units().prefetcher());
                        given_back.extend(r.given_back_cells());
                    }
                    let units = self.take_for_event(rt, &state, meter, e.quantity, at, now, For::Work).await?;
                    (state, meter, units, e.quantity)
                }
            },
        };
        let record = UsageRecord::new(state.id.clone(), e.meter.clone(), window_start, e.quantity)
            .with_billable(self.units().pipeline().billable(rt, &state) && rt.config.exports_meter(&e.meter));
        // Its tenant's organization, when it limits the meter and the event falls in its
        // period in force (a period already over counts nothing, as at the tenant).
        let org = Self::org_limiting(&state, meter).and_then(|o| {
            let org = self.gate().org_state(o);
            let (start, end) = org.quota(meter)?.window(at);
            (start <= now && now < end).then_some((org, org_units))
        });
        Ok(Some(Prepared {
            org,
            index,
            state,
            meter,
            quantity: e.quantity,
            units,
            charged,
            taken_at: now,
            event: UsageEvent::new(id, record, at),
        }))
    }

    /// Checks an event (its id, quantity, time, meter) and finds its tenant: its state, the
    /// meter's index in the state's plan, and the event's time in Unix seconds.
    async fn check_event(&self, rt: &Runtime, e: &Event, now: i64) -> Result<(Tenant, usize, i64), EventError> {
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
        if rt.meters.has_dimensions(meter_index) {
            // Its units would miss its total and selectors, or its series (the bill).
            return Err(EventError::Malformed(format!(
                "the meter `{}` has dimensions, which usage events do not name: a handler records it \
                 (`TenantContext::record_with`)",
                e.meter
            )));
        }
        let step = Self::event_window(rt, e);
        if at - at.rem_euclid(step) < now.saturating_sub(MAX_AGE.as_secs() as i64) {
            return Err(EventError::TooOld { age_secs: now.saturating_sub(at).max(0) as u64 });
        }
        let state = self.known_tenant(&e.tenant).await?;
        // A state of another configuration (a reload meanwhile) indexes meters its own way.
        let meter = state.plan.meters.index(e.meter.as_str()).unwrap_or(meter_index);
        state.touch(now);
        Ok((state, meter, at))
    }

    /// The length of the window billing sends the event in: a pre-aggregated meter's hour or
    /// day, else `usage.window`.
    fn event_window(rt: &Runtime, e: &Event) -> i64 {
        let window = rt.config.usage.window.as_secs().max(1) as i64;
        let coarse = rt.config.meters.iter().find(|m| m.id == e.meter).and_then(|m| m.aggregation.window_secs());
        coarse.unwrap_or(window)
    }

    /// The organization of `state`'s tenant, when it limits `meter`.
    fn org_limiting(state: &Tenant, meter: usize) -> Option<&Arc<crate::plan::OrgLimits>> {
        state.plan.org.as_ref().filter(|o| meter < 64 && o.meters & (1 << meter) != 0)
    }

    /// The state of an event's tenant: never the anonymous tenant an unknown one would get.
    pub(crate) async fn known_tenant(&self, id: &TenantId) -> Result<Tenant, EventError> {
        if let Some(s) = self.gate().table().get(Lookup::Identity(id.as_str())) {
            if s.id == *id {
                return Ok(s);
            }
        }
        if let Ok(s) = self.gate().lookup(OwnedCredential::Tenant(id.clone()), 0).await {
            if s.id == *id {
                return Ok(s);
            }
        }
        // Unknown, or the directory did not answer: ask once more, to tell which.
        match self.shared().stores().request().directory.tenant(id).await {
            Ok(None) => Err(EventError::UnknownTenant(id.clone())),
            Ok(Some(_)) => Err(EventError::Store(StoreError::Backend("the tenant directory did not answer".into()))),
            Err(e) => Err(EventError::Store(e)),
        }
    }

    /// Takes an event's units from the quota of `meter`, if the event falls in the period in
    /// force: `Some(tag)` of the lease they came from. A period already over takes nothing.
    /// For work done, units the quota does not have are charged past the limit; for a
    /// reservation, they are refused.
    #[allow(clippy::too_many_arguments)]
    async fn take_for_event(
        &self,
        rt: &Runtime,
        state: &Tenant,
        meter: usize,
        quantity: u64,
        at: i64,
        now: i64,
        purpose: For,
    ) -> Result<EventUnits, EventError> {
        let Some(cell) = state.quota(meter) else {
            return Ok(EventUnits::None);
        };
        let period = cell.spec.period();
        // A prepaid balance has one counter whatever the event's time: it is spent now.
        let at = if cell.prepaid() { now } else { at };
        // A period already over never refuses (its counter is left alone).
        let (start, end) = cell.window(at);
        if quantity == 0 || end <= now {
            return Ok(EventUnits::None);
        }
        // Just ahead of the clock (within `events.max_skew`), in a period that has not begun:
        // its quota cannot be asked yet; a retry once it has begun applies it there.
        if start > now {
            return Err(EventError::PeriodNotStarted { starts_in_secs: (start - now) as u64 });
        }
        let exceeded = || match &state.plan.counts_for {
            Some(org) => EventError::OrgQuotaExceeded {
                org: org.clone(),
                meter: cell.meter_id().clone(),
                period: period.name(),
                limit: cell.limit(),
            },
            None => EventError::QuotaExceeded {
                meter: cell.meter_id().clone(),
                period: period.name(),
                limit: cell.limit(),
                plan: state.plan.id.clone(),
            },
        };
        // Work done that the quota cannot hold: charged past the limit (owed to the store,
        // which counts it at the next lease), the period stays spent.
        // (Counted once the event is applied: a duplicate gives them back.)
        let past_limit = || EventUnits::Taken { taken: Taken::force(state, meter, quantity, now), past_limit: true };
        let leased =
            |tag| EventUnits::Taken { taken: Taken::lease(state, meter, quantity, tag, now), past_limit: false };
        match cell.try_take(quantity, now) {
            Take::Taken { tag, .. } => return Ok(leased(tag)),
            Take::Exhausted if state.plan.shadow => {}
            Take::Exhausted if purpose == For::Work => return Ok(past_limit()),
            Take::Exhausted => return Err(exceeded()),
            Take::NeedLease => {}
        }
        let leases = self.units().leases();
        let taken = self
            .shared()
            .stores()
            .under_lock(cell.lock(), async {
                leases.settle_inflight(cell).await?;
                match cell.try_take(quantity, now) {
                    Take::Taken { tag, .. } => return Ok(Some(tag)),
                    Take::Exhausted => return Ok(None),
                    Take::NeedLease => {}
                }
                Ok(match leases.refill_locked(rt, cell, now, quantity, 0, true).await? {
                    Refill::Taken { tag, .. } => Some(tag),
                    Refill::Short | Refill::Done => None,
                })
            })
            .await;
        match taken {
            Ok(Some(tag)) => Ok(leased(tag)),
            Ok(None) if state.plan.shadow => {
                // Shadow mode: taken past the limit (owed to the store); a reservation's refusal
                // counted (work done is never refused).
                if purpose == For::Reserve {
                    self.gate().would_refuse(&Gate::shadow_quota(state, meter));
                }
                Ok(EventUnits::Taken { taken: Taken::force(state, meter, quantity, now), past_limit: false })
            }
            Ok(None) if purpose == For::Work => Ok(past_limit()),
            Ok(None) => Err(exceeded()),
            Err(e) => Err(EventError::Store(e)),
        }
    }
}

/// A job's hold opened for a reservation: closed when dropped before the reservation is made.
struct OpenedJob<'a>(Option<(&'a crate::engine::usage::events::EventRecorder, TenantId)>);

impl OpenedJob<'_> {
    fn reserve(mut self, id: String, reserved: Arc<Reserved>) {
        if let Some((events, _)) = self.0.take() {
            events.reserve(id, reserved);
        }
    }
}

impl Drop for OpenedJob<'_> {
    fn drop(&mut self) {
        if let Some((events, tenant)) = self.0.take() {
            events.close_job(&tenant);
        }
    }
}
