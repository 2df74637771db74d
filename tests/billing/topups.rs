//! Prepaid top-ups from signed Stripe payments, on Stripe's own complete example objects: a
//! paid checkout grants once however many shapes of the payment arrive, line items are read
//! from the stand-in's API (a failed read is a 500 and the redelivery grants once), a refund
//! takes back its share once, and the top-up is seen at once on the node that took it and
//! within a second on the others.
#![cfg(feature = "stripe")]

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{stripe::StandIn, Harness, NOON};
use serde_json::{json, Value};
use tollgate::{
    admin::Admin,
    billing::{Secret, WebhookHandler, WebhookOutcome},
    store::{CreditBalance, KeyHash, MemoryStore, SqliteStore, Store, TenantRecord},
};

const SECRET: &str = "whsec_topups";

fn config(refunds: &str) -> String {
    format!(
        r#"
[usage]
store_timeout = "10s"
[limits]
directory_ttl = "30s"
[meters.tokens]
event_name = "tokens"
[[routes]]
path = "/generate"
reports = ["tokens"]
[plans.credits]
quotas.requests = {{ period = "prepaid" }}
quotas.tokens = {{ period = "prepaid" }}
[stripe.credits]
meter = "requests"
refunds = "{refunds}"
expires_after = "365d"
prices = {{ price_pack = 100, pack_large = 1000 }}
"#
    )
}

fn fixtures() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["resources"].clone()
}

fn event(id: &str, kind: &str, object: Value) -> String {
    let mut e = fixtures()["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(NOON - 10);
    e["data"] = json!({ "object": object });
    e.to_string()
}

/// Stripe's example checkout session, completed by `customer`, paid or not.
fn session(id: &str, customer: &str, paid: bool, invoice: Option<&str>, intent: Option<&str>) -> Value {
    let mut s = fixtures()["checkout.session"].clone();
    s["id"] = json!(id);
    s["customer"] = json!(customer);
    s["status"] = json!("complete");
    s["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
    s["amount_total"] = json!(1000);
    s["invoice"] = json!(invoice);
    s["payment_intent"] = json!(intent);
    s
}

/// A checkout session's line item on a price with this id and lookup key.
fn item(id: &str, price: &str, lookup_key: Option<&str>, quantity: u64) -> Value {
    let mut i = fixtures()["item"].clone();
    i["id"] = json!(id);
    i["price"]["id"] = json!(price);
    i["price"]["lookup_key"] = json!(lookup_key);
    i["quantity"] = json!(quantity);
    i["amount_total"] = json!(500);
    i
}

/// Stripe's example invoice, paid by `customer`, with these lines embedded (current API: the
/// price under `pricing.price_details`).
fn invoice(id: &str, customer: &str, lines: &[(&str, u64)]) -> Value {
    let mut inv = fixtures()["invoice"].clone();
    inv["id"] = json!(id);
    inv["customer"] = json!(customer);
    inv["status"] = json!("paid");
    inv["amount_paid"] = json!(1000);
    inv["total"] = json!(1000);
    let data: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(n, (price, quantity))| {
            let mut l = fixtures()["line_item"].clone();
            l["id"] = json!(format!("il_{id}_{n}"));
            l["pricing"] = json!({ "type": "price_details", "price_details": { "price": price, "product": "prod_1" },
                "unit_amount_decimal": "100" });
            l["quantity"] = json!(quantity);
            l["amount"] = json!(500);
            l["parent"] = json!({ "type": "invoice_item_details", "invoice_item_details":
                { "invoice_item": "ii_1", "proration": false, "proration_details": { "credited_items": null },
                  "subscription": null }, "subscription_item_details": null });
            l
        })
        .collect();
    inv["lines"] =
        json!({ "object": "list", "data": data, "has_more": false, "url": format!("/v1/invoices/{id}/lines") });
    inv
}

/// The stand-in lists `intent` as the paid payment of `invoice` (Stripe's invoice payments: the
/// only place API versions from 2025 name an invoice's payment intent).
fn paid_by(s: &Setup, invoice: &str, intent: &str) {
    let mut payment = fixtures()["invoice_payment"].clone();
    payment["id"] = json!(format!("inpay_{invoice}"));
    payment["invoice"] = json!(invoice);
    payment["status"] = json!("paid");
    payment["payment"] = json!({ "type": "payment_intent", "payment_intent": intent });
    s.stripe.add_invoice_payments(invoice, vec![payment]);
}

fn charge(customer: &str, intent: &str, amount: u64, refunded: u64) -> Value {
    let mut c = fixtures()["charge"].clone();
    c["customer"] = json!(customer);
    c["payment_intent"] = json!(intent);
    c["amount"] = json!(amount);
    c["amount_captured"] = json!(amount);
    c["amount_refunded"] = json!(refunded);
    c["refunded"] = json!(refunded == amount);
    c
}

/// Stripe's example credit note of `invoice`, its lines crediting these invoice lines.
fn credit_note(id: &str, invoice: &str, lines: &[(&str, u64)], refunded: u64) -> Value {
    let mut n = fixtures()["credit_note"].clone();
    n["id"] = json!(id);
    n["invoice"] = json!(invoice);
    // The invoice's customer (every invoice of these tests is acme's).
    n["customer"] = json!("cus_acme");
    n["status"] = json!("issued");
    // Issued after the payment (Stripe's "The Credit Note object": `type` `post_payment`): a
    // refund's note.
    n["type"] = json!("post_payment");
    // What it refunded: its `refunds` (a credit note object names no `refund_amount`; that is
    // a parameter of creating one).
    n["refunds"] = if refunded > 0 {
        json!([{ "amount_refunded": refunded, "refund": format!("re_{id}"), "type": "refund",
                 "payment_record_refund": null }])
    } else {
        json!([])
    };
    n["out_of_band_amount"] = json!(null);
    n["customer_balance_transaction"] = json!(null);
    let template = n["lines"]["data"][0].clone();
    let data: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(i, (line, amount))| {
            let mut l = template.clone();
            l["id"] = json!(format!("cnli_{id}_{i}"));
            l["invoice_line_item"] = json!(line);
            l["amount"] = json!(amount);
            // Neither discounted nor taxed, as the lines it credits.
            l["discount_amounts"] = json!([]);
            l["pretax_credit_amounts"] = json!([]);
            l["taxes"] = json!([]);
            l
        })
        .collect();
    let total = lines.iter().map(|(_, a)| a).sum::<u64>();
    n["amount"] = json!(total);
    n["pre_payment_amount"] = json!(0);
    n["post_payment_amount"] = json!(total);
    n["lines"]["data"] = json!(data);
    n["lines"]["has_more"] = json!(false);
    n
}

/// Stripe's example refund of `intent`, its metadata naming units or not.
fn refund_of(id: &str, intent: &str, amount: u64, units: Option<&str>) -> Value {
    let mut r = fixtures()["refund"].clone();
    r["id"] = json!(id);
    r["payment_intent"] = json!(intent);
    r["amount"] = json!(amount);
    r["metadata"] = units.map_or_else(|| json!({}), |u| json!({ "tollgate_units": u }));
    r
}

struct Setup {
    h: Harness,
    store: Arc<dyn Store>,
    handler: WebhookHandler,
    stripe: StandIn,
    toml: String,
}

async fn setup(store: Arc<dyn Store>, refunds: &str) -> Setup {
    let acme = TenantRecord::new("acme".into(), "credits".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let toml = config(refunds);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    let stripe = StandIn::start(&[]).await;
    // The account's other prices, which the tests' payments name beside the packs (Stripe
    // knows every price a payment names: a 404 on one is a key of another account).
    for price in ["seat", "price_seat", "price_plan_monthly"] {
        stripe.add_price(price, None, true);
    }
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]).with_api_key(
        Secret::new(common::stripe::SECRET),
        Some(&stripe.url),
        Duration::from_secs(5),
    );
    Setup { h, store, handler, stripe, toml }
}

impl Setup {
    async fn signed(&self, payload: &str) -> (u16, WebhookOutcome) {
        self.signed_at(payload, NOON).await
    }

    /// Signed at `t`, when the handler's clock has moved there.
    async fn signed_at(&self, payload: &str, t: i64) -> (u16, WebhookOutcome) {
        let signature = stripe_webhook::Webhook::generate_test_header(payload, SECRET, Some(t));
        let reply = self.handler.handle(Some(&signature), payload.as_bytes()).await;
        (reply.status().as_u16(), reply.outcome)
    }

    async fn balance(&self) -> CreditBalance {
        let (_, balances) = Admin::new(self.store.clone()).credits("acme").await.unwrap();
        balances.into_iter().map(|(_, b)| b).next().unwrap_or_default()
    }

    /// How many of `n` requests acme gets through now.
    async fn admitted(&self, n: usize) -> usize {
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
}

fn credited(units: u64, grant: &str) -> WebhookOutcome {
    WebhookOutcome::Credited { tenant: "acme".into(), meter: "requests".into(), units, grant: grant.into() }
}

/// The stores a fleet's webhooks reach: memory, SQLite, PostgreSQL and DynamoDB (the servers'
/// skipped loudly outside CI without them). Redis holds quotas only: the audit drives its
/// payments (tests/audit).
macro_rules! on_stores {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn memory() {
                super::$test(super::setup(std::sync::Arc::new(super::MemoryStore::new()), "proportional").await).await;
            }
            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
                super::$test(super::setup(std::sync::Arc::new(store), "proportional").await).await;
            }
            #[tokio::test]
            async fn postgres() {
                #[cfg(feature = "postgres")]
                if let Some((store, _)) = crate::common::postgres::store().await {
                    super::$test(super::setup(std::sync::Arc::new(store), "proportional").await).await;
                }
                #[cfg(not(feature = "postgres"))]
                assert!(std::env::var_os("CI").is_none(), "CI runs the billing tests with the postgres feature");
            }
            #[cfg(feature = "dynamodb")]
            #[tokio::test]
            async fn dynamodb() {
                if let Some(store) = crate::common::dynamo::table().await {
                    super::$test(super::setup(std::sync::Arc::new(store), "proportional").await).await;
                }
            }
        }
    };
}

on_stores!(one_payment_grants_once_whatever_shapes_of_it_arrive);
async fn one_payment_grants_once_whatever_shapes_of_it_arrive(s: Setup) {
    assert_eq!(s.admitted(1).await, 0, "no balance yet");
    s.stripe.add_lines(
        "/v1/checkout/sessions/cs_1/line_items",
        vec![item("li_1", "price_pack", None, 2), item("li_2", "price_other", Some("pack_large"), 1)],
    );
    // A delayed payment method: completed unpaid first. Nothing is granted.
    let unpaid = event("evt_1", "checkout.session.completed", session("cs_1", "cus_acme", false, Some("in_1"), None));
    assert_eq!(s.signed(&unpaid).await, (200, WebhookOutcome::Ignored));
    assert_eq!(s.balance().await, CreditBalance::default());
    // Then paid: 2 packs of 100 and one of 1,000, read from the API.
    let paid = event(
        "evt_2",
        "checkout.session.async_payment_succeeded",
        session("cs_1", "cus_acme", true, Some("in_1"), Some("pi_1")),
    );
    assert_eq!(s.signed(&paid).await, (200, credited(1200, "in_1")));
    assert_eq!(s.h.tollgate.stats().webhooks_applied, 1);
    // At once on this node.
    assert_eq!(s.admitted(3).await, 3);
    // The same payment's invoice, and the delivery again: nothing more.
    let inv = event("evt_3", "invoice.paid", invoice("in_1", "cus_acme", &[("price_pack", 2), ("pack_large", 1)]));
    assert_eq!(s.signed(&inv).await, (200, WebhookOutcome::Duplicate));
    assert_eq!(s.signed(&paid).await, (200, WebhookOutcome::Duplicate));
    let b = s.balance().await;
    assert_eq!(b.granted, 1200);
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!((g.id.as_str(), g.units, g.payment.as_deref()), ("in_1", 1200, Some("pi_1")));
    assert_eq!(g.expires_at, Some(NOON + 365 * 86_400), "expires_after from the payment, or its later delivery");
}

on_stores!(an_invoice_grants_from_its_embedded_lines_and_a_session_without_credit_prices_grants_nothing);
async fn an_invoice_grants_from_its_embedded_lines_and_a_session_without_credit_prices_grants_nothing(s: Setup) {
    // The invoice names its payment intent only in its payments (API versions from 2025).
    paid_by(&s, "in_9", "pi_9");
    let inv = event("evt_1", "invoice.paid", invoice("in_9", "cus_acme", &[("price_pack", 3), ("seat", 4)]));
    assert_eq!(s.signed(&inv).await, (200, credited(300, "in_9")));
    assert_eq!(s.stripe.list_reads(), 1, "only its payment intent was read");
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants[0].payment.as_deref(), Some("pi_9"));
    // Paid from the customer's credit balance: nothing left to pay, paid for all the same.
    let mut from_balance = invoice("in_bal", "cus_acme", &[("price_pack", 1)]);
    from_balance["amount_paid"] = json!(0);
    from_balance["amount_remaining"] = json!(0);
    assert_eq!(s.signed(&event("evt_b", "invoice.paid", from_balance)).await, (200, credited(100, "in_bal")));
    // So its refund finds it.
    let refund = event("evt_9", "charge.refunded", charge("cus_acme", "pi_9", 1000, 1000));
    let outcome = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 300 };
    assert_eq!(s.signed(&refund).await, (200, outcome));
    // A subscription checkout for something else: not a credit purchase.
    s.stripe.add_lines("/v1/checkout/sessions/cs_2/line_items", vec![item("li_9", "price_seat", None, 1)]);
    let other = event("evt_2", "checkout.session.completed", session("cs_2", "cus_acme", true, None, Some("pi_2")));
    assert_eq!(s.signed(&other).await, (200, WebhookOutcome::NotCredited { prices: vec!["price_seat".into()] }));
    // A customer no tenant has yet: paid for, so delivered again (500) until one has it.
    s.stripe.add_lines("/v1/checkout/sessions/cs_3/line_items", vec![item("li_3", "price_pack", None, 1)]);
    let stranger =
        event("evt_3", "checkout.session.completed", session("cs_3", "cus_nobody", true, None, Some("pi_3")));
    assert_eq!(s.signed(&stranger).await.0, 500);
    // A free trial's invoice, a fully discounted one: paid, for nothing.
    let mut free = invoice("in_free", "cus_acme", &[("price_pack", 5)]);
    free["total"] = json!(0);
    free["amount_paid"] = json!(0);
    assert_eq!(s.signed(&event("evt_5", "invoice.paid", free)).await, (200, WebhookOutcome::Ignored));
    // Proration lines (a quantity changed mid-period) and credits for unused time buy nothing.
    let mut prorated = invoice("in_pro", "cus_acme", &[("price_pack", 10), ("price_pack", 1)]);
    prorated["lines"]["data"][0]["parent"]["invoice_item_details"]["proration"] = json!(true);
    prorated["lines"]["data"][1]["amount"] = json!(-450);
    assert_eq!(s.signed(&event("evt_6", "invoice.paid", prorated)).await, (200, WebhookOutcome::Ignored));
    // A forged payment: 400, nothing.
    let forged = event("evt_4", "checkout.session.completed", session("cs_3", "cus_acme", true, None, Some("pi_4")));
    let signature = stripe_webhook::Webhook::generate_test_header(&forged, "whsec_forger", Some(NOON));
    assert_eq!(s.handler.handle(Some(&signature), forged.as_bytes()).await.status().as_u16(), 400);
    assert_eq!(s.balance().await.granted, 100);
}

/// An invoice of proration lines of customer acme's subscription item `si_1`: `(price, net
/// amount, the line it credits)`, a negative amount a credit for unused time, a positive one a
/// charge for the rest of the period (Stripe's invoice line item: `parent.subscription_item_details`
/// with `proration` and `proration_details.credited_items`).
fn prorations(id: &str, lines: &[(&str, i64, &str)]) -> Value {
    let shape: Vec<(&str, u64)> = lines.iter().map(|(price, _, _)| (*price, 1)).collect();
    let mut inv = invoice(id, "cus_acme", &shape);
    for (n, (_, amount, credited_line)) in lines.iter().enumerate() {
        let credited = (*amount < 0).then(|| json!({ "invoice": "in_9", "invoice_line_items": [credited_line] }));
        inv["lines"]["data"][n]["amount"] = json!(amount);
        inv["lines"]["data"][n]["parent"] = json!({ "type": "subscription_item_details",
            "invoice_item_details": null,
            "subscription_item_details": { "invoice_item": null, "proration": true,
                "proration_details": { "credited_items": credited },
                "subscription": "sub_1", "subscription_item": "si_1" } });
    }
    let total: i64 = lines.iter().map(|(_, a, _)| a).sum();
    inv["total"] = json!(total);
    inv["amount_paid"] = json!(total.max(0));
    inv
}

// A proration credit (a downgrade or a cancel with proration: a negative proration line whose
// `proration_details.credited_items` names the invoice it credits, as Stripe's invoice line
// item documents it) on a credit price takes back `bought × credit / paid` from that
// invoice's grant, once per credit line; a credit on another price takes nothing (main took
// nothing: the customer kept the units of the money credited back).
on_stores!(a_proration_credit_takes_back_what_it_credits);
async fn a_proration_credit_takes_back_what_it_credits(s: Setup) {
    paid_by(&s, "in_9", "pi_9");
    // 300 units for 5.00, beside seats.
    let paid = invoice("in_9", "cus_acme", &[("price_pack", 3), ("seat", 4)]);
    s.stripe.add_lines("/v1/invoices/in_9/lines", paid["lines"]["data"].as_array().unwrap().clone());
    assert_eq!(s.signed(&event("evt_1", "invoice.paid", paid)).await, (200, credited(300, "in_9")));
    assert_eq!(s.admitted(20).await, 20);
    // The downgrade's invoice: 2.50 of the pack and 1.00 of the seats credited for unused time.
    let credit = event(
        "evt_2",
        "invoice.paid",
        prorations("in_dn", &[("price_pack", -250, "il_in_9_0"), ("seat", -100, "il_in_9_1")]),
    );
    let (code, outcome) = s.signed(&credit).await;
    assert_eq!(code, 200);
    assert_eq!(outcome, WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 150 });
    assert_eq!(s.balance().await.granted, 150, "300 × 2.50 / 5.00 taken back; the seats' credit takes nothing");
    let (code, outcome) = s.signed(&credit).await;
    assert_eq!(code, 200);
    assert!(!matches!(outcome, WebhookOutcome::Refunded { .. }), "{outcome:?}");
    assert_eq!(s.balance().await.granted, 150, "once per credit line");
    // A refund of the rest of the pack later takes what the grant still holds.
    s.stripe.add_credit_notes("in_9", vec![credit_note("cn_9", "in_9", &[("il_in_9_0", 500)], 500)]);
    let refund = event("evt_3", "charge.refunded", charge("cus_acme", "pi_9", 1000, 500));
    let (code, outcome) = s.signed(&refund).await;
    assert!(matches!(outcome, WebhookOutcome::Refunded { .. }), "{code} {outcome:?}");
    assert_eq!(s.balance().await.granted, 0);
}

// A proration credit is net of the proration charge on the same subscription item: a quantity
// raised (credit of the old 3 packs, charge of the new 6) takes nothing, one lowered (3 to 2)
// takes what the net credit bought; a credit's discount lowers it. A proration credit of an
// invoice whose grant has not landed yet is answered 500 (Stripe delivers it again), and taken
// once the grant lands.
on_stores!(a_proration_credit_is_net_of_the_charge_of_the_new_quantity);
async fn a_proration_credit_is_net_of_the_charge_of_the_new_quantity(s: Setup) {
    paid_by(&s, "in_9", "pi_9");
    let mut first = invoice("in_9", "cus_acme", &[("price_pack", 3), ("seat", 4)]);
    first["status_transitions"]["paid_at"] = json!(NOON - 3_600);
    s.stripe.add_invoice(first.clone());
    let paid = event("evt_1", "invoice.paid", first);
    // The downgrade comes first: the grant it credits has not landed.
    let down = event(
        "evt_2",
        "invoice.paid",
        prorations("in_dn", &[("price_pack", -375, "il_in_9_0"), ("price_pack", 250, "")]),
    );
    assert_eq!(s.signed(&down).await.0, 500, "the grant it credits is still on its way");
    assert_eq!(s.signed(&paid).await, (200, credited(300, "in_9")));
    let up = event(
        "evt_3",
        "invoice.paid",
        prorations("in_up", &[("price_pack", -250, "il_in_9_0"), ("price_pack", 500, "")]),
    );
    let (code, outcome) = s.signed(&up).await;
    assert_eq!(code, 200);
    assert!(!matches!(outcome, WebhookOutcome::Refunded { .. }), "an upgrade takes nothing: {outcome:?}");
    // A price switched by replacing the item (credit on si_1, charge on si_2), and a charge
    // naming no item: netted within the subscription.
    for (n, item) in [json!("si_2"), json!(null)].into_iter().enumerate() {
        let mut switch =
            prorations(&format!("in_sw{n}"), &[("price_pack", -250, "il_in_9_0"), ("pack_large", 300, "")]);
        switch["lines"]["data"][1]["parent"]["subscription_item_details"]["subscription_item"] = item;
        let (code, outcome) = s.signed(&event(&format!("evt_sw{n}"), "invoice.paid", switch)).await;
        assert_eq!(code, 200);
        assert!(!matches!(outcome, WebhookOutcome::Refunded { .. }), "a switch up takes nothing: {outcome:?}");
    }
    assert_eq!(s.balance().await.granted, 300);
    let (code, outcome) = s.signed(&down).await;
    assert_eq!(code, 200);
    assert_eq!(
        outcome,
        WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 75 },
        "300 × (3.75 − 2.50) / 5.00"
    );
    // A credit of 2.00 with 1.00 of it discounted: 1.00 credited.
    let mut discounted = prorations("in_ds", &[("price_pack", -200, "il_in_9_0")]);
    discounted["lines"]["data"][0]["discount_amounts"] = json!([{ "amount": 100, "discount": "di_1" }]);
    let (_, outcome) = s.signed(&event("evt_4", "invoice.paid", discounted)).await;
    assert_eq!(outcome, WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 60 });
    assert_eq!(s.balance().await.granted, 165);
    // A credit of an older invoice no grant has (bought before credits were sold): nothing to
    // take, and the invoice's own pack is granted.
    let mut old = invoice("in_old", "cus_acme", &[("price_pack", 1)]);
    old["status_transitions"]["paid_at"] = json!(NOON - 40 * 86_400);
    s.stripe.add_invoice(old);
    paid_by(&s, "in_re", "pi_re");
    let mut renewal = prorations("in_re", &[("price_pack", -100, "il_in_old_0"), ("price_pack", 0, "")]);
    renewal["lines"]["data"][0]["parent"]["subscription_item_details"]["proration_details"]["credited_items"]
        ["invoice"] = json!("in_old");
    renewal["lines"]["data"][1] = invoice("in_re", "cus_acme", &[("price_pack", 2)])["lines"]["data"][0].clone();
    renewal["lines"]["data"][1]["id"] = json!("il_in_re_1");
    renewal["total"] = json!(400);
    renewal["amount_paid"] = json!(400);
    assert_eq!(s.signed(&event("evt_5", "invoice.paid", renewal)).await, (200, credited(200, "in_re")));
    // A credit of a customer not linked yet, of an invoice paid an hour ago: its grant is on its
    // way (answered 500 until the tenant is linked), so the credit waits too.
    let mut theirs = invoice("in_n", "cus_new", &[("price_pack", 1)]);
    theirs["status_transitions"]["paid_at"] = json!(NOON - 3_600);
    s.stripe.add_invoice(theirs);
    let mut credit = prorations("in_nd", &[("price_pack", -50, "il_in_n_0")]);
    credit["customer"] = json!("cus_new");
    credit["lines"]["data"][0]["parent"]["subscription_item_details"]["proration_details"]["credited_items"]
        ["invoice"] = json!("in_n");
    assert_eq!(s.signed(&event("evt_6", "invoice.paid", credit)).await.0, 500);
    // A credit naming the invoice that carries it: left to that invoice's own payment.
    let mut own = prorations("in_own", &[("price_pack", -100, "il_in_own_1"), ("price_pack", 0, "")]);
    own["lines"]["data"][0]["parent"]["subscription_item_details"]["proration_details"]["credited_items"]["invoice"] =
        json!("in_own");
    let (code, outcome) = s.signed(&event("evt_7", "invoice.paid", own)).await;
    assert_eq!(code, 200);
    assert!(!matches!(outcome, WebhookOutcome::Refunded { .. }), "{outcome:?}");
    assert_eq!(s.balance().await.granted, 365, "165 and the renewal's 200");
}

// An invoice created, finalized and paid through the API (what a recharge will do), as the
// stand-in emits its `invoice.paid`, grants once through the top-up path: its lines, its
// payment and its metadata are read as they are of any paid invoice.
on_stores!(an_invoice_paid_through_the_api_grants_once);
async fn an_invoice_paid_through_the_api_grants_once(s: Setup) {
    use stripe_billing::{
        invoice::{CreateInvoice, CreateInvoicePendingInvoiceItemsBehavior, FinalizeInvoiceInvoice, PayInvoice},
        invoice_item::{CreateInvoiceItem, PricingParam},
    };
    s.stripe.add_price("price_pack", None, true);
    s.stripe.set_unit_amount("price_pack", 500);
    let client = stripe::ClientBuilder::new(super::common::stripe::SECRET)
        .url(s.stripe.url.as_str())
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let invoice = CreateInvoice::new()
        .customer("cus_acme")
        .pending_invoice_items_behavior(CreateInvoicePendingInvoiceItemsBehavior::Exclude)
        .send(&client)
        .await
        .unwrap();
    let id = invoice.id.clone().unwrap();
    let mut pricing = PricingParam::new();
    pricing.price = Some("price_pack".into());
    CreateInvoiceItem::new()
        .customer("cus_acme")
        .invoice(id.as_str())
        .pricing(pricing)
        .quantity(2u64)
        .send(&client)
        .await
        .unwrap();
    FinalizeInvoiceInvoice::new(id.clone()).send(&client).await.unwrap();
    PayInvoice::new(id.clone()).send(&client).await.unwrap();
    // Every event the payment emitted delivered: only `invoice.paid` grants.
    let mut granted = 0;
    let mut paid = String::new();
    for e in s.stripe.take_emitted() {
        let (code, outcome) = s.signed(&e.to_string()).await;
        assert_eq!(code, 200, "{}", e["type"]);
        if e["type"] == "invoice.paid" {
            assert_eq!(outcome, credited(200, id.as_str()), "2 packs of 100");
            paid = e.to_string();
            granted += 1;
        } else {
            assert!(!matches!(outcome, WebhookOutcome::Credited { .. }), "{}: {outcome:?}", e["type"]);
        }
    }
    assert_eq!(granted, 1);
    assert_eq!(s.signed(&paid).await, (200, WebhookOutcome::Duplicate), "a redelivery grants once");
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants[0].paid, Some(1000));
    assert!(grants[0].payment.as_deref().is_some_and(|p| p.starts_with("pi_")), "its payment intent, for refunds");
}

on_stores!(the_shapes_of_one_payment_grant_once_even_on_different_meters);
async fn the_shapes_of_one_payment_grant_once_even_on_different_meters(s: Setup) {
    // The session names another balance in its metadata; its invoice does not.
    let mut paid = session("cs_1", "cus_acme", true, Some("in_1"), Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "70", "tollgate_meter": "tokens" });
    let credited_tokens =
        WebhookOutcome::Credited { tenant: "acme".into(), meter: "tokens".into(), units: 70, grant: "in_1".into() };
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited_tokens));
    let inv = event("evt_2", "invoice.paid", invoice("in_1", "cus_acme", &[("price_pack", 2)]));
    assert_eq!(s.signed(&inv).await, (200, WebhookOutcome::Duplicate));
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
}

#[tokio::test]
async fn without_a_secret_key_a_payment_needing_its_line_items_is_not_retried_forever() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = setup(store.clone(), "proportional").await;
    let handler = s.h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let payload = event("evt_1", "checkout.session.completed", session("cs_1", "cus_acme", true, None, Some("pi_1")));
    let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(NOON));
    let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
    assert_eq!((reply.status().as_u16(), reply.outcome), (200, WebhookOutcome::Ignored));
    assert_eq!(s.balance().await.granted, 0);
}

on_stores!(line_items_that_cannot_be_read_answer_500_and_the_redelivery_grants_once);
async fn line_items_that_cannot_be_read_answer_500_and_the_redelivery_grants_once(s: Setup) {
    s.stripe.add_lines("/v1/checkout/sessions/cs_1/line_items", vec![item("li_1", "price_pack", None, 5)]);
    s.stripe.fail_reads(1);
    let paid = event("evt_1", "checkout.session.completed", session("cs_1", "cus_acme", true, None, Some("pi_1")));
    let (status, outcome) = s.signed(&paid).await;
    assert_eq!(status, 500);
    assert!(matches!(outcome, WebhookOutcome::ApiFailed(_)), "{outcome:?}");
    assert_eq!(s.balance().await.granted, 0);
    assert_eq!(s.signed(&paid).await, (200, credited(500, "pi_1")));
    assert_eq!(s.signed(&paid).await, (200, WebhookOutcome::Duplicate));
    assert_eq!(s.balance().await.granted, 500);
    // Metadata units: no read at all; a bad value grants nothing.
    let reads = s.stripe.list_reads();
    let mut meta = session("cs_2", "cus_acme", true, None, Some("pi_2"));
    meta["metadata"] = json!({ "tollgate_units": "250" });
    assert_eq!(s.signed(&event("evt_2", "checkout.session.completed", meta)).await, (200, credited(250, "pi_2")));
    let mut bad = session("cs_3", "cus_acme", true, None, Some("pi_3"));
    bad["metadata"] = json!({ "tollgate_units": "lots" });
    assert_eq!(s.signed(&event("evt_3", "checkout.session.completed", bad)).await, (200, WebhookOutcome::Ignored));
    assert_eq!(s.stripe.list_reads(), reads);
    assert_eq!(s.balance().await.granted, 750);
}

on_stores!(a_refund_takes_back_what_its_money_bought_once);
async fn a_refund_takes_back_what_its_money_bought_once(s: Setup) {
    let mut paid = session("cs_1", "cus_acme", true, None, Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "100" });
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(100, "pi_1")));
    assert_eq!(s.admitted(20).await, 20);
    // Half of the 10.00 refunded: the 50 units it bought, from what the grant still holds.
    let half = event("evt_2", "charge.refunded", charge("cus_acme", "pi_1", 1000, 500));
    let taken = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 50 };
    assert_eq!(s.signed(&half).await, (200, taken));
    assert_eq!(s.signed(&half).await, (200, WebhookOutcome::Duplicate), "once");
    let rest = event("evt_3", "charge.refunded", charge("cus_acme", "pi_1", 1000, 1000));
    let (_, outcome) = s.signed(&rest).await;
    assert!(matches!(outcome, WebhookOutcome::Refunded { .. }), "{outcome:?}");
    // Everything was taken back: the units used stay billed, nothing more is served.
    assert_eq!(s.admitted(100).await, 0);
    // The units this node held in its lease left with the refunded grant: given back at the
    // stop, they do not come back to the balance.
    s.h.tollgate.shutdown().await.unwrap();
    let b = s.balance().await;
    assert_eq!((b.granted, b.left()), (0, 0), "{b:?}");
    // A refund of a payment of neither a checkout session nor an invoice (no grant can come of
    // it) is not kept.
    let other = event("evt_4", "charge.refunded", charge("cus_acme", "pi_other", 1000, 1000));
    assert_eq!(s.signed(&other).await, (200, WebhookOutcome::Ignored));
}

// Two packs of 100 units, 100 used, the older (spent first) refunded in full: the refund takes
// the 100 the balance still holds, so nothing is left, as when the newer one is refunded (on
// main it took the older pack's 100 "spent" units back from the used total and left 100 to
// serve).
on_stores!(refunding_either_of_two_packs_takes_what_the_balance_still_holds);
async fn refunding_either_of_two_packs_takes_what_the_balance_still_holds(s: Setup) {
    for (n, intent) in ["pi_a", "pi_b"].into_iter().enumerate() {
        let mut paid = session(&format!("cs_{intent}"), "cus_acme", true, None, Some(intent));
        paid["metadata"] = json!({ "tollgate_units": "100" });
        let paid = event(&format!("evt_{n}"), "checkout.session.completed", paid);
        assert_eq!(s.signed(&paid).await, (200, credited(100, intent)));
    }
    assert_eq!(s.admitted(100).await, 100);
    let refund = event("evt_r", "charge.refunded", charge("cus_acme", "pi_a", 1000, 1000));
    let (status, outcome) = s.signed(&refund).await;
    assert_eq!(status, 200);
    assert!(matches!(outcome, WebhookOutcome::Refunded { .. }), "{outcome:?}");
    assert_eq!(s.admitted(10).await, 0, "the refunded pack's units were the unused ones");
    assert_eq!(s.signed(&refund).await, (200, WebhookOutcome::Duplicate), "once");
    s.h.tollgate.shutdown().await.unwrap();
    let b = s.balance().await;
    assert_eq!((b.granted, b.left()), (100, 0), "{b:?}");
}

// A subscription that sells credits by its metadata: each renewal invoice carries the
// subscription's metadata under `parent.subscription_details.metadata` (Stripe's API
// reference, "The Invoice object": `parent.subscription_details.metadata`, "a snapshot of the
// subscription's metadata at the time of invoice finalization"), not in its own `metadata`.
// Every period's invoice is credited (main credited none: it read only the invoice's own).
on_stores!(a_subscription_selling_credits_by_metadata_credits_every_period);
async fn a_subscription_selling_credits_by_metadata_credits_every_period(s: Setup) {
    for (n, id) in ["in_p1", "in_p2"].into_iter().enumerate() {
        let mut inv = invoice(id, "cus_acme", &[("price_plan_monthly", 1)]);
        inv["billing_reason"] = json!(if n == 0 { "subscription_create" } else { "subscription_cycle" });
        inv["metadata"] = json!({});
        inv["parent"] = json!({ "type": "subscription_details", "quote_details": null,
            "subscription_details": { "metadata": { "tollgate_units": "250" }, "subscription": "sub_1" } });
        let paid = event(&format!("evt_{id}"), "invoice.paid", inv);
        assert_eq!(s.signed(&paid).await, (200, credited(250, id)), "period {n}");
    }
    assert_eq!(s.balance().await.granted, 500);
    // The invoice's own metadata, when it says so, wins.
    let mut inv = invoice("in_p3", "cus_acme", &[("price_plan_monthly", 1)]);
    inv["metadata"] = json!({ "tollgate_units": "10" });
    inv["parent"] = json!({ "type": "subscription_details", "quote_details": null,
        "subscription_details": { "metadata": { "tollgate_units": "250" }, "subscription": "sub_1" } });
    assert_eq!(s.signed(&event("evt_p3", "invoice.paid", inv)).await, (200, credited(10, "in_p3")));
}

// The subscription's metadata names a period's units, so it grants only on the invoices of a
// period: `billing_reason` `subscription_create` and `subscription_cycle` (Stripe's API
// reference, "The Invoice object": `billing_reason`). Stripe copies it onto every invoice of the
// subscription: a mid-period change invoiced at once (`subscription_update`, a proration of
// 1.33), a threshold invoice (`subscription_threshold`) or a one-off invoice of it (`manual`)
// carries it too, and must grant by its own metadata or lines only (main granted the full 6,000
// on each, so an upgrade and downgrade loop in the portal gave units for nothing).
#[tokio::test]
async fn subscription_metadata_grants_only_on_a_periods_invoice() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    let parent = json!({ "type": "subscription_details", "quote_details": null,
        "subscription_details": { "metadata": { "tollgate_units": "6000" }, "subscription": "sub_1" } });
    for (n, reason) in ["subscription_update", "subscription_threshold", "manual"].into_iter().enumerate() {
        let id = format!("in_mid{n}");
        let mut inv = invoice(&id, "cus_acme", &[("price_plan_monthly", 1)]);
        inv["billing_reason"] = json!(reason);
        inv["metadata"] = json!({});
        inv["parent"] = parent.clone();
        inv["total"] = json!(133);
        inv["amount_paid"] = json!(133);
        let (status, outcome) = s.signed(&event(&format!("evt_mid{n}"), "invoice.paid", inv)).await;
        assert_eq!(status, 200, "{reason}");
        assert!(matches!(outcome, WebhookOutcome::NotCredited { .. }), "{reason}: {outcome:?}");
    }
    assert_eq!(s.balance().await.granted, 0, "no period's units for a proration");
    // Its own lines still grant: a credit pack bought on the subscription's one-off invoice.
    let mut inv = invoice("in_pack", "cus_acme", &[("price_pack", 2)]);
    inv["billing_reason"] = json!("manual");
    inv["metadata"] = json!({});
    inv["parent"] = parent.clone();
    paid_by(&s, "in_pack", "pi_pack");
    let (_, outcome) = s.signed(&event("evt_pack", "invoice.paid", inv)).await;
    assert!(matches!(outcome, WebhookOutcome::Credited { units: 200, .. }), "{outcome:?}");
    // The renewal grants its period's units.
    let mut inv = invoice("in_cycle", "cus_acme", &[("price_plan_monthly", 1)]);
    inv["billing_reason"] = json!("subscription_cycle");
    inv["metadata"] = json!({});
    inv["parent"] = parent;
    assert_eq!(s.signed(&event("evt_cycle", "invoice.paid", inv)).await, (200, credited(6000, "in_cycle")));
    assert_eq!(s.balance().await.granted, 6200);
}

// A coupon is listed twice on a line: in `discount_amounts` and again in
// `pretax_credit_amounts` with `type: "discount"` (Stripe's API reference, "The Invoice Line
// Item object": `pretax_credit_amounts`, "the pretax credit amounts (ex: discount, credit
// grants, etc)", each with `type` `credit_balance_transaction` or `discount`). What the pack
// cost subtracts it once, and a billing credit's `credit_balance_transaction` entry once: a
// line of 100.00 with 20.00 off and 10.00 of billing credits was paid 70.00 (main read 50.00,
// so a refund took too many units back).
on_stores!(a_discount_listed_in_both_arrays_is_subtracted_once);
async fn a_discount_listed_in_both_arrays_is_subtracted_once(s: Setup) {
    let mut inv = invoice("in_c", "cus_acme", &[("price_pack", 1)]);
    let line = &mut inv["lines"]["data"][0];
    line["amount"] = json!(10_000);
    line["discount_amounts"] = json!([{ "amount": 2000, "discount": "di_1" }]);
    line["pretax_credit_amounts"] = json!([
        { "amount": 2000, "credit_balance_transaction": null, "discount": "di_1", "type": "discount" },
        { "amount": 1000, "credit_balance_transaction": "cbtxn_1", "discount": null, "type": "credit_balance_transaction" },
    ]);
    line["taxes"] = json!([]);
    inv["total"] = json!(7000);
    inv["amount_paid"] = json!(7000);
    paid_by(&s, "in_c", "pi_c");
    assert_eq!(s.signed(&event("evt_c1", "invoice.paid", inv)).await, (200, credited(100, "in_c")));
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants[0].paid, Some(7000), "what the customer paid for the pack");
    // Half of it refunded: half the units, under `credits_first` or pro rata alike.
    let refund = event("evt_c2", "charge.refunded", charge("cus_acme", "pi_c", 7000, 3500));
    let half = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 50 };
    assert_eq!(s.signed(&refund).await, (200, half));
}

// What a pack cost is what the customer paid: an invoice line's `amount` is before its
// discounts and tax (Stripe's API reference, "The Invoice Line Item object": `amount`, "the
// amount, in cents, before discounts and taxes"; `discount_amounts`, `pretax_credit_amounts`,
// `taxes` with `tax_behavior`). A pack of 100 units listed at 10.00, 2.00 off and 0.80 of
// exclusive tax, was paid 8.80: refunded in full (the charge's 8.80), it takes all 100 units
// back under either attribution (main counted its cost as 10.00, so `credits_first` took 88).
async fn a_discounted_pack_refunded_in_full_takes_all_its_units(s: Setup) {
    let mut inv = invoice("in_d", "cus_acme", &[("price_pack", 1)]);
    let line = &mut inv["lines"]["data"][0];
    line["amount"] = json!(1000);
    line["discount_amounts"] = json!([{ "amount": 200, "discount": "di_1" }]);
    line["pretax_credit_amounts"] = json!([]);
    line["taxes"] = json!([{ "amount": 80, "tax_behavior": "exclusive", "tax_rate_details": null,
        "taxability_reason": "standard_rated", "taxable_amount": 800, "type": "tax_rate_details" }]);
    inv["total"] = json!(880);
    inv["amount_paid"] = json!(880);
    paid_by(&s, "in_d", "pi_d");
    assert_eq!(s.signed(&event("evt_d1", "invoice.paid", inv)).await, (200, credited(100, "in_d")));
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants[0].paid, Some(880), "what the customer paid for the pack");
    let refund = event("evt_d2", "charge.refunded", charge("cus_acme", "pi_d", 880, 880));
    let all = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 100 };
    assert_eq!(s.signed(&refund).await, (200, all));
    assert_eq!(s.balance().await.granted, 0);
}

mod a_discounted_pack_refunded_in_full_takes_all_its_units {
    use super::*;
    #[tokio::test]
    async fn pro_rata_on_memory() {
        super::a_discounted_pack_refunded_in_full_takes_all_its_units(
            setup(Arc::new(MemoryStore::new()), "proportional").await,
        )
        .await;
    }
    #[tokio::test]
    async fn credits_first_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
        let toml = "proportional\"\nrefund_attribution = \"credits_first";
        super::a_discounted_pack_refunded_in_full_takes_all_its_units(setup(Arc::new(store), toml).await).await;
    }
}

// A key that cannot read what a payment needs never drops the top-up: a 401 (a rolled key),
// a 403 (a restricted key without the permission) or a 404 (a key of another account or mode)
// on a read that must succeed answers 500, so Stripe delivers the event again, counted and
// naming the permission; once the key can read, the redelivery grants once. On main, a
// refused line-items read answered 200 (nothing granted, never delivered again), and a
// refused invoice-payments read granted without the payment intent (never refundable).
on_stores!(a_key_that_cannot_read_never_drops_a_paid_top_up);
async fn a_key_that_cannot_read_never_drops_a_paid_top_up(s: Setup) {
    s.stripe.add_lines("/v1/checkout/sessions/cs_1/line_items", vec![item("li_1", "price_pack", None, 2)]);
    let paid = event("evt_1", "checkout.session.completed", session("cs_1", "cus_acme", true, None, Some("pi_1")));
    for status in [403, 401, 404] {
        s.stripe.refuse_reads(Some(("/v1/checkout/sessions", status)));
        let (code, outcome) = s.signed(&paid).await;
        assert_eq!(code, 500, "{status}: {outcome:?}");
        let WebhookOutcome::ApiRefused { permission } = &outcome else { panic!("{status}: {outcome:?}") };
        assert!(permission.contains("Checkout Sessions"), "{status}: {permission}");
        s.stripe.refuse_reads(None);
    }
    assert_eq!(s.h.tollgate.stats().webhooks_api_refused, 3);
    assert_eq!(s.balance().await.granted, 0);
    assert_eq!(s.signed(&paid).await, (200, credited(200, "pi_1")), "granted once the key can read");
    // An invoice whose payment intent must be read: refused, never granted without it.
    paid_by(&s, "in_2", "pi_2");
    let inv = event("evt_2", "invoice.paid", invoice("in_2", "cus_acme", &[("price_pack", 1)]));
    s.stripe.refuse_reads(Some(("/v1/invoice_payments", 403)));
    let (code, outcome) = s.signed(&inv).await;
    assert_eq!(code, 500, "{outcome:?}");
    assert!(
        matches!(&outcome, WebhookOutcome::ApiRefused { permission } if permission.contains("Invoices")),
        "{outcome:?}"
    );
    assert_eq!(s.balance().await.granted, 200, "nothing granted without the payment");
    s.stripe.refuse_reads(None);
    assert_eq!(s.signed(&inv).await, (200, credited(100, "in_2")));
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    let g = grants.iter().find(|g| g.id == "in_2").unwrap();
    assert_eq!(g.payment.as_deref(), Some("pi_2"), "refundable");
    // A refund whose refunds cannot be read: 500 too, counted.
    s.stripe.refuse_reads(Some(("/v1/refunds", 403)));
    let refund = event("evt_3", "charge.refunded", charge("cus_acme", "pi_2", 1000, 1000));
    let (code, outcome) = s.signed(&refund).await;
    assert_eq!(code, 500);
    assert!(
        matches!(&outcome, WebhookOutcome::ApiRefused { permission } if permission.contains("Refunds")),
        "{outcome:?}"
    );
    assert_eq!(s.h.tollgate.stats().webhooks_api_refused, 5);
}

// Stripe cannot list a key's permissions: `check_stripe_access` asks for one item of each list
// `[stripe.credits]` needs, and names what the key lacks; an unreachable Stripe is said apart.
#[tokio::test]
async fn what_the_key_lacks_is_named_before_a_payment_needs_it() {
    let stripe = StandIn::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("stripe-key");
    std::fs::write(&key, common::stripe::SECRET).unwrap();
    let with = |base: &str| {
        let stripe = format!(
            "[stripe]\napi_base = \"{base}\"\nsecret_key_file = {:?}\n[stripe.credits]",
            key.display().to_string()
        );
        tollgate::Config::from_toml_str(&config("proportional").replace("[stripe.credits]", &stripe)).unwrap()
    };
    let access = tollgate::billing::check_stripe_access(&with(&stripe.url)).await.unwrap();
    assert!(access.is_ok(), "{access:?}");
    stripe.refuse_reads(Some(("/v1/refunds", 403)));
    stripe.refuse_reads(Some(("/v1/invoice_payments", 401)));
    let access = tollgate::billing::check_stripe_access(&with(&stripe.url)).await.unwrap();
    assert_eq!(access.refused.len(), 2, "{access:?}");
    assert!(access.refused.iter().any(|r| r.starts_with("Refunds: read")), "{access:?}");
    assert!(access.refused.iter().any(|r| r.contains("invoice payments")), "{access:?}");
    assert_eq!(access.unreachable, None);
    // Nothing listens there: unreachable, nothing named.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let access = tollgate::billing::check_stripe_access(&with(&base)).await.unwrap();
    assert!(access.refused.is_empty() && access.unreachable.is_some(), "{access:?}");
}

// Nothing is granted that was not paid (Stripe's API reference, "The Invoice object":
// `pre_payment_credit_notes_amount`, "the sum of all pre-payment credit notes issued for this
// invoice", which lower what is due; "The Credit Note object": `type` `pre_payment` or
// `post_payment`). An invoice a pre-payment credit note brought to zero is "paid" for nothing:
// it grants nothing (main granted its 100 units). One whose credit note covers one of two
// pack lines grants the other's units alone.
on_stores!(an_invoice_credited_before_payment_grants_only_what_was_paid);
async fn an_invoice_credited_before_payment_grants_only_what_was_paid(s: Setup) {
    let mut inv = invoice("in_z", "cus_acme", &[("price_pack", 1)]);
    inv["pre_payment_credit_notes_amount"] = json!(1000);
    inv["amount_paid"] = json!(0);
    inv["amount_due"] = json!(0);
    let (status, outcome) = s.signed(&event("evt_z", "invoice.paid", inv)).await;
    assert_eq!(status, 200);
    assert!(!matches!(outcome, WebhookOutcome::Credited { .. }), "{outcome:?}");
    assert_eq!(s.balance().await.granted, 0, "paid for nothing");
    // Two pack lines of 5.00 each; a pre-payment credit note of 5.00 on the second.
    paid_by(&s, "in_h", "pi_h");
    let mut inv = invoice("in_h", "cus_acme", &[("price_pack", 1), ("pack_large", 1)]);
    inv["pre_payment_credit_notes_amount"] = json!(500);
    inv["amount_paid"] = json!(500);
    s.stripe.add_lines("/v1/invoices/in_h/lines", inv["lines"]["data"].as_array().unwrap().clone());
    let mut note = credit_note("cn_h", "in_h", &[("il_in_h_1", 500)], 0);
    note["type"] = json!("pre_payment");
    note["pre_payment_amount"] = json!(500);
    note["post_payment_amount"] = json!(0);
    s.stripe.add_credit_notes("in_h", vec![note]);
    assert_eq!(
        s.signed(&event("evt_h", "invoice.paid", inv)).await,
        (200, credited(100, "in_h")),
        "the large pack was credited"
    );
    let (grants, _) = Admin::new(s.store.clone()).credits("acme").await.unwrap();
    assert_eq!(grants.iter().find(|g| g.id == "in_h").unwrap().paid, Some(500));
}

// A checkout session whose payment may be only authorized (manual capture: Stripe's "Place a
// hold on a payment method"; the session's `payment_method_options.card.capture_method` is
// `manual`) is credited only once its payment intent succeeded (captured, or paid by a
// method captured at once): an authorized one (`requires_capture`), or an unpaid one, is
// not credited, counted and logged (main credited a "paid" one before any capture).
on_stores!(a_checkout_with_manual_capture_is_credited_only_once_captured);
async fn a_checkout_with_manual_capture_is_credited_only_once_captured(s: Setup) {
    for (n, (status, intent)) in
        [("paid", "requires_capture"), ("unpaid", "requires_capture"), ("paid", "succeeded")].into_iter().enumerate()
    {
        let pi = format!("pi_m{n}");
        s.stripe.add_payment_intent(&pi, intent);
        let mut held = session(&format!("cs_m{n}"), "cus_acme", status == "paid", None, Some(&pi));
        held["metadata"] = json!({ "tollgate_units": "100" });
        held["payment_method_options"] = json!({ "card": { "capture_method": "manual" } });
        let (code, outcome) = s.signed(&event(&format!("evt_m{n}"), "checkout.session.completed", held)).await;
        assert_eq!(code, 200);
        if intent == "succeeded" {
            assert_eq!(outcome, credited(100, &pi), "captured");
        } else {
            assert!(matches!(outcome, WebhookOutcome::NotCaptured { .. }), "{status}: {outcome:?}");
        }
    }
    assert_eq!(s.balance().await.granted, 100);
    assert_eq!(s.h.tollgate.stats().webhooks_not_credited, 2, "counted");
}

/// Stripe's example dispute of `intent` (Stripe's "The Dispute object"; a lost dispute sends
/// no `charge.refunded`).
fn dispute(id: &str, intent: Option<&str>, amount: Value, status: &str) -> Value {
    let mut d = fixtures()["dispute"].clone();
    d["id"] = json!(id);
    d["payment_intent"] = json!(intent);
    d["amount"] = amount;
    d["status"] = json!(status);
    d
}

// Disputes: funds withdrawn take back what the payment bought, as a full refund does, once
// (the lost close after it, and a redelivery, take nothing more; main ignored disputes, so a
// customer who charged back kept the units). A dispute of a payment no grant has changes and
// keeps nothing; a malformed amount is refused (400) and changes nothing.
on_stores!(a_dispute_takes_back_what_the_payment_bought_once);
async fn a_dispute_takes_back_what_the_payment_bought_once(s: Setup) {
    let mut paid = session("cs_d", "cus_acme", true, None, Some("pi_d"));
    paid["metadata"] = json!({ "tollgate_units": "100" });
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(100, "pi_d")));
    assert_eq!(s.admitted(30).await, 30);
    let bad = event(
        "evt_b",
        "charge.dispute.funds_withdrawn",
        dispute("dp_1", Some("pi_d"), json!("lots"), "needs_response"),
    );
    assert_eq!(s.signed(&bad).await.0, 400, "a malformed amount");
    let withdrawn =
        event("evt_2", "charge.dispute.funds_withdrawn", dispute("dp_1", Some("pi_d"), json!(1000), "needs_response"));
    let (code, outcome) = s.signed(&withdrawn).await;
    assert_eq!(code, 200);
    assert!(matches!(outcome, WebhookOutcome::Refunded { .. }), "{outcome:?}");
    assert_eq!(s.admitted(10).await, 0, "nothing left of what the disputed payment bought");
    assert_eq!(s.signed(&withdrawn).await, (200, WebhookOutcome::Duplicate), "a redelivery");
    let lost = event("evt_3", "charge.dispute.closed", dispute("dp_1", Some("pi_d"), json!(1000), "lost"));
    assert_eq!(s.signed(&lost).await, (200, WebhookOutcome::Duplicate), "applied once per dispute");
    s.h.tollgate.shutdown().await.unwrap();
    let b = s.balance().await;
    assert_eq!((b.granted, b.left()), (0, 0), "the 30 used left with the rest: {b:?}");
    // A dispute of a payment no grant has: nothing taken, nothing kept for a grant to come.
    let unknown = event("evt_4", "charge.dispute.closed", dispute("dp_2", Some("pi_u"), json!(1000), "lost"));
    assert_eq!(s.signed(&unknown).await, (200, WebhookOutcome::Ignored), "a dispute of an unknown payment");
    let mut later = session("cs_u", "cus_acme", true, None, Some("pi_u"));
    later["metadata"] = json!({ "tollgate_units": "50" });
    assert_eq!(s.signed(&event("evt_5", "checkout.session.completed", later)).await, (200, credited(50, "pi_u")));
    assert_eq!(s.balance().await.granted, 50, "the grant keeps its units");
    // A refund larger than its charge: refused, nothing changed.
    let over = event("evt_6", "charge.refunded", charge("cus_acme", "pi_u", 1000, 2000));
    assert_eq!(s.signed(&over).await.0, 400);
    assert_eq!(s.balance().await.granted, 50);
}

// The tenant sees what was taken. A pack of 1,000 units for 10.00: a refund of 5.00 takes 500,
// then the dispute of the whole payment, lost, takes what is left (500), not the 1,000 its
// money bought. The usage route shows each take's `took` (what it removed from the grant) and
// `unspent` (of it, what the balance still held), so refunded 500 plus a dispute that took
// 500 add up to the 1,000 bought (main showed the dispute's 1,000: 1,500 of 1,000 bought).
on_stores!(the_usage_route_shows_what_each_refund_and_dispute_took);
async fn the_usage_route_shows_what_each_refund_and_dispute_took(s: Setup) {
    let mut paid = session("cs_t", "cus_acme", true, None, Some("pi_t"));
    paid["metadata"] = json!({ "tollgate_units": "1000" });
    assert_eq!(s.signed(&event("evt_t1", "checkout.session.completed", paid)).await, (200, credited(1000, "pi_t")));
    let half = event("evt_t2", "charge.refunded", charge("cus_acme", "pi_t", 1000, 500));
    assert!(matches!(s.signed(&half).await.1, WebhookOutcome::Refunded { units: 500, .. }));
    let lost = event("evt_t3", "charge.dispute.closed", dispute("dp_t", Some("pi_t"), json!(1000), "lost"));
    assert!(matches!(s.signed(&lost).await.1, WebhookOutcome::Refunded { .. }));
    let request = http::Request::get("/v1/usage").header("x-api-key", "key-acme").body(()).unwrap();
    let usage = s.h.tollgate.tenant_usage(&request).await;
    assert_eq!(usage.status(), 200);
    let body: Value = serde_json::from_slice(usage.body()).unwrap();
    let balance = body["balances"].as_array().unwrap().iter().find(|b| b["meter"] == "requests").unwrap();
    let grant = &balance["grants"][0];
    assert_eq!((grant["bought"].as_u64(), grant["refunded"].as_u64()), (Some(1000), Some(500)), "{grant}");
    let take = &grant["takes"][0];
    assert_eq!((take["id"].as_str(), take["units"].as_u64()), (Some("dp_t"), Some(1000)), "{take}");
    assert_eq!(
        (take["took"].as_u64(), take["unspent"].as_u64()),
        (Some(500), Some(500)),
        "what it actually took: {take}"
    );
    crate::common::check_usage_schema(&[usage.body().clone()]);
}

// A post-payment credit note's part to the customer's balance (`customer_balance_transaction`)
// or out of band (`out_of_band_amount`) refunds no charge, so no `charge.refunded` ever comes
// for it: on main its units were kept, and the balance it made then paid the next invoice (a
// recharge's too), which granted again: 2,000 units for 10.00. `credit_note.created` now takes
// back what that money (the note's post-payment amount less its `refunds[].amount_refunded`)
// bought of the pack lines, once per credit note (Stripe's API reference, "The Credit Note
// object": `type`, `post_payment_amount`, `refunds`, `out_of_band_amount`,
// `customer_balance_transaction`); its refunded part is left to `charge.refunded`, which does
// not count the credited part again. A note of an invoice whose grant may still come is
// answered 500; of one that bought no credit, ignored. On DynamoDB (found by the audit) the note
// took nothing: the store finds an invoice's grant by its id only among its tenant's grants,
// and the note did not name the tenant; it now does, by the note's customer.
on_stores!(a_credit_note_to_the_balance_takes_back_what_it_credits_once);
async fn a_credit_note_to_the_balance_takes_back_what_it_credits_once(s: Setup) {
    paid_by(&s, "in_cn", "pi_cn");
    let first = invoice("in_cn", "cus_acme", &[("price_pack", 1), ("seat", 1)]);
    s.stripe.add_invoice(first.clone());
    s.stripe.add_lines("/v1/invoices/in_cn/lines", first["lines"]["data"].as_array().unwrap().clone());
    assert_eq!(s.signed(&event("evt_cn1", "invoice.paid", first)).await, (200, credited(100, "in_cn")));
    // 2.00 of the pack's 5.00 to the customer's balance, 1.00 out of band, 2.00 refunded.
    let mut note = credit_note("cn_1", "in_cn", &[("il_in_cn_0", 500)], 200);
    note["customer_balance_transaction"] = json!("cbtxn_1");
    note["out_of_band_amount"] = json!(100);
    s.stripe.add_credit_notes("in_cn", vec![note.clone()]);
    let created = event("evt_cn2", "credit_note.created", note.clone());
    let taken = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 60 };
    assert_eq!(s.signed(&created).await, (200, taken), "3.00 of 5.00 credited: 60 units");
    assert_eq!(s.signed(&created).await, (200, WebhookOutcome::Duplicate), "once per credit note");
    assert_eq!(s.balance().await.granted, 40);
    // Voided, its balance credit reversed by Stripe: what it took is given back, once.
    let mut voided_note = note.clone();
    voided_note["status"] = json!("void");
    let voided = event("evt_cn2v", "credit_note.voided", voided_note.clone());
    let back = WebhookOutcome::Reinstated { tenant: "acme".into(), meter: "requests".into(), units: 60 };
    assert_eq!(s.signed(&voided).await, (200, back), "given back");
    assert_eq!(s.signed(&voided).await, (200, WebhookOutcome::Duplicate), "once");
    assert_eq!(s.balance().await.granted, 100);
    // Issued again as a new note (Stripe voids and reissues): taken again, under its own id.
    let mut again = voided_note;
    again["id"] = json!("cn_1b");
    again["status"] = json!("issued");
    let taken = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 60 };
    assert_eq!(s.signed(&event("evt_cn2b", "credit_note.created", again)).await, (200, taken));
    assert_eq!(s.balance().await.granted, 40);
    // Its refunded 2.00 comes as `charge.refunded`: 40 units more, not the note's 5.00 again.
    let refund = event("evt_cn3", "charge.refunded", charge("cus_acme", "pi_cn", 1000, 200));
    let (code, outcome) = s.signed(&refund).await;
    assert_eq!(code, 200);
    assert!(matches!(outcome, WebhookOutcome::Refunded { units: 40, .. }), "{outcome:?}");
    assert_eq!(s.balance().await.granted, 0, "5.00 of the pack credited or refunded: all 100 units");
    // Bad input: a credit note of an invoice that bought no credit (a seat): nothing taken.
    let seats = invoice("in_other", "cus_acme", &[("seat", 1)]);
    s.stripe.add_lines("/v1/invoices/in_other/lines", seats["lines"]["data"].as_array().unwrap().clone());
    let mut other = credit_note("cn_2", "in_other", &[("il_in_other_0", 500)], 0);
    other["customer_balance_transaction"] = json!("cbtxn_2");
    assert_eq!(s.signed(&event("evt_cn4", "credit_note.created", other)).await, (200, WebhookOutcome::Ignored));
    // A note of an invoice not paid yet (a mixed note comes before its payment): its grant
    // may still come, so it is delivered again (500), never dropped.
    let mut unpaid = invoice("in_late", "cus_acme", &[("price_pack", 1)]);
    unpaid["status"] = json!("open");
    s.stripe.add_invoice(unpaid.clone());
    s.stripe.add_lines("/v1/invoices/in_late/lines", unpaid["lines"]["data"].as_array().unwrap().clone());
    let mut early = credit_note("cn_3", "in_late", &[("il_in_late_0", 500)], 0);
    early["customer_balance_transaction"] = json!("cbtxn_3");
    let (code, outcome) = s.signed(&event("evt_cn5", "credit_note.created", early)).await;
    assert_eq!(code, 500, "{outcome:?}");
}

// A credit note voided before its invoice's grant landed (the invoice's `invoice.paid` answered
// 500 meanwhile, or delayed: Stripe does not promise the order) is delivered again until the
// grant lands, and then leaves the note nothing to take (found by the audit: main answered the
// void 200 `ignored` and dropped it, and the note, delivered after the grant, took the 100 units
// of a credit Stripe had reversed).
on_stores!(a_note_voided_before_its_grant_lands_is_kept_until_it_does);
async fn a_note_voided_before_its_grant_lands_is_kept_until_it_does(s: Setup) {
    paid_by(&s, "in_v", "pi_v");
    let mut inv = invoice("in_v", "cus_acme", &[("price_pack", 1)]);
    inv["status_transitions"]["paid_at"] = json!(NOON - 60);
    s.stripe.add_invoice(inv.clone());
    s.stripe.add_lines("/v1/invoices/in_v/lines", inv["lines"]["data"].as_array().unwrap().clone());
    let mut note = credit_note("cn_v", "in_v", &[("il_in_v_0", 500)], 0);
    note["customer_balance_transaction"] = json!("cbtxn_v");
    let mut voided = note.clone();
    voided["status"] = json!("void");
    s.stripe.add_credit_notes("in_v", vec![voided.clone()]);
    let void = event("evt_v1", "credit_note.voided", voided);
    let (code, outcome) = s.signed(&void).await;
    assert_eq!(code, 500, "its grant may still come: delivered again ({outcome:?})");
    assert_eq!(s.signed(&event("evt_v2", "invoice.paid", inv)).await, (200, credited(100, "in_v")));
    let back = WebhookOutcome::Reinstated { tenant: "acme".into(), meter: "requests".into(), units: 0 };
    assert_eq!(s.signed(&void).await, (200, back), "delivered again: recorded before its take");
    let created = event("evt_v3", "credit_note.created", note);
    assert_eq!(s.signed(&created).await, (200, WebhookOutcome::Duplicate), "the voided note takes nothing");
    assert_eq!(s.balance().await.granted, 100);
    // A void that could give nothing back is ignored at once, never delivered again: a note
    // on an invoice of seats paid a minute ago (no grant will ever come), and a pre-payment
    // note (it credited nothing to the balance).
    let mut seats = invoice("in_seats", "cus_acme", &[("seat", 1)]);
    seats["status_transitions"]["paid_at"] = json!(NOON - 60);
    s.stripe.add_invoice(seats.clone());
    s.stripe.add_lines("/v1/invoices/in_seats/lines", seats["lines"]["data"].as_array().unwrap().clone());
    let mut of_seats = credit_note("cn_s", "in_seats", &[("il_in_seats_0", 500)], 0);
    of_seats["customer_balance_transaction"] = json!("cbtxn_s");
    of_seats["status"] = json!("void");
    let void = event("evt_v4", "credit_note.voided", of_seats);
    assert_eq!(s.signed(&void).await, (200, WebhookOutcome::Ignored), "the seats bought no credit");
    let mut before = credit_note("cn_p", "in_v", &[("il_in_v_0", 500)], 0);
    before["type"] = json!("pre_payment");
    before["pre_payment_amount"] = json!(500);
    before["post_payment_amount"] = json!(0);
    before["status"] = json!("void");
    let void = event("evt_v5", "credit_note.voided", before);
    assert_eq!(s.signed(&void).await, (200, WebhookOutcome::Ignored), "a pre-payment note credited nothing");
    assert_eq!(s.balance().await.granted, 100);
}

// A dispute won after its funds were withdrawn gives back what the withdrawal took of what the
// balance held (a node's lease unused at the withdrawal stays counted used: docs/credits.md),
// once per dispute (`charge.dispute.funds_reinstated`, or the close as won); a
// win delivered before its withdrawal leaves the withdrawal nothing to take (main logged the
// win for a person, and the customer who won kept nothing).
on_stores!(a_won_dispute_gives_back_what_its_withdrawal_took);
async fn a_won_dispute_gives_back_what_its_withdrawal_took(s: Setup) {
    let mut paid = session("cs_w", "cus_acme", true, None, Some("pi_w"));
    paid["metadata"] = json!({ "tollgate_units": "100" });
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(100, "pi_w")));
    assert_eq!(s.admitted(30).await, 30);
    let withdrawn =
        event("evt_2", "charge.dispute.funds_withdrawn", dispute("dp_w", Some("pi_w"), json!(1000), "needs_response"));
    let took = match s.signed(&withdrawn).await {
        (200, WebhookOutcome::Refunded { units, .. }) => units,
        other => panic!("{other:?}"),
    };
    // What the balance held unspent; the node's lease unused at the withdrawal counted used.
    assert!((60..=70).contains(&took), "{took}");
    assert_eq!(s.admitted(1).await, 0);
    let reinstated =
        event("evt_3", "charge.dispute.funds_reinstated", dispute("dp_w", Some("pi_w"), json!(1000), "won"));
    let (code, outcome) = s.signed(&reinstated).await;
    assert_eq!(code, 200);
    assert!(matches!(outcome, WebhookOutcome::Reinstated { units, .. } if units == took), "{outcome:?}");
    assert_eq!(s.signed(&reinstated).await, (200, WebhookOutcome::Duplicate), "a redelivery");
    let closed = event("evt_4", "charge.dispute.closed", dispute("dp_w", Some("pi_w"), json!(1000), "won"));
    assert_eq!(s.signed(&closed).await, (200, WebhookOutcome::Duplicate), "the close as won: given back once");
    assert_eq!(s.signed(&withdrawn).await, (200, WebhookOutcome::Duplicate), "a late withdrawal takes nothing");
    assert_eq!(s.admitted(80).await, took as usize, "what the balance held unspent before the dispute");
    s.h.tollgate.shutdown().await.unwrap();
    assert_eq!(s.balance().await.left(), 0);
    // Won before its withdrawal was delivered (events come in any order).
    let mut paid = session("cs_o", "cus_acme", true, None, Some("pi_o"));
    paid["metadata"] = json!({ "tollgate_units": "50" });
    assert_eq!(s.signed(&event("evt_5", "checkout.session.completed", paid)).await, (200, credited(50, "pi_o")));
    let won = event("evt_6", "charge.dispute.funds_reinstated", dispute("dp_o", Some("pi_o"), json!(500), "won"));
    assert!(matches!(s.signed(&won).await, (200, WebhookOutcome::Reinstated { units: 0, .. })));
    let late = event("evt_7", "charge.dispute.funds_withdrawn", dispute("dp_o", Some("pi_o"), json!(500), "won"));
    assert_eq!(s.signed(&late).await, (200, WebhookOutcome::Duplicate));
    assert_eq!(s.balance().await.left(), 50, "the won dispute took nothing");
    assert_eq!(s.h.tollgate.stats().webhooks_applied, 5, "grants, the withdrawal and the wins are counted");
}

// A refund that arrives before its grant keeps its credit-note attribution: the charge names
// no invoice on the current API, so the invoice is read from its payments, and the credit note
// on the seats of a mixed invoice then takes no credits when the grant lands (main kept the
// refund without its invoice and took half the pack, pro rata).
on_stores!(a_refund_before_its_grant_keeps_its_credit_note_attribution);
async fn a_refund_before_its_grant_keeps_its_credit_note_attribution(s: Setup) {
    s.store
        .put_tenant(&TenantRecord::new("newco".into(), "credits".into()), &[KeyHash::of(b"key-newco")])
        .await
        .unwrap();
    paid_by(&s, "in_k", "pi_k");
    let inv = invoice("in_k", "cus_new", &[("price_pack", 3), ("seat", 4)]);
    s.stripe.add_lines("/v1/invoices/in_k/lines", inv["lines"]["data"].as_array().unwrap().clone());
    s.stripe.add_invoice(inv.clone());
    let paid = event("evt_1", "invoice.paid", inv);
    assert_eq!(s.signed(&paid).await.0, 500, "no tenant has the customer yet");
    s.stripe.add_credit_notes("in_k", vec![credit_note("cn_k", "in_k", &[("il_in_k_1", 500)], 500)]);
    let seats = event("evt_2", "charge.refunded", charge("cus_new", "pi_k", 1000, 500));
    assert_eq!(s.signed(&seats).await, (200, WebhookOutcome::RefundKept { payment: "pi_k".into() }));
    Admin::new(s.store.clone()).set_customer("newco", Some("cus_new"), false).await.unwrap();
    let (status, outcome) = s.signed(&paid).await;
    assert_eq!(status, 200, "{outcome:?}");
    let (_, balances) = Admin::new(s.store.clone()).credits("newco").await.unwrap();
    assert_eq!(balances[0].1.granted, 300, "the seats' credit note took no credits");
}

// Only refunds that concern credits are kept until their grant lands: a refund of a payment
// that bought no credit price (read from its checkout session's lines) is answered 200
// `ignored` and never stored, whether its customer is linked or not (main kept every refund
// of the account, 35 days, counted as applied, and answered 500 to all of them past 10,000
// kept). One that bought credits, by a customer not linked yet, is kept.
on_stores!(only_refunds_of_credit_payments_are_kept);
async fn only_refunds_of_credit_payments_are_kept(s: Setup) {
    for (n, customer) in ["cus_acme", "cus_nobody"].into_iter().enumerate() {
        let seats = session(&format!("cs_s{n}"), customer, true, None, Some(&format!("pi_s{n}")));
        s.stripe.add_session(seats);
        s.stripe
            .add_lines(&format!("/v1/checkout/sessions/cs_s{n}/line_items"), vec![item("li_s", "price_seat", None, 3)]);
        let refund = event(&format!("evt_s{n}"), "charge.refunded", charge(customer, &format!("pi_s{n}"), 1000, 1000));
        assert_eq!(s.signed(&refund).await, (200, WebhookOutcome::Ignored), "{customer}");
    }
    // A credit pack's payment, its customer not linked yet: kept for its grant.
    let pack = session("cs_p", "cus_later", true, None, Some("pi_p"));
    s.stripe.add_session(pack);
    s.stripe.add_lines("/v1/checkout/sessions/cs_p/line_items", vec![item("li_p", "price_pack", None, 1)]);
    let refund = event("evt_p", "charge.refunded", charge("cus_later", "pi_p", 1000, 1000));
    assert_eq!(s.signed(&refund).await, (200, WebhookOutcome::RefundKept { payment: "pi_p".into() }));
}

// The worked examples of docs/credits.md over signed webhooks: on a mixed invoice, the seats'
// credit note takes nothing and the pack's all of it; a 1-cent refund takes nothing; a refund
// whose metadata says `tollgate_units` takes that many.
on_stores!(refunds_take_back_what_the_refunded_lines_bought);
async fn refunds_take_back_what_the_refunded_lines_bought(s: Setup) {
    paid_by(&s, "in_9", "pi_9");
    let inv = invoice("in_9", "cus_acme", &[("price_pack", 3), ("seat", 4)]);
    s.stripe.add_lines("/v1/invoices/in_9/lines", inv["lines"]["data"].as_array().unwrap().clone());
    assert_eq!(s.signed(&event("evt_1", "invoice.paid", inv)).await, (200, credited(300, "in_9")));
    // The seats (line 1) refunded by a credit note: no credits taken.
    s.stripe.add_credit_notes("in_9", vec![credit_note("cn_1", "in_9", &[("il_in_9_1", 500)], 500)]);
    let seats = event("evt_2", "charge.refunded", charge("cus_acme", "pi_9", 1000, 500));
    assert_eq!(s.signed(&seats).await, (200, WebhookOutcome::Duplicate));
    assert_eq!(s.balance().await.granted, 300);
    // Then the pack (line 0): its 300 units.
    s.stripe.add_credit_notes(
        "in_9",
        vec![
            credit_note("cn_2", "in_9", &[("il_in_9_0", 500)], 500),
            credit_note("cn_1", "in_9", &[("il_in_9_1", 500)], 500),
        ],
    );
    let pack = event("evt_3", "charge.refunded", charge("cus_acme", "pi_9", 1000, 1000));
    let all = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 300 };
    assert_eq!(s.signed(&pack).await, (200, all));
    assert_eq!(s.signed(&seats).await, (200, WebhookOutcome::Duplicate), "an older delivery, late");
    // 100 units for 10.00: a cent refunded takes nothing.
    let mut paid = session("cs_c", "cus_acme", true, None, Some("pi_c"));
    paid["metadata"] = json!({ "tollgate_units": "100" });
    assert_eq!(s.signed(&event("evt_4", "checkout.session.completed", paid)).await, (200, credited(100, "pi_c")));
    let cent = event("evt_5", "charge.refunded", charge("cus_acme", "pi_c", 1000, 1));
    assert_eq!(s.signed(&cent).await, (200, WebhookOutcome::Duplicate));
    // A refund of 1.00 that says it takes 30 units, beside the cent.
    s.stripe.add_refunds("pi_c", vec![refund_of("re_2", "pi_c", 100, Some("30")), refund_of("re_1", "pi_c", 1, None)]);
    let named = event("evt_6", "charge.refunded", charge("cus_acme", "pi_c", 1000, 101));
    let thirty = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 30 };
    assert_eq!(s.signed(&named).await, (200, thirty));
    assert_eq!(s.balance().await.granted, 70);
}

// The review's case: a customer pays before their tenant is linked, the grant is answered 500
// and retried, and the payment is refunded meanwhile. The refund is kept, and the grant lands
// with it applied: nothing is served for a refunded payment.
on_stores!(a_refund_before_its_grant_is_applied_when_the_grant_lands);
async fn a_refund_before_its_grant_is_applied_when_the_grant_lands(s: Setup) {
    s.store
        .put_tenant(&TenantRecord::new("newco".into(), "credits".into()), &[KeyHash::of(b"key-newco")])
        .await
        .unwrap();
    let mut paid = session("cs_n", "cus_new", true, None, Some("pi_n"));
    paid["metadata"] = json!({ "tollgate_units": "100" });
    s.stripe.add_session(paid.clone());
    let paid = event("evt_1", "checkout.session.completed", paid);
    assert_eq!(s.signed(&paid).await.0, 500, "no tenant has the customer yet");
    let refund = event("evt_2", "charge.refunded", charge("cus_new", "pi_n", 1000, 1000));
    assert_eq!(s.signed(&refund).await, (200, WebhookOutcome::RefundKept { payment: "pi_n".into() }));
    Admin::new(s.store.clone()).set_customer("newco", Some("cus_new"), false).await.unwrap();
    let (status, outcome) = s.signed(&paid).await;
    assert_eq!(status, 200, "{outcome:?}");
    let (grants, balances) = Admin::new(s.store.clone()).credits("newco").await.unwrap();
    assert_eq!((grants[0].units, grants[0].taken), (0, 100), "{grants:?}");
    assert_eq!(balances[0].1.granted, 0, "nothing to spend for a refunded payment");
    assert_eq!(s.signed(&refund).await, (200, WebhookOutcome::Duplicate), "applied once");
}

#[tokio::test]
async fn with_refunds_unspent_a_refund_takes_what_its_money_bought_and_a_node_sees_a_top_up_within_a_second() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = setup(store.clone(), "unspent").await;
    // Another node of the fleet, on the same store and clock time.
    let other = Harness::with_store(&s.toml, store.clone(), NOON);
    assert_eq!(other.status("/", "key-acme").await, 402);
    let mut paid = session("cs_1", "cus_acme", true, None, Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "50" });
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(50, "pi_1")));
    // The other node trusts the store's "spent" for up to a second, then asks again: well
    // within directory_ttl.
    other.clock.advance(Duration::from_millis(1100));
    assert_eq!(other.status("/", "key-acme").await, 200);
    other.tollgate.shutdown().await.unwrap();
    // A tenth refunded takes the tenth it bought, not everything (as `unspent` used to).
    let tenth = event("evt_2", "charge.refunded", charge("cus_acme", "pi_1", 1000, 100));
    let five = WebhookOutcome::Refunded { tenant: "acme".into(), meter: "requests".into(), units: 5 };
    assert_eq!(s.signed(&tenth).await, (200, five));
    assert_eq!(s.balance().await.granted, 45);
}

/// A snapshot event is told from a thin one by its envelope alone: a customer who types
/// `v2.core.event` as their name at checkout still gets the credits they paid for, and a
/// snapshot event whose envelope says it is thin is refused (no destination here).
#[tokio::test]
async fn a_customer_named_like_a_thin_event_is_still_credited() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    let mut paid = session("cs_1", "cus_acme", true, None, Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "50" });
    paid["customer_details"]["name"] = json!("v2.core.event");
    paid["custom_fields"] = json!([{ "object": "v2.core.event" }]);
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(50, "pi_1")));
    assert_eq!(s.balance().await.granted, 50);
    let mut thin: Value = serde_json::from_str(&event("evt_2", "checkout.session.completed", json!({}))).unwrap();
    thin["object"] = json!("v2.core.event");
    let (status, outcome) = s.signed(&thin.to_string()).await;
    assert_eq!(status, 400, "{outcome:?}");
}

/// An invoice line names its price by id alone (`pricing.price_details.price`): a lookup key of
/// `[stripe.credits.prices]` is resolved through `GET /v1/prices`, so a renewal paid on it is
/// credited. The ids are kept (no read per payment), read again when a payment names a price
/// id they lack and they are over a minute old (a lookup key moved to a new price), and a paid
/// payment on no credit price is counted and named, never silent.
#[tokio::test]
async fn an_invoice_on_a_lookup_key_price_is_credited() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    s.stripe.add_price("price_large", Some("pack_large"), true);
    s.stripe.add_price("price_seat", Some("seat_monthly"), true);
    let inv = event("evt_1", "invoice.paid", invoice("in_1", "cus_acme", &[("price_large", 1)]));
    assert_eq!(s.signed(&inv).await, (200, credited(1000, "in_1")));
    assert_eq!(s.stripe.price_reads(), 1);
    let inv = event("evt_2", "invoice.paid", invoice("in_2", "cus_acme", &[("price_large", 2)]));
    assert_eq!(s.signed(&inv).await, (200, credited(2000, "in_2")));
    assert_eq!(s.stripe.price_reads(), 1, "kept: no read per payment");
    // Paid, on no credit price (read once to be sure): named and counted.
    let seats = event("evt_3", "invoice.paid", invoice("in_3", "cus_acme", &[("price_seat", 1)]));
    assert_eq!(s.signed(&seats).await, (200, WebhookOutcome::NotCredited { prices: vec!["price_seat".into()] }));
    assert_eq!(s.h.tollgate.stats().webhooks_not_credited, 1);
    // The merchant moves the lookup key to a new price (the old one archived): the first
    // payment on the new id reads that price, at once.
    s.stripe.add_price("price_large_v2", None, true);
    s.stripe.move_lookup_key("pack_large", "price_large_v2");
    let renewal = event("evt_4", "invoice.paid", invoice("in_4", "cus_acme", &[("price_large_v2", 1)]));
    assert_eq!(s.signed(&renewal).await, (200, credited(1000, "in_4")));
    // A price that had no lookup key when read is asked again after a minute.
    s.stripe.add_price("price_large_v3", None, true);
    let early = event("evt_5", "invoice.paid", invoice("in_5", "cus_acme", &[("price_large_v3", 1)]));
    assert!(matches!(s.signed(&early).await, (200, WebhookOutcome::NotCredited { .. })));
    s.stripe.move_lookup_key("pack_large", "price_large_v3");
    s.h.clock.advance(Duration::from_secs(61));
    let renewal = event("evt_6", "invoice.paid", invoice("in_6", "cus_acme", &[("price_large_v3", 1)]));
    assert_eq!(s.signed_at(&renewal, NOON + 61).await, (200, credited(1000, "in_6")));
    assert_eq!(s.balance().await.granted, 5000);
    // A price that cannot be read now: 500, delivered again; never taken for no credit.
    s.stripe.fail_reads(1);
    let failing = event("evt_7", "invoice.paid", invoice("in_7", "cus_acme", &[("price_other_x", 1)]));
    let (status, outcome) = s.signed(&failing).await;
    assert_eq!(status, 500, "{outcome:?}");
    // Stripe knows every price a signed payment names (prices are archived, never deleted): a
    // 404 on one is a key of another account or mode, answered 500 until the key is right.
    let (status, outcome) = s.signed(&failing).await;
    assert_eq!(status, 500, "{outcome:?}");
    assert!(
        matches!(&outcome, WebhookOutcome::ApiRefused { permission } if permission.contains("Prices")),
        "{outcome:?}"
    );
    s.stripe.add_price("price_other_x", None, true);
    let other = WebhookOutcome::NotCredited { prices: vec!["price_other_x".into()] };
    assert_eq!(s.signed(&failing).await, (200, other), "a price without a lookup key of the map");
}

/// A lookup key whose prices cannot be read now answers 500 (Stripe delivers it again); the
/// redelivery credits once.
#[tokio::test]
async fn a_lookup_key_that_cannot_be_read_answers_500_and_the_redelivery_credits() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    s.stripe.add_price("price_large", Some("pack_large"), false);
    s.stripe.fail_reads(1);
    let inv = event("evt_1", "invoice.paid", invoice("in_1", "cus_acme", &[("price_large", 1)]));
    let (status, outcome) = s.signed(&inv).await;
    assert_eq!(status, 500, "{outcome:?}");
    assert_eq!(s.balance().await.granted, 0);
    // An archived price: subscriptions made before still renew on it.
    assert_eq!(s.signed(&inv).await, (200, credited(1000, "in_1")));
    assert_eq!(s.signed(&inv).await, (200, WebhookOutcome::Duplicate));
}

/// Without a secret key a lookup key could never be matched with an invoice line: the
/// handler built from the configuration refuses it, naming the key.
#[tokio::test]
async fn a_lookup_key_without_a_secret_key_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("whsec");
    std::fs::write(&secret, SECRET).unwrap();
    let missing = dir.path().join("no-such-key");
    let stripe = format!(
        "[stripe]\nwebhook_secret_file = {secret:?}\nsecret_key_file = {missing:?}\n",
        secret = secret.display().to_string(),
        missing = missing.display().to_string()
    );
    let toml = config("proportional").replace("[stripe.credits]", &format!("{stripe}[stripe.credits]"));
    let h = Harness::with_store(&toml, Arc::new(MemoryStore::new()), NOON);
    let e = h.tollgate.webhook_handler().unwrap_err();
    assert!(e.to_string().contains("stripe.credits.prices.pack_large"), "{e}");
    // By price id only: taken.
    let by_id = toml.replace(", pack_large = 1000", "");
    let h = Harness::with_store(&by_id, Arc::new(MemoryStore::new()), NOON);
    assert!(h.tollgate.webhook_handler().is_ok());
}

/// A prepaid meter paid up front is kept out of every export with `[meters.X] export = false`:
/// its usage is counted and limited, but no event is planned for it (a metered price on the
/// same Stripe meter would bill it again). Windows left pending from before the setting are
/// parked as never exported, listed with the dead letters, never sent.
#[tokio::test]
async fn a_meter_that_is_not_exported_is_never_billed() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = setup(store.clone(), "proportional").await;
    let mut paid = session("cs_1", "cus_acme", true, None, Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "50" });
    assert_eq!(s.signed(&event("evt_1", "checkout.session.completed", paid)).await, (200, credited(50, "pi_1")));
    // Exported before the setting: a window left pending.
    assert_eq!(s.admitted(3).await, 3);
    s.h.tollgate.flush().await.unwrap();
    let later = NOON + 2 * 86_400;
    s.h.clock.set_unix(later);
    assert_eq!(s.h.tollgate.export_preview().await.unwrap().len(), 1, "exported today");

    let toml =
        s.toml.replace("[meters.tokens]\n", "[meters.requests]\nexport = false\n[meters.tokens]\nexport = false\n");
    let config = tollgate::Config::from_toml_str(&toml).unwrap();
    assert!(!config.exports_meter(&"requests".into()) && config.exports_meter(&"other".into()));
    let sink = common::Collect::default();
    let (clock, fake) = tollgate::clock::Clock::fake_at_unix(NOON + 3 * 86_400);
    let (engine, _worker) =
        tollgate::Tollgate::builder(config).store_arc(store.clone()).clock(clock).billing_sink(sink.clone()).build();
    let node = Harness::from_layer(tollgate::TollgateLayer::new(engine), fake);
    // Counted and limited all the same.
    for _ in 0..2 {
        assert_eq!(node.status("/", "key-acme").await, 200);
    }
    assert_eq!(node.status("/generate", "key-acme").await, 402, "no tokens granted");
    node.tollgate.flush().await.unwrap();
    node.clock.set_unix(NOON + 5 * 86_400);
    assert_eq!(node.tollgate.export_preview().await.unwrap(), vec![], "nothing planned");
    let report = node.tollgate.export().await.unwrap();
    assert_eq!((report.events, report.dead_letters), (0, 1), "{report:?}");
    assert!(sink.0.lock().unwrap().is_empty(), "nothing sent");
    let dead = node.tollgate.usage_store().dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("never exported"), "{}", dead[0].reason);
    assert_eq!(dead[0].key.window_start, NOON - NOON.rem_euclid(3600), "the window left pending");
    let usage =
        node.tollgate.usage_store().usage_range(&"acme".into(), NOON - 86_400, NOON + 6 * 86_400).await.unwrap();
    assert_eq!(usage.iter().map(|a| a.quantity).sum::<u64>(), 5, "every request counted");
}

/// Without a secret key, a paid invoice's payment intent cannot be read: its grant is refused
/// and counted, never made without its payment (the session of the same payment, naming its
/// payment intent, would then grant a second time).
#[tokio::test]
async fn an_invoice_whose_payment_cannot_be_read_is_refused_and_counted() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    let keyless = s.h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let inv = event("evt_1", "invoice.paid", invoice("in_1", "cus_acme", &[("price_pack", 2)]));
    let signature = stripe_webhook::Webhook::generate_test_header(&inv, SECRET, Some(NOON));
    let reply = keyless.handle(Some(&signature), inv.as_bytes()).await;
    assert_eq!(
        (reply.status().as_u16(), reply.outcome),
        (200, WebhookOutcome::PaymentUnknown { invoice: "in_1".into() })
    );
    assert_eq!(s.h.tollgate.stats().webhooks_not_credited, 1);
    assert_eq!(s.balance().await.granted, 0);
    // The same payment's session names its payment intent: granted once.
    let mut paid = session("cs_1", "cus_acme", true, Some("in_1"), Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "200" });
    let e = event("evt_2", "checkout.session.completed", paid);
    let signature = stripe_webhook::Webhook::generate_test_header(&e, SECRET, Some(NOON));
    assert_eq!(keyless.handle(Some(&signature), e.as_bytes()).await.outcome, credited(200, "in_1"));
    assert_eq!(s.balance().await.granted, 200);
}

/// The refusal of an invoice whose payment cannot be read never asks for a second grant by
/// hand: when the checkout session of the same payment granted first, the invoice is a
/// duplicate.
#[tokio::test]
async fn an_invoice_after_its_session_granted_is_a_duplicate_even_without_a_key() {
    let s = setup(Arc::new(MemoryStore::new()), "proportional").await;
    let keyless = s.h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let send = |payload: String| {
        let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(NOON));
        let handler = &keyless;
        async move { handler.handle(Some(&signature), payload.as_bytes()).await.outcome }
    };
    let mut paid = session("cs_1", "cus_acme", true, Some("in_1"), Some("pi_1"));
    paid["metadata"] = json!({ "tollgate_units": "200" });
    assert_eq!(send(event("evt_1", "checkout.session.completed", paid)).await, credited(200, "in_1"));
    let inv = event("evt_2", "invoice.paid", invoice("in_1", "cus_acme", &[("price_pack", 2)]));
    assert_eq!(send(inv).await, WebhookOutcome::Duplicate);
    assert_eq!(s.balance().await.granted, 200);
}
