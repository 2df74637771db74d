//! Recharges as payments really behave (issue 84), against the Stripe stand-in and the real
//! async-stripe client: a plan or price changed under a tenant's setting, bank debits that
//! stay `processing` for days, grants refused, reversals, debt.
#![cfg(feature = "stripe")]

use std::time::Duration;

use super::recharge::{on_stores, setup, Setup};
use crate::common;
use tollgate::billing::WebhookOutcome;
use tollgate::{
    admin::Admin,
    money::RechargeAsk,
    store::{MemoryStore, SqliteStore},
};

// A plan change cannot break the monthly limit: the setting keeps the price its pack is of.
// Turned on under `payg` (packs of 100 units for 5.00, at most 50.00 a month), the tenant moves
// to `pro`, whose recharges buy `price_big` (10,000 units for 400.00). On main the next claim
// counted 7 to 10 packs at 5.00 and the invoice charged them at 400.00 (2,800.00 and more
// against a 50.00 limit). Now nothing is charged: recharge is turned off, reason
// `price_changed`, with one alert, and the claim's amount goes back to the month; turned on
// again, the new pack is counted. Likewise a price whose amount on Stripe is no longer the
// one the setting counted.
on_stores!(a_plan_or_price_change_never_charges_what_the_limit_did_not_count);
async fn a_plan_or_price_change_never_charges_what_the_limit_did_not_count(s: Setup) {
    s.stripe.add_price("price_big", None, true);
    s.stripe.set_unit_amount("price_big", 40_000);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    admin.set_plan("acme", "pro").await.unwrap();
    assert_eq!(s.admitted(250).await, 250);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert!(view.state.open.is_some(), "claimed under the setting's pack: {view:?}");
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1, "delivered: turned off");
    assert!(s.stripe.invoices_created().is_empty(), "nothing charged: {:?}", s.stripe.invoices_created());
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(
        (view.off_reason(), view.state.open, view.month_spent, view.state.failures),
        (Some("price_changed"), None, 0, 0)
    );
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0);
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharge_failed").await {
        assert_eq!(got.len(), 2, "once, to the operator and the tenant: {got:?}");
        assert_eq!(got[0].1["reason"], "price_changed");
    }
    // Turned on again under `pro`: its pack is counted (2 packs of 400.00 reach 20,000).
    let ask = RechargeAsk::new(Some(300), Some(20_000), Some("5000.00".into()));
    let view = admin.set_recharge("acme", "requests", Some(ask)).await.unwrap();
    let own = view.state.setting.clone().unwrap();
    assert_eq!((own.pack.units, own.pack.amount, own.price.as_str()), (10_000, 40_000, "price_big"));
    assert!(s.spend_until_recharged(300).await);
    let invoices = s.stripe.invoices_created();
    let [invoice] = invoices.as_slice() else { panic!("{invoices:?}") };
    assert_eq!(invoice["amount_paid"], 80_000);
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.month_spent, 80_000, "what was charged is what the limit counted");
    // The price's amount changed on Stripe (a price is replaced by one of the same id in a
    // stand-in only; on Stripe a price's amount is fixed, its currency options are not).
    s.stripe.set_unit_amount("price_big", 50_000);
    s.h.clock.advance(Duration::from_secs(60));
    assert!(s.spend_until_recharged(20_000).await, "claimed and delivered");
    assert_eq!(s.stripe.invoices_created().len(), 1, "not charged at 500.00 a pack");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.off_reason(), view.month_spent), (Some("price_changed"), 80_000));
    // Bad input: the price now in another currency (its amount the same): never charged in
    // it, turned off alike.
    s.stripe.set_unit_amount("price_big", 40_000);
    admin
        .set_recharge("acme", "requests", Some(RechargeAsk::new(Some(300), Some(20_000), Some("5000.00".into()))))
        .await
        .unwrap();
    s.stripe.set_price_currency("price_big", "eur");
    s.h.clock.advance(Duration::from_secs(3600));
    assert!(s.spend_until_recharged(20_000).await, "claimed and delivered");
    assert_eq!(s.stripe.invoices_created().len(), 1, "not charged in eur");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.off_reason(), Some("price_changed"));
}

// A bank debit that fails days later (`invoice.payment_failed`) counts one failure, and the
// next crossing waits its hour; a debit that neither clears nor fails within
// `PROCESSING_SECS` (21 days: the webhook missed) is taken again and its invoice only read:
// still open, one failure, never paid again.
on_stores!(a_bank_debit_that_fails_or_never_clears_is_never_paid_again);
async fn a_bank_debit_that_fails_or_never_clears_is_never_paid_again(s: Setup) {
    s.stripe.set_card("cus_acme", common::stripe::Card::BankDebit);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let first = s.stripe.invoices_created()[0]["id"].as_str().unwrap().to_owned();
    s.h.clock.advance(Duration::from_secs(2 * 86_400));
    s.stripe.settle_debit(&first, false);
    let outcomes = s.deliver_events().await;
    let failed = WebhookOutcome::RechargeFailed { tenant: "acme".into(), meter: "requests".into(), n: 1, off: false };
    assert!(outcomes.iter().any(|(k, o)| k == "invoice.payment_failed" && *o == failed), "{outcomes:?}");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.open, view.month_spent), (1, None, 0));
    // Counted by the webhook first: its invoice voided by it, so that the customer never pays
    // it later beside the next recharge (main left it open).
    assert_eq!(s.stripe.invoices_created()[0]["status"], "void");
    // The next crossing, an hour on: debited, processing; nothing comes for 21 days.
    s.h.clock.advance(Duration::from_secs(3600));
    assert_eq!(s.admitted(25).await, 25);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    assert_eq!(s.stripe.pays(), 2);
    s.h.clock.advance(Duration::from_secs(tollgate::store::PROCESSING_SECS as u64 - 60));
    assert_eq!(s.admitted(5).await, 5);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "still waiting");
    // The debit failed, and its `invoice.payment_failed` never reached the endpoint.
    let second = s.stripe.invoices_created()[1]["id"].as_str().unwrap().to_owned();
    s.stripe.settle_debit(&second, false);
    s.stripe.take_emitted();
    s.h.clock.advance(Duration::from_secs(120));
    let mut delivered = 0;
    for _ in 0..20 {
        s.admitted(1).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!(delivered, 1, "taken again once, past 21 days");
    assert_eq!(s.stripe.pays(), 2, "its invoice read, never paid again");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.state.open, view.state.n), (2, None, 2));
    assert_eq!(s.stripe.invoices_created()[1]["status"], "void", "its failure counted: voided");
    assert_eq!(s.granted().await, 500, "nothing paid, nothing granted");
}

// A paid recharge whose grant is refused (the balance holds 1,000 open grants, none used up:
// the one spent first is spent only in part) is never closed as paid: on main `invoice.paid` answered 500 for three days, the claim stayed
// open and the tenant got 402 "recharge under way" for good while every delivery found the
// invoice paid. Now recharge is turned off (`grant_refused`, one alert) at the first refusal,
// the delivery is still answered 500 (Stripe delivers it again once room is made), and the
// tenant's requests end with a plain 402.
on_stores!(a_paid_recharge_whose_grant_is_refused_turns_recharge_off);
async fn a_paid_recharge_whose_grant_is_refused_turns_recharge_off(s: Setup) {
    s.stripe.add_price("price_big", None, true);
    s.stripe.set_unit_amount("price_big", 40_000);
    let admin = Admin::for_engine(&s.h.tollgate);
    let year = s.h.clock.unix_secs() + 365 * 86_400;
    admin.grant_credits("acme", "requests", 1300, Some(year), "first").await.unwrap();
    for i in 0..999 {
        admin.grant_credits("acme", "requests", 1, None, &format!("g{i}")).await.unwrap();
    }
    // On `pro` (packs of 10,000), below 5,000: the balance of 2,299 claims at once.
    admin.set_plan("acme", "pro").await.unwrap();
    let ask = RechargeAsk::new(Some(5000), Some(20_000), Some("5000.00".into()));
    admin.set_recharge("acme", "requests", Some(ask)).await.unwrap();
    assert_eq!(s.admitted(300).await, 300);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let events = s.stripe.take_emitted();
    let paid = events.iter().find(|e| e["type"] == "invoice.paid").expect("paid").to_string();
    for _ in 0..2 {
        let (status, outcome) = s.signed(&paid).await;
        assert_eq!(status, 500, "delivered again by Stripe: {outcome:?}");
    }
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.off_reason(), view.state.open), (Some("grant_refused"), None));
    let charged = s.stripe.invoices_created()[0]["amount_paid"].as_u64().unwrap();
    assert_eq!(view.month_spent, charged, "the money taken stays counted against the month's limit");
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharge_failed").await {
        assert_eq!(got.len(), 2, "once, to the operator and the tenant: {got:?}");
        assert_eq!(got[0].1["reason"], "grant_refused");
    }
    // Off: spent to the end, a plain 402, and nothing charged again.
    assert!(s.admitted(2100).await < 2100, "spent to the end");
    let refused = s.h.get("/", "key-acme").await;
    assert_eq!(refused.status, 402);
    assert!(refused.headers.get("retry-after").is_none(), "no recharge under way");
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0);
    assert_eq!(s.stripe.invoices_created().len(), 1);
}

// `invoice.paid` never comes (the endpoint is not subscribed to it, or was down past Stripe's
// three days): on main the claim stayed open, each delivery found the invoice paid and logged
// it at info, nothing was granted and the tenant got 402 "recharge under way" for good. A
// delivery that finds its invoice paid an hour or more after the claim credits it through the
// top-up path (grant id = invoice id), counted; the event coming after all is a duplicate.
on_stores!(a_paid_recharge_whose_invoice_paid_never_comes_is_credited_by_the_worker);
async fn a_paid_recharge_whose_invoice_paid_never_comes_is_credited_by_the_worker(s: Setup) {
    // Stripe's clock is the engine's (its `paid_at` is read against it).
    s.stripe.set_now(s.h.clock.unix_secs());
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let lost = s.stripe.take_emitted();
    let open = admin.recharge("acme", "requests").await.unwrap().state.open.expect("open");
    // Taken again at the lapse, found paid: not yet credited (the event may be on its way).
    s.h.clock.advance(Duration::from_secs(tollgate::store::CLAIM_TAKEN_SECS as u64));
    let mut delivered = 0;
    for _ in 0..30 {
        s.admitted(1).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!((delivered, s.granted().await), (1, 500), "delivered again, not credited yet");
    // An hour after its claim: credited by the worker, closed, counted.
    s.h.clock.advance(Duration::from_secs(3600));
    let mut delivered = 0;
    for _ in 0..30 {
        s.admitted(1).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!(delivered, 1);
    assert_eq!(s.granted().await, 500 + open.packs * 100, "credited once");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.open, view.state.n, view.month_count), (None, 1, 1));
    assert_eq!(s.h.tollgate.stats().recharges_credited_unannounced, 1);
    assert_eq!(s.stripe.pays(), 1, "paid once");
    // The event comes after all: a duplicate.
    let paid = lost.iter().find(|e| e["type"] == "invoice.paid").unwrap().to_string();
    assert_eq!(s.signed(&paid).await, (200, WebhookOutcome::Duplicate));
    assert_eq!(s.granted().await, 500 + open.packs * 100);
}

fn fixture(kind: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["resources"][kind].clone()
}

fn event(id: &str, kind: &str, object: serde_json::Value) -> String {
    let mut e = fixture("event");
    e["id"] = serde_json::json!(id);
    e["type"] = serde_json::json!(kind);
    e["data"] = serde_json::json!({ "object": object });
    e.to_string()
}

impl Setup {
    /// Spends until a recharge is claimed, delivers it and its events: its invoice (paid and
    /// credited).
    async fn recharged(&self) -> serde_json::Value {
        assert!(self.spend_until_recharged(1000).await, "recharged");
        self.stripe.invoices_created().last().cloned().unwrap()
    }
}

// A disputed recharge turns recharge off (`disputed`, one alert), so that the card under
// dispute is not charged again by the next request; a refunded one likewise (`refunded`). On
// main both took the units back and left recharge on: the balance fell under `below` and the
// next request charged the same card again.
on_stores!(a_refunded_or_disputed_recharge_turns_recharge_off);
async fn a_refunded_or_disputed_recharge_turns_recharge_off(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    // Three packs (15.00) a recharge: two fit the month's 50.00.
    let small = RechargeAsk::new(Some(300), Some(500), None);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(small.clone())).await.unwrap();
    for (n, reason) in [(1u64, "disputed"), (2, "refunded")] {
        let invoice = s.recharged().await;
        let id = invoice["id"].as_str().unwrap();
        let intent = s.stripe.payment_intent_of(id).expect("paid through the API");
        let amount = invoice["amount_paid"].clone();
        let reversal = if reason == "disputed" {
            let mut d = fixture("dispute");
            d["id"] = serde_json::json!("dp_1");
            d["payment_intent"] = serde_json::json!(intent);
            d["amount"] = amount;
            d["status"] = serde_json::json!("needs_response");
            event("evt_dp", "charge.dispute.funds_withdrawn", d)
        } else {
            let mut c = fixture("charge");
            c["customer"] = serde_json::json!("cus_acme");
            c["payment_intent"] = serde_json::json!(intent);
            c["amount"] = amount.clone();
            c["amount_captured"] = amount.clone();
            c["amount_refunded"] = amount;
            c["refunded"] = serde_json::json!(true);
            event("evt_rf", "charge.refunded", c)
        };
        let (status, outcome) = s.signed(&reversal).await;
        assert!(matches!((status, &outcome), (200, WebhookOutcome::Refunded { .. })), "{reason}: {outcome:?}");
        let view = admin.recharge("acme", "requests").await.unwrap();
        assert_eq!((view.off_reason(), view.state.n), (Some(reason), n), "{reason}");
        // Spent below `below` again: nothing claimed, the card not charged again.
        let invoices = s.stripe.invoices_created().len();
        s.admitted(300).await;
        assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "{reason}: not charged again");
        assert_eq!(s.stripe.invoices_created().len(), invoices);
        #[cfg(feature = "alerts")]
        if let Some(got) = s.alerts("balance.recharge_failed").await {
            let this: Vec<_> = got.iter().filter(|(_, d)| d["reason"] == reason).collect();
            assert_eq!(this.len(), 2, "once, to the operator and the tenant: {got:?}");
        }
        // Turned on again by the tenant, on purpose.
        admin.grant_credits("acme", "requests", 500, None, &format!("more{n}")).await.unwrap();
        admin.set_recharge("acme", "requests", Some(small.clone())).await.unwrap();
    }
}

// A recharge's decline never moves the tenant's plan through `[stripe.events]`: on main,
// with `invoice.payment_failed` mapped to a plan (for subscriptions), a prepaid tenant moved to
// it at its recharge's first decline, though recharge allows three (and a claim delivered
// after the move then cleared its setting).
#[tokio::test]
async fn a_recharge_decline_never_moves_the_plan() {
    let s = setup(std::sync::Arc::new(MemoryStore::new())).await;
    let toml = common::recharge::CONFIG
        .replace("[stripe]\n", "[stripe]\n[stripe.events]\n\"invoice.payment_failed\" = \"pro\"\n");
    s.h.tollgate.reload(tollgate::config::Config::from_toml_str(&toml).unwrap()).await.unwrap();
    s.stripe.set_card("cus_acme", common::stripe::Card::Declined);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let outcomes = s.deliver_events().await;
    let failed = WebhookOutcome::RechargeFailed { tenant: "acme".into(), meter: "requests".into(), n: 1, off: false };
    assert!(outcomes.iter().any(|(k, o)| k == "invoice.payment_failed" && *o == failed), "{outcomes:?}");
    let tenant = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!(tenant.plan.as_str(), "payg", "the plan is the subscription's business, not a recharge's");
}

// With a plan that recharges, `tollgate check` (`check_stripe_access`) asks for Prices: read,
// which every recharge needs to read its price's amount (main asked for it only for lookup
// keys, so a key without it passed the check and every `PUT /recharge` answered 503).
#[tokio::test]
async fn the_check_asks_for_what_recharge_reads() {
    let stripe = common::stripe::StandIn::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("stripe-key");
    std::fs::write(&key, common::stripe::SECRET).unwrap();
    let section =
        format!("[stripe]\napi_base = \"{}\"\nsecret_key_file = {:?}\n", stripe.url, key.display().to_string());
    let config = tollgate::Config::from_toml_str(&common::recharge::CONFIG.replace("[stripe]\n", &section)).unwrap();
    assert!(tollgate::billing::check_stripe_access(&config).await.unwrap().is_ok());
    stripe.refuse_reads(Some(("/v1/prices", 403)));
    let access = tollgate::billing::check_stripe_access(&config).await.unwrap();
    assert!(access.refused.iter().any(|r| r.starts_with("Prices: read")), "{access:?}");
}

// Who may turn on charges to a card. The tenant's route may set recharge only on a plan that
// allows it (`tenant_may_set`): on `pro`, which does not, a `PUT` is refused 403 problem+json
// and nothing is stored (main let any key of any plan turn it on), while `DELETE` (turning it
// off) and `GET` still answer. What set it is recorded (the tenant's route, or the operator).
// And the hour a failure waits survives a change of values: on main any changed value cleared
// the failures and the wait, so a script toggling `below` had a declining card charged every
// few seconds.
on_stores!(only_a_plan_that_allows_it_lets_the_tenant_turn_charges_on);
async fn only_a_plan_that_allows_it_lets_the_tenant_turn_charges_on(s: Setup) {
    let bob = tollgate::store::TenantRecord::new("bob".into(), "pro".into()).with_customer("cus_bob");
    s.store.put_tenant(&bob, &[tollgate::store::KeyHash::of(b"key-bob")]).await.unwrap();
    s.stripe.add_price("price_big", None, true);
    s.stripe.set_unit_amount("price_big", 40_000);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("bob", "requests", 500, None, "b").await.unwrap();
    admin.grant_credits("acme", "requests", 500, None, "a").await.unwrap();
    // Both keys may turn charges on, as far as their scopes go: the plan decides.
    let payer = tollgate::store::KeyScopes::ALL;
    admin.set_key_scopes("bob", &tollgate::store::KeyHash::of(b"key-bob").id(), payer).await.unwrap();
    admin.set_key_scopes("acme", &tollgate::store::KeyHash::of(b"key-acme").id(), payer).await.unwrap();
    let put = |key: &'static str, method: &'static str, body: &'static str| {
        let h = &s.h;
        async move {
            let ctx = super::recharge::context(h, key).await;
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let caller = tollgate::Caller::api_key(key.as_bytes());
            let r = h.tollgate.tenant_recharge(&ctx, &caller, &method, body.as_bytes()).await;
            let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), ct, serde_json::from_slice::<serde_json::Value>(r.body()).unwrap_or_default())
        }
    };
    let (status, ct, v) = put("key-bob", "PUT", "{}").await;
    assert_eq!((status, ct.as_deref()), (403, Some("application/problem+json")), "{v}");
    assert_eq!(admin.recharge("bob", "requests").await.unwrap().state.setting, None, "nothing stored");
    assert_eq!(put("key-bob", "GET", "").await.0, 200);
    assert_eq!(put("key-bob", "DELETE", "").await.0, 204);
    // The operator may, for any plan: recorded as the operator's.
    let view = admin.set_recharge("bob", "requests", Some(RechargeAsk::default())).await.unwrap();
    assert_eq!(view.to_json()["settings"]["set_by"], "operator");
    // On `payg`, which allows it, the tenant's route turns it on: recorded as the key's.
    let (status, _, v) = put("key-acme", "PUT", "{}").await;
    let by = format!("key:{}", tollgate::store::KeyHash::of(b"key-acme").id());
    assert_eq!((status, &v["settings"]["set_by"]), (200, &serde_json::json!(by)), "{v}");
    // A decline, then a change of values: the hour still waits.
    s.stripe.set_card("cus_acme", common::stripe::Card::Declined);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    s.deliver_events().await;
    assert_eq!(put("key-acme", "PUT", r#"{"below": 250}"#).await.0, 200);
    assert_eq!(put("key-acme", "PUT", r#"{"below": 299}"#).await.0, 200);
    s.admitted(30).await;
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "the hour after a failure waits, whatever the values");
    assert_eq!(s.stripe.invoices_created().len(), 1);
    s.h.clock.advance(Duration::from_secs(3600));
    s.admitted(30).await;
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1, "then the next one is tried");
}

// A bank debit whose `pay` answer is lost (the connection closes after Stripe took it) is
// never paid again: the claim is taken again at its lapse, the invoice found attempted, and its
// payment read (an invoice payment whose payment intent is `processing`): pending, marked,
// no failure counted, no second `pay` (main paid again, was refused, counted a failure and
// tried to void it; an hour later a second debit went out).
on_stores!(a_bank_debit_whose_pay_answer_was_lost_is_not_paid_again);
async fn a_bank_debit_whose_pay_answer_was_lost_is_not_paid_again(s: Setup) {
    s.stripe.set_card("cus_acme", common::stripe::Card::BankDebit);
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    // Create, item and finalize answer; the pay is taken and its answer lost.
    s.stripe.fail_next_invoice_writes(&[
        common::stripe::Fault::Pass,
        common::stripe::Fault::Pass,
        common::stripe::Fault::Pass,
        common::stripe::Fault::TakeAndHang,
    ]);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "not known: delivered again at the lapse");
    assert_eq!(s.stripe.pays(), 1);
    for step in [tollgate::store::CLAIM_TAKEN_SECS as u64, 3600, 7200] {
        s.h.clock.advance(Duration::from_secs(step));
        for _ in 0..20 {
            s.admitted(1).await;
            s.h.tollgate.deliver_recharges().await;
        }
    }
    assert_eq!((s.stripe.pays(), s.stripe.voids()), (1, 0), "never paid again, never voided");
    let view = admin.recharge("acme", "requests").await.unwrap();
    let open = view.state.open.expect("still open");
    assert_eq!((open.n, open.processing, view.state.failures), (1, true, 0));
    assert_eq!(s.stripe.invoices_created().len(), 1);
}

// A recharge paid more than an hour after its claim (its first deliveries met a Stripe
// outage) is not taken for one whose `invoice.paid` never came: the worker credits only an
// invoice paid an hour ago or more, by the invoice's `paid_at`, not the claim's age.
on_stores!(a_recharge_paid_late_is_credited_by_its_event_not_the_worker);
async fn a_recharge_paid_late_is_credited_by_its_event_not_the_worker(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    s.stripe.fail_next_invoice_writes(&[common::stripe::Fault::Status(500)]);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "Stripe failed: delivered again");
    s.h.clock.advance(Duration::from_secs(3600 + tollgate::store::CLAIM_TAKEN_SECS as u64));
    s.stripe.set_now(s.h.clock.unix_secs());
    let mut delivered = 0;
    for _ in 0..30 {
        s.admitted(1).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!(delivered, 1);
    assert_eq!(s.h.tollgate.stats().recharges_credited_unannounced, 0, "paid just now: its event is on its way");
    let credited = s.deliver_events().await;
    assert!(credited.iter().any(|(_, o)| matches!(o, WebhookOutcome::Credited { .. })), "{credited:?}");
}

// A downgrade to a plan of the same price with lower bounds (`lite`: to at most 500, 10.00 a
// month) never charges the tenant's own values past them: turned off (`price_changed`) at
// delivery, nothing charged. And a price the key can no longer read (403: Prices: read taken
// away) is never charged blind: the claim waits, and is charged once the key is mended (a
// refused key must not turn every tenant's recharge off).
on_stores!(a_downgrade_or_an_unreadable_price_never_charges_blind);
async fn a_downgrade_or_an_unreadable_price_never_charges_blind(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    admin.set_plan("acme", "lite").await.unwrap();
    assert_eq!(s.admitted(250).await, 250);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    assert!(s.stripe.invoices_created().is_empty(), "not charged past the plan's bounds");
    assert_eq!(admin.recharge("acme", "requests").await.unwrap().off_reason(), Some("price_changed"));
    // Back on `payg`, turned on again; the key then loses Prices: read.
    admin.set_plan("acme", "payg").await.unwrap();
    admin.grant_credits("acme", "requests", 500, None, "more").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    s.stripe.refuse_reads(Some(("/v1/prices", 403)));
    let mut delivered = 0;
    for _ in 0..60 {
        s.admitted(10).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!(delivered, 0, "never charged blind");
    assert!(s.stripe.invoices_created().is_empty());
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!(view.off_reason(), None, "a key refused passes once it is right: never every tenant turned off");
    // The key mended: the claim, taken again at its lapse, is charged at the counted amount.
    s.stripe.refuse_reads(None);
    s.h.clock.advance(Duration::from_secs(tollgate::store::CLAIM_TAKEN_SECS as u64));
    for _ in 0..30 {
        s.admitted(1).await;
        delivered += s.h.tollgate.deliver_recharges().await;
    }
    assert_eq!((delivered, s.stripe.invoices_created().len()), (1, 1));
}

// The recharge invoice is in the billing currency, whatever the customer's: on main it was
// created without `currency`, so a customer whose Stripe currency is `eur` (an earlier EUR
// subscription) got an EUR invoice, the USD price's item was refused, and each recharge
// counted a `refused` failure (three turned recharge off). And a plan may have Stripe Tax
// compute the invoice's tax (`automatic_tax`), off by default.
on_stores!(the_recharge_invoice_is_in_the_billing_currency);
async fn the_recharge_invoice_is_in_the_billing_currency(s: Setup) {
    s.stripe.set_customer_currency("cus_acme", "eur");
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::new(Some(300), Some(500), None))).await.unwrap();
    assert!(s.recharged_once().await);
    let invoice = s.stripe.invoices_created()[0].clone();
    assert_eq!((&invoice["currency"], &invoice["status"]), (&serde_json::json!("usd"), &serde_json::json!("paid")));
    assert_eq!(invoice["automatic_tax"]["enabled"], false);
    assert_eq!(admin.recharge("acme", "requests").await.unwrap().state.failures, 0);
    // Stripe Tax on: the next invoice asks for it.
    let taxed =
        common::recharge::CONFIG.replace("tenant_may_set = true\n", "tenant_may_set = true\nautomatic_tax = true\n");
    s.h.tollgate.reload(tollgate::config::Config::from_toml_str(&taxed).unwrap()).await.unwrap();
    assert!(s.recharged_once().await);
    assert_eq!(s.stripe.invoices_created()[1]["automatic_tax"]["enabled"], true);
}

impl Setup {
    /// Spends (ten at a time, a 402 allowed) until a recharge is claimed and delivered, its
    /// events with it: whether one was.
    async fn recharged_once(&self) -> bool {
        for _ in 0..100 {
            self.admitted(10).await;
            if self.h.tollgate.deliver_recharges().await > 0 {
                self.deliver_events().await;
                return true;
            }
        }
        false
    }
}

// 3-D Secure leaves the recharge's invoice open for the tenant to pay: an automatic charge
// cannot authenticate, so the failure is counted (three in a row turn recharge off, as any
// payment failure), but the invoice is never voided (on main it was, and the tenant had no way
// to pay it); its hosted page is on the recharge route (`action.url`) and in one
// `balance.recharge_action_required` alert. Paid there, `invoice.paid` grants its units, counts
// its money spent again and ends the failures in a row.
on_stores!(three_d_secure_leaves_the_invoice_open_for_the_tenant_to_pay);
async fn three_d_secure_leaves_the_invoice_open_for_the_tenant_to_pay(s: Setup) {
    let admin = Admin::for_engine(&s.h.tollgate);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(RechargeAsk::default())).await.unwrap();
    s.stripe.set_card("cus_acme", common::stripe::Card::RequiresAction);
    assert_eq!(s.admitted(350).await, 350);
    assert_eq!(s.h.tollgate.deliver_recharges().await, 1);
    let invoices = s.stripe.invoices_created();
    let [invoice] = invoices.as_slice() else { panic!("{invoices:?}") };
    let id = invoice["id"].as_str().unwrap().to_owned();
    let url = invoice["hosted_invoice_url"].as_str().unwrap().to_owned();
    assert_eq!((invoice["status"].as_str(), s.stripe.voids()), (Some("open"), 0), "not voided");
    let view = admin.recharge("acme", "requests").await.unwrap();
    let unpaid = view.state.unpaid.expect("closed unpaid");
    assert_eq!((view.state.failures, view.month_spent, view.state.on()), (1, 0, true));
    let route = view.to_json();
    assert_eq!((route["action"]["recharge"].as_u64(), route["action"]["url"].as_str()), (Some(1), Some(url.as_str())));
    // Its webhook event comes too: counted once, still not voided.
    s.deliver_events().await;
    assert_eq!((s.stripe.voids(), admin.recharge("acme", "requests").await.unwrap().state.failures), (0, 1));
    #[cfg(feature = "alerts")]
    if let Some(got) = s.alerts("balance.recharge_action_required").await {
        assert_eq!(got.len(), 2, "once, to the operator and the tenant: {got:?}");
        assert_eq!(
            (got[0].1["action_url"].as_str(), got[0].1["invoice"].as_str()),
            (Some(url.as_str()), Some(id.as_str()))
        );
        assert_eq!(got[0].1["recharge"], 1);
    }
    // The tenant pays on the page.
    let granted = s.granted().await;
    s.stripe.pay_on_page(&id);
    s.deliver_events().await;
    let pack = view.state.setting.as_ref().unwrap().pack;
    assert_eq!(s.granted().await, granted + unpaid.packs * pack.units, "credited");
    let view = admin.recharge("acme", "requests").await.unwrap();
    assert_eq!((view.state.failures, view.month_spent), (0, unpaid.amount), "spent, the failures ended");
    assert!(view.state.action.is_none() && view.to_json()["action"].is_null(), "nothing left to pay");
    // Bad input: an action event whose page is not https is counted, and no page is shown.
    assert_eq!(tollgate::store::RechargeAction::new(2, "http://evil.example/pay", 0), None);
    assert_eq!(tollgate::store::RechargeAction::new(2, "https://x/\u{7f}", 0), None);
}

// With `refunds = "ignore"` (no units are taken back), a disputed or refunded recharge still
// turns recharge off: on main the events were not read at all under `ignore`, so the next
// request charged the card the customer had asked their money back from.
#[tokio::test]
async fn under_refunds_ignore_a_reversed_recharge_still_turns_recharge_off() {
    let s = setup(std::sync::Arc::new(MemoryStore::new())).await;
    let toml = common::recharge::CONFIG.replace("[stripe.credits]\n", "[stripe.credits]\nrefunds = \"ignore\"\n");
    s.h.tollgate.reload(tollgate::config::Config::from_toml_str(&toml).unwrap()).await.unwrap();
    let admin = Admin::for_engine(&s.h.tollgate);
    let small = RechargeAsk::new(Some(300), Some(500), None);
    admin.grant_credits("acme", "requests", 500, None, "first").await.unwrap();
    admin.set_recharge("acme", "requests", Some(small.clone())).await.unwrap();
    for (n, reason) in [(1u64, "disputed"), (2, "refunded")] {
        let invoice = s.recharged().await;
        let id = invoice["id"].as_str().unwrap();
        let intent = s.stripe.payment_intent_of(id).expect("paid through the API");
        let amount = invoice["amount_paid"].clone();
        let granted = s.granted().await;
        let reversal = if reason == "disputed" {
            let mut d = fixture("dispute");
            d["id"] = serde_json::json!("dp_1");
            d["payment_intent"] = serde_json::json!(intent);
            d["amount"] = amount;
            event("evt_dp", "charge.dispute.funds_withdrawn", d)
        } else {
            let mut c = fixture("charge");
            c["customer"] = serde_json::json!("cus_acme");
            c["payment_intent"] = serde_json::json!(intent);
            c["amount"] = amount.clone();
            c["amount_captured"] = amount.clone();
            c["amount_refunded"] = amount;
            c["refunded"] = serde_json::json!(true);
            event("evt_rf", "charge.refunded", c)
        };
        let (status, _) = s.signed(&reversal).await;
        assert_eq!(status, 200, "{reason}");
        assert_eq!(s.granted().await, granted, "{reason}: nothing taken back under ignore");
        let view = admin.recharge("acme", "requests").await.unwrap();
        assert_eq!((view.off_reason(), view.state.n), (Some(reason), n), "{reason}");
        let invoices = s.stripe.invoices_created().len();
        s.admitted(300).await;
        assert_eq!(s.h.tollgate.deliver_recharges().await, 0, "{reason}: not charged again");
        assert_eq!(s.stripe.invoices_created().len(), invoices);
        admin.set_recharge("acme", "requests", Some(small.clone())).await.unwrap();
    }
}
