//! A run of the audit: a sequence of operations sent to a fleet (requests four at a time, the
//! clock moving), then every node stopped or expired, and the ledger checked.

use std::{collections::BTreeMap, time::Duration};

use tollgate::{
    door::{Admission, Credential, RequestInfo},
    money::SPEND_METER,
    store::{Defect, FaultCounts, FaultPlan},
    Overrun, RejectionKind,
};

use crate::{
    common::{req, req_with, Harness},
    fleet::{Fleet, Stuck, Tally, PAYMENT_AMOUNT},
    ops::{Ending, Op, Who},
    stores::{self, Kind},
};

/// Requests in flight at once.
const IN_FLIGHT: usize = 4;

/// What a run found.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Each invariant broken, named.
    pub(crate) violations: Vec<String>,
    pub(crate) faults: FaultCounts,
    /// Requests answered, by status.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// The store was not there (outside CI).
    pub(crate) skipped: bool,
    /// How far (seconds) each node's host clock was off.
    pub(crate) skews: Vec<i64>,
}

impl Outcome {
    pub(crate) fn failed(&self, invariant: &str) -> bool {
        self.violations.iter().any(|v| v.starts_with(invariant))
    }
}

/// What one request op answers: its status (a refusal's), for the statuses' table.
type Answer = Result<u16, String>;

/// Runs `ops` on a new store of `kind` (its faults drawn from `seed`), `defect` planted.
pub(crate) async fn run(kind: Kind, seed: u64, ops: &[Op], defect: Option<Defect>) -> Outcome {
    let Some(stores) = stores::open(kind, seed).await else {
        return Outcome { skipped: true, ..Outcome::default() };
    };
    // Errors, lost answers and pauses each in 8% of calls, while on.
    stores.plan.set_rates(80, 80, 80);
    stores.plan.set_pause_max(Duration::from_millis(15));
    stores.plan.set_on(false);
    stores.plan.plant(defect);
    // As many nodes as the operations name (2 to 4, drawn from the seed).
    let nodes = ops.iter().filter_map(Op::node).max().map_or(2, |n| (n + 1).max(2));
    let skews = crate::ops::skews_of(seed, nodes);
    let mut fleet = Fleet::start(stores, nodes, skews.clone()).await;
    let mut outcome = Outcome { skews, ..Outcome::default() };
    let mut tasks: tokio::task::JoinSet<Answer> = tokio::task::JoinSet::new();
    let mut clock_tick = tokio::time::interval(Duration::from_millis(5));
    // A tick missed (a loaded machine) is not made up in a burst.
    clock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passes = tokio::task::JoinSet::new();
    let mut ticks = 0u64;
    for (n, op) in ops.iter().enumerate() {
        // Requests go four at a time; everything else waits its turn among them.
        while tasks.len() >= IN_FLIGHT {
            tokio::select! {
                done = tasks.join_next() => settle(&mut outcome, done),
                _ = clock_tick.tick() => tick(&fleet, &mut ticks, &mut passes),
            }
        }
        match op.clone() {
            Op::Plain { node, who } => {
                let (h, generation) = fleet.at(node);
                let tally = fleet.tally.clone();
                tasks.spawn(async move { plain(&h, generation, &tally, who).await });
            }
            Op::Keyed { node, who, key } => {
                let (h, generation) = fleet.at(node);
                let tally = fleet.tally.clone();
                tasks.spawn(async move { keyed(&h, generation, &tally, who, key).await });
            }
            Op::Held { node, who, estimate, actual, ending } => {
                let (h, generation) = fleet.at(node);
                let (tally, stuck) = (fleet.tally.clone(), fleet.stuck.clone());
                tasks.spawn(async move { held(&h, generation, &tally, &stuck, who, estimate, actual, ending).await });
            }
            Op::Job { node, who, job, units, actual, copies, late } => {
                let (h, generation) = fleet.at(node);
                // Its first redelivery reaches another node (a queue's other consumer).
                let (other, other_generation) = fleet.at(node.wrapping_add(1));
                let tally = fleet.tally.clone();
                let at = fleet.now() - i64::from(late);
                tasks.spawn(async move {
                    let work = Work { job, units, actual, copies, at };
                    self::job([(&h, generation), (&other, other_generation)], &tally, who, work).await
                });
            }
            Op::Pay { payment, units, copies } => fleet.pay(payment, units, copies),
            Op::Invoice { payment, bought, units, copies } => {
                fleet.pay_invoice(payment, crate::invoices::Bought::of(bought), units, copies);
            }
            Op::Note { payment, percent, void } => fleet.note(payment, percent, void),
            Op::Plan { node, to } => fleet.change_plan(node, to).await,
            Op::Subscription { to, copies } => fleet.subscribe(to, copies),
            Op::Refund { payment, percent } => fleet.refund(payment, percent),
            Op::Dispute { payment, won } => fleet.dispute(payment, won).await,
            Op::Deliver { pick } => {
                let slot = u8::try_from(n % usize::from(nodes)).unwrap();
                if let Err(e) = fleet.deliver(pick, slot).await {
                    outcome.violations.push(format!("webhooks: {e}"));
                }
            }
            Op::Kill { node } => {
                // Its requests end first (a request cut by a crash is Ending::Abandon's), the
                // clock moving meanwhile (a job retrying waits for it).
                while !tasks.is_empty() {
                    tokio::select! {
                        done = tasks.join_next() => settle(&mut outcome, done),
                        _ = clock_tick.tick() => tick(&fleet, &mut ticks, &mut passes),
                    }
                }
                fleet.kill(node);
            }
            Op::Reload { node, small, raised } => {
                let (h, generation) = fleet.at(node);
                // Each reload retires the node's states: one more cell that may hold a call.
                fleet.tally.add(generation, Who::Q, RELOADS, 1);
                let toml = if small { crate::fleet::small_leases(&fleet.toml) } else { fleet.toml.clone() };
                let toml = if raised {
                    fleet.large_raised = true;
                    crate::plans::raised_large(&toml)
                } else {
                    toml
                };
                let config = tollgate::config::Config::from_toml_str(&toml).unwrap();
                if let Err(e) = h.tollgate.reload(config).await {
                    outcome.violations.push(format!("reload: {e}"));
                }
            }
            Op::Advance { secs } => {
                fleet.advance(u64::from(secs));
                // What the workers did meanwhile, on the time it moved: a flush renews what each
                // node keeps, and a node whose reservation went unrenewed stops spending it.
                worker_passes(&fleet).await;
            }
            Op::Card { card } => fleet.card(card),
            Op::Settle { pick, succeeds } => fleet.settle(pick, succeeds),
            Op::Cap { node, cents } => fleet.cap(node, cents).await,
            Op::StoreFaults { on } => fleet.stores.plan.set_on(on),
            Op::StripeFaults { which, count } => {
                use crate::common::stripe::Fault;
                let fault = match which {
                    0 => Fault::Status(500),
                    1 => Fault::Drop,
                    _ => Fault::TakeAndHang,
                };
                fleet.stripe.fail_next(&vec![fault; usize::from(count)]);
            }
        }
    }
    while !tasks.is_empty() {
        tokio::select! {
            done = tasks.join_next() => settle(&mut outcome, done),
            _ = clock_tick.tick() => tick(&fleet, &mut ticks, &mut passes),
        }
    }
    while passes.join_next().await.is_some() {}
    outcome.faults = fleet.stores.plan.counts();
    fleet.stores.plan.set_on(false);
    crate::ledger::check(&mut fleet, &mut outcome).await;
    outcome
}

/// Never over, at a checkpoint once the nodes stopped, before the expiries: every unit `q` was
/// served is reserved in its counters (a node serves what a lease the store counts holds, and
/// owes what it recorded past one), and every nano-dollar `s` spent in its spend counter, but
/// for what a killed node served since its reports last landed. (Not during the run: units
/// recorded past a lease while the store did not answer are owed by the cell's next call that
/// lands.) Read from the store beneath the faults.
pub(crate) async fn checkpoint(fleet: &Fleet, at: &str, violations: &mut Vec<String>) {
    for (who, meter) in
        [(Who::Q, "requests"), (Who::Q, "tokens"), (Who::D, "requests"), (Who::D, "tokens"), (Who::S, SPEND_METER)]
    {
        let counters = match fleet.stores.quota.counters(&who.id().into(), &meter.into()).await {
            Ok(counters) => counters,
            Err(e) => {
                violations.push(format!("checkpoint: {}'s {meter} counters could not be read: {e}", who.id()));
                continue;
            }
        };
        let reserved: u64 = counters.iter().map(|c| c.reserved).sum();
        let (served, dead) = if who == Who::S { fleet.tally.spent() } else { fleet.tally.served(who, meter) };
        if served > reserved + dead {
            violations.push(format!(
                "never over: {at}, {} was served {served} {meter}; its counters reserve {reserved} \
                 ({dead} on nodes killed)",
                who.id()
            ));
        }
    }
}

/// The clock moves a second a tick; every flush interval (10 s) each live node runs its
/// worker's passes that go by the engine's clock, as its worker would on a clock that moves as
/// fast (the workers' own timers go by the machine's: at a second every 5 ms, a flush every
/// 10 s of the machine's time would renew a reservation once every 2,000 s of the clock's,
/// and a live node would find its reservation expired as only a node paused half an hour does).
fn tick(fleet: &Fleet, ticks: &mut u64, passes: &mut tokio::task::JoinSet<()>) {
    // The clock waits for the passes in flight: on a loaded machine (or a slow store) it never
    // runs ahead of the workers, as it does not in production, where both go by one time.
    while passes.try_join_next().is_some() {}
    if !passes.is_empty() {
        return;
    }
    fleet.advance(1);
    *ticks += 1;
    if ticks.is_multiple_of(10) {
        fleet.passes.lock().unwrap().retain(|(_, pass)| !pass.is_finished());
        for (node, generation) in fleet.live() {
            let (tally, plan) = (fleet.tally.clone(), fleet.stores.plan.clone());
            let pass = passes.spawn(async move { worker_pass(&node, generation, &tally, &plan).await });
            fleet.passes.lock().unwrap().push((generation, pass));
        }
    }
}

/// A node's passes that go by the engine's clock: a flush (what was served before it began is
/// in the store once it succeeds), and its stale leases stopped.
async fn worker_pass(node: &Harness, generation: usize, tally: &Tally, plan: &FaultPlan) {
    flush(node, generation, tally, plan).await;
    let _stopped = node.tollgate.stop_stale_leases();
}

/// One flush of `node`: whether it succeeded. One that succeeded while no store call failed
/// told the store what every cell keeps before it committed their usage; one during which
/// calls failed may have committed the usage of a cell whose report did not land (its call
/// kept in flight): a node killed after has that usage given back at its expiry, within what
/// the cell's last call that landed said it kept (docs/architecture.md, "Stranded units"),
/// so the tally counts it as not reported.
async fn flush(node: &Harness, generation: usize, tally: &Tally, plan: &FaultPlan) -> bool {
    let failed = |c: FaultCounts| c.errors + c.lost;
    let (before, faults) = (tally.snapshot(generation), failed(plan.counts()));
    let ok = node.tollgate.flush().await.is_ok();
    if ok && failed(plan.counts()) == faults {
        tally.flushed(generation, before);
    }
    ok
}

/// Each live node's passes that go by the engine's clock, awaited, after the clock moved on:
/// its worker would have flushed every 10 s of that time, so each node flushes until one
/// succeeds (at most 10 tries). A node whose flushes all fail for the 27 minutes to its
/// expiry is cut off from the store, a case of its own (docs/audit.md).
async fn worker_passes(fleet: &Fleet) {
    for (node, generation) in fleet.live() {
        for _ in 0..10 {
            if flush(&node, generation, &fleet.tally, &fleet.stores.plan).await {
                break;
            }
        }
        let _stopped = node.tollgate.stop_stale_leases();
    }
}

fn settle(outcome: &mut Outcome, done: Option<Result<Answer, tokio::task::JoinError>>) {
    match done {
        Some(Ok(Ok(status))) => *outcome.statuses.entry(status).or_default() += 1,
        Some(Ok(Err(e))) => outcome.violations.push(e),
        Some(Err(e)) => outcome.violations.push(format!("answers: a request panicked: {e}")),
        None => {}
    }
}

/// The tally's pseudo-meter of requests answered 503: among them those whose refill the
/// store applied and whose answer was lost. That refill counts the request's units used, and
/// a node killed before it sends the call again (its next flush does) leaves them so
/// (docs/architecture.md, "Stranded units"); [`Tally::unanswered_dead`] bounds them.
pub(crate) const UNANSWERED: &str = "unanswered";

/// The tally's pseudo-meter of the units of jobs whose reservation was answered with a
/// failure (503): as [`UNANSWERED`], a refill applied whose answer was lost counts the units
/// the job was to take used, and a node killed before it sends the call again leaves them so
/// (docs/architecture.md, "Stranded units"); [`Tally::unanswered_dead`] bounds them.
pub(crate) const UNANSWERED_JOBS: &str = "unanswered jobs";

/// The tally's pseudo-meter of requests whose units were given back (a hold refused after
/// the request was admitted, a service failing): back in the lease, they are counted used by
/// the store until the cell's next report, and a node killed before it leaves them so
/// (docs/architecture.md, "Stranded units"); [`Tally::unanswered_dead`] bounds them.
pub(crate) const GIVEN_BACK: &str = "given back";

/// The tally's pseudo-meter of units jobs gave back (their work recorded fewer, or released):
/// told to the store at once, after the write, but a report that fails is in flight until
/// the cell's next call, and a node killed before it leaves them spent (docs/events.md);
/// [`Tally::unanswered_dead`] bounds them.
pub(crate) const JOBS_GIVEN_BACK: &str = "jobs given back";

/// The tally's pseudo-meter of reloads of a node: each retires its states, whose cells may
/// hold a call in flight of their own.
pub(crate) const RELOADS: &str = "reloads";

/// A status a request may be answered with whatever happens: served, refused by a limit, the
/// store failing closed, a key in flight elsewhere.
fn expected(status: u16) -> Result<u16, String> {
    match status {
        200 | 201 | 402 | 409 | 429 | 503 => Ok(status),
        s => Err(format!("answers: a request answered {s}")),
    }
}

async fn plain(h: &Harness, generation: usize, tally: &Tally, who: Who) -> Answer {
    let reply = h.send(req("GET", "/items", Some(who.key()), None)).await;
    let status = reply.status.as_u16();
    match status {
        200 => tally.add(generation, who, "requests", 1),
        503 => tally.add(generation, who, UNANSWERED, 1),
        _ => {}
    }
    expected(status)
}

async fn keyed(h: &Harness, generation: usize, tally: &Tally, who: Who, key: u16) -> Answer {
    // Keys are the tenant's own: the same key sent again is the same request (the same body).
    let key = format!("audit-{}-{key}", who.id());
    let body: &'static [u8] = match who {
        Who::Q => b"q",
        Who::B => b"b",
        Who::S => b"s",
        Who::D => b"d",
    };
    let reply = h.send(req_with("POST", "/echo", who.key(), &key, body)).await;
    let status = reply.status.as_u16();
    if status == 201 {
        // A first answer runs the handler (a call number never seen); a replay answers that
        // number again, and is not charged.
        let call: u64 = reply.header("x-call").and_then(|c| c.parse().ok()).unwrap_or(0);
        if crate::first_call(call) {
            tally.add(generation, who, "requests", 1);
        }
    }
    if status == 503 {
        tally.add(generation, who, UNANSWERED, 1);
    }
    expected(status)
}

#[allow(clippy::too_many_arguments)]
async fn held(
    h: &Harness,
    generation: usize,
    tally: &Tally,
    stuck: &Stuck,
    who: Who,
    estimate: u64,
    actual: u64,
    ending: Ending,
) -> Answer {
    let info = RequestInfo::new("POST", "/generate", Credential::ApiKey(who.key().as_bytes()));
    let refused = |r: &tollgate::Rejection| {
        if r.kind() == RejectionKind::StoreUnavailable {
            tally.add(generation, who, UNANSWERED, 1);
        }
        refusal(r)
    };
    let mut ticket = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => match h.tollgate.resolve(p).await {
            Ok(t) => t,
            Err(r) => return refused(&r),
        },
        Admission::Rejected(r) => return refused(&r),
    };
    // Handed to its handler, as the layer does: cut off from now on, it is billed.
    ticket.service_called();
    let ctx = ticket.context();
    let mut hold = match ctx.hold_with("tokens", estimate, Overrun::Refuse).await {
        Ok(hold) => hold,
        Err(r) => {
            ticket.give_back();
            tally.add(generation, who, GIVEN_BACK, 1);
            return refusal(&r);
        }
    };
    // Admitted: the request is charged unless given back.
    let record = |hold: &mut tollgate::Hold, units: u64| -> u64 {
        if hold.record(units).is_ok() {
            tally.add(generation, who, "tokens", units);
            units
        } else {
            0
        }
    };
    match ending {
        Ending::Fail => {
            drop(hold);
            ticket.give_back();
            tally.add(generation, who, GIVEN_BACK, 1);
            return Ok(200);
        }
        Ending::Settle => {
            if record(&mut hold, actual) == 0 && actual > 0 {
                // Past what it holds and the lease: extended if the limit allows, else what
                // it held is all it records.
                if hold.extend(actual.saturating_sub(estimate)).await.is_ok() {
                    record(&mut hold, actual);
                } else {
                    record(&mut hold, estimate);
                }
            }
        }
        Ending::Stream { chunks } => {
            let chunk = (actual / u64::from(chunks)).max(1);
            for _ in 0..chunks {
                if record(&mut hold, chunk) == 0 {
                    if hold.extend(chunk).await.is_err() {
                        break;
                    }
                    record(&mut hold, chunk);
                }
                tokio::task::yield_now().await;
            }
        }
        Ending::Cut => {
            record(&mut hold, actual.min(estimate) / 2);
            drop(hold);
            drop(ticket);
            // Counted once its ticket has ended, its request billed: a flush that begins before
            // then does not hold it, and must not count it flushed.
            tally.add(generation, who, "requests", 1);
            return Ok(200);
        }
        Ending::Abandon => {
            // Its request is billed when its ticket ends: counted then (its node stopped), or
            // as lost with its node (killed).
            record(&mut hold, actual.min(estimate) / 2);
            stuck.push(generation, who, Box::new((ticket, hold)));
            return Ok(200);
        }
    }
    hold.settle();
    ticket.complete(200);
    // Counted once its ticket has ended (as above).
    tally.add(generation, who, "requests", 1);
    Ok(200)
}

/// A job's work, as [`Op::Job`] draws it; `at` its time.
struct Work {
    job: u16,
    units: u64,
    actual: u64,
    copies: u8,
    at: i64,
}

/// The tally's pseudo-meter of units a redelivery through another node may keep: its write
/// failed or went unanswered and its retry answered `Duplicate`, so its units stay held as
/// those of a write that may have landed (docs/events.md, "A store failure").
pub(crate) const KEPT_BY_REDELIVERY: &str = "kept by redelivery";

/// A job on `nodes[0]`: its units reserved, then its event recorded (retried while the store
/// fails, as a queue redelivers a message not acknowledged, and delivered again `copies`
/// times: the first time to `nodes[1]`, another consumer), or its work abandoned and
/// released. Answers as a request would: 200 recorded, 402 refused, 503 the reservation's
/// store call failed.
async fn job(nodes: [(&Harness, usize); 2], tally: &Tally, who: Who, work: Work) -> Answer {
    use tollgate::events::{Event, EventError};
    let at = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(work.at).unwrap());
    let mut event = Event::new(format!("job-{}", work.job), who.id().into(), "tokens".into(), work.units, at);
    let (h, generation) = nodes[0];
    // Units given back to a lease that the node could not tell the store at once (its report
    // failed, or the cell was busy): counted used until told, as a node killed first leaves
    // them. Told, they are not allowed for.
    let untold = |h: &Harness| h.tollgate.stats().give_backs_untold;
    match h.tollgate.reserve_event(&event, Duration::from_secs(86_400)).await {
        Ok(()) => {}
        Err(EventError::QuotaExceeded { .. }) => return Ok(402),
        Err(e) if e.is_retryable() => {
            tally.add(generation, who, UNANSWERED_JOBS, work.units);
            return Ok(503);
        }
        Err(e) => return Err(format!("answers: a job's reservation refused: {e}")),
    }
    if work.actual == 0 {
        let before = untold(h);
        if !h.tollgate.release_event(&event).await {
            return Err("answers: a job's reservation was not there to release".to_owned());
        }
        if untold(h) > before {
            tally.add(generation, who, JOBS_GIVEN_BACK, work.units);
        }
        return Ok(200);
    }
    event.quantity = work.actual;
    let mut recorded = false;
    for copy in 0..1 + u32::from(work.copies) {
        let (h, on) = if copy == 1 { nodes[1] } else { nodes[0] };
        let before = untold(h);
        let (mut tries, started) = (0, std::time::Instant::now());
        let outcome = loop {
            tries += 1;
            match h.tollgate.record_event(event.clone()).await {
                Ok(outcome) => {
                    if copy == 1 && tries > 1 && outcome == tollgate::store::EventOutcome::Duplicate {
                        tally.add(generation, who, KEPT_BY_REDELIVERY, work.actual);
                    }
                    break outcome;
                }
                // A queue redelivers a message not acknowledged after a while: here after the
                // clock's next tick (a second of it), so that a node failing fast after a run of
                // store errors (for a moment of the engine's clock) is asked again after it.
                // Not a race: it ends only when the event is recorded, or a minute went by.
                Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    return Err(format!("answers: job-{}'s event was refused after {tries} tries: {e}", work.job))
                }
            }
        };
        if untold(h) > before {
            // What went back untold: the reservation's rest (the first record), or what a
            // duplicate took.
            let units = if copy == 0 { work.units.saturating_sub(work.actual) } else { work.actual };
            if outcome == tollgate::store::EventOutcome::Duplicate || copy == 0 {
                tally.add(on, who, JOBS_GIVEN_BACK, units);
            }
        }
        // Stored once (applied, or a duplicate of a write whose answer was lost): its units
        // are served once, however often it is delivered.
        if !recorded {
            tally.add(generation, who, "tokens", work.actual);
            recorded = true;
        }
    }
    if std::env::var_os("AUDIT_VERBOSE").is_some() {
        eprintln!("job-{}: {} of {} recorded, {} copies", work.job, work.actual, work.units, work.copies);
    }
    Ok(200)
}

fn refusal(r: &tollgate::Rejection) -> Answer {
    match r.kind() {
        RejectionKind::QuotaExceeded
        | RejectionKind::CreditsExhausted
        | RejectionKind::UnitsHeld
        | RejectionKind::TenantBusy
        | RejectionKind::HoldExceedsLimit
        | RejectionKind::SpendCapReached
        | RejectionKind::StoreUnavailable => Ok(r.status_code()),
        other => Err(format!("answers: a request refused {other:?}: {r}")),
    }
}

/// The payment id a grant of payment `n` carries.
pub(crate) fn payment_of(grant_payment: Option<&str>) -> Option<u16> {
    grant_payment?.strip_prefix("pi_audit_")?.parse().ok()
}

/// Units a refund of `refunded` cents of a payment of `units` takes back at most (proportional).
pub(crate) fn refund_share(units: u64, refunded: u64) -> u64 {
    (units * refunded).div_ceil(PAYMENT_AMOUNT)
}
