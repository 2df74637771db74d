//! The audit of tenants' settings (issue 91, deliverable 4): a change from each source (an
//! operator through `Admin`, the tenant at its own route by its key, a Stripe webhook by its
//! event) is recorded once, with who, the value before and after, and when, on every store
//! that keeps a directory.

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate::{
    admin::{Admin, KeyOptions},
    config::QuotaMode,
    store::{Actor, AuditRecord, Setting, Store},
};

use super::{holds::admit, Harness, NOON};

/// A plan with a spend cap its tenants may raise, and tenant alerts; Stripe's price of `pro`.
pub const TOML: &str = r#"
[billing]
currency = "usd"
[meters.tokens]
price = "0.000001"
[plans.team]
tenant_alerts = true
spend = { limit = "5.00", period = "month", mode = "hard", max_limit = "50.00" }
[plans.pro]
tenant_alerts = true
spend = { limit = "20.00", period = "month", mode = "hard", max_limit = "50.00" }
[alerts]
allow_private = ["127.0.0.1/32"]
[stripe.prices]
price_pro_monthly = "pro"
[stripe.subscription_status]
past_due = "team"
unpaid = "team"
canceled = "team"
paused = "team"
incomplete = "ignore"
incomplete_expired = "team"
[[routes]]
path = "/generate"
reports = ["tokens"]
"#;

/// The signing secret of the scenario's webhooks.
pub const SECRET: &str = "whsec_audit";

/// A complete `customer.subscription.updated` event, as Stripe sends it, putting `customer`
/// on the price of `pro`.
fn subscription_event(id: &str, customer: &str) -> String {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    let fixtures = serde_json::from_str::<Value>(&text).unwrap()["resources"].clone();
    let mut s = fixtures["subscription"].clone();
    s["customer"] = json!(customer);
    s["status"] = json!("active");
    s["items"]["data"][0]["price"]["id"] = json!("price_pro_monthly");
    s["items"]["data"][0]["price"]["lookup_key"] = Value::Null;
    let mut e = fixtures["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!("customer.subscription.updated");
    e["created"] = json!(NOON - 60);
    e["data"] = json!({ "object": s });
    e.to_string()
}

fn change(r: &AuditRecord) -> (String, &str, Option<&str>, Option<&str>) {
    (r.actor.to_string(), r.setting.as_str(), r.before.as_deref(), r.after.as_deref())
}

/// An operator creates tenant `acme`, gives it a key, a customer, overrides, a spend cap and
/// an alert endpoint; the tenant lowers its cap with its key at its own route; a Stripe
/// webhook moves it to `pro`; the operator revokes the key. The audit holds one record per
/// change, newest first, each with who, before and after (the endpoint's URL, never its
/// secret; the key's id, never the key), stamped by the engine's clock; a read changes
/// nothing, and a change to the same value is not recorded.
pub async fn every_source_records_its_changes(store: Arc<dyn Store>) {
    let h = Harness::with_store(TOML, store, NOON);
    let ops = Admin::for_engine(&h.tollgate).operator("ana@ops");
    ops.add_tenant("acme", "team", None).await.unwrap();
    let issued = ops.issue_key("acme", KeyOptions::default()).await.unwrap();
    let (key, key_id) = (issued.key.clone(), issued.record.id.clone());
    ops.set_customer("acme", Some("cus_acme"), false).await.unwrap();
    ops.set_overrides("acme", Some(r#"{"rate": "40/s", "burst": 40}"#)).await.unwrap();
    ops.set_spend_cap("acme", Some("8.00"), QuotaMode::Hard).await.unwrap();
    ops.set_spend_cap("acme", Some("8.00"), QuotaMode::Hard).await.unwrap(); // the same: not recorded
    ops.spend_cap("acme").await.unwrap(); // a read: not recorded

    // An endpoint whose URL carries a receiver's token (a user is refused at registration):
    // the token is not recorded.
    let url = "https://127.0.0.1:9/hook?token=tok_secret#f";
    let secret = if cfg!(feature = "alerts") {
        ops.set_alert_endpoint("acme", Some(url)).await.unwrap().unwrap()
    } else {
        String::new()
    };

    // The tenant, at its own route, with its key.
    let key: &'static str = Box::leak(key.into_boxed_str());
    let (ticket, ctx) = admit(&h, key).await.unwrap();
    assert!(ticket.complete(200));
    let caller = tollgate::Caller::api_key(key.as_bytes());
    let put = br#"{"limit": "6.00", "mode": "hard"}"#;
    let r = h.tollgate.tenant_spend_cap(&ctx, &caller, &http::Method::PUT, put).await;
    assert_eq!(r.status(), 200, "{:?}", r.body());
    let refused = h.tollgate.tenant_spend_cap(&ctx, &caller, &http::Method::PUT, br#"{"limit": "99.00"}"#).await;
    assert_eq!(refused.status(), 422, "above the maximum: refused, not recorded");

    // A Stripe webhook.
    #[cfg(feature = "stripe")]
    {
        let handler = h.tollgate.webhook_handler_with_secrets(vec![tollgate::billing::Secret::new(SECRET)]);
        let event = subscription_event("evt_audit_1", "cus_acme");
        let signature = stripe_webhook::Webhook::generate_test_header(&event, SECRET, Some(NOON));
        let reply = handler.handle(Some(&signature), event.as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 200, "{:?}", reply.outcome);
        // Delivered again: a duplicate, not recorded again.
        assert_eq!(handler.handle(Some(&signature), event.as_bytes()).await.status().as_u16(), 200);
    }
    ops.revoke_key("acme", &key_id).await.unwrap();

    let audit = ops.audit(Some("acme"), None, 50).await.unwrap();
    let operator = "operator:ana@ops".to_owned();
    let print = |v: &str| tollgate::store::KeyHash::of(v.as_bytes()).to_hex()[..12].to_owned();
    let endpoint = format!("https://127.0.0.1:9/hook url=sha256:{} secret=sha256:{}", print(url), print(&secret));
    let key_text = audit.iter().find(|r| r.setting == Setting::Key).and_then(|r| r.before.clone()).unwrap();
    assert!(key_text.starts_with(&format!("{key_id} prefix=tg_live_")) && !key_text.contains(&key[12..]), "{key_text}");
    let mut expected = vec![
        (operator.clone(), "key", Some(key_text.as_str()), None),
        (format!("key:{key_id}"), "spend-cap", Some("8 hard"), Some("6 hard")),
        (operator.clone(), "spend-cap", None, Some("8 hard")),
        (operator.clone(), "overrides", None, Some(r#"{"burst":40,"rate":"40/s"}"#)),
        (operator.clone(), "customer", None, Some("cus_acme")),
        (operator.clone(), "key", None, Some(key_text.as_str())),
        (operator.clone(), "tenant", None, Some("plan=team")),
    ];
    if cfg!(feature = "alerts") {
        expected.insert(2, (operator.clone(), "alert-endpoint", None, Some(endpoint.as_str())));
    }
    if cfg!(feature = "stripe") {
        expected.insert(1, ("stripe:evt_audit_1".to_owned(), "plan", Some("team"), Some("pro")));
    }
    let got: Vec<_> = audit.iter().map(change).collect();
    assert_eq!(got, expected, "{audit:#?}");
    let seqs: Vec<i64> = audit.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=expected.len() as i64).rev().collect::<Vec<_>>(), "numbered one after the other");
    assert!(audit.iter().all(|r| r.at == NOON * 1_000), "the engine's clock");
    let all = format!("{audit:?}");
    assert!(!all.contains(&secret) || secret.is_empty(), "never the endpoint's secret");
    assert!(!all.contains("tok_secret"), "never its URL's token: {all}");
    assert!(matches!(&audit[0].actor, Actor::Operator(name) if name == "ana@ops"));

    // The fleet's listing holds the same, in pages.
    let first = ops.audit(None, None, 4).await.unwrap();
    let rest = ops.audit(None, Some(first[3].cursor()), 50).await.unwrap();
    assert_eq!(first.len() + rest.len(), audit.len());
    assert_eq!(ops.audit(Some("nobody"), None, 10).await.unwrap(), vec![]);
}
