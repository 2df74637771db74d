//! Stripe webhooks through `WebhookHandler`, built over Stripe's own complete example objects
//! (`tests/fixtures/stripe_objects.json`) and signed as Stripe signs them. Each case asserts
//! the tenant's plan afterwards and the limits a request then meets: `free` allows 2 requests
//! a day, `metered` and `pro` 1,000.
#![cfg(feature = "stripe")]

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{Harness, NOON};
use serde_json::{json, Value};
use tollgate::store::prelude::*;
use tollgate::store::KeyHash;
use tollgate::store::Store;
use tollgate::{
    billing::{Secret, WebhookHandler, WebhookOutcome},
    store::{MemoryStore, TenantRecord, TenantUpdate, UpdateWhen},
};

const SECRET: &str = "whsec_current";
const OLD_SECRET: &str = "whsec_previous";

const CONFIG: &str = r#"
[usage]
# A first lease on PostgreSQL is a few statements: on a loaded machine it must not turn into a
# fail-open admission (the hard quota of 2 is what these cases count).
store_timeout = "10s"
[limits]
directory_ttl = "30s"
[plans.free]
quotas.requests = { limit = 2, period = "day", mode = "hard" }
[plans.metered]
quotas.requests = { limit = 1000, period = "day", mode = "hard" }
[plans.pro]
quotas.requests = { limit = 1000, period = "day", mode = "hard" }
[stripe.events]
"payment_method.attached" = "metered"
"customer.subscription.deleted" = "free"
[stripe.subscription_status]
past_due = "free"
unpaid = "free"
canceled = "free"
paused = "free"
incomplete = "ignore"
incomplete_expired = "free"
[stripe.prices]
price_pro_monthly = "pro"
pro_yearly = "pro"
"#;

fn fixtures() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["resources"].clone()
}

/// A complete event of `kind` around `object`, as Stripe sends it.
fn event(id: &str, kind: &str, created: i64, object: Value) -> String {
    let mut e = fixtures()["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["data"] = json!({ "object": object });
    e.to_string()
}

/// Stripe's example subscription, for `customer`, in `status`, on a price with this id and
/// lookup key.
fn subscription(customer: &str, status: &str, price: &str, lookup_key: Option<&str>) -> Value {
    let mut s = fixtures()["subscription"].clone();
    s["customer"] = json!(customer);
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!(price);
    s["items"]["data"][0]["price"]["lookup_key"] = json!(lookup_key);
    s
}

fn payment_method(customer: &str) -> Value {
    let mut p = fixtures()["payment_method"].clone();
    p["customer"] = json!(customer);
    p
}

/// The `Stripe-Signature` value for `payload` signed with `secret` at `t`.
fn sign(payload: &str, secret: &str, t: i64) -> String {
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(t))
}

struct Setup {
    h: Harness,
    store: Arc<dyn Store>,
    handler: WebhookHandler,
}

/// acme (customer `cus_acme`, key `key-acme`) on free, in the store's directory; a handler
/// verifying with the current and the previous secret (a rotation).
async fn setup() -> Setup {
    setup_with(CONFIG).await
}

async fn setup_with(config: &str) -> Setup {
    setup_on(Arc::new(MemoryStore::new()), config).await
}

/// The same on a schema of its own on the PostgreSQL test server (`None`: skipped loudly,
/// outside CI).
async fn setup_postgres() -> Option<Setup> {
    #[cfg(feature = "postgres")]
    {
        let (store, _) = common::postgres::store().await?;
        Some(setup_on(Arc::new(store), CONFIG).await)
    }
    #[cfg(not(feature = "postgres"))]
    {
        assert!(std::env::var_os("CI").is_none(), "CI runs the webhook tests with the postgres feature");
        eprintln!("SKIPPED: the PostgreSQL store needs the postgres feature");
        None
    }
}

/// A webhook test on each store that a fleet's webhooks reach: memory and PostgreSQL (the
/// plan change and its event id in one transaction).
macro_rules! on_every_store {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn memory() {
                super::$test(super::setup().await).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(s) = super::setup_postgres().await {
                    super::$test(s).await;
                }
            }
        }
    };
}

async fn setup_on(store: Arc<dyn Store>, config: &str) -> Setup {
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let h = Harness::with_store(config, store.clone(), NOON);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET), Secret::new(OLD_SECRET)]);
    Setup { h, store, handler }
}

impl Setup {
    async fn deliver(&self, payload: &str, signature: &str) -> (u16, WebhookOutcome) {
        let reply = self.handler.handle(Some(signature), payload.as_bytes()).await;
        (reply.status().as_u16(), reply.outcome)
    }

    async fn signed(&self, payload: &str) -> (u16, WebhookOutcome) {
        self.deliver(payload, &sign(payload, SECRET, NOON)).await
    }

    async fn plan(&self) -> String {
        self.store.tenant(&"acme".into()).await.unwrap().unwrap().plan.to_string()
    }

    /// How many of `n` requests acme gets through now, and the plan its handler saw.
    async fn admitted(&self, n: usize) -> (usize, String) {
        let mut ok = 0;
        let mut plan = String::new();
        for _ in 0..n {
            let r = self.h.get("/", "key-acme").await;
            if r.status == 200 {
                ok += 1;
                plan = String::from_utf8_lossy(&r.body).into_owned();
            }
        }
        (ok, plan)
    }
}

fn applied(plan: &str) -> WebhookOutcome {
    WebhookOutcome::Applied { tenant: "acme".into(), plan: plan.into() }
}

on_every_store!(a_valid_event_moves_the_tenant_at_once_on_this_node);
async fn a_valid_event_moves_the_tenant_at_once_on_this_node(s: Setup) {
    assert_eq!(s.admitted(3).await, (2, "acme on free".into()), "free: 2 a day");
    let e = event("evt_1", "payment_method.attached", NOON - 10, payment_method("cus_acme"));
    assert_eq!(s.signed(&e).await, (200, applied("metered")));
    assert_eq!(s.plan().await, "metered");
    assert_eq!(s.admitted(5).await, (5, "acme on metered".into()), "the new limits, at once");
    assert_eq!(s.h.tollgate.stats().webhooks_applied, 1);
    let reply = s.handler.handle(Some(&sign(&e, SECRET, NOON)), e.as_bytes()).await.into_response();
    assert_eq!(reply.headers()["content-type"], "application/json");
}

on_every_store!(a_wrong_secret_a_bad_header_or_an_expired_signature_gets_400_and_changes_nothing);
async fn a_wrong_secret_a_bad_header_or_an_expired_signature_gets_400_and_changes_nothing(s: Setup) {
    let e = event("evt_1", "payment_method.attached", NOON - 10, payment_method("cus_acme"));
    for signature in [
        sign(&e, "whsec_someone_else", NOON),
        sign(&e, SECRET, NOON - 301),
        sign(&e, SECRET, NOON + 301),
        "t=abc,v1=00".to_owned(),
        "v1=deadbeef".to_owned(),
        String::new(),
    ] {
        let (status, outcome) = s.deliver(&e, &signature).await;
        assert_eq!(status, 400, "{signature}: {outcome:?}");
        assert!(matches!(outcome, WebhookOutcome::Rejected(_)), "{outcome:?}");
    }
    // Within the tolerance, and the body changed after signing.
    assert_eq!(s.deliver(&e, &sign(&e, SECRET, NOON - 300)).await.0, 200);
    let reply = s.handler.handle(None, e.as_bytes()).await;
    assert_eq!(reply.status(), 400);
    assert_eq!(reply.clone().into_response().headers()["content-type"], "application/problem+json");
    let other = event("evt_2", "customer.subscription.deleted", NOON, subscription("cus_acme", "canceled", "p", None));
    assert_eq!(s.deliver(&other, &sign(&e, SECRET, NOON)).await.0, 400, "a signature of another body");
    assert_eq!(s.h.tollgate.stats().webhooks_rejected, 8);
    assert_eq!(s.plan().await, "metered", "only the one good delivery applied");
}

on_every_store!(rotated_secrets_are_each_accepted_and_any_v1_signature_may_match);
async fn rotated_secrets_are_each_accepted_and_any_v1_signature_may_match(s: Setup) {
    let e1 = event(
        "evt_1",
        "customer.subscription.deleted",
        NOON - 20,
        subscription("cus_acme", "canceled", "price_pro_monthly", None),
    );
    assert_eq!(s.deliver(&e1, &sign(&e1, OLD_SECRET, NOON)).await, (200, applied("free")), "the previous secret");
    let e2 = event("evt_2", "payment_method.attached", NOON - 10, payment_method("cus_acme"));
    // Stripe signs with both secrets during a rotation: one header, two v1 values.
    let both =
        format!("{},v1={}", sign(&e2, "whsec_unknown", NOON), sign(&e2, SECRET, NOON).split("v1=").nth(1).unwrap());
    assert_eq!(s.deliver(&e2, &both).await, (200, applied("metered")));
    // A handler that no longer has the previous secret refuses it.
    let current_only = s.h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let e3 = event("evt_3", "payment_method.attached", NOON, payment_method("cus_acme"));
    assert_eq!(current_only.handle(Some(&sign(&e3, OLD_SECRET, NOON)), e3.as_bytes()).await.status(), 400);
}

on_every_store!(a_duplicate_is_a_no_op_and_an_older_event_never_undoes_a_newer_one);
async fn a_duplicate_is_a_no_op_and_an_older_event_never_undoes_a_newer_one(s: Setup) {
    let attached = event("evt_a", "payment_method.attached", NOON - 100, payment_method("cus_acme"));
    let deleted = event(
        "evt_b",
        "customer.subscription.deleted",
        NOON - 50,
        subscription("cus_acme", "canceled", "price_pro_monthly", None),
    );
    // Out of order: the deletion (newer) arrives first, then the attachment (older).
    assert_eq!(s.signed(&deleted).await, (200, applied("free")));
    assert_eq!(s.signed(&attached).await, (200, WebhookOutcome::Stale));
    assert_eq!(s.plan().await, "free");
    assert_eq!(s.admitted(3).await.0, 2, "still free");
    // Stripe delivers the deletion again: nothing happens.
    assert_eq!(s.signed(&deleted).await, (200, WebhookOutcome::Duplicate));
    // An update of the same subscription in the same second, delivered after the deletion:
    // a deletion comes after an update of its second, so the tenant stays on free (it was left
    // on the paid plan, in arrival order).
    let same_second = event(
        "evt_c",
        "customer.subscription.updated",
        NOON - 50,
        subscription("cus_acme", "active", "price_pro_monthly", None),
    );
    assert_eq!(s.signed(&same_second).await, (200, WebhookOutcome::Stale));
    assert_eq!(s.plan().await, "free");
    assert_eq!(s.admitted(3).await.0, 0, "free, its 2 spent above");
    assert_eq!(s.h.tollgate.stats().webhooks_ignored, 3);
}

on_every_store!(subscription_statuses_and_prices_move_the_plan_both_ways);
async fn subscription_statuses_and_prices_move_the_plan_both_ways(s: Setup) {
    let sub = |id: &str, at: i64, status: &str| {
        event(id, "customer.subscription.updated", at, subscription("cus_acme", status, "price_x", Some("pro_yearly")))
    };
    assert_eq!(s.signed(&sub("evt_1", NOON - 30, "active")).await, (200, applied("pro")), "by lookup key");
    assert_eq!(s.signed(&sub("evt_2", NOON - 20, "past_due")).await, (200, applied("free")));
    assert_eq!(s.admitted(3).await, (2, "acme on free".into()));
    assert_eq!(s.signed(&sub("evt_3", NOON - 10, "active")).await, (200, applied("pro")), "paid again");
    assert_eq!(s.admitted(3).await.0, 3);
    // A status mapped to `ignore` changes nothing.
    assert_eq!(s.signed(&sub("evt_4", NOON - 5, "incomplete")).await, (200, WebhookOutcome::Ignored));
    // Another subscription of the customer's, on a price the file does not map: 200, nothing
    // changes for it (an add-on).
    let mut addon = subscription("cus_acme", "active", "price_other", None);
    addon["id"] = json!("sub_addon");
    let unmapped = event("evt_5", "customer.subscription.updated", NOON, addon);
    assert_eq!(s.signed(&unmapped).await, (200, WebhookOutcome::UnknownPrice));
    assert_eq!(s.plan().await, "pro");
    // The paying subscription moved to a price the file does not map: it no longer gives pro.
    let moved = event(
        "evt_6",
        "customer.subscription.updated",
        NOON + 1,
        subscription("cus_acme", "active", "price_other", None),
    );
    assert_eq!(s.signed(&moved).await, (200, applied("free")));
}

on_every_store!(unknown_types_customers_and_events_the_typed_parser_refuses_get_200);
async fn unknown_types_customers_and_events_the_typed_parser_refuses_get_200(s: Setup) {
    // A type no transition names.
    let mut invoice = fixtures()["invoice"].clone();
    invoice["customer"] = json!("cus_acme");
    let e = event("evt_1", "invoice.paid", NOON, invoice);
    assert_eq!(s.signed(&e).await, (200, WebhookOutcome::Ignored));
    // A type async-stripe does not know at all (from a newer API version).
    let e = event("evt_2", "billing.credit_grant.future_thing", NOON, json!({"object": "x", "customer": "cus_acme"}));
    assert_eq!(s.signed(&e).await, (200, WebhookOutcome::Ignored));
    // A customer no tenant has.
    let e = event("evt_3", "payment_method.attached", NOON, payment_method("cus_nobody"));
    assert_eq!(s.signed(&e).await, (200, WebhookOutcome::UnknownCustomer));
    assert_eq!(s.plan().await, "free");
    // A subscription from another API version, missing fields the typed parser requires:
    // verified, then read with serde_json for the fields a transition needs.
    let mut partial = subscription("cus_acme", "active", "price_pro_monthly", None);
    partial.as_object_mut().unwrap().remove("billing_cycle_anchor");
    partial.as_object_mut().unwrap().remove("automatic_tax");
    let mut e: Value = serde_json::from_str(&event("evt_4", "customer.subscription.updated", NOON, partial)).unwrap();
    e["api_version"] = json!("2099-01-01.future");
    let e = e.to_string();
    assert_eq!(s.signed(&e).await, (200, applied("pro")));
    // A verified body that is not an event at all: taken and ignored (a 400 would have Stripe
    // retry it for days).
    assert_eq!(s.signed("{\"hello\":1}").await, (200, WebhookOutcome::Ignored));
}

on_every_store!(the_plan_reaches_another_node_within_the_directory_ttl);
async fn the_plan_reaches_another_node_within_the_directory_ttl(s: Setup) {
    // Node B: another engine on the same store, which has seen acme on free.
    let b = Harness::with_store(CONFIG, s.store.clone(), NOON);
    assert_eq!(b.get("/", "key-acme").await.body, "acme on free");
    let e = event("evt_1", "payment_method.attached", NOON, payment_method("cus_acme"));
    assert_eq!(s.signed(&e).await, (200, applied("metered")));
    assert_eq!(s.h.get("/", "key-acme").await.body, "acme on metered", "at once on the node that handled it");
    // The worker's revalidation (called directly here) reads it again within the TTL.
    b.clock.advance(Duration::from_secs(20));
    assert_eq!(b.tollgate.revalidate().await, 0, "not due yet");
    // Still on free there (2 a day, one used on each node): refused, naming the plan.
    let cached = b.get("/", "key-acme").await;
    assert_eq!(cached.status, 429);
    assert!(cached.json()["detail"].as_str().unwrap().contains("plan `free`"), "cached: {:?}", cached.json());
    b.clock.advance(Duration::from_secs(5));
    assert_eq!(b.tollgate.revalidate().await, 1, "due within the TTL");
    assert_eq!(b.get("/", "key-acme").await.body, "acme on metered");
}

#[tokio::test]
async fn a_store_failure_is_a_500_and_the_retry_applies() {
    let store = Arc::new(common::Faulty::default());
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    store.inner.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let h = Harness::with_store(CONFIG, store.clone(), NOON);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let e = event("evt_1", "payment_method.attached", NOON, payment_method("cus_acme"));
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let reply = handler.handle(Some(&sign(&e, SECRET, NOON)), e.as_bytes()).await;
    assert_eq!(reply.status(), 500);
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(store.inner.tenant(&"acme".into()).await.unwrap().unwrap().plan.as_str(), "free");
    // Stripe's retry is not taken for a duplicate: the id was not marked seen.
    let reply = handler.handle(Some(&sign(&e, SECRET, NOON)), e.as_bytes()).await;
    assert_eq!(reply.outcome, applied("metered"));
}

/// A webhook moves a tenant whose overrides do not fit the new plan (a `burst` over a plan
/// without a rate): the plan change is applied (the customer paid for it), and the tenant is
/// served the new plan without the overrides, counted, rather than kept on the old one.
#[tokio::test]
async fn a_plan_change_the_overrides_do_not_fit_is_applied_and_served_without_them() {
    let config = CONFIG.replace("[plans.free]\n", "[plans.free]\nrate = \"100/s\"\n");
    let store = Arc::new(MemoryStore::new());
    let mut acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    acme.overrides = Some(r#"{"burst": 10}"#.into());
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let h = Harness::with_store(&config, store.clone(), NOON);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let s = Setup { h, store, handler };
    assert_eq!(s.admitted(1).await, (1, "acme on free".into()));
    let e = event("evt_1", "payment_method.attached", NOON - 10, payment_method("cus_acme"));
    assert_eq!(s.signed(&e).await, (200, applied("metered")));
    assert_eq!(s.admitted(3).await, (3, "acme on metered".into()), "the new plan, at once");
    assert_eq!(s.h.tollgate.stats().overrides_not_served, 1);
    let record = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!(record.overrides.as_deref(), Some(r#"{"burst": 10}"#), "kept, to be mended");
}

/// Every subscription status has an outcome: a file that maps subscriptions (by price or by
/// status) but leaves one unmapped is refused, naming it (`paused` kept a tenant on its paid
/// plan); `paused` then moves the tenant as mapped.
#[tokio::test]
async fn every_subscription_status_has_an_outcome() {
    let without_paused = CONFIG.replace("paused = \"free\"\n", "");
    let e = tollgate::Config::from_toml_str(&without_paused).unwrap_err();
    assert_eq!(e.key(), "stripe.subscription_status", "{e}");
    assert!(e.to_string().contains("paused") && e.to_string().contains("ignore"), "{e}");
    // `active` and `trialing` go by price when prices are mapped; without them they need
    // their own outcome.
    let no_prices = CONFIG.replace("price_pro_monthly = \"pro\"\npro_yearly = \"pro\"\n", "");
    let e = tollgate::Config::from_toml_str(&no_prices).unwrap_err();
    assert!(e.to_string().contains("active") && e.to_string().contains("trialing"), "{e}");
    // A plan named like the keyword is refused as an outcome (ambiguous).
    let e = tollgate::Config::from_toml_str(&format!("{CONFIG}[plans.ignore]\n")).unwrap_err();
    assert_eq!(e.key(), "stripe.subscription_status.incomplete", "{e}");
    let s = setup().await;
    let sub = |id: &str, at: i64, status: &str| {
        event(id, "customer.subscription.updated", at, subscription("cus_acme", status, "price_x", Some("pro_yearly")))
    };
    assert_eq!(s.signed(&sub("evt_1", NOON - 30, "active")).await, (200, applied("pro")));
    assert_eq!(s.signed(&sub("evt_2", NOON - 20, "paused")).await, (200, applied("free")), "paused: off the paid plan");
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`: Stripe's signature over bytes that
/// async-stripe's test helper (which takes a `&str`) cannot sign.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner).finalize().to_vec()
}

on_every_store!(a_signed_body_that_is_not_utf8_is_taken_and_ignored);
/// A body signed with the endpoint's secret but not UTF-8 is verified (over its bytes, as Stripe
/// signs it) and taken with 200 `ignored`, as the docs promise for verified bodies that are not
/// events: a 400 would have Stripe retry it for days. The same bytes with a wrong signature get
/// 400, and nothing changes either way.
async fn a_signed_body_that_is_not_utf8_is_taken_and_ignored(s: Setup) {
    let body: &[u8] = b"{\"id\":\"evt_x\",\"type\":\"customer.subscription.deleted\",\"note\":\"\xff\xfe\"}";
    let header = |secret: &str| {
        let mut signed = format!("{NOON}.").into_bytes();
        signed.extend_from_slice(body);
        format!("t={NOON},v1={}", hex::encode(hmac_sha256(secret.as_bytes(), &signed)))
    };
    // The helper agrees with async-stripe's signer on a UTF-8 body.
    let text = "{\"hello\":1}";
    let mine =
        format!("t={NOON},v1={}", hex::encode(hmac_sha256(SECRET.as_bytes(), format!("{NOON}.{text}").as_bytes())));
    assert_eq!(mine, sign(text, SECRET, NOON));

    let reply = s.handler.handle(Some(&header(SECRET)), body).await;
    assert_eq!((reply.status().as_u16(), reply.outcome), (200, WebhookOutcome::Ignored));
    let reply = s.handler.handle(Some(&header(OLD_SECRET)), body).await;
    assert_eq!((reply.status().as_u16(), reply.outcome), (200, WebhookOutcome::Ignored), "a rotated secret too");
    let reply = s.handler.handle(Some(&header("whsec_wrong")), body).await;
    assert_eq!(reply.status().as_u16(), 400, "{:?}", reply.outcome);
    // Signed rightly, 301 s before the handler's clock: outside the tolerance.
    let mut signed = format!("{}.", NOON - 301).into_bytes();
    signed.extend_from_slice(body);
    let stale = format!("t={},v1={}", NOON - 301, hex::encode(hmac_sha256(SECRET.as_bytes(), &signed)));
    assert_eq!(s.handler.handle(Some(&stale), body).await.status().as_u16(), 400, "the timestamp counts");
    assert_eq!(s.plan().await, "free");
}

/// A webhook for the customer of a tenant declared in the configuration file: its plan is the
/// file's, so the event changes nothing, and says so (200 `file_tenant`, naming the tenant, and a
/// log line), rather than `unknown_customer` as if no tenant had the customer.
#[tokio::test]
async fn a_webhook_for_a_file_tenant_says_its_plan_is_the_file_s() {
    let toml =
        format!("{CONFIG}[tenants.filed]\nplan = \"free\"\nkeys = [\"key-filed\"]\nstripe_customer = \"cus_filed\"\n");
    let store = Arc::new(MemoryStore::new());
    let h = Harness::with_store(&toml, store.clone(), NOON);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let e = event(
        "evt_f",
        "customer.subscription.updated",
        NOON,
        subscription("cus_filed", "active", "price_pro_monthly", None),
    );
    let reply = handler.handle(Some(&sign(&e, SECRET, NOON)), e.as_bytes()).await;
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(reply.outcome, WebhookOutcome::FileTenant { tenant: "filed".into() });
    assert!(reply.body().contains("\"outcome\":\"file_tenant\""), "{}", reply.body());
    assert!(store.tenant(&"filed".into()).await.unwrap().is_none(), "nothing written");
}

/// One of several subscriptions of `cus_acme`: `id`, in `status`, on `price`.
fn sub_of(id: &str, status: &str, price: &str) -> Value {
    let mut s = subscription("cus_acme", status, price, None);
    s["id"] = json!(id);
    s
}

/// A customer with several subscriptions: events are ordered per subscription (an older event
/// of another subscription still applies), the plan is the highest that a live subscription
/// gives (`plan_order`), an add-on (a price no plan maps) never moves it, and the canceled
/// outcome applies once no subscription gives a plan.
#[tokio::test]
async fn the_plan_follows_every_live_subscription_of_the_customer() {
    let config = CONFIG
        .replace("pro_yearly = \"pro\"", "pro_yearly = \"pro\"\nprice_metered = \"metered\"")
        .replace("[stripe.events]", "[stripe]\nplan_order = [\"pro\", \"metered\"]\n[stripe.events]");
    let s = setup_with(&config).await;
    let e = |id: &str, kind: &str, at: i64, object: Value| event(id, kind, at, object);
    let created = "customer.subscription.created";
    let (updated, deleted) = ("customer.subscription.updated", "customer.subscription.deleted");
    assert_eq!(
        s.signed(&e("e1", created, NOON - 100, sub_of("sub_m", "active", "price_metered"))).await.1,
        applied("metered")
    );
    assert_eq!(
        s.signed(&e("e2", created, NOON - 90, sub_of("sub_p", "active", "price_pro_monthly"))).await.1,
        applied("pro")
    );
    // An add-on: no plan of its own, and its end downgrades no one.
    assert_eq!(
        s.signed(&e("e3", created, NOON - 80, sub_of("sub_a", "active", "price_addon"))).await.1,
        WebhookOutcome::UnknownPrice
    );
    assert_eq!(
        s.signed(&e("e4", deleted, NOON - 70, sub_of("sub_a", "canceled", "price_addon"))).await.1,
        WebhookOutcome::Ignored
    );
    assert_eq!(s.plan().await, "pro");
    // An older event of one subscription is stale for it alone.
    assert_eq!(
        s.signed(&e("e5", updated, NOON - 95, sub_of("sub_p", "past_due", "price_pro_monthly"))).await.1,
        WebhookOutcome::Stale
    );
    let old_other = e("e6", created, NOON - 200, sub_of("sub_x", "active", "price_metered"));
    assert_eq!(s.signed(&old_other).await.1, applied("pro"), "applied, though older than the tenant's last event");
    // The metered subscriptions fall behind: pro still wins.
    assert_eq!(
        s.signed(&e("e7", updated, NOON - 60, sub_of("sub_m", "past_due", "price_metered"))).await.1,
        applied("pro")
    );
    // pro ends: the highest left is metered (sub_x).
    assert_eq!(
        s.signed(&e("e8", deleted, NOON - 50, sub_of("sub_p", "canceled", "price_pro_monthly"))).await.1,
        applied("metered")
    );
    assert_eq!(
        s.signed(&e("e9", deleted, NOON - 45, sub_of("sub_x", "canceled", "price_metered"))).await.1,
        applied("free"),
        "sub_m gives free (past_due)"
    );
    // The last one ends: the canceled outcome.
    assert_eq!(
        s.signed(&e("e10", deleted, NOON - 40, sub_of("sub_m", "canceled", "price_metered"))).await.1,
        applied("free")
    );
    assert_eq!(s.admitted(3).await, (2, "acme on free".into()));
    let stored = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    assert!(stored.subscriptions.as_deref().is_some_and(|j| j.contains("sub_p") && j.contains("sub_m")), "{stored:?}");
}

/// `plan_order` names plans of the file, once each.
#[test]
fn plan_order_is_checked_at_load() {
    for (order, says) in [("[\"pro\", \"gold\"]", "unknown plan `gold`"), ("[\"pro\", \"pro\"]", "listed twice")] {
        let config = CONFIG.replace("[stripe.events]", &format!("[stripe]\nplan_order = {order}\n[stripe.events]"));
        let e = tollgate::Config::from_toml_str(&config).unwrap_err().to_string();
        assert!(e.contains("stripe.plan_order") && e.contains(says), "{e}");
    }
}

on_every_store!(a_move_to_a_price_no_plan_maps_ends_the_plan_it_gave);
/// A subscription that gave a plan and moves to a price no plan maps no longer gives it: with no
/// other, the canceled outcome applies; its later deletion keeps the tenant there (it kept the
/// paid plan for good).
async fn a_move_to_a_price_no_plan_maps_ends_the_plan_it_gave(s: Setup) {
    let (created, updated, deleted) =
        ("customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted");
    assert_eq!(
        s.signed(&event("e1", created, NOON - 30, sub_of("sub_p", "active", "price_pro_monthly"))).await.1,
        applied("pro")
    );
    assert_eq!(
        s.signed(&event("e2", updated, NOON - 20, sub_of("sub_p", "active", "price_other"))).await.1,
        applied("free")
    );
    assert_eq!(
        s.signed(&event("e3", deleted, NOON - 10, sub_of("sub_p", "canceled", "price_other"))).await.1,
        applied("free")
    );
    assert_eq!(s.plan().await, "free");
}

on_every_store!(a_tenant_from_before_keeps_its_order_and_its_plan);
/// A tenant whose subscriptions were stored by no earlier event (before this version) keeps the
/// rules it had: its last event orders every subscription's, and the plan follows the one event.
async fn a_tenant_from_before_keeps_its_order_and_its_plan(s: Setup) {
    let mut acme = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    acme.plan = "pro".into();
    acme.last_event_at = Some(NOON - 100);
    s.store.put_tenant(&acme, &[]).await.unwrap();
    let (updated, deleted) = ("customer.subscription.updated", "customer.subscription.deleted");
    // Stripe still retrying an event older than the last applied: stale, as before.
    let old = event("e0", updated, NOON - 200, sub_of("sub_p", "past_due", "price_pro_monthly"));
    assert_eq!(s.signed(&old).await.1, WebhookOutcome::Stale);
    // An add-on's end: nothing moves.
    assert_eq!(
        s.signed(&event("e1", deleted, NOON - 50, sub_of("sub_a", "canceled", "price_addon"))).await.1,
        WebhookOutcome::Ignored
    );
    assert_eq!(s.plan().await, "pro");
    // The paid subscription's end: the canceled outcome.
    assert_eq!(
        s.signed(&event("e2", deleted, NOON - 40, sub_of("sub_p", "canceled", "price_pro_monthly"))).await.1,
        applied("free")
    );
}

on_every_store!(a_plan_set_by_hand_survives_events_that_change_nothing);
/// A plan set by hand (a comp) is not undone by an add-on's event or an ignored status: only a
/// change of the best plan the subscriptions give, or a subscription giving one anew, writes it.
async fn a_plan_set_by_hand_survives_events_that_change_nothing(s: Setup) {
    let created = "customer.subscription.created";
    assert_eq!(
        s.signed(&event("e1", created, NOON - 30, sub_of("sub_p", "active", "price_pro_monthly"))).await.1,
        applied("pro")
    );
    let read = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    let update = TenantUpdate::Plan(read.id.clone(), "metered".into());
    assert!(s.store.update_tenant(&update, UpdateWhen::Unchanged(&read)).await.unwrap());
    assert_eq!(
        s.signed(&event("e2", created, NOON - 20, sub_of("sub_a", "active", "price_addon"))).await.1,
        WebhookOutcome::UnknownPrice
    );
    let ignored =
        event("e3", "customer.subscription.updated", NOON - 10, sub_of("sub_p", "incomplete", "price_pro_monthly"));
    assert_eq!(s.signed(&ignored).await.1, WebhookOutcome::Ignored);
    assert_eq!(s.plan().await, "metered");
}

on_every_store!(a_forgotten_subscription_s_late_event_is_stale);
/// Past 32 subscriptions the oldest that give nothing are forgotten, but a late event of a
/// forgotten one is still stale: a deleted subscription never comes back.
async fn a_forgotten_subscription_s_late_event_is_stale(s: Setup) {
    let (created, deleted) = ("customer.subscription.created", "customer.subscription.deleted");
    assert_eq!(
        s.signed(&event("d0", deleted, NOON - 500, sub_of("sub_0", "canceled", "price_pro_monthly"))).await.1,
        applied("free")
    );
    for i in 1..=32 {
        let e = event(&format!("a{i}"), created, NOON - 400 + i, sub_of(&format!("sub_{i}"), "active", "price_addon"));
        assert_eq!(s.signed(&e).await.1, WebhookOutcome::UnknownPrice);
    }
    let stored = s.store.tenant(&"acme".into()).await.unwrap().unwrap().subscriptions.unwrap();
    assert!(!stored.contains("\"sub_0\""), "forgotten: {stored}");
    let late = event("u0", "customer.subscription.updated", NOON - 600, sub_of("sub_0", "active", "price_pro_monthly"));
    assert_eq!(s.signed(&late).await.1, WebhookOutcome::Stale);
    assert_eq!(s.plan().await, "free");
}

/// Several plans by price need `plan_order` naming each.
#[test]
fn several_plans_by_price_need_a_plan_order() {
    let config = CONFIG.replace("pro_yearly = \"pro\"", "pro_yearly = \"pro\"\nprice_metered = \"metered\"");
    let e = tollgate::Config::from_toml_str(&config).unwrap_err().to_string();
    assert!(e.contains("stripe.plan_order") && e.contains("missing metered, pro"), "{e}");
    let ordered = config.replace("[stripe.events]", "[stripe]\nplan_order = [\"pro\", \"metered\"]\n[stripe.events]");
    assert!(tollgate::Config::from_toml_str(&ordered).is_ok());
}

on_every_store!(an_event_of_the_customer_never_overrides_a_live_subscription);
/// The guide's own configuration: a pro subscriber who replaces a card
/// (`payment_method.attached = "metered"`) stays on pro. Events of the customer move the plan
/// only while no live subscription gives one; older ones are stale.
async fn an_event_of_the_customer_never_overrides_a_live_subscription(s: Setup) {
    let created = event(
        "evt_1",
        "customer.subscription.created",
        NOON - 100,
        subscription("cus_acme", "active", "price_pro_monthly", None),
    );
    assert_eq!(s.signed(&created).await, (200, applied("pro")));
    let card = event("evt_2", "payment_method.attached", NOON - 50, payment_method("cus_acme"));
    assert_eq!(s.signed(&card).await, (200, WebhookOutcome::Ignored));
    assert_eq!(s.plan().await, "pro");
    assert_eq!(s.admitted(3).await, (3, "acme on pro".into()));
    // The subscription ends: nothing gives a plan, so the customer's events apply again.
    let deleted = event(
        "evt_3",
        "customer.subscription.deleted",
        NOON - 40,
        subscription("cus_acme", "canceled", "price_pro_monthly", None),
    );
    assert_eq!(s.signed(&deleted).await, (200, applied("free")));
    let card = event("evt_4", "payment_method.attached", NOON - 30, payment_method("cus_acme"));
    assert_eq!(s.signed(&card).await, (200, applied("metered")));
    let older = event("evt_5", "payment_method.attached", NOON - 35, payment_method("cus_acme"));
    assert_eq!(s.signed(&older).await, (200, WebhookOutcome::Stale));
    assert_eq!(s.plan().await, "metered");
}

on_every_store!(an_event_of_the_customer_keeps_the_rules_of_a_tenant_without_stored_subscriptions);
/// A tenant none of whose subscription events was stored (from before, or set on a plan by
/// hand): a plan a price gives stands for the subscription that gives it, so a card update
/// does not move it; on another plan the customer's event applies, and the tenant's first
/// subscription event still follows the rules of a tenant from before.
async fn an_event_of_the_customer_keeps_the_rules_of_a_tenant_without_stored_subscriptions(s: Setup) {
    let card = event("evt_1", "payment_method.attached", NOON - 50, payment_method("cus_acme"));
    assert_eq!(s.signed(&card).await, (200, applied("metered")), "free is no plan of a price");
    // An ignored status of a subscription on a priced plan: as before, the plan is kept.
    let incomplete = event(
        "evt_2",
        "customer.subscription.updated",
        NOON - 40,
        subscription("cus_acme", "incomplete", "price_pro_monthly", None),
    );
    assert_eq!(s.signed(&incomplete).await, (200, WebhookOutcome::Ignored));
    assert_eq!(s.plan().await, "metered");
    // Set on pro by hand, its subscriptions unknown: a card update leaves it there.
    let mut acme = s.store.tenant(&"acme".into()).await.unwrap().unwrap();
    acme.plan = "pro".into();
    acme.subscriptions = None;
    s.store.put_tenant(&acme, &[]).await.unwrap();
    let card = event("evt_3", "payment_method.attached", NOON - 30, payment_method("cus_acme"));
    assert_eq!(s.signed(&card).await, (200, WebhookOutcome::Ignored));
    assert_eq!(s.plan().await, "pro");
}

/// A webhook's store calls are bounded by `limits.background_timeout`: a delivery on a
/// directory that hangs is answered 500 (Stripe retries it) once the bound has passed, rather
/// than held open (on main it waited for good), and changes nothing.
#[tokio::test]
async fn a_delivery_on_a_directory_that_hangs_gets_500_at_the_background_timeout() {
    let store = Arc::new(common::Faulty::default());
    let s = setup_on(store.clone(), &CONFIG.replace("[limits]\n", "[limits]\nbackground_timeout = \"300ms\"\n")).await;
    store.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = event("evt_1", "payment_method.attached", NOON - 10, payment_method("cus_acme"));
    let (status, _) = tokio::time::timeout(std::time::Duration::from_secs(60), s.signed(&e)).await.expect("answered");
    assert_eq!(status, 500);
    store.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(s.plan().await, "free", "nothing changed");
    assert_eq!(s.signed(&e).await, (200, applied("metered")), "the retry applies it");
}
