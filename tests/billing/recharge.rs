//! Auto-recharge (issue 55) end to end against the Stripe stand-in: a balance crossing the
//! tenant's `below` claims one recharge in the store, the node's worker charges it (an invoice
//! of the credit price's packs, finalized and paid at once), and `invoice.paid` grants it
//! through the top-up path, once. Deliveries are driven by the test
//! (`Tollgate::deliver_recharges`), the clock is the engine's fake one.
#![cfg(feature = "stripe")]

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{
    stripe::{Card, StandIn, SECRET as API_KEY},
    Harness, NOON,
};
use tollgate::{
    admin::Admin,
    billing::{RechargeCharger, Secret, WebhookHandler, WebhookOutcome},
    config::Config,
    money::RechargeAsk,
    store::{KeyHash, KeyScope, KeyScopes, MemoryStore, SqliteStore, Store, TenantRecord},
    Tollgate,
};

const SECRET: &str = "whsec_recharge";

use common::recharge::CONFIG;

pub(crate) struct Setup {
    pub(crate) h: Harness,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) handler: WebhookHandler,
    pub(crate) stripe: StandIn,
    /// Every event delivered to the handler so far.
    pub(crate) sent: std::sync::Mutex<Vec<serde_json::Value>>,
    /// The alerts' receiver (the operator's endpoint `/ops`, the tenant's `/tenant`), verifying
    /// each delivery with the official Standard Webhooks library; `None` only outside CI
    /// without its Python (skipped loudly).
    #[cfg(feature = "alerts")]
    pub(crate) receiver: Option<(common::alerts::Receiver, tempfile::TempDir)>,
}

/// An engine on `store` under the configuration `toml`, charging through the stand-in, on a
/// fake clock at noon; the webhook handler of its node, reading with the stand-in's key.
fn engine(toml: &str, store: &Arc<dyn Store>, stripe: &StandIn) -> (Harness, WebhookHandler) {
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let charger = RechargeCharger::new(&Secret::new(API_KEY), Some(&stripe.url), Duration::from_secs(5)).unwrap();
    let config = Config::from_toml_str(toml).unwrap();
    let (engine, _worker) =
        Tollgate::builder(config).store_arc(store.clone()).clock(clock).recharge_charger(charger).build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine), handle);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]).with_api_key(
        Secret::new(API_KEY),
        Some(&stripe.url),
        Duration::from_secs(5),
    );
    (h, handler)
}

pub(crate) async fn setup(store: Arc<dyn Store>) -> Setup {
    let acme = TenantRecord::new("acme".into(), "payg".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let stripe = StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 500);
    stripe.set_card("cus_acme", Card::Pays);
    #[cfg_attr(not(feature = "alerts"), allow(unused_mut))]
    let mut toml = CONFIG.to_owned();
    // Alerts to the operator's endpoint, and to the tenant's own (its plan allows them).
    #[cfg(feature = "alerts")]
    let receiver = common::alerts::Receiver::start().map(|r| {
        let (dir, secret) = common::alerts::secret_file();
        toml = toml.replace("[plans.payg]\n", "[plans.payg]\ntenant_alerts = true\n");
        toml = toml.replace("[plans.pro]\n", "[plans.pro]\ntenant_alerts = true\n");
        toml.push_str(&common::alerts::section(&r.url("/ops"), &secret, "allow_private = [\"127.0.0.1/32\"]"));
        (r, dir)
    });
    let (h, handler) = engine(&toml, &store, &stripe);
    #[cfg(feature = "alerts")]
    if let Some((r, _)) = &receiver {
        let admin = Admin::for_engine(&h.tollgate);
        let secret = admin.set_alert_endpoint("acme", Some(&r.url("/tenant"))).await.unwrap().unwrap();
        r.add_secret(&secret).await;
    }
    Setup {
        h,
        store,
        handler,
        stripe,
        sent: std::sync::Mutex::default(),
        #[cfg(feature = "alerts")]
        receiver,
    }
}

impl Setup {
    pub(crate) async fn signed(&self, payload: &str) -> (u16, WebhookOutcome) {
        // Signed now, by the engine's clock (the handler's).
        let now = self.h.clock.unix_secs();
        let signature = stripe_webhook::Webhook::generate_test_header(payload, SECRET, Some(now));
        let reply = self.handler.handle(Some(&signature), payload.as_bytes()).await;
        (reply.status().as_u16(), reply.outcome)
    }

    /// How many of `n` requests acme gets through now.
    pub(crate) async fn admitted(&self, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            match self.h.status("/", "key-acme").await {
                200 => ok += 1,
                402 => {}
                s => panic!("status {s}"),
            }
        }
        ok
    }

    /// Delivers every event the stand-in emitted to the webhook handler: their outcomes.
    pub(crate) async fn deliver_events(&self) -> Vec<(String, WebhookOutcome)> {
        let mut out = Vec::new();
        for e in self.stripe.take_emitted() {
            let (code, outcome) = self.signed(&e.to_string()).await;
            assert_eq!(code, 200, "{}: {outcome:?}", e["type"]);
            out.push((e["type"].as_str().unwrap().to_owned(), outcome));
            self.sent.lock().unwrap().push(e);
        }
        out
    }

    /// Requests until one is refused (at most 200): the refusal (402).
    pub(crate) async fn until_refused(&self) -> common::Reply {
        for _ in 0..200 {
            let reply = self.h.get("/", "key-acme").await;
            if reply.status == 402 {
                return reply;
            }
        }
        panic!("the balance never ran out");
    }

    /// The recharge alerts of type `kind` the receiver got once the node wrote and delivered
    /// what it saw: each verified by the Standard Webhooks library and valid by the schema, as
    /// (path, body's data). `None`: no receiver (skipped loudly).
    #[cfg(feature = "alerts")]
    pub(crate) async fn alerts(&self, kind: &str) -> Option<Vec<(String, serde_json::Value)>> {
        let (receiver, _) = self.receiver.as_ref()?;
        for _ in 0..10 {
            self.h.tollgate.flush().await.unwrap();
            let report = self.h.tollgate.deliver_alerts().await;
            if report.retried == 0 {
                break;
            }
            // A delivery that failed (its time limit passed on a loaded machine) is due again
            // after its backoff, 5 s give or take a fifth, on the engine's clock: awaited, not
            // raced.
            self.h.clock.advance(Duration::from_secs(7));
        }
        let got = receiver.received().await;
        // A delivery answered after its time limit was received and is sent again: a receiver
        // keeps one per id (Standard Webhooks' `webhook-id`), as a receiver should.
        let mut seen = std::collections::HashSet::new();
        Some(
            got.iter()
                .filter(|d| d.kind.as_deref() == Some(kind))
                .filter(|d| seen.insert((d.path.clone(), d.id.clone())))
                .map(|d| {
                    assert!(d.verified && d.valid, "{d:?}");
                    (d.path.clone(), d.data.clone())
                })
                .collect(),
        )
    }

    pub(crate) async fn granted(&self) -> u64 {
        let (_, balances) = Admin::new(self.store.clone()).credits("acme").await.unwrap();
        balances.into_iter().map(|(_, b)| b.granted).sum()
    }
}

macro_rules! on_stores {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn memory() {
                super::$test(super::setup(std::sync::Arc::new(super::MemoryStore::new())).await).await;
            }
            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
                super::$test(super::setup(std::sync::Arc::new(store)).await).await;
            }
            #[tokio::test]
            async fn postgres() {
                #[cfg(feature = "postgres")]
                if let Some((store, _)) = crate::common::postgres::store().await {
                    super::$test(super::setup(std::sync::Arc::new(store)).await).await;
                }
                #[cfg(not(feature = "postgres"))]
                assert!(std::env::var_os("CI").is_none(), "CI runs the billing tests with the postgres feature");
            }
        }
    };
}

pub(crate) use on_stores;

on_stores!(a_crossing_is_charged_once_and_granted_when_paid);
async fn a_crossing_is_charged_once_and_granted_when_paid(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    // Off until the tenant turns it on: nothing is claimed however low the balance goes.
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.off_reason(), Some("not_turned_on"));
    let view = admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    let own = view.state.setting.expect("on");
    assert_eq!((own.below, own.to, own.monthly_limit, own.pack.units, own.pack.amount), (300, 1000, 5000, 100, 500));
    // Spending: each refill watches the balance; the one that leaves it below 300 claims.
    assert_eq!(s.admitted(150).await, 150);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "3xx left: nothing claimed yet");
    assert!(s.stripe.invoices_created().is_empty());
    assert_eq!(s.admitted(200).await, 200);
    let view = admin.recharge("acme", "requests").await.unwrap();
    let open = view.state.open.expect("a recharge is open");
    assert_eq!(open.n, 1);
    assert!((7..=10).contains(&open.packs), "{} packs", open.packs);
    // The tenant's usage report shows it: on, the one open, the month's spending.
    let report = s.h.tollgate.usage_report(&"acme".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let [recharge] = report.recharges.as_slice() else { panic!("{:?}", report.recharges) };
    assert_eq!((recharge.meter.as_str(), recharge.off_reason(), recharge.state.open), ("requests", None, Some(open)));
    assert_eq!((recharge.month_count, recharge.month_spent), (1, open.packs * 500));
    // And its own usage route: the recharge on, the one open, valid against the schema.
    let request = http::Request::get("/v1/usage").header("x-api-key", "key-acme").body(()).unwrap();
    let usage = s.h.tollgate.tenant_usage(&request).await;
    assert_eq!(usage.status(), 200, "{:?}", usage.body());
    let body: serde_json::Value = serde_json::from_slice(usage.body()).unwrap();
    let balance = body["balances"].as_array().unwrap().iter().find(|b| b["meter"] == "requests").unwrap();
    assert_eq!((&balance["recharge"]["on"], &balance["recharge"]["open"]["n"]), (&true.into(), &1.into()), "{body}");
    assert_eq!(balance["recharge"]["month"]["recharges"], 1);
    common::check_usage_schema(&[usage.body().clone()]);
    // Before it is charged, the balance runs out: 402, to come back in a few seconds.
    let refused = s.until_refused().await;
    assert_eq!(refused.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("5"));
    assert!(String::from_utf8_lossy(&refused.body).contains("recharge 1 is under way"), "{:?}", refused.body);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "delivered once");
    let invoices = s.stripe.invoices_created();
    assert_eq!(invoices.len(), 1, "one invoice");
    let invoice = &invoices[0];
    assert_eq!(invoice["status"], "paid");
    assert_eq!(invoice["collection_method"], "charge_automatically");
    assert_eq!(invoice["metadata"]["tollgate_recharge"], "1");
    assert_eq!(invoice["metadata"]["tollgate_tenant"], "acme");
    assert_eq!(invoice["amount_paid"], serde_json::json!(open.packs * 500));
    // Not granted before Stripe says paid: the webhook grants it, once.
    assert_eq!(s.granted().await, 500);
    let outcomes = s.deliver_events().await;
    let credited: Vec<_> = outcomes.iter().filter(|(_, o)| matches!(o, WebhookOutcome::Credited { .. })).collect();
    assert_eq!(credited.len(), 1, "{outcomes:?}");
    assert_eq!(credited[0].0, "invoice.paid");
    assert_eq!(s.granted().await, 500 + open.packs * 100);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.open, view.state.n, view.month_count, view.month_spent), (None, 1, 1, open.packs * 500));
    // `invoice.paid` delivered again: granted once, closed once.
    let paid = s.sent.lock().unwrap().iter().find(|e| e["type"] == "invoice.paid").cloned().unwrap();
    assert_eq!(s.signed(&paid.to_string()).await.1, WebhookOutcome::Duplicate);
    assert_eq!(s.granted().await, 500 + open.packs * 100);
    let stats = s.h.tollgate.stats();
    let counted = (stats.recharges_claimed, stats.recharges_charged, stats.recharges_paid, stats.recharges_failed);
    assert_eq!(counted, (1, 1, 1, 0), "claimed, charged, paid once");
    // One `balance.recharged`, to the operator's endpoint and the tenant's.
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharged").await {
        let mut paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/ops", "/tenant"], "{got:?}");
        let data = &got[0].1;
        assert_eq!((data["tenant"].as_str(), data["recharge"].as_u64()), (Some("acme"), Some(1)));
        let amount = format!("{}.00", open.packs * 5);
        assert_eq!((data["amount_paid"].as_str(), data["currency"].as_str()), (Some(amount.as_str()), Some("usd")));
        assert_eq!(s.alerts("balance.recharged").await.unwrap().len(), 2, "written and delivered once");
    }
    // Served again at once on this node (its next refill finds the grant), above 300 again.
    assert_eq!(s.admitted(300).await, 300);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "above 300 again");
}

// The audit found it (issue 87), shrunk to five operations: a recharge charged and paid whose
// `invoice.paid` is late (Stripe retries a failed delivery for days), the balance topped up
// meanwhile. Past the claim's 10 minutes, a refill that no longer needed it dropped it unpaid
// and gave its amount back to the month: the next crossing claimed and charged a second
// recharge, and once `invoice.paid` came the month had charged 90.00 of its 50.00. A lapsed
// claim no longer wanted now stays open and counted; wanted again, it is taken again under its
// keys, and its delivery finds it paid: one invoice, charged once.
on_stores!(a_paid_recharge_whose_invoice_paid_is_late_keeps_its_place_in_the_month);
async fn a_paid_recharge_whose_invoice_paid_is_late_keeps_its_place_in_the_month(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1, "claimed below 300, charged");
    let invoices = s.stripe.invoices_created();
    let [first] = invoices.as_slice() else { panic!("{invoices:?}") };
    assert_eq!(first["status"], "paid");
    let amount = first["amount_paid"].as_u64().unwrap();
    // Its `invoice.paid` is late; a top-up by hand lifts the balance above 300 meanwhile.
    let late = s.stripe.take_emitted();
    admin.grant_credits("acme", "requests", 500, None, "by-hand").await.unwrap();
    // Past the claim's 10 minutes: the refills that watch the balance no longer need it.
    s.h.clock.advance(Duration::from_secs(601));
    assert_eq!(s.admitted(50).await, 50);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.month_spent, amount, "still counted in its month: it was paid");
    // Spent below 300 again: the same recharge is taken again, and found paid.
    assert_eq!(s.admitted(400).await, 400);
    s.h.tollgate.deliver_recharges().await;
    assert_eq!(s.stripe.invoices_created().len(), 1, "one invoice: never a second recharge for it");
    assert_eq!(s.stripe.pays(), 1, "paid once");
    // `invoice.paid` comes at last: granted once, the month counts it once.
    for e in late {
        let (code, outcome) = s.signed(&e.to_string()).await;
        assert_eq!(code, 200, "{}: {outcome:?}", e["type"]);
    }
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.open, view.month_count, view.month_spent), (None, 1, amount));
    let charged: u64 = s
        .stripe
        .invoices_created()
        .iter()
        .filter(|i| i["status"] == "paid")
        .map(|i| i["amount_paid"].as_u64().unwrap())
        .sum();
    assert!(charged <= 5000, "the month's limit holds: {charged} cents");
}

// A declined card three times in a row: no grant, recharge off (why: declined), each failure
// counted once whether the worker's pay call or `invoice.payment_failed` says it first; the
// balance then runs out with a plain 402 (no recharge under way). Turning it on again is an
// explicit call, which clears the failures.
on_stores!(three_declines_in_a_row_turn_recharge_off);
async fn three_declines_in_a_row_turn_recharge_off(s: Setup) {
    s.stripe.set_card("cus_acme", Card::Declined);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    for k in 1..=3u64 {
        assert_eq!(s.h.tollgate.deliver_recharges().await, 1, "recharge {k} delivered");
        // The webhook comes a second later: the third failure's alert is told twice (the
        // worker wrote it, the webhook writes it again, with another time): one alert.
        s.h.clock.advance(Duration::from_secs(1));
        let outcomes = s.deliver_events().await;
        let kinds: Vec<&str> = outcomes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["invoice.finalized", "invoice.payment_failed", "invoice.voided"]);
        assert_eq!(outcomes[2].1, WebhookOutcome::Ignored, "a voided invoice changes nothing");
        // Counted by the worker's pay call first; the event is answered alike, not counted again.
        let failed =
            WebhookOutcome::RechargeFailed { tenant: "acme".into(), meter: "requests".into(), n: k, off: k == 3 };
        assert_eq!(outcomes[1].1, failed);
        let view = admin.recharge("acme", "requests").await.unwrap();
        assert_eq!((view.state.failures, view.state.open), (u32::try_from(k).unwrap(), None));
        // Its invoice voided: never paid later beside the next one.
        let invoices = s.stripe.invoices_created();
        assert_eq!(invoices.last().unwrap()["status"], "void");
        assert_eq!(s.granted().await, 500, "nothing granted without payment");
        // The next claim waits an hour after a failure.
        assert_eq!(s.admitted(5).await, 5);
        assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "no claim within the hour");
        s.h.clock.advance(Duration::from_secs(3600));
        // The next refill (leases are small this near the end) claims again.
        assert_eq!(s.admitted(25).await, 25);
    }
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.off_reason(), Some("declined"));
    assert!(!view.state.on());
    let report = s.h.tollgate.usage_report(&"acme".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let off: Vec<_> = report.recharges.iter().map(|r| (r.off_reason(), r.state.failures)).collect();
    assert_eq!(off, [(Some("declined"), 3)], "the report says why recharge is off");
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "off: nothing claimed");
    // Each failure counted once (by the pay call; its webhook answered alike), never paid.
    let stats = s.h.tollgate.stats();
    let counted = (stats.recharges_claimed, stats.recharges_charged, stats.recharges_paid, stats.recharges_failed);
    assert_eq!(counted, (3, 0, 0, 3));
    // One `balance.recharge_failed` (told by the worker and the webhook: one alert), to the
    // operator's endpoint and the tenant's, verified by the official library.
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharge_failed").await {
        let mut paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/ops", "/tenant"], "{got:?}");
        let data = &got[0].1;
        assert_eq!(
            (data["recharge"].as_u64(), data["reason"].as_str(), data["failures"].as_u64()),
            (Some(3), Some("declined"), Some(3))
        );
        assert!(s.alerts("balance.recharged").await.unwrap().is_empty());
    }
    assert_eq!(s.stripe.invoices_created().len(), 3);
    // Spent to the end: a plain 402, no recharge under way.
    let left = 500 - 350 - 90;
    assert_eq!(s.admitted(left + 20).await, left);
    let refused = s.h.get("/", "key-acme").await;
    assert_eq!(refused.status, 402);
    assert!(refused.headers.get("retry-after").is_none(), "no recharge under way");
    // Turned on again by hand: failures cleared.
    let view = admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!((view.state.on(), view.state.failures, view.off_reason()), (true, 0, None));
}

/// Four engines on one memory store (the other stores: tests/store) cross together: one
/// recharge, one invoice, granted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_charge_once() {
    common::recharge::four_engines_crossing_together_charge_once(Arc::new(MemoryStore::new())).await;
}

/// Four engines on one memory store wait for a bank debit that processes for days: one `pay`,
/// one grant (the other stores: tests/store).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_on_one_memory_store_wait_for_a_processing_debit() {
    common::recharge::four_engines_wait_for_a_processing_debit(Arc::new(MemoryStore::new())).await;
}

impl Setup {
    /// Spends until a refill claims a recharge, then delivers it and the events it emitted
    /// (at most `max` requests): whether one was delivered.
    pub(crate) async fn spend_until_recharged(&self, max: usize) -> bool {
        for _ in 0..max / 10 {
            assert_eq!(self.admitted(10).await, 10);
            if self.h.tollgate.deliver_recharges().await > 0 {
                self.deliver_events().await;
                return true;
            }
        }
        false
    }
}

// The monthly limit (UTC calendar month) stops the fourth recharge of a month: no claim while
// the month's recharges would pass it; the next month recharges again.
on_stores!(the_monthly_limit_stops_the_fourth_recharge_until_the_next_month);
async fn the_monthly_limit_stops_the_fourth_recharge_until_the_next_month(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    // Below 300, to 500: 3 packs (15.00) a recharge; 50.00 a month holds three.
    let ask = RechargeAsk::new(Some(300), Some(500), Some("50.00".into()));
    admin.set_recharge("acme", "requests", Some(ask)).await.unwrap();
    for k in 1..=3 {
        assert!(s.spend_until_recharged(400).await, "recharge {k}");
    }
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.n, view.month_count, view.month_spent), (3, 3, 4500));
    assert_eq!(s.granted().await, 500 + 3 * 300);
    assert!(!s.spend_until_recharged(300).await, "the fourth would pass 50.00");
    let view = admin.recharge("acme", "requests").await.unwrap();
    let march = tollgate::store::month_of(NOON);
    assert_eq!((view.state.n, view.state.open, view.state.limit_month), (3, None, march), "stopped by the limit");
    assert_eq!(s.h.tollgate.stats().recharges_limited, 1, "once a month, however many refills it stopped");
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharge_limit_reached").await {
        assert_eq!(got.len(), 2, "once, to the operator and the tenant: {got:?}");
        assert_eq!(got[0].1["month"], "2026-03");
    }
    // The next month (UTC): recharged again.
    s.h.clock.set_unix(1_775_001_600 + 3600); // 2026-04-01T01:00Z
    let recharged = s.spend_until_recharged(100).await;
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert!(recharged, "a new month: {view:?} granted {}", s.granted().await);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.n, view.month_count), (4, 1));
}

// A tenant's own values outside its plan's bounds are refused, nothing stored.
on_stores!(values_outside_the_plans_bounds_are_refused);
async fn values_outside_the_plans_bounds_are_refused(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    for ask in [
        RechargeAsk::new(None, Some(1001), None),
        RechargeAsk::new(Some(500), Some(400), None),
        RechargeAsk::new(None, None, Some("50.01".into())),
        RechargeAsk::new(None, None, Some("ten".into())),
        RechargeAsk::new(None, None, Some("1.001".into())),
        RechargeAsk::new(Some(0), None, None),
    ] {
        let e = admin.set_recharge("acme", "requests", Some(ask.clone())).await.unwrap_err();
        assert!(
            matches!(e, tollgate::admin::AdminError::Recharge(tollgate::money::RechargeError::Invalid(_))),
            "{ask:?}: {e}"
        );
    }
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.state.setting, None, "nothing stored");
    let e = admin.set_recharge("acme", "tokens", Some(RechargeAsk::default())).await.unwrap_err();
    assert!(e.to_string().contains("allows no recharge"), "{e}");
}

/// A request of the tenant with `key`, admitted: its context (for the tenant's own routes).
pub(crate) async fn context(h: &Harness, key: &'static str) -> tollgate::TenantContext {
    use tollgate::door::{Admission, Credential, RequestInfo};
    let info = RequestInfo::new("GET", "/", Credential::ApiKey(key.as_bytes()));
    let ticket = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    let ctx = ticket.context();
    ticket.give_back();
    ctx
}

// The tenant's own route (behind the layer): PUT within the plan's bounds turns it on (the
// price read from Stripe), outside them or not numbers 422 problem+json and nothing stored;
// GET shows the caller's own only; DELETE turns it off.
on_stores!(the_tenants_route_sets_its_own_recharge_within_the_plans_bounds);
async fn the_tenants_route_sets_its_own_recharge_within_the_plans_bounds(s: Setup) {
    let bob = TenantRecord::new("bob".into(), "payg".into()).with_customer("cus_bob");
    s.store.put_tenant(&bob, &[KeyHash::of(b"key-bob")]).await.unwrap();
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "a").await.unwrap();
    admin.grant_credits("bob", "requests", 500, None, "b").await.unwrap();
    let acme = context(&s.h, "key-acme").await;
    let bob = context(&s.h, "key-bob").await;
    let call = |ctx: &tollgate::TenantContext, method: &str, body: &'static str| {
        let (engine, ctx) = (s.h.tollgate.clone(), ctx.clone());
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let key = if ctx.tenant().as_str() == "acme" { "key-acme" } else { "key-bob" };
        async move {
            let r = engine
                .tenant_recharge(&ctx, &tollgate::Caller::api_key(key.as_bytes()), &method, body.as_bytes())
                .await;
            let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), ct, serde_json::from_slice::<serde_json::Value>(r.body()).unwrap_or_default())
        }
    };
    // A key charges the card only with the scope `recharge:write`, never a default one.
    let (status, _, v) = call(&acme, "PUT", r#"{"to": 800}"#).await;
    assert_eq!((status, v["type"].as_str()), (403, Some("https://tollgate.rs/problems/scope-missing")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("recharge:write"), "{v}");
    assert_eq!(admin.recharge("acme", "requests").await.unwrap().state.setting, None, "nothing stored");
    let acme_key = KeyHash::of(b"key-acme").id();
    admin.set_key_scopes("acme", &acme_key, KeyScopes::DEFAULT.with(KeyScope::RechargeWrite)).await.unwrap();
    for body in [
        r#"{"to": 1001}"#,
        r#"{"below": 600, "to": 500}"#,
        r#"{"monthly_limit": "50.01"}"#,
        r#"{"monthly_limit": "ten"}"#,
        r#"{"below": "ten"}"#,
        r#"{"below": -1}"#,
        r#"{"to": 500, "extra": 1}"#,
        "not json",
        "",
    ] {
        let (status, ct, _) = call(&acme, "PUT", body).await;
        assert_eq!((status, ct.as_deref()), (422, Some("application/problem+json")), "{body}");
    }
    let (status, _, v) = call(&acme, "GET", "").await;
    assert_eq!((status, v["on"].as_bool(), v["off_reason"].as_str()), (200, Some(false), Some("not_turned_on")));
    assert_eq!(v["plan"]["monthly_limit"], "50.00");
    let (status, _, v) = call(&acme, "PUT", r#"{"below": 200, "to": 800, "monthly_limit": "20.00"}"#).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["on"].as_bool(), v["settings"]["to"].as_u64()), (Some(true), Some(800)));
    assert_eq!(v["settings"]["pack"]["amount"], "5.00", "the price's amount, read from Stripe");
    assert_eq!(v["settings"]["set_by"], format!("key:{acme_key}"), "who set it is recorded");
    // Bob sees his own, off; acme's is acme's alone.
    let (_, _, v) = call(&bob, "GET", "").await;
    assert_eq!((v["on"].as_bool(), v["settings"].is_null()), (Some(false), true));
    let (status, _, _) = call(&acme, "DELETE", "").await;
    assert_eq!(status, 204);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.state.setting, None, "off");
    let (status, _, _) = call(&acme, "POST", "").await;
    assert_eq!(status, 405);
    // The audit: the operator's scopes, then the tenant's key turning it on and off; the
    // refusals and reads are not recorded.
    let audit = admin.audit(Some("acme"), None, 10).await.unwrap();
    let changes: Vec<_> =
        audit.iter().map(|r| (r.actor.to_string(), r.setting.to_string(), r.before.clone(), r.after.clone())).collect();
    let on = "requests below=200 to=800 monthly_limit=2000".to_owned();
    let by_key = format!("key:{acme_key}");
    // (The setup registered an alert endpoint first.)
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(changes[0], (by_key.clone(), "recharge".into(), Some(on.clone()), None));
    assert_eq!(changes[1], (by_key, "recharge".into(), None, Some(on)));
    assert_eq!((changes[2].0.as_str(), changes[2].1.as_str()), ("operator:admin", "key"));
    assert!(changes[2].3.as_deref().unwrap().contains("recharge:write"), "{changes:?}");
}

// Each of a tenant's own routes asks its caller's key for a scope (issue 84: "a key needs a
// scope that allows it"): a key issued with none is served but opens none of them, reading
// needs `usage:read` (or the scope that writes), writing the scope itself; another tenant's
// key opens nothing of this one; scopes taken away close the route at its next call.
on_stores!(a_key_opens_only_the_routes_its_scopes_allow);
async fn a_key_opens_only_the_routes_its_scopes_allow(s: Setup) {
    use tollgate::admin::KeyOptions;
    let bob = TenantRecord::new("bob".into(), "payg".into()).with_customer("cus_bob");
    s.store.put_tenant(&bob, &[KeyHash::of(b"key-bob")]).await.unwrap();
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "a").await.unwrap();
    let blind = admin.issue_key("acme", KeyOptions::default().scopes(KeyScopes::NONE)).await.unwrap();
    let payer = KeyScopes::NONE.with(KeyScope::RechargeWrite);
    let payer = admin.issue_key("acme", KeyOptions::default().scopes(payer)).await.unwrap();
    let ctx = context(&s.h, "key-acme").await;
    let recharge = |key: String, method: &'static str, body: &'static str| {
        let (engine, ctx) = (s.h.tollgate.clone(), ctx.clone());
        async move {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let r = engine
                .tenant_recharge(&ctx, &tollgate::Caller::api_key(key.as_bytes()), &method, body.as_bytes())
                .await;
            (r.status().as_u16(), serde_json::from_slice::<serde_json::Value>(r.body()).unwrap_or_default())
        }
    };
    let usage = |key: String| {
        let engine = s.h.tollgate.clone();
        async move {
            let request = http::Request::get("/v1/usage").header("x-api-key", key).body(()).unwrap();
            let r = engine.tenant_usage(&request).await;
            (r.status().as_u16(), serde_json::from_slice::<serde_json::Value>(r.body()).unwrap_or_default())
        }
    };
    let problem = |v: &serde_json::Value| v["type"].as_str().unwrap_or_default().rsplit('/').next().unwrap().to_owned();
    // Every key is served by the layer, whatever its scopes.
    assert_eq!(s.h.status("/", &blind.key).await, 200);
    // No scope: nothing read, nothing set; refused before its body is read.
    let (status, v) = recharge(blind.key.clone(), "GET", "").await;
    assert_eq!((status, problem(&v)), (403, "scope-missing".to_owned()), "{v}");
    assert_eq!(recharge(blind.key.clone(), "PUT", "not json").await.0, 403);
    assert_eq!(recharge("key-acme".into(), "PUT", r#"{"to": "lots"}"#).await.0, 403);
    let (status, v) = usage(blind.key.clone()).await;
    assert_eq!((status, problem(&v)), (403, "scope-missing".to_owned()), "{v}");
    // The default reads the usage and the recharge, and does not turn it on.
    assert_eq!(usage("key-acme".into()).await.0, 200);
    assert_eq!(recharge("key-acme".into(), "GET", "").await.0, 200);
    assert_eq!(recharge("key-acme".into(), "PUT", "{}").await.0, 403);
    // recharge:write alone: sets and reads the recharge, not the usage.
    let (status, v) = recharge(payer.key.clone(), "PUT", "{}").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["settings"]["set_by"], format!("key:{}", payer.record.id));
    assert_eq!(usage(payer.key.clone()).await.0, 403);
    // Another tenant's key opens nothing of this one (and its own usage only).
    let (status, v) = recharge("key-bob".into(), "DELETE", "").await;
    assert_eq!((status, problem(&v)), (403, "key-not-live".to_owned()), "{v}");
    assert!(admin.recharge("acme", "requests").await.unwrap().state.setting.is_some(), "still on");
    // The scope taken away: refused at the next call, nothing changed.
    admin.set_key_scopes("acme", &payer.record.id, KeyScopes::DEFAULT).await.unwrap();
    assert_eq!(recharge(payer.key.clone(), "DELETE", "").await.0, 403);
    assert!(admin.recharge("acme", "requests").await.unwrap().state.setting.is_some(), "still on");
    // Within a second, the usage view reads the scopes again.
    s.h.clock.advance(Duration::from_secs(2));
    assert_eq!(usage(payer.key.clone()).await.0, 200);
    // A revoked key opens nothing, though its tenant is still held on the node, and a change
    // of its scopes does not bring it back.
    admin.revoke_key("acme", &payer.record.id).await.unwrap();
    assert_eq!(recharge(payer.key.clone(), "GET", "").await.0, 403);
    assert!(admin.set_key_scopes("acme", &payer.record.id, KeyScopes::ALL).await.is_err());
    assert_eq!(s.store.key(&KeyHash::of(payer.key.as_bytes())).await.unwrap(), None, "not written back");
    assert_eq!(recharge(payer.key.clone(), "PUT", "{}").await.0, 403);
}

// 3-D Secure needed and a customer without a payment method fail with their reasons, each
// counted once; a server error is no failure: the claim stays open and the next delivery,
// once the claim lapses, charges it (the failures in a row end with its payment).
on_stores!(failures_are_counted_with_their_reasons_and_server_errors_never_are);
async fn failures_are_counted_with_their_reasons_and_server_errors_never_are(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    s.stripe.set_card("cus_acme", Card::RequiresAction);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let outcomes = s.deliver_events().await;
    let failed = WebhookOutcome::RechargeFailed { tenant: "acme".into(), meter: "requests".into(), n: 1, off: false };
    assert!(outcomes.iter().any(|(k, o)| k == "invoice.payment_action_required" && *o == failed), "{outcomes:?}");
    s.stripe.set_card("cus_acme", Card::Missing);
    s.h.clock.advance(Duration::from_secs(3600));
    // Its invoice waits for the tenant: nothing more is claimed until the setting is stored
    // again.
    assert_eq!(s.admitted(30).await, 30);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "paused while the 3-D Secure invoice waits");
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(30).await, 30);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.n, view.state.open), (2, 2, None));
    // The one without a payment method voided; the 3-D Secure one left open for the tenant.
    let invoices = s.stripe.invoices_created();
    let statuses: Vec<&str> = invoices.iter().filter_map(|i| i["status"].as_str()).collect();
    assert_eq!(statuses, ["open", "void"], "{invoices:?}");
    s.deliver_events().await;
    // A server error (not executed): no failure; the claim stays open.
    s.stripe.set_card("cus_acme", Card::Pays);
    s.stripe.fail_next_invoice_writes(&[common::stripe::Fault::Status(500)]);
    s.h.clock.advance(Duration::from_secs(3600));
    assert_eq!(s.admitted(30).await, 30);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "not delivered");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.open.map(|o| o.n)), (2, Some(3)), "not counted, still open");
    // Taken again once its claim lapses: charged, paid, granted; the failures end.
    s.h.clock.advance(Duration::from_secs(tollgate::store::CLAIM_TAKEN_SECS as u64));
    assert_eq!(s.admitted(30).await, 30);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    s.deliver_events().await;
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.open, view.state.n), (0, None, 3));
    assert!(s.granted().await > 500, "granted once paid");
}

// A request Stripe refuses as such (`invalid_request_error`: a customer deleted) counts as a
// failure once, like a declined card: the claim is closed rather than held open for good (a
// tenant then told "recharge under way" by every 402), and three turn recharge off.
on_stores!(a_request_stripe_refuses_counts_as_a_failure);
async fn a_request_stripe_refuses_counts_as_a_failure(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    s.stripe.fail_next_invoice_writes(&[common::stripe::Fault::Invalid(404)]);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1, "delivered: a failure");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.open, view.state.n), (1, None, 1));
    assert!(s.stripe.invoices_created().is_empty(), "nothing made");
    // Not under way any more: the balance runs out with a plain 402.
    assert!(s.until_refused().await.headers.get("retry-after").is_none());
}

/// The quickstart's prepaid plan recharges (examples/quickstart.toml, its `#recharge#` lines on
/// as the file says, with a `[stripe]` section), against the stand-in: initech turns it on,
/// spends its balance below 200, one invoice is paid and `invoice.paid` grants its packs.
#[tokio::test]
async fn the_quickstarts_prepaid_plan_recharges() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml")).unwrap();
    let on: Vec<&str> = file.lines().map(|l| l.strip_prefix("#recharge# ").unwrap_or(l)).collect();
    assert_ne!(on.join("\n"), file.trim_end(), "the quickstart has recharge lines to turn on");
    let stripe = StandIn::start(&[]).await;
    stripe.add_price("price_quickstart_tokens", None, true);
    stripe.set_unit_amount("price_quickstart_tokens", 200);
    stripe.set_card("cus_QuickstartInitech", Card::Pays);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("t.db")).await.unwrap());
    let (h, handler) = engine(&format!("{}\n[stripe]\n", on.join("\n")), &store, &stripe);
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("initech", "tokens", 300, None, "first").await.unwrap();
    let view = admin.set_recharge("initech", "tokens", Some(RechargeAsk::default())).await.unwrap();
    let own = view.state.setting.expect("on");
    assert_eq!((own.below, own.to, own.monthly_limit, own.pack.units, own.pack.amount), (200, 1000, 5000, 100, 200));
    let mut spent = 0;
    while h.tollgate.deliver_recharges().await == 0 {
        assert!(spent < 300, "no recharge claimed below 200");
        // A completion as the quickstart's route makes it: its tokens held, then recorded.
        h.clock.advance(Duration::from_millis(100)); // the plan's rate: 10/s
        let ctx = context(&h, "tg_test_prepaid_initech").await;
        let mut hold = ctx.hold("tokens", 10).await.unwrap();
        hold.record(10).unwrap();
        drop(hold);
        spent += 10;
    }
    let invoices = stripe.invoices_created();
    assert_eq!((invoices.len(), invoices[0]["status"].as_str()), (1, Some("paid")));
    let packs = invoices[0]["amount_paid"].as_u64().unwrap() / 200;
    let mut credited = 0;
    for e in stripe.take_emitted() {
        let payload = e.to_string();
        let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(h.clock.unix_secs()));
        let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 200, "{}", e["type"]);
        credited += usize::from(matches!(reply.outcome, WebhookOutcome::Credited { .. }));
    }
    assert_eq!(credited, 1, "granted once");
    let (_, balances) = Admin::new(store).credits("initech").await.unwrap();
    let granted: u64 = balances.into_iter().map(|(_, b)| b.granted).sum();
    assert_eq!(granted, 300 + packs * 100);
    assert!(300 + packs * 100 - spent >= 1000 - 100, "brought to about 1,000: {packs} packs, {spent} spent");
}

/// A recharge's `invoice.paid` whose alert cannot be written (the outbox down) is answered
/// 500, its grant kept; Stripe's next delivery, once the outbox is back, writes the alert
/// once, and neither grants nor counts the recharge again.
#[cfg(feature = "alerts")]
#[tokio::test]
async fn a_paid_recharge_whose_alert_cannot_be_written_is_delivered_again() {
    use std::sync::atomic::Ordering;
    let faulty = Arc::new(common::Faulty::default());
    let s = setup(faulty.clone()).await;
    if s.receiver.is_none() {
        return; // skipped loudly by the receiver (never in CI)
    }
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let packs = s.stripe.invoices_created()[0]["amount_paid"].as_u64().unwrap() / 500;
    faulty.alerts_down.store(true, Ordering::SeqCst);
    let mut paid = None;
    for e in s.stripe.take_emitted() {
        let (code, outcome) = s.signed(&e.to_string()).await;
        if e["type"] == "invoice.paid" {
            assert_eq!(code, 500, "{outcome:?}");
            paid = Some(e);
        } else {
            assert_eq!(code, 200, "{}: {outcome:?}", e["type"]);
        }
    }
    let paid = paid.expect("invoice.paid emitted");
    assert_eq!(s.granted().await, 500 + packs * 100, "granted before its alert failed, and kept");
    faulty.alerts_down.store(false, Ordering::SeqCst);
    let (code, outcome) = s.signed(&paid.to_string()).await;
    assert_eq!((code, outcome), (200, WebhookOutcome::Duplicate));
    assert_eq!(s.granted().await, 500 + packs * 100, "granted once");
    assert_eq!(s.h.tollgate.stats().recharges_paid, 1, "counted once");
    let got = s.alerts("balance.recharged").await.unwrap();
    assert_eq!(got.len(), 2, "once, to the operator and the tenant: {got:?}");
}
