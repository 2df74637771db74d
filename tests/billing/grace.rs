//! Past due, with grace (`[stripe] past_due_grace`, docs/stripe.md): a tenant whose
//! subscription goes `past_due` keeps its plan through the grace, told when by the usage route
//! and a `Tollgate-Past-Due` header on every response, on every node; at the grace's end the
//! pass of four engines moves it once to the past-due plan; a payment within the grace (the
//! subscription `active` again) cancels the move. Signed events over Stripe's own example
//! subscription, on every store.
#![cfg(feature = "stripe")]

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{Harness, NOON};
use serde_json::{json, Value};
use tollgate::{
    billing::{Secret, WebhookHandler, WebhookOutcome},
    store::{KeyHash, MemoryStore, SqliteStore, Store, TenantRecord},
};

const SECRET: &str = "whsec_grace";
const DAY: i64 = 86_400;
const GRACE: i64 = 3 * DAY;

const CONFIG: &str = r#"
[usage]
store_timeout = "10s"
[limits]
directory_ttl = "30s"
[plans.free]
quotas.requests = { limit = 100, period = "day", mode = "hard" }
[plans.pro]
quotas.requests = { limit = 1000, period = "day", mode = "hard" }
[stripe]
past_due_grace = "3d"
[stripe.subscription_status]
past_due = "free"
unpaid = "free"
canceled = "free"
paused = "free"
incomplete = "ignore"
incomplete_expired = "free"
[stripe.prices]
price_pro_monthly = "pro"
"#;

fn fixtures() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["resources"].clone()
}

/// `customer.subscription.updated` of acme's subscription `sub_1` on the pro price, in
/// `status`, created at `created`.
fn updated(id: &str, created: i64, status: &str) -> String {
    let mut s = fixtures()["subscription"].clone();
    s["id"] = json!("sub_1");
    s["customer"] = json!("cus_acme");
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!("price_pro_monthly");
    s["items"]["data"][0]["price"]["lookup_key"] = Value::Null;
    let mut e = fixtures()["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!("customer.subscription.updated");
    e["created"] = json!(created);
    e["data"] = json!({ "object": s });
    e.to_string()
}

struct Setup {
    nodes: Vec<Harness>,
    store: Arc<dyn Store>,
    handler: WebhookHandler,
}

async fn setup(store: Arc<dyn Store>) -> Setup {
    let acme = TenantRecord::new("acme".into(), "free".into()).with_customer("cus_acme");
    store.put_tenant(&acme, &[KeyHash::of(b"key-acme")]).await.unwrap();
    let nodes: Vec<Harness> = (0..4).map(|_| Harness::with_store(CONFIG, store.clone(), NOON)).collect();
    let handler = nodes[0].tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    Setup { nodes, store, handler }
}

impl Setup {
    /// Delivered at `t` (every node's clock moved there first).
    async fn deliver(&self, payload: &str, t: i64) -> (u16, WebhookOutcome) {
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

    async fn plan(&self) -> String {
        self.store.tenant(&"acme".into()).await.unwrap().unwrap().plan.as_str().to_owned()
    }

    /// What each node tells acme, every node having followed the directory: the
    /// `Tollgate-Past-Due` header of a served request, and the usage route's `past_due`.
    async fn told(&self) -> Vec<(Option<String>, Value)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            n.tollgate.follow_directory().await.unwrap();
            let reply = n.get("/", "key-acme").await;
            assert_eq!(reply.status, 200);
            let request = http::Request::builder().uri("/v1/usage").header("x-api-key", "key-acme").body(()).unwrap();
            let usage = n.tollgate.tenant_usage(&request).await;
            assert_eq!(usage.status(), 200);
            common::check_usage_schema(&[usage.body().clone()]);
            let body: Value = serde_json::from_slice(usage.body()).unwrap();
            assert_eq!(body["plan"], json!(self.plan().await), "the usage route's plan is the directory's");
            out.push((reply.header("tollgate-past-due").map(str::to_owned), body["past_due"].clone()));
        }
        out
    }

    /// Every node's pass at the end of graces: how many tenants it moved, in all.
    async fn pass(&self) -> usize {
        let mut moved = 0;
        for n in &self.nodes {
            moved += n.tollgate.check_past_due().await.unwrap();
        }
        moved
    }
}

fn applied(plan: &str) -> WebhookOutcome {
    WebhookOutcome::Applied { tenant: "acme".into(), plan: plan.into() }
}

fn past_due(until: i64) -> WebhookOutcome {
    WebhookOutcome::PastDue { tenant: "acme".into(), plan: "pro".into(), until, then: "free".into() }
}

/// What every node tells a tenant in its grace ending at `until`.
fn in_grace(until: i64, text: &str) -> Vec<(Option<String>, Value)> {
    let header = format!("until=\"{text}\", plan=\"free\"");
    vec![(Some(header), json!({ "until": until, "plan": "free" })); 4]
}

fn nothing_told() -> Vec<(Option<String>, Value)> {
    vec![(None, Value::Null); 4]
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

on_stores!(a_tenant_past_due_is_served_through_its_grace_then_moved_once);
async fn a_tenant_past_due_is_served_through_its_grace_then_moved_once(store: Arc<dyn Store>) {
    let s = setup(store).await;
    assert_eq!(s.deliver(&updated("evt_1", NOON, "active"), NOON).await, (200, applied("pro")));
    // Every node serves acme on pro before anything is past due (its state made then).
    assert_eq!(s.told().await, nothing_told());
    // Past due: pro is kept for three days, and every node says until when, and what then.
    let until = NOON + 100 + GRACE;
    assert_eq!(s.deliver(&updated("evt_2", NOON + 100, "past_due"), NOON + 100).await, (200, past_due(until)));
    assert_eq!(s.plan().await, "pro");
    assert_eq!(s.told().await, in_grace(until, "2026-03-17T12:01:40Z"));
    // The operator sees it too (the command line's `tollgate usage`, the dashboard's page).
    let admin = tollgate::admin::Admin::for_engine(&s.nodes[1].tollgate);
    let grace = admin.past_due("acme").await.unwrap().expect("in its grace");
    assert_eq!(grace.line(), "keeps its plan until 2026-03-17T12:01:40Z, then moves to free");
    let report = s.nodes[2].tollgate.usage_report(&"acme".into(), NOON, NOON + 101).await.unwrap();
    assert_eq!(report.past_due, Some(grace));
    // Delivered again: nothing more. Stripe's next past-due event (a retry of the invoice)
    // does not start the grace again.
    assert_eq!(s.deliver(&updated("evt_2", NOON + 100, "past_due"), NOON + 200).await.1, WebhookOutcome::Duplicate);
    assert_eq!(s.deliver(&updated("evt_3", NOON + DAY, "past_due"), NOON + DAY).await, (200, past_due(until)));
    // A second before its end: served on pro, no node moves it.
    s.at(until - 1);
    assert_eq!(s.pass().await, 0);
    assert_eq!(s.plan().await, "pro");
    // At its end: one node's pass moves it, the others find it moved; every node serves free
    // within a second, and tells nothing more.
    s.at(until);
    assert_eq!(s.pass().await, 1, "one move across four engines");
    assert_eq!(s.plan().await, "free");
    assert_eq!(s.told().await, nothing_told());
    assert_eq!(admin.past_due("acme").await.unwrap(), None);
    assert_eq!(s.pass().await, 0, "moved once");
    // Still past due afterwards: no grace again.
    assert_eq!(s.deliver(&updated("evt_4", until + 60, "past_due"), until + 60).await, (200, applied("free")));
    assert_eq!(s.plan().await, "free");
    // Paid at last: back on pro at once.
    assert_eq!(s.deliver(&updated("evt_5", until + 120, "active"), until + 120).await, (200, applied("pro")));
    assert_eq!(s.plan().await, "pro");
    assert_eq!(s.told().await, nothing_told());
}

on_stores!(a_payment_within_the_grace_cancels_the_move);
async fn a_payment_within_the_grace_cancels_the_move(store: Arc<dyn Store>) {
    let s = setup(store).await;
    assert_eq!(s.deliver(&updated("evt_1", NOON, "active"), NOON).await, (200, applied("pro")));
    let until = NOON + 100 + GRACE;
    assert_eq!(s.deliver(&updated("evt_2", NOON + 100, "past_due"), NOON + 100).await, (200, past_due(until)));
    assert_eq!(s.told().await, in_grace(until, "2026-03-17T12:01:40Z"));
    // Paid on the second day: the subscription is active again, the grace gone.
    assert_eq!(s.deliver(&updated("evt_3", NOON + DAY, "active"), NOON + DAY).await, (200, applied("pro")));
    assert_eq!(s.told().await, nothing_told());
    s.at(until + DAY);
    assert_eq!(s.pass().await, 0, "nothing to move");
    assert_eq!(s.plan().await, "pro");
    // Past due again later: a new spell, with a grace of its own.
    let again = until + DAY + GRACE;
    assert_eq!(s.deliver(&updated("evt_4", until + DAY, "past_due"), until + DAY).await, (200, past_due(again)));
    assert_eq!(s.plan().await, "pro");
    s.at(again);
    assert_eq!(s.pass().await, 1);
    assert_eq!(s.plan().await, "free");
}

on_stores!(a_past_due_event_delivered_after_its_grace_moves_at_once);
async fn a_past_due_event_delivered_after_its_grace_moves_at_once(store: Arc<dyn Store>) {
    let s = setup(store).await;
    assert_eq!(s.deliver(&updated("evt_1", NOON, "active"), NOON).await, (200, applied("pro")));
    // Stripe retries a failed delivery for up to three days: this one arrives when the grace
    // its own time started is over.
    let late = NOON + 100 + GRACE;
    assert_eq!(s.deliver(&updated("evt_2", NOON + 100, "past_due"), late).await, (200, applied("free")));
    assert_eq!(s.plan().await, "free");
    assert_eq!(s.told().await, nothing_told());
}

/// A tenant whose other live subscription gives as high a plan loses nothing at the grace's
/// end: it is told nothing, and the pass moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_that_would_move_nothing_is_not_told() {
    let s = setup(Arc::new(MemoryStore::new())).await;
    assert_eq!(s.deliver(&updated("evt_1", NOON, "active"), NOON).await, (200, applied("pro")));
    let mut other: Value = serde_json::from_str(&updated("evt_2", NOON + 10, "active")).unwrap();
    other["data"]["object"]["id"] = json!("sub_2");
    assert_eq!(s.deliver(&other.to_string(), NOON + 10).await, (200, applied("pro")));
    let until = NOON + 100 + GRACE;
    assert_eq!(s.deliver(&updated("evt_3", NOON + 100, "past_due"), NOON + 100).await, (200, applied("pro")));
    assert_eq!(s.told().await, nothing_told(), "sub_2 keeps acme on pro whatever sub_1 does");
    s.at(until);
    assert_eq!(s.pass().await, 0, "sub_1 gives free now, acme stays on pro");
    assert_eq!(s.plan().await, "pro");
}
