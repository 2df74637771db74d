//! Tiers (`[tiers.NAME]`, docs/tiers.md) through signed Stripe payments on Stripe's own example
//! objects: a tenant pays $5 then $45 and climbs a ladder — tier 1 at once, tier 2 once 7 days
//! have passed since its first payment (the daily check, run by four engines on one store) —
//! each move made once, with one alert; a refund below the threshold keeps the tier on a
//! ladder that never moves down, and takes it down on one that does.
#![cfg(feature = "stripe")]

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{stripe::StandIn, Harness, NOON};
use serde_json::{json, Value};
use tollgate::{
    billing::{Secret, WebhookHandler, WebhookOutcome},
    store::{AlertQuery, KeyHash, MemoryStore, PaymentCall, SqliteStore, Standing, Store, TenantRecord},
};

const SECRET: &str = "whsec_tiers";
const DAY: i64 = 86_400;

fn config(secret_file: &str, downgrade: bool) -> String {
    format!(
        r#"
[usage]
store_timeout = "10s"
[limits]
directory_ttl = "30s"
[billing]
currency = "usd"
[alerts.endpoints.ops]
url = "https://ops.example.com/hooks/tollgate"
secret_file = "{secret_file}"
events = ["tenant.*"]
[plans.free]
quotas.requests = {{ limit = 1, period = "day", mode = "hard" }}
[plans.tier1]
quotas.requests = {{ limit = 2, period = "day", mode = "hard" }}
[plans.tier2]
quotas.requests = {{ limit = 4, period = "day", mode = "hard" }}
[tiers.api]
order = ["free", "tier1", "tier2"]
tier1 = {{ paid = "5.00" }}
tier2 = {{ paid = "50.00", age = "7d" }}
downgrade = {downgrade}
[stripe]
"#
    )
}

fn fixtures() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["resources"].clone()
}

fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    let mut e = fixtures()["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["data"] = json!({ "object": object });
    e.to_string()
}

/// Stripe's example invoice of acme, paid `amount` cents at `at`.
fn invoice(id: &str, amount: u64, at: i64) -> Value {
    let mut inv = fixtures()["invoice"].clone();
    inv["id"] = json!(id);
    inv["customer"] = json!("cus_acme");
    inv["status"] = json!("paid");
    inv["currency"] = json!("usd");
    inv["amount_paid"] = json!(amount);
    inv["total"] = json!(amount);
    inv["status_transitions"]["paid_at"] = json!(at);
    inv
}

/// Stripe's example charge of acme's payment intent, `refunded` of it refunded so far.
fn charge(intent: &str, amount: u64, refunded: u64) -> Value {
    let mut c = fixtures()["charge"].clone();
    c["customer"] = json!("cus_acme");
    c["payment_intent"] = json!(intent);
    c["amount"] = json!(amount);
    c["amount_captured"] = json!(amount);
    c["amount_refunded"] = json!(refunded);
    c["refunded"] = json!(refunded == amount);
    c
}

struct Setup {
    nodes: Vec<Harness>,
    store: Arc<dyn Store>,
    handler: WebhookHandler,
    stripe: StandIn,
    _secret: tempfile::TempDir,
}

async fn setup(store: Arc<dyn Store>, downgrade: bool) -> Setup {
    setup_with(store, |secret_file| config(secret_file, downgrade)).await
}

/// [`setup`] with the configuration `toml` makes of the alerts' secret file.
async fn setup_with(store: Arc<dyn Store>, toml: impl FnOnce(&str) -> String) -> Setup {
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let (secret, secret_file) = common::alerts::secret_file();
    let toml = toml(&secret_file);
    let nodes: Vec<Harness> = (0..4).map(|_| Harness::with_store(&toml, store.clone(), NOON)).collect();
    let stripe = StandIn::start(&[]).await;
    let handler = nodes[0].tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]).with_api_key(
        Secret::new(common::stripe::SECRET),
        Some(&stripe.url),
        Duration::from_secs(5),
    );
    Setup { nodes, store, handler, stripe, _secret: secret }
}

impl Setup {
    /// Signed at `t`, every node's clock moved there first.
    async fn signed_at(&self, payload: &str, t: i64) -> (u16, WebhookOutcome) {
        self.at(t);
        let signature = stripe_webhook::Webhook::generate_test_header(payload, SECRET, Some(t));
        let reply = self.handler.handle(Some(&signature), payload.as_bytes()).await;
        (reply.status().as_u16(), reply.outcome)
    }

    fn at(&self, t: i64) {
        for n in &self.nodes {
            let now = n.tollgate.clock().unix_secs();
            if t > now {
                n.clock.advance(Duration::from_secs(u64::try_from(t - now).unwrap()));
            }
        }
    }

    /// The stand-in lists `intent` as the paid payment of `invoice`.
    fn paid_by(&self, invoice: &str, intent: &str) {
        let mut payment = fixtures()["invoice_payment"].clone();
        payment["id"] = json!(format!("inpay_{invoice}"));
        payment["invoice"] = json!(invoice);
        payment["status"] = json!("paid");
        payment["payment"] = json!({ "type": "payment_intent", "payment_intent": intent });
        self.stripe.add_invoice_payments(invoice, vec![payment]);
    }

    async fn plan(&self) -> String {
        self.store.tenant(&"acme".into()).await.unwrap().unwrap().plan.as_str().to_owned()
    }

    /// How many requests of acme each node serves today, every node having followed the
    /// directory (a move reaches each within a second).
    async fn served(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for n in &self.nodes {
            n.tollgate.follow_directory().await.unwrap();
            let mut ok = 0;
            for _ in 0..5 {
                if n.status("/", "key-acme").await == 200 {
                    ok += 1;
                }
            }
            out.push(ok);
        }
        out
    }

    /// The usage route's `tier` as node `n` answers acme, checked against its schema.
    async fn usage(&self, n: usize) -> Value {
        let n = &self.nodes[n];
        n.tollgate.follow_directory().await.unwrap();
        let request = http::Request::builder().uri("/v1/usage").header("x-api-key", "key-acme").body(()).unwrap();
        let response = n.tollgate.tenant_usage(&request).await;
        assert_eq!(response.status(), 200);
        common::check_usage_schema(&[response.body().clone()]);
        serde_json::from_slice::<Value>(response.body()).unwrap()["tier"].clone()
    }

    /// The `tenant.tier_changed` alerts in the outbox: (from, to).
    async fn moves(&self) -> Vec<(String, String)> {
        let rows = self.store.list_alerts(&AlertQuery::new(100)).await.unwrap();
        rows.iter()
            .filter(|r| r.event == "tenant.tier_changed")
            .map(|r| {
                let body: Value = serde_json::from_str(&r.body).unwrap();
                (body["data"]["from"].as_str().unwrap().to_owned(), body["data"]["to"].as_str().unwrap().to_owned())
            })
            .collect()
    }
}

fn paid(paid: u64, tier: Option<&str>) -> WebhookOutcome {
    WebhookOutcome::Paid { tenant: "acme".into(), paid, tier: tier.map(Into::into) }
}

macro_rules! on_stores {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$test(std::sync::Arc::new(super::MemoryStore::new())).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
                super::$test(std::sync::Arc::new(store)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                #[cfg(feature = "postgres")]
                if let Some((store, _)) = crate::common::postgres::store().await {
                    super::$test(std::sync::Arc::new(store)).await;
                }
                #[cfg(not(feature = "postgres"))]
                assert!(std::env::var_os("CI").is_none(), "CI runs the billing tests with the postgres feature");
            }
            #[cfg(feature = "dynamodb")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dynamodb() {
                if let Some(store) = crate::common::dynamo::table().await {
                    super::$test(std::sync::Arc::new(store)).await;
                }
            }
        }
    };
}

on_stores!(paying_climbs_the_ladder_once_across_four_engines);
async fn paying_climbs_the_ladder_once_across_four_engines(store: Arc<dyn Store>) {
    let s = setup(store, false).await;
    assert_eq!(s.served().await, [1, 0, 0, 0], "free: one request a day, across the fleet");
    // $5: tier 1 at once, on every node.
    s.paid_by("in_1", "pi_1");
    let first = event("evt_1", "invoice.paid", NOON + 60, invoice("in_1", 500, NOON + 60));
    assert_eq!(s.signed_at(&first, NOON + 60).await, (200, paid(500, Some("tier1"))));
    assert_eq!(s.signed_at(&first, NOON + 61).await, (200, paid(500, None)), "delivered again: counted once");
    assert_eq!(s.plan().await, "tier1");
    // The tenant sees its tier and what unlocks the next, on any node.
    let view = s.usage(2).await;
    assert_eq!(
        (view["ladder"].as_str(), view["paid"].as_str(), view["since"].as_i64()),
        (Some("api"), Some("5.00"), Some(NOON + 60))
    );
    assert_eq!(view["next"], json!({ "plan": "tier2", "paid_left": "45.00", "wait_secs": 7 * DAY - 1 }));
    // And `usage_report` (the dashboard's and the command line's) the same.
    let report = s.nodes[2].tollgate.usage_report(&"acme".into(), NOON, NOON + 61).await.unwrap();
    let tier = report.tier.expect("on a ladder");
    assert_eq!((tier.ladder.as_str(), tier.paid, tier.since, tier.pinned), ("api", 500, Some(NOON + 60), false));
    let next = tier.next.clone().expect("tier 2 above");
    assert_eq!((next.plan.as_str(), next.paid_left), ("tier2", 4_500));
    assert_eq!(next.wait, Some(Duration::from_secs(u64::try_from(7 * DAY - 1).unwrap())));
    assert_eq!(
        tier.line(),
        "api: paid 5.00 usd since 2026-03-14T12:01:00Z; next tier2: 45.00 usd to pay, 6days 23h 59m 59s to wait"
    );
    // $45 a day later: $50 paid, but not 7 days since the first payment yet.
    s.paid_by("in_2", "pi_2");
    let second = event("evt_2", "invoice.paid", NOON + DAY, invoice("in_2", 4_500, NOON + DAY));
    assert_eq!(s.signed_at(&second, NOON + DAY).await, (200, paid(5_000, None)));
    assert_eq!(s.plan().await, "tier1");
    for n in &s.nodes {
        assert_eq!(n.tollgate.check_tiers().await.unwrap(), 0, "a day short of the 7");
    }
    // Seven days after the first payment: the daily check of every node moves it once.
    s.at(NOON + 60 + 7 * DAY);
    let mut moved = 0;
    for n in &s.nodes {
        moved += n.tollgate.check_tiers().await.unwrap();
    }
    assert_eq!(moved, 1, "one node moves it; the others find it moved");
    assert_eq!(s.plan().await, "tier2");
    assert_eq!(s.usage(3).await["next"], Value::Null, "the top");
    assert_eq!(s.served().await, [4, 0, 0, 0], "tier 2's four a day, on every node within a second");
    let mut moves = s.moves().await;
    moves.sort();
    assert_eq!(
        moves,
        [("free".to_owned(), "tier1".to_owned()), ("tier1".to_owned(), "tier2".to_owned())],
        "one alert per move"
    );
    // The audit: the webhook's move by its event, the daily check's by the check, once each.
    let audit = tollgate::admin::Admin::for_engine(&s.nodes[0].tollgate).audit(Some("acme"), None, 10).await.unwrap();
    let changes: Vec<_> =
        audit.iter().map(|r| (r.actor.to_string(), r.setting.to_string(), r.before.clone(), r.after.clone())).collect();
    let plan =
        |who: &str, from: &str, to: &str| (who.to_owned(), "plan".to_owned(), Some(from.into()), Some(to.into()));
    assert_eq!(changes, [plan("tollgate:tier-check", "tier1", "tier2"), plan("stripe:evt_1", "free", "tier1")]);
    // $10 of the $45 refunded: $40 paid, below tier 2's $50; this ladder never moves down.
    let refund = event("evt_3", "charge.refunded", NOON + 8 * DAY, charge("pi_2", 4_500, 1_000));
    assert_eq!(s.signed_at(&refund, NOON + 8 * DAY).await, (200, paid(4_000, None)));
    assert_eq!(s.plan().await, "tier2");
    let read = PaymentCall::Read { tenant: "acme".into() };
    let standing = s.store.payments(&read, NOON + 8 * DAY).await.unwrap().standing;
    assert_eq!(standing, Standing::new(4_000, Some(NOON + 60)));
}

on_stores!(a_ladder_that_moves_down_moves_down_on_a_refund_alone);
async fn a_ladder_that_moves_down_moves_down_on_a_refund_alone(store: Arc<dyn Store>) {
    let s = setup(store, true).await;
    s.paid_by("in_1", "pi_1");
    let first = event("evt_1", "invoice.paid", NOON, invoice("in_1", 6_000, NOON));
    assert_eq!(s.signed_at(&first, NOON).await, (200, paid(6_000, Some("tier1"))));
    s.at(NOON + 7 * DAY);
    assert_eq!(s.nodes[1].tollgate.check_tiers().await.unwrap(), 1);
    assert_eq!(s.plan().await, "tier2");
    // Half refunded: $30, below tier 2's $50 and above tier 1's $5.
    let refund = event("evt_2", "charge.refunded", NOON + 8 * DAY, charge("pi_1", 6_000, 3_000));
    assert_eq!(s.signed_at(&refund, NOON + 8 * DAY).await, (200, paid(3_000, Some("tier1"))));
    assert_eq!(s.plan().await, "tier1");
    // The daily check moves up, never down: it leaves tier 1 as it is.
    assert_eq!(s.nodes[2].tollgate.check_tiers().await.unwrap(), 0);
    assert_eq!(s.moves().await.len(), 3, "up, up, down: an alert each");
}

/// Stripe's example checkout session of acme in payment mode, paid `amount` cents.
fn checkout(id: &str, intent: &str, amount: u64, invoice: Option<&str>) -> Value {
    let mut s = fixtures()["checkout.session"].clone();
    s["id"] = json!(id);
    s["customer"] = json!("cus_acme");
    s["mode"] = json!("payment");
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["currency"] = json!("usd");
    s["amount_total"] = json!(amount);
    s["payment_intent"] = json!(intent);
    s["invoice"] = json!(invoice);
    s
}

on_stores!(a_top_up_counts_once_and_its_refund_reaches_it);
async fn a_top_up_counts_once_and_its_refund_reaches_it(store: Arc<dyn Store>) {
    let s = setup(store, true).await;
    let top_up = event("evt_1", "checkout.session.completed", NOON, checkout("cs_1", "pi_c", 1_000, None));
    assert_eq!(s.signed_at(&top_up, NOON).await, (200, paid(1_000, Some("tier1"))));
    // The same payment as its async success, then a checkout that made an invoice (its
    // `invoice.paid` counts it): nothing more.
    let again = event("evt_2", "checkout.session.async_payment_succeeded", NOON, checkout("cs_1", "pi_c", 1_000, None));
    assert_eq!(s.signed_at(&again, NOON).await, (200, paid(1_000, None)));
    let invoiced = event("evt_3", "checkout.session.completed", NOON, checkout("cs_2", "pi_d", 9_000, Some("in_9")));
    assert_eq!(s.signed_at(&invoiced, NOON).await, (200, WebhookOutcome::Ignored));
    // Refunded in full (the charge names the payment intent): nothing paid, down to the first.
    let refund = event("evt_4", "charge.refunded", NOON + 60, charge("pi_c", 1_000, 1_000));
    assert_eq!(s.signed_at(&refund, NOON + 60).await, (200, paid(0, Some("free"))));
    assert_eq!(s.plan().await, "free");
}

/// `config` with `invoice.paid` moving a subscription's tenant to `pro` (`[stripe.events]`),
/// a plan of no ladder.
fn config_with_transition(secret_file: &str) -> String {
    config(secret_file, true).replace(
        "[stripe]\n",
        "[plans.pro]\nquotas.requests = { limit = 9, period = \"day\", mode = \"hard\" }\n\
         [stripe]\n[stripe.events]\n\"invoice.paid\" = \"pro\"\n",
    )
}

impl Setup {
    async fn standing(&self, tenant: &str) -> Standing {
        let read = PaymentCall::Read { tenant: tenant.into() };
        self.store.payments(&read, self.nodes[0].tollgate.clock().unix_secs()).await.unwrap().standing
    }
}

// Counting money for tiers never holds up what the event does besides: on main, the tier step
// ran first and its read of Stripe failing answered 500 before the plan transition (and
// credits, and disputes' clawbacks) were applied, for every `invoice.paid` while Stripe's API
// failed or the key could not read invoice payments.
on_stores!(counting_for_tiers_holds_up_no_plan_transition);
async fn counting_for_tiers_holds_up_no_plan_transition(store: Arc<dyn Store>) {
    let s = setup_with(store, config_with_transition).await;
    s.paid_by("in_1", "pi_1");
    s.stripe.fail_reads(1);
    let first = event("evt_1", "invoice.paid", NOON, invoice("in_1", 1_000, NOON));
    let (status, _) = s.signed_at(&first, NOON).await;
    assert_eq!(status, 500, "the payment's read failed: delivered again, for tiers");
    assert_eq!(s.plan().await, "pro", "the plan transition applied all the same");
    assert_eq!(s.standing("acme").await.paid, 0);
    // Delivered again: counted, once.
    assert_eq!(s.signed_at(&first, NOON + 60).await.0, 200);
    assert_eq!(s.signed_at(&first, NOON + 120).await.0, 200);
    assert_eq!(s.standing("acme").await, Standing::new(1_000, Some(NOON)));
    // A customer of no tenant: Stripe is not read for tiers.
    let reads = s.stripe.list_reads();
    let mut stranger = invoice("in_2", 1_000, NOON);
    stranger["customer"] = json!("cus_stranger");
    let stranger = event("evt_2", "invoice.paid", NOON, stranger);
    assert_eq!(s.signed_at(&stranger, NOON + 180).await.0, 200);
    assert_eq!(s.stripe.list_reads(), reads, "no read for a customer of no tenant");
}

// Refunds of payments the ledger never saw (made before tiers were configured, or in another
// currency) wait for their payment, at most 64: on main, the 65th answered 500 for good, and
// so did every later refund and dispute of the tenant, holding up credits' clawbacks too. The
// oldest is let go instead.
on_stores!(refunds_of_unseen_payments_never_block_the_webhook);
async fn refunds_of_unseen_payments_never_block_the_webhook(store: Arc<dyn Store>) {
    let s = setup(store, false).await;
    let payment = event("evt_p", "invoice.paid", NOON, invoice("in_p", 1_000, NOON));
    s.paid_by("in_p", "pi_p");
    assert_eq!(s.signed_at(&payment, NOON).await.0, 200);
    for i in 0..=tollgate::store::ORPHANS_KEPT {
        let refund = event(&format!("evt_r{i}"), "charge.refunded", NOON, charge(&format!("pi_old{i}"), 700, 700));
        let (status, outcome) = s.signed_at(&refund, NOON).await;
        assert_eq!((status, outcome), (200, paid(1_000, None)), "refund {i}");
    }
    // And a refund of the payment it saw still counts.
    let refund = event("evt_rp", "charge.refunded", NOON, charge("pi_p", 1_000, 400));
    assert_eq!(s.signed_at(&refund, NOON).await, (200, paid(600, None)));
}

// A checkout whose payment is only authorized (manual capture) is not money paid: on main it
// counted for tiers (the credits of the same checkout were refused until captured).
on_stores!(an_authorized_payment_is_not_counted_until_captured);
async fn an_authorized_payment_is_not_counted_until_captured(store: Arc<dyn Store>) {
    let s = setup(store, true).await;
    let mut session = checkout("cs_m", "pi_m", 1_000, None);
    session["payment_method_options"] = json!({ "card": { "capture_method": "manual" } });
    s.stripe.add_payment_intent("pi_m", "requires_capture");
    let authorized = event("evt_1", "checkout.session.completed", NOON, session.clone());
    assert_eq!(s.signed_at(&authorized, NOON).await, (200, WebhookOutcome::Ignored));
    assert_eq!((s.standing("acme").await.paid, s.plan().await.as_str()), (0, "free"));
    // Captured by the time it is delivered again: counted.
    s.stripe.add_payment_intent("pi_m", "succeeded");
    assert_eq!(s.signed_at(&authorized, NOON + 60).await, (200, paid(1_000, Some("tier1"))));
}

// Every move has its alert: on main the alert's id named the move and what was paid, so a
// tenant moved down and back up having paid the same again lost the second move's alert.
on_stores!(each_move_has_its_alert_however_often_it_is_made);
async fn each_move_has_its_alert_however_often_it_is_made(store: Arc<dyn Store>) {
    let s = setup(store, true).await;
    let first = event("evt_1", "checkout.session.completed", NOON, checkout("cs_1", "pi_1", 1_000, None));
    assert_eq!(s.signed_at(&first, NOON).await, (200, paid(1_000, Some("tier1"))));
    let refund = event("evt_2", "charge.refunded", NOON + 60, charge("pi_1", 1_000, 1_000));
    assert_eq!(s.signed_at(&refund, NOON + 60).await, (200, paid(0, Some("free"))));
    let again = event("evt_3", "checkout.session.completed", NOON + 120, checkout("cs_2", "pi_2", 1_000, None));
    assert_eq!(s.signed_at(&again, NOON + 120).await, (200, paid(1_000, Some("tier1"))));
    // Each delivered again: no move, no alert.
    for (e, t) in [(&first, NOON + 180), (&refund, NOON + 181), (&again, NOON + 182)] {
        assert_eq!(s.signed_at(e, t).await.0, 200);
    }
    let mut moves = s.moves().await;
    moves.sort();
    let m = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(moves, [m("free", "tier1"), m("free", "tier1"), m("tier1", "free")], "three moves, three alerts");
}

// The daily check goes past a tenant whose ledger cannot be read: on main one failing read
// ended the pass, and every tenant after it waited for the next day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_check_goes_past_a_tenant_it_cannot_read() {
    let inner = Arc::new(MemoryStore::new());
    let faulty = Arc::new(common::Faulty::over(inner.clone()));
    let s = setup(faulty.clone(), false).await;
    let beta = TenantRecord::new("beta".into(), "free".into()).with_customer("cus_beta");
    s.store.put_tenant(&beta, &[KeyHash::of(b"key-beta")]).await.unwrap();
    for (tenant, customer, pi) in [("acme", "cus_acme", "pi_a"), ("beta", "cus_beta", "pi_b")] {
        let mut session = checkout(&format!("cs_{tenant}"), pi, 6_000, None);
        session["customer"] = json!(customer);
        let paid = event(&format!("evt_{tenant}"), "checkout.session.completed", NOON, session);
        assert_eq!(s.signed_at(&paid, NOON).await.0, 200);
    }
    s.at(NOON + 7 * DAY);
    *faulty.refuse_tenant.lock().unwrap() = Some("acme".to_owned());
    assert_eq!(s.nodes[0].tollgate.check_tiers().await.unwrap(), 1, "beta moved; acme tried again tomorrow");
    assert_eq!(s.store.tenant(&"beta".into()).await.unwrap().unwrap().plan.as_str(), "tier2");
    *faulty.refuse_tenant.lock().unwrap() = None;
    assert_eq!(s.nodes[0].tollgate.check_tiers().await.unwrap(), 1);
    assert_eq!(s.plan().await, "tier2");
}

// Nor does a failure of what else the event does hold up the count: a top-up whose credits
// cannot be granted yet (its line items unreadable: 500, delivered again) is money paid all the
// same. On 237de48 the tiers' step ran only once the event was settled, and a settlement that
// failed for days (a chargeback of a grant that cannot take it, a key without a credits
// permission) left the money uncounted past Stripe's retries.
on_stores!(a_failure_of_credits_holds_up_no_count_for_tiers);
async fn a_failure_of_credits_holds_up_no_count_for_tiers(store: Arc<dyn Store>) {
    let s = setup_with(store, |secret_file| {
        config(secret_file, false).replace(
            "[stripe]\n",
            "[plans.prepaid]\nquotas.requests = { period = \"prepaid\" }\n\
                 [stripe]\n[stripe.credits]\nmeter = \"requests\"\nprices = { price_pack = 100 }\n",
        )
    })
    .await;
    let mut item = fixtures()["item"].clone();
    item["price"]["id"] = json!("price_pack");
    item["quantity"] = json!(1);
    s.stripe.add_lines("/v1/checkout/sessions/cs_1/line_items", vec![item]);
    s.stripe.fail_reads(1);
    let top_up = event("evt_1", "checkout.session.completed", NOON, checkout("cs_1", "pi_c", 1_000, None));
    let (status, outcome) = s.signed_at(&top_up, NOON).await;
    assert_eq!(status, 500, "its credits' line items could not be read: {outcome:?}");
    assert_eq!(s.standing("acme").await, Standing::new(1_000, Some(NOON)), "counted for tiers all the same");
    assert_eq!(s.plan().await, "tier1");
    // Delivered again: counted once.
    let again = s.signed_at(&top_up, NOON + 60).await;
    assert_eq!(again.0, 200, "{again:?}");
    assert_eq!(s.standing("acme").await.paid, 1_000);
}

// An operator pins a tenant's tier (`tollgate tenants set-tier`, `Admin::set_tier`): it moves
// there, and no payment, refund or daily check moves it, up or down (on a ladder that moves
// down, a refund would); the usage route says so and shows no next tier. `set-plan` lifts the pin
// (the operator's plan is the tenant's now: a forgotten pin would hold it there for good), and so
// does `--unpin`, leaving the plan. A plan of no ladder, an unknown plan: refused, nothing
// written.
on_stores!(a_pinned_tier_is_moved_by_nothing_but_the_operator);
async fn a_pinned_tier_is_moved_by_nothing_but_the_operator(store: Arc<dyn Store>) {
    let s = setup_with(store, config_with_transition).await;
    let admin = tollgate::admin::Admin::for_engine(&s.nodes[0].tollgate);
    let pinned =
        || async { s.store.payments(&PaymentCall::Read { tenant: "acme".into() }, NOON).await.unwrap().pinned };
    let err = admin.set_tier("acme", Some("pro")).await.unwrap_err().to_string();
    assert!(err.contains("on no ladder"), "{err}");
    assert!(admin.set_tier("acme", Some("nope")).await.unwrap_err().to_string().contains("nope"));
    assert_eq!((pinned().await, s.plan().await), (None, "free".to_owned()), "nothing written");
    assert_eq!(admin.set_tier("acme", Some("tier1")).await.unwrap().plan.as_str(), "tier1");
    assert_eq!(pinned().await.as_deref(), Some("tier1"));
    // $60 paid, and 8 days later $1 more: tier 2's $50 and 7 days reached, by the webhook and by
    // every node's daily check; not moved.
    let first = event("evt_1", "checkout.session.completed", NOON, checkout("cs_1", "pi_1", 6_000, None));
    assert_eq!(s.signed_at(&first, NOON).await, (200, paid(6_000, None)), "counted, not moved");
    s.at(NOON + 8 * DAY);
    for n in &s.nodes {
        assert_eq!(n.tollgate.check_tiers().await.unwrap(), 0, "pinned");
    }
    let second = event("evt_2", "checkout.session.completed", NOON + 8 * DAY, checkout("cs_2", "pi_2", 100, None));
    assert_eq!(s.signed_at(&second, NOON + 8 * DAY).await, (200, paid(6_100, None)));
    // $58 refunded: $3 left, below tier 1's $5, on a ladder that moves down: not moved.
    let refund = event("evt_3", "charge.refunded", NOON + 8 * DAY, charge("pi_1", 6_000, 5_800));
    assert_eq!(s.signed_at(&refund, NOON + 8 * DAY).await, (200, paid(300, None)), "a reversal: not moved");
    assert_eq!(s.plan().await, "tier1");
    let view = s.usage(1).await;
    assert_eq!((view["pinned"].as_bool(), &view["next"]), (Some(true), &Value::Null), "{view}");
    assert!(s.moves().await.is_empty(), "no move, no alert");
    // The operator moves it: the pin is lifted, and the next refund moves it down.
    assert_eq!(admin.set_plan("acme", "tier2").await.unwrap().plan.as_str(), "tier2");
    assert_eq!(pinned().await, None, "set-plan lifts the pin");
    s.at(NOON + 8 * DAY + 60);
    assert_eq!(s.usage(1).await.get("pinned"), None, "the view made again a minute later");
    let refund = event("evt_4", "charge.refunded", NOON + 9 * DAY, charge("pi_2", 100, 100));
    assert_eq!(s.signed_at(&refund, NOON + 9 * DAY).await, (200, paid(200, Some("free"))));
    assert_eq!(s.moves().await, [("tier2".to_owned(), "free".to_owned())]);
    // Pinned again, then unpinned: the plan stays.
    assert_eq!(admin.set_tier("acme", Some("tier2")).await.unwrap().plan.as_str(), "tier2");
    assert_eq!(admin.set_tier("acme", None).await.unwrap().plan.as_str(), "tier2");
    assert_eq!((pinned().await, s.plan().await), (None, "tier2".to_owned()));
}

/// Each payment in the billing currency is added to the fleet's tallies and its tenant's, once
/// per event whatever its deliveries: the overview's money paid today. A subscription's
/// checkout (its invoice pays it) and a payment in another currency are not.
#[cfg(feature = "dashboard")]
#[tokio::test]
async fn a_payment_is_tallied_once_for_the_overview() {
    use tollgate::store::{TallyQuery, TallyRead, TallyScope};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let (_secret, secret_file) = common::alerts::secret_file();
    let h = Harness::with_store(&config(&secret_file, false), store.clone(), now);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let deliver = |payload: String| {
        let handler = &handler;
        async move {
            let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(now));
            handler.handle(Some(&signature), payload.as_bytes()).await.status().as_u16()
        }
    };
    let paid = event("evt_paid", "invoice.paid", now, invoice("in_paid", 500, now));
    assert_eq!(deliver(paid.clone()).await, 200);
    assert_eq!(deliver(paid).await, 200, "delivered again");
    let mut euros = invoice("in_eur", 900, now);
    euros["currency"] = json!("eur");
    assert_eq!(deliver(event("evt_eur", "invoice.paid", now, euros)).await, 200);
    let mut checkout = fixtures()["checkout.session"].clone();
    checkout["customer"] = json!("cus_acme");
    checkout["mode"] = json!("subscription");
    checkout["payment_status"] = json!("paid");
    checkout["amount_total"] = json!(700);
    checkout["currency"] = json!("usd");
    assert_eq!(deliver(event("evt_sub", "checkout.session.completed", now, checkout)).await, 200);

    let paid_of = |read: Vec<tollgate::store::Tally>, scope: TallyScope| {
        read.iter().filter(|t| t.scope == scope).map(|t| t.count("paid_minor")).sum::<u64>()
    };
    let minute = now - now.rem_euclid(60);
    let fleet = store.tallies(&TallyQuery::new(TallyRead::Fleet, minute, minute + 60)).await.unwrap();
    assert_eq!(paid_of(fleet, TallyScope::Fleet), 500, "once, in dollars' cents, the subscription's checkout not");
    let day = now - now.rem_euclid(86_400);
    let tenants = store.tallies(&TallyQuery::new(TallyRead::Tenants, day, day + 86_400)).await.unwrap();
    assert_eq!(paid_of(tenants, TallyScope::Tenant("acme".into())), 500);
    // The overview says it.
    let token = "dashboard-token-0123456789-abcdefgh";
    let d = tollgate::dashboard::Dashboard::for_engine(
        &h.tollgate,
        tollgate::dashboard::Access::Token(tollgate::config::DashboardToken::new(token).unwrap()),
    );
    let r =
        http::Request::get("/").header("authorization", format!("Bearer {token}")).body(bytes::Bytes::new()).unwrap();
    let page = String::from_utf8(d.respond("/ops", r).await.body().to_vec()).unwrap();
    assert!(page.contains("<span class=\"paid-today\">5.00 USD</span>"), "{page}");
}
