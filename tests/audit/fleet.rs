//! The audit's fleet: engines with their workers on one store behind faults, the Stripe
//! stand-in as their billing system and the source of their payments' webhooks, one clock.

use std::{
    collections::BTreeMap,
    mem::ManuallyDrop,
    sync::{
        atomic::{AtomicU64, Ordering::SeqCst},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use serde_json::{json, Value};
use tollgate::{
    billing::{RechargeCharger, Secret, StripeSink},
    clock::{Clock, FakeClock},
    config::Config,
    store::{FaultPlan, QuotaInspect, StoreInspect},
    Tollgate, TollgateLayer,
};

use crate::{
    common::{
        self, builder_on,
        stripe::{Card, StandIn},
        Harness, NodeStore, NOON,
    },
    ops::Who,
    plans::{LARGE_REQUESTS_LIMIT, LARGE_TOKENS_LIMIT},
};

/// The hard limits of `q`'s month.
pub(crate) const TOKENS_LIMIT: u64 = 3_000;
pub(crate) const REQUESTS_LIMIT: u64 = 90;
/// What a payment costs (cents): its units are bought with it.
pub(crate) const PAYMENT_AMOUNT: u64 = 1_000;
pub(crate) const WEBHOOK_SECRET: &str = "whsec_audit";
/// `b`'s auto-recharge: packs of 100 tokens at 5.00, below 300 up to 1,000, at most 50.00 a
/// month.
pub(crate) const PACK_UNITS: u64 = 100;
pub(crate) const PACK_CENTS: u64 = 500;
pub(crate) const RECHARGE_BELOW: u64 = 300;
pub(crate) const RECHARGE_MONTHLY_LIMIT: &str = "50.00";
pub(crate) const RECHARGE_MONTHLY_CENTS: u64 = 5_000;
/// `s`'s prices (nano-dollars): a request 0.01, a token 0.001; its plan's hard spend cap of
/// 1.00 a month, which it may set up to 3.00.
pub(crate) const REQUEST_NANOS: u64 = 10_000_000;
pub(crate) const TOKEN_NANOS: u64 = 1_000_000;
pub(crate) const PLAN_CAP_CENTS: u64 = 100;
/// Nano-dollars in a cent.
pub(crate) const CENT_NANOS: u64 = 10_000_000;

/// The fleet's configuration, exporting to the stand-in at `url`; its alerts (at 50% and 90%
/// of a limit, and at the limit) sent as `alerts` says, when a receiver runs.
pub(crate) fn config(url: &str, alerts: &str) -> String {
    format!(
        r#"
{alerts}
[usage]
store_timeout = "5s"
flush_interval = "10s"
shutdown_timeout = "8s"
notify_at = [50, 90]
[limits]
hold_timeout = "1h"
[export]
calls_per_second = 1000
[meters.requests]
event_name = "requests"
[meters.tokens]
event_name = "tokens"
[plans.quota]
quotas.requests = {{ limit = {REQUESTS_LIMIT}, period = "month", mode = "hard", lease = 8 }}
quotas.tokens = {{ limit = {TOKENS_LIMIT}, period = "month", mode = "hard", lease = 100 }}
[billing]
currency = "usd"
[plans.prepaid]
quotas.tokens = {{ period = "prepaid", lease = 100 }}
[plans.prepaid.recharge.tokens]
price = "price_pack"
below = {RECHARGE_BELOW}
to = 1000
monthly_limit = "{RECHARGE_MONTHLY_LIMIT}"
[plans.quota_large]
quotas.requests = {{ limit = {LARGE_REQUESTS_LIMIT}, period = "month", mode = "hard", lease = 8 }}
quotas.tokens = {{ limit = {LARGE_TOKENS_LIMIT}, period = "month", mode = "hard", lease = 100 }}
[plans.capped]
prices.requests = "0.01"
prices.tokens = "0.001"
spend = {{ limit = "1.00", period = "month", mode = "hard", max_limit = "3.00" }}
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.q]
plan = "quota"
keys = ["key-q"]
stripe_customer = "cus_q"
[tenants.b]
plan = "prepaid"
keys = ["key-b"]
stripe_customer = "cus_b"
[tenants.s]
plan = "capped"
keys = ["key-s"]
stripe_customer = "cus_s"
[stripe]
api_base = "{url}"
timeout = "1s"
plan_order = ["quota_large", "quota"]
[stripe.subscription_status]
past_due = "quota"
unpaid = "quota"
canceled = "quota"
paused = "quota"
incomplete = "ignore"
incomplete_expired = "quota"
[stripe.prices]
price_quota = "quota"
price_quota_large = "quota_large"
[stripe.credits]
meter = "tokens"
refunds = "proportional"
prices = {{ price_pack = {PACK_UNITS} }}
"#
    )
}

/// The fleet's configuration `toml` with quotas that lease less at a time (4 requests, 40
/// tokens), as a node's reload may bring during a rolling deploy.
pub(crate) fn small_leases(toml: &str) -> String {
    let small = toml.replace("lease = 8 }", "lease = 4 }").replace("lease = 100 }", "lease = 40 }");
    assert_ne!(small, toml, "the leases are named as config() writes them");
    small
}

/// Units served by one node, by tenant and meter.
pub(crate) type Served = BTreeMap<(Who, &'static str), u64>;

/// A request stuck in its handler: its node's generation, its tenant, its ticket and hold.
type StuckRequest = (usize, Who, Box<dyn Send>);

/// One engine of the fleet, its worker running until the node stops or is killed.
pub(crate) struct Node {
    pub(crate) h: Arc<Harness>,
    worker: tokio::task::AbortHandle,
}

/// What the driver counts of what it was served: per node, tenant and meter, the units
/// admitted and recorded (so a node killed has its share apart).
#[derive(Default)]
pub(crate) struct Tally {
    /// (node slot generation, tenant, meter) → units.
    units: Mutex<BTreeMap<(usize, Who, &'static str), u64>>,
    /// Generations of nodes killed.
    killed: Mutex<Vec<usize>>,
    /// Per node generation, its units as they were when its last two flushes that succeeded
    /// with no store call failing began (the older first): what the older had is in the store,
    /// committed and reported. (A flush whose reports did not all land still commits its
    /// usage: what the node used since its cells' last calls the store took may go back at its
    /// expiry, docs/architecture.md, "Stranded units".)
    flushed: Mutex<BTreeMap<usize, [Served; 2]>>,
    /// Changes of `d`'s plan or overrides asked for: each retires `d`'s state on every node
    /// that learns it, giving its lease back (one more cell that may hold a call in flight).
    d_changes: std::sync::atomic::AtomicU64,
}

impl Tally {
    /// A change of `d`'s plan or overrides was asked for.
    pub(crate) fn d_changed(&self) {
        self.d_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn add(&self, generation: usize, who: Who, meter: &'static str, units: u64) {
        if units > 0 {
            *self.units.lock().unwrap().entry((generation, who, meter)).or_default() += units;
        }
    }

    /// Units served to `who` on `meter`: (in all, on nodes killed after their last flush that
    /// succeeded: what a crash may lose, and have given back at its expiry).
    pub(crate) fn served(&self, who: Who, meter: &str) -> (u64, u64) {
        let killed = self.killed.lock().unwrap().clone();
        let units = self.units.lock().unwrap();
        let flushed = self.flushed.lock().unwrap();
        let mut all = 0;
        let mut dead = 0;
        for ((generation, w, m), n) in units.iter() {
            if *w == who && *m == meter {
                all += n;
                if killed.contains(generation) {
                    let before = flushed.get(generation).and_then(|[f, _]| f.get(&(who, *m))).copied().unwrap_or(0);
                    dead += n.saturating_sub(before);
                }
            }
        }
        (all, dead)
    }

    /// What `s` spent, in nano-dollars, as [`served`](Self::served) counts units: its
    /// requests and tokens at their prices (whole nano-dollars, so a hold's rounding is exact).
    pub(crate) fn spent(&self) -> (u64, u64) {
        let (requests, dead_requests) = self.served(Who::S, "requests");
        let (tokens, dead_tokens) = self.served(Who::S, "tokens");
        (requests * REQUEST_NANOS + tokens * TOKEN_NANOS, dead_requests * REQUEST_NANOS + dead_tokens * TOKEN_NANOS)
    }

    /// Units of `who`'s `meter` a killed node may leave counted used that nothing used, per
    /// node killed (docs/architecture.md, "Stranded units"), since the older of its last two
    /// flushes that succeeded with no store call failing (a report that failed or passed a
    /// busy cell is sent again by the next):
    /// - on requests, its requests answered 503 (whose refill may have landed unanswered), at
    ///   most one per cell it had (a cell has one call in flight: its first state's, and one
    ///   per state retired by a reload or a change of `d`), and those its requests gave back
    ///   (told to the store by the next flush; given back into a retired state's lease, by the
    ///   first flush after that state's last request ends: for a node with retired states,
    ///   every one);
    /// - on tokens, what its jobs answered 503 were to take (a hold's units are kept, not
    ///   taken), and what its jobs gave back that it could not tell the store at once
    ///   (`Stats::give_backs_untold`).
    pub(crate) fn unanswered_dead(&self, who: Who, meter: &str) -> u64 {
        let killed = self.killed.lock().unwrap().clone();
        let units = self.units.lock().unwrap();
        let flushed = self.flushed.lock().unwrap();
        let of = |g: usize, w: Who, m: &str| units.get(&(g, w, m)).copied().unwrap_or(0);
        let since = |g: usize, m: &'static str| {
            let before = flushed.get(&g).and_then(|[f, _]| f.get(&(who, m))).copied().unwrap_or(0);
            of(g, who, m).saturating_sub(before)
        };
        let changes = if who == Who::D { self.d_changes.load(std::sync::atomic::Ordering::Relaxed) } else { 0 };
        killed
            .iter()
            .map(|&g| match meter {
                "requests" => {
                    let retired = of(g, Who::Q, crate::driver::RELOADS) + changes;
                    let given_back = if retired > 0 {
                        of(g, who, crate::driver::GIVEN_BACK)
                    } else {
                        since(g, crate::driver::GIVEN_BACK)
                    };
                    since(g, crate::driver::UNANSWERED).min(1 + retired) + given_back
                }
                "tokens" => since(g, crate::driver::UNANSWERED_JOBS) + since(g, crate::driver::JOBS_GIVEN_BACK),
                _ => 0,
            })
            .sum()
    }

    /// What `generation`'s node was served so far, as a flush begins.
    pub(crate) fn snapshot(&self, generation: usize) -> Served {
        let units = self.units.lock().unwrap();
        units.iter().filter(|((g, _, _), _)| *g == generation).map(|((_, w, m), n)| ((*w, *m), *n)).collect()
    }

    /// `generation`'s flush that began at `snapshot` succeeded.
    pub(crate) fn flushed(&self, generation: usize, snapshot: Served) {
        let mut flushed = self.flushed.lock().unwrap();
        let pair = flushed.entry(generation).or_default();
        pair[0] = std::mem::replace(&mut pair[1], snapshot);
    }

    pub(crate) fn killed(&self, generation: usize) {
        self.killed.lock().unwrap().push(generation);
    }

    pub(crate) fn any_killed(&self) -> bool {
        !self.killed.lock().unwrap().is_empty()
    }
}

/// Requests stuck in their handlers (`Ending::Abandon`), by the generation of their node:
/// cancelled when it stops gracefully (as a server's grace period ends, before the engine's
/// shutdown), never ended when it is killed.
#[derive(Default)]
pub(crate) struct Stuck(Mutex<Vec<StuckRequest>>);

impl Stuck {
    pub(crate) fn push(&self, generation: usize, who: Who, request: Box<dyn Send>) {
        self.0.lock().unwrap().push((generation, who, request));
    }

    /// The requests stuck on `generation`'s node, taken out, each counted as a request served
    /// (billed as its ticket ends; lost with its node when it is killed).
    fn take(&self, generation: usize, tally: &Tally) -> Vec<Box<dyn Send>> {
        let mut all = self.0.lock().unwrap();
        let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(g, _, _)| *g == generation);
        *all = rest;
        mine.into_iter()
            .map(|(g, who, r)| {
                tally.add(g, who, "requests", 1);
                r
            })
            .collect()
    }
}

/// A webhook waiting to be delivered: its payload.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) payload: String,
}

/// What the driver knows of a payment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Payment {
    pub(crate) units: u64,
    /// The most refunded in all (cents) of the refunds sent.
    pub(crate) refunded: u64,
    /// Its dispute, once opened: won or lost.
    pub(crate) dispute: Option<bool>,
    /// Paid by an invoice whose line buys packs (credit notes apply to it), not a checkout.
    pub(crate) invoice: bool,
    /// Its post-payment credit notes to the customer's balance, in the order issued.
    pub(crate) notes: Vec<Note>,
}

/// A credit note of a payment's invoice, to the customer's balance.
#[derive(Debug, Clone)]
pub(crate) struct Note {
    pub(crate) id: String,
    pub(crate) cents: u64,
    pub(crate) voided: bool,
}

impl Payment {
    /// Cents its notes in force credit.
    pub(crate) fn noted(&self) -> u64 {
        self.notes.iter().filter(|n| !n.voided).map(|n| n.cents).sum()
    }
}

/// The stores an audit runs on: what the nodes use (behind faults), and what the auditor reads.
pub(crate) struct Stores {
    pub(crate) nodes: NodeStore,
    /// The quota role, read without faults.
    pub(crate) quota: Arc<dyn QuotaInspect>,
    /// The usage role (and the rest), read without faults.
    pub(crate) usage: Arc<dyn StoreInspect>,
    pub(crate) plan: Arc<FaultPlan>,
    /// Kept alive with the run (a directory of a SQLite file).
    pub(crate) _keep: Option<tempfile::TempDir>,
}

pub(crate) struct Fleet {
    pub(crate) toml: String,
    pub(crate) stores: Stores,
    pub(crate) clock: Clock,
    pub(crate) handle: FakeClock,
    pub(crate) stripe: StandIn,
    /// The live nodes by slot, and each slot's generation (a node killed is replaced).
    pub(crate) nodes: Vec<Option<Node>>,
    pub(crate) generations: Vec<usize>,
    next_generation: usize,
    /// Nodes killed: never dropped (nothing of theirs runs again, their state stays).
    dead: Vec<ManuallyDrop<Arc<Harness>>>,
    /// The requests stuck on nodes killed: never ended.
    dead_requests: Vec<ManuallyDrop<Box<dyn Send>>>,
    pub(crate) tally: Arc<Tally>,
    pub(crate) stuck: Arc<Stuck>,
    /// The worker passes the driver runs, by node generation: a node killed runs none again.
    pub(crate) passes: Mutex<Vec<(usize, tokio::task::AbortHandle)>>,
    pub(crate) queue: Vec<Delivery>,
    pub(crate) payments: BTreeMap<u16, Payment>,
    /// Webhooks answered 200 may be delivered again (while the operations run).
    pub(crate) redeliver: bool,
    /// The highest spend cap `s` asked for (cents; the plan's to begin with): the most that
    /// was ever in force (a cap set whose answer was lost may be in force).
    pub(crate) highest_cap: u64,
    pub(crate) events: AtomicU64,
    /// How far (seconds) each slot's host clock is off the fleet's time: within half the
    /// skew the fleet tolerates either way, so two nodes differ by at most that skew.
    pub(crate) skews: Vec<i64>,
    /// The plans (0: `quota`, 1: `quota_large`) and overrides (set or not) `d` may have been on:
    /// each change asked for may be in force (an answer lost).
    pub(crate) d_plans: std::collections::BTreeSet<u8>,
    pub(crate) d_overridden: std::collections::BTreeSet<bool>,
    /// A node was reloaded with plan `quota_large`'s limits raised.
    pub(crate) large_raised: bool,
    /// The receiver of the fleet's alerts (none where no Python with the Standard Webhooks
    /// library runs: outside CI), and the directory of its secret's file.
    pub(crate) alerts: Option<(common::alerts::Receiver, tempfile::TempDir)>,
}

impl Fleet {
    /// `nodes` engines on `stores`.
    /// `skews[slot]`: how far (seconds) the clock of the host in that slot is off.
    pub(crate) async fn start(stores: Stores, nodes: u8, skews: Vec<i64>) -> Self {
        let stripe = StandIn::start(&[("requests", None), ("tokens", None)]).await;
        let alerts = common::alerts::Receiver::start().map(|receiver| (receiver, common::alerts::secret_file()));
        let section = alerts.as_ref().map_or(String::new(), |(receiver, (_, secret))| {
            common::alerts::section(&receiver.url("/ops"), secret, "")
        });
        let alerts = alerts.map(|(receiver, (dir, _))| (receiver, dir));
        let toml = config(&stripe.url, &section);
        let (clock, handle) = Clock::fake_at_unix(NOON);
        stripe.set_now(NOON);
        stripe.add_price("price_pack", None, true);
        stripe.set_unit_amount("price_pack", i64::try_from(PACK_CENTS).unwrap());
        stripe.set_card(Who::B.customer(), Card::Pays);
        let mut fleet = Self {
            toml,
            stores,
            clock,
            handle,
            stripe,
            nodes: Vec::new(),
            generations: Vec::new(),
            next_generation: 0,
            dead: Vec::new(),
            dead_requests: Vec::new(),
            tally: Arc::default(),
            stuck: Arc::default(),
            passes: Mutex::default(),
            queue: Vec::new(),
            payments: BTreeMap::new(),
            redeliver: true,
            highest_cap: PLAN_CAP_CENTS,
            skews,
            d_plans: [0].into(),
            d_overridden: [false].into(),
            large_raised: false,
            events: AtomicU64::new(0),
            alerts,
        };
        // `d`: a tenant of the store's directory, on `quota` to begin with.
        let d = tollgate::store::TenantRecord::new(Who::D.id().into(), "quota".into()).with_customer(Who::D.customer());
        fleet
            .stores
            .usage
            .put_tenant(&d, &[tollgate::store::KeyHash::of(Who::D.key().as_bytes())])
            .await
            .expect("d in the directory");
        for slot in 0..usize::from(nodes) {
            let node = fleet.node_off(fleet.skews[slot]);
            fleet.generations.push(fleet.next_generation);
            fleet.next_generation += 1;
            fleet.nodes.push(Some(node));
        }
        // `b` recharges: through the stand-in's quota role, as a tenant's own setting is kept.
        let (h, _) = fleet.at(0);
        tollgate::admin::Admin::for_engine(&h.tollgate)
            .set_recharge("b", "tokens", Some(tollgate::money::RechargeAsk::default()))
            .await
            .expect("b's recharge on");
        fleet
    }

    /// A new engine on the fleet's stores, its worker running, on a clock that is right (the
    /// auditor's own nodes).
    pub(crate) fn node(&self) -> Node {
        self.node_off(0)
    }

    /// A new engine on the fleet's stores, its worker running, on a host whose clock is
    /// `off` seconds away from the fleet's time.
    pub(crate) fn node_off(&self, off: i64) -> Node {
        let config = Config::from_toml_str(&self.toml).expect("the audit's configuration");
        let sink =
            StripeSink::new(&Secret::new(common::stripe::SECRET), Some(&self.stripe.url), Duration::from_secs(1))
                .expect("a Stripe sink");
        let charger =
            RechargeCharger::new(&Secret::new(common::stripe::SECRET), Some(&self.stripe.url), Duration::from_secs(2))
                .expect("a recharge charger");
        let (engine, worker): (Tollgate, _) = builder_on(config, &self.stores.nodes)
            .clock(self.handle.clock_off_by(off))
            .billing_sink(sink)
            .recharge_charger(charger)
            .build();
        let worker = tokio::spawn(worker.run()).abort_handle();
        let h = Arc::new(Harness::from_layer(TollgateLayer::new(engine), self.handle.clone()));
        Node { h, worker }
    }

    /// The live nodes, with their generations.
    pub(crate) fn live(&self) -> Vec<(Arc<Harness>, usize)> {
        self.nodes.iter().zip(&self.generations).filter_map(|(n, g)| n.as_ref().map(|n| (n.h.clone(), *g))).collect()
    }

    pub(crate) fn at(&self, slot: u8) -> (Arc<Harness>, usize) {
        let slot = usize::from(slot) % self.nodes.len();
        let node = self.nodes[slot].as_ref().expect("a live node in every slot");
        (node.h.clone(), self.generations[slot])
    }

    /// Kills the node in `slot` (no shutdown: its worker stops, its state stays as it was) and
    /// starts another in its place.
    pub(crate) fn kill(&mut self, slot: u8) {
        let slot = usize::from(slot) % self.nodes.len();
        let node = self.nodes[slot].take().expect("a live node");
        node.worker.abort();
        // Nothing of it runs again: its passes in flight are cut where they are.
        let generation = self.generations[slot];
        self.passes.lock().unwrap().retain(|(g, pass)| {
            if *g == generation {
                pass.abort();
            }
            *g != generation
        });
        self.dead.push(ManuallyDrop::new(node.h));
        // Its requests stuck in their handlers never end.
        self.dead_requests.extend(self.stuck.take(generation, &self.tally).into_iter().map(ManuallyDrop::new));
        self.tally.killed(self.generations[slot]);
        self.nodes[slot] = Some(self.node_off(self.skews[slot]));
        self.generations[slot] = self.next_generation;
        self.next_generation += 1;
    }

    /// Shuts every live node down (flushed, leases given back), workers stopped.
    pub(crate) async fn shut_down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (slot, node) in self.nodes.iter_mut().enumerate() {
            let Some(node) = node.take() else { continue };
            drop(self.stuck.take(self.generations[slot], &self.tally));
            if let Err(e) = node.h.tollgate.shutdown().await {
                problems.push(format!("a node's shutdown lost usage: {e}"));
            }
            node.worker.abort();
        }
        problems
    }

    pub(crate) fn now(&self) -> i64 {
        self.clock.unix_secs()
    }

    pub(crate) fn advance(&self, secs: u64) {
        self.handle.advance(Duration::from_secs(secs));
        self.stripe.set_now(self.now());
    }

    // Payments: Stripe's example objects, as its webhooks carry them.

    pub(crate) fn event(&self, id: &str, kind: &str, object: Value) -> String {
        let mut e = fixtures()["event"].clone();
        e["id"] = json!(id);
        e["type"] = json!(kind);
        e["created"] = json!(self.now());
        e["data"] = json!({ "object": object });
        e.to_string()
    }

    pub(crate) fn next_event(&self) -> String {
        format!("evt_audit_{}", self.events.fetch_add(1, SeqCst))
    }

    /// A checkout paid for `units`: its completion queued `copies` times (one event
    /// redelivered), and its async payment's success once (another shape of the payment).
    pub(crate) fn pay(&mut self, payment: u16, units: u64, copies: u8) {
        let intent = intent(payment);
        let mut session = fixtures()["checkout.session"].clone();
        session["id"] = json!(format!("cs_audit_{payment}"));
        session["customer"] = json!(Who::B.customer());
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["amount_total"] = json!(PAYMENT_AMOUNT);
        session["invoice"] = json!(null);
        session["payment_intent"] = json!(intent);
        session["metadata"] = json!({ "tollgate_units": units.to_string() });
        let completed = self.event(&self.next_event(), "checkout.session.completed", session.clone());
        for _ in 0..copies {
            self.queue.push(Delivery { payload: completed.clone() });
        }
        let succeeded = self.event(&self.next_event(), "checkout.session.async_payment_succeeded", session);
        self.queue.push(Delivery { payload: succeeded });
        self.payments.insert(payment, Payment { units, ..Payment::default() });
    }

    /// `payment` refunded up to `percent` of its amount in all.
    pub(crate) fn refund(&mut self, payment: u16, percent: u8) {
        let refunded = PAYMENT_AMOUNT * u64::from(percent) / 100;
        // Stripe refuses to refund a disputed charge (API error code `charge_disputed`: "The
        // charge you're attempting to refund has been charged back").
        let Some(known) = self.payments.get_mut(&payment).filter(|p| p.dispute.is_none()) else { return };
        // What the refunds and the notes in force return stays within what was paid (Stripe:
        // "the sum of the credit note's amounts ... cannot exceed the invoice's amount paid").
        if refunded + known.noted() > PAYMENT_AMOUNT {
            return;
        }
        known.refunded = known.refunded.max(refunded);
        let mut c = fixtures()["charge"].clone();
        c["customer"] = json!(Who::B.customer());
        c["payment_intent"] = json!(intent(payment));
        c["amount"] = json!(PAYMENT_AMOUNT);
        c["amount_captured"] = json!(PAYMENT_AMOUNT);
        c["amount_refunded"] = json!(refunded);
        c["refunded"] = json!(refunded == PAYMENT_AMOUNT);
        let payload = self.event(&self.next_event(), "charge.refunded", c);
        self.queue.push(Delivery { payload });
    }

    /// `payment` disputed, once its grant landed (a dispute comes days after its payment): its
    /// funds withdrawn, then won (reinstated, closed won) or lost (closed lost), queued.
    pub(crate) async fn dispute(&mut self, payment: u16, won: bool) {
        let intent = intent(payment);
        let granted = self
            .stores
            .quota
            .credit_grants(&"b".into(), Some(&"tokens".into()))
            .await
            .is_ok_and(|(grants, _)| grants.iter().any(|g| g.payment.as_deref() == Some(intent.as_str())));
        let Some(known) = self.payments.get_mut(&payment).filter(|p| p.dispute.is_none() && granted) else { return };
        // A dispute is of what the charge still holds: its amount less what was refunded
        // (Stripe's "The Dispute object": `amount`, "disputed amount ... less than or equal to
        // the amount of the charge").
        let amount = PAYMENT_AMOUNT - known.refunded;
        if amount == 0 {
            return;
        }
        known.dispute = Some(won);
        let object = |status: &str| {
            let mut d = fixtures()["dispute"].clone();
            d["id"] = json!(format!("dp_audit_{payment}"));
            d["payment_intent"] = json!(intent);
            d["amount"] = json!(amount);
            d["status"] = json!(status);
            d
        };
        let mut events =
            vec![self.event(&self.next_event(), "charge.dispute.funds_withdrawn", object("needs_response"))];
        if won {
            events.push(self.event(&self.next_event(), "charge.dispute.funds_reinstated", object("won")));
            events.push(self.event(&self.next_event(), "charge.dispute.closed", object("won")));
        } else {
            events.push(self.event(&self.next_event(), "charge.dispute.closed", object("lost")));
        }
        self.queue.extend(events.into_iter().map(|payload| Delivery { payload }));
    }

    /// Delivers the `pick`-th queued webhook (modulo the queue) to a live node's handler,
    /// signed now. Answered 500 it stays queued (Stripe delivers it again); any other answer
    /// but 200 is a violation.
    pub(crate) async fn deliver(&mut self, pick: u16, slot: u8) -> Result<(), String> {
        self.take_emitted();
        if self.queue.is_empty() {
            return Ok(());
        }
        let i = usize::from(pick) % self.queue.len();
        let delivery = self.queue.remove(i);
        let (h, _) = self.at(slot);
        let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(WEBHOOK_SECRET)]).with_api_key(
            Secret::new(common::stripe::SECRET),
            Some(&self.stripe.url),
            Duration::from_secs(2),
        );
        let signature =
            stripe_webhook::Webhook::generate_test_header(&delivery.payload, WEBHOOK_SECRET, Some(self.now()));
        let reply = handler.handle(Some(&signature), delivery.payload.as_bytes()).await;
        if std::env::var_os("AUDIT_VERBOSE").is_some() {
            let kind = serde_json::from_str::<Value>(&delivery.payload).map(|e| e["type"].clone()).unwrap_or_default();
            eprintln!("webhook {kind} on slot {slot}: {} {:?}", reply.status(), reply.outcome);
        }
        match reply.status().as_u16() {
            // Stripe delivers at least once: some are delivered again, later, after a 200.
            200 if self.redeliver && pick.is_multiple_of(5) => {
                self.queue.push(delivery);
                Ok(())
            }
            200 => Ok(()),
            500 | 503 => {
                self.queue.push(delivery);
                Ok(())
            }
            s => Err(format!("a signed webhook answered {s}: {:?}", reply.outcome)),
        }
    }
}

impl Fleet {
    /// The events Stripe emitted since (recharges' invoices paid or failing), queued to be
    /// delivered.
    pub(crate) fn take_emitted(&mut self) {
        for event in self.stripe.take_emitted() {
            self.queue.push(Delivery { payload: event.to_string() });
        }
    }

    /// `s` sets its own spend cap to `cents` (0: lifts it) through the node in `slot`. Whatever
    /// the answer, the cap may be in force (an answer lost).
    pub(crate) async fn cap(&mut self, slot: u8, cents: u16) {
        let (h, _) = self.at(slot);
        let cents = u64::from(cents);
        self.highest_cap = self.highest_cap.max(cents);
        let limit = (cents > 0).then(|| format!("{}.{:02}", cents / 100, cents % 100));
        let _ = tollgate::admin::Admin::for_engine(&h.tollgate)
            .set_spend_cap(Who::S.id(), limit.as_deref(), tollgate::config::QuotaMode::Hard)
            .await;
    }

    /// `b`'s default payment method from now on.
    pub(crate) fn card(&self, card: u8) {
        let card = match card % 4 {
            0 => Card::Pays,
            1 => Card::Declined,
            2 => Card::RequiresAction,
            _ => Card::BankDebit,
        };
        self.stripe.set_card(Who::B.customer(), card);
    }

    /// A bank debit processing settles (the `pick`-th), or, with none, an invoice waiting for
    /// its customer's action is paid on its page.
    pub(crate) fn settle(&self, pick: u16, succeeds: bool) {
        let debits = self.stripe.processing_debits();
        if !debits.is_empty() {
            self.stripe.settle_debit(&debits[usize::from(pick) % debits.len()], succeeds);
            return;
        }
        if succeeds {
            let open: Vec<String> = self
                .stripe
                .invoices_created()
                .iter()
                .filter(|i| i["status"] == "open")
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect();
            if !open.is_empty() {
                // Listed open, it may be paid by a node's pass before this (no assertion).
                self.stripe.pay_on_page_if_open(&open[usize::from(pick) % open.len()]);
            }
        }
    }
}

pub(crate) fn intent(payment: u16) -> String {
    format!("pi_audit_{payment}")
}

pub(crate) fn fixtures() -> &'static Value {
    static FIXTURES: OnceLock<Value> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json"))
            .expect("Stripe's example objects");
        serde_json::from_str::<Value>(&text).expect("JSON")["resources"].clone()
    })
}
