//! Plan versions (docs/configuration.md, "Plan versions"): a tenant keeps the version of its
//! plan it was put on after a reload brings a new one, whatever a renewal's webhook says, until
//! an operator migrates it (a dry run first, then batches); a plan whose limits change without
//! a new version moves everyone, and says so. On every store, two engines.
#![cfg(feature = "stripe")]

use crate::common;

use std::sync::Arc;

use common::{Harness, NOON};
use serde_json::{json, Value};
use tollgate::{
    admin::Admin,
    billing::{Secret, WebhookOutcome},
    store::{MemoryStore, SqliteStore, Store},
    Config,
};

const SECRET: &str = "whsec_versions";

const STRIPE: &str = r#"
[usage]
store_timeout = "10s"
[stripe.subscription_status]
past_due = "ignore"
unpaid = "ignore"
canceled = "ignore"
paused = "ignore"
incomplete = "ignore"
incomplete_expired = "ignore"
[stripe.prices]
price_pro_monthly = "pro"
"#;

/// Version 1 of `pro`: 5 requests a day.
fn v1() -> String {
    format!("[plans.pro]\nquotas.requests = {{ limit = 5, period = \"day\", mode = \"hard\" }}\n{STRIPE}")
}

/// Version 2 of `pro` (8 a day), version 1 kept for its tenants.
fn v2() -> String {
    format!(
        "[plans.pro]\nversion = 2\nquotas.requests = {{ limit = 8, period = \"day\", mode = \"hard\" }}\n\
         [plans.pro.versions.1]\nquotas.requests = {{ limit = 5, period = \"day\", mode = \"hard\" }}\n{STRIPE}"
    )
}

/// `customer.subscription.updated` of acme's subscription on the pro price: a renewal.
fn renewal(id: &str, created: i64) -> String {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stripe_objects.json")).unwrap();
    let fixtures = serde_json::from_str::<Value>(&text).unwrap()["resources"].clone();
    let mut s = fixtures["subscription"].clone();
    s["id"] = json!("sub_1");
    s["customer"] = json!("cus_acme");
    s["status"] = json!("active");
    s["items"]["data"][0]["price"]["id"] = json!("price_pro_monthly");
    s["items"]["data"][0]["price"]["lookup_key"] = Value::Null;
    let mut e = fixtures["event"].clone();
    e["id"] = json!(id);
    e["type"] = json!("customer.subscription.updated");
    e["created"] = json!(created);
    e["data"] = json!({ "object": s });
    e.to_string()
}

/// How many of `n` requests of `key` each node serves in turn (every node having followed
/// the directory first).
async fn served(nodes: &[Harness], key: &str, n: usize) -> usize {
    for node in nodes {
        node.tollgate.follow_directory().await.unwrap();
    }
    let mut ok = 0;
    for i in 0..n {
        if nodes[i % nodes.len()].status("/", key).await == 200 {
            ok += 1;
        }
    }
    ok
}

async fn plan_of(store: &Arc<dyn Store>, tenant: &str) -> String {
    store.tenant(&tenant.into()).await.unwrap().unwrap().plan.as_str().to_owned()
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

on_stores!(a_tenant_keeps_its_version_until_it_is_migrated);
/// acme, on `pro` before it had versions, keeps version 1's 5 a day on both nodes after they
/// reload version 2 (and after a renewal's webhook names `pro`); beta, added then, is put on
/// version 2 (8 a day). A dry run moves nothing; the migration moves acme alone, once, and both
/// nodes serve it version 2's limit over the day's count it had.
async fn a_tenant_keeps_its_version_until_it_is_migrated(store: Arc<dyn Store>) {
    let nodes: Vec<Harness> = (0..2).map(|_| Harness::with_store(&v1(), store.clone(), NOON)).collect();
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&v1()).unwrap());
    cli.add_tenant("acme", "pro", Some("cus_acme")).await.unwrap();
    let acme = cli.issue_key("acme", Default::default()).await.unwrap().key;
    assert_eq!(served(&nodes, &acme, 3).await, 3);

    // Version 2 is loaded: nothing of version 1 changed, so nothing is said to move.
    let (old, new) = (Config::from_toml_str(&v1()).unwrap(), Config::from_toml_str(&v2()).unwrap());
    assert_eq!(new.changed_without_version(&old), Vec::<tollgate::config::PlanId>::new());
    for node in &nodes {
        node.tollgate.reload(new.clone()).await.unwrap();
    }
    let cli = Admin::new(store.clone()).with_config(new.clone());
    cli.add_tenant("beta", "pro", None).await.unwrap();
    assert_eq!(plan_of(&store, "beta").await, "pro@2", "a tenant put on pro now is on its version 2");
    let beta = cli.issue_key("beta", Default::default()).await.unwrap().key;
    assert_eq!(served(&nodes, &beta, 10).await, 8, "version 2: 8 a day");

    // A renewal names the plan: acme keeps its version.
    let handler = nodes[0].tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let payload = renewal("evt_renewal", NOON);
    let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(NOON));
    let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(reply.outcome, WebhookOutcome::Applied { tenant: "acme".into(), plan: "pro".into() });
    assert_eq!(plan_of(&store, "acme").await, "pro", "kept on version 1");
    assert_eq!(served(&nodes, &acme, 4).await, 2, "version 1: 5 a day, 3 used");

    let counts = cli.plan_versions(1000).await.unwrap();
    assert!(counts.complete);
    assert_eq!(counts.counts["pro"].clone().into_iter().collect::<Vec<_>>(), vec![(1, 1), (2, 1)]);

    // A dry run names acme and writes nothing.
    let dry = cli.migrate_plan("pro", 1, 2, None, 100, false).await.unwrap();
    assert_eq!((dry.moved.clone(), dry.kept.clone(), dry.next.clone()), (vec!["acme".into()], vec![], None));
    assert_eq!(plan_of(&store, "acme").await, "pro");
    assert_eq!(served(&nodes, &acme, 1).await, 0, "still version 1's 5");

    let done = cli.migrate_plan("pro", 1, 2, None, 100, true).await.unwrap();
    assert_eq!(done.moved, vec![tollgate::config::TenantId::from("acme")]);
    assert_eq!(plan_of(&store, "acme").await, "pro@2");
    assert_eq!(served(&nodes, &acme, 5).await, 3, "version 2's 8, over the 5 it used today");
    let again = cli.migrate_plan("pro", 1, 2, None, 100, true).await.unwrap();
    assert!(again.moved.is_empty() && again.kept.is_empty(), "run again, nothing moves: {again:?}");
    let counts = cli.plan_versions(1000).await.unwrap();
    assert_eq!(counts.counts["pro"].clone().into_iter().collect::<Vec<_>>(), vec![(2, 2)]);
    for node in &nodes {
        node.tollgate.shutdown().await.unwrap();
    }
}

/// What a migration refuses, before anything is read or written: a version the file does not
/// declare, the same version twice, a plan it does not declare, a batch out of bounds.
#[tokio::test]
async fn a_migration_to_a_version_not_declared_is_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&v2()).unwrap());
    cli.add_tenant("acme", "pro@1", None).await.unwrap();
    assert_eq!(plan_of(&store, "acme").await, "pro", "version 1 is kept by the plan's name");
    for (plan, from, to, batch, says) in [
        ("pro", 1, 3, 100, "plan `pro` has no version 3: its current version is 2 (declared: 1, 2)"),
        ("pro", 2, 2, 100, "both version 2"),
        ("gold", 1, 2, 100, "gold"),
        ("pro@2", 1, 2, 100, "pro@2"),
        ("pro", 1, 2, 0, "a batch is 1 to 1000 tenants, not 0"),
    ] {
        let e = cli.migrate_plan(plan, from, to, None, batch, true).await.unwrap_err().to_string();
        assert!(e.contains(says), "{plan} {from}→{to}: {e}");
    }
    assert_eq!(plan_of(&store, "acme").await, "pro", "nothing moved");
}

/// A plan whose limits change without a new version moves every tenant on it, and the
/// configuration says which: the reload logs it.
#[tokio::test]
async fn limits_changed_without_a_new_version_are_named() {
    let old = Config::from_toml_str(&v1()).unwrap();
    let new = Config::from_toml_str(&v1().replace("limit = 5", "limit = 6")).unwrap();
    assert_eq!(new.changed_without_version(&old), vec![tollgate::config::PlanId::from("pro")]);
    // The same limits under a new version: version 1 is unchanged, and version 2 is new.
    assert!(Config::from_toml_str(&v2()).unwrap().changed_without_version(&old).is_empty());
    // Version 1 kept, but edited: named by its id.
    let edited = Config::from_toml_str(&v2().replacen("limit = 5", "limit = 4", 1)).unwrap();
    assert_eq!(edited.changed_without_version(&old), vec![tollgate::config::PlanId::from("pro")]);
}

/// A migration from version 0 is refused: version 0 is no version (the bare name is version
/// 1), and "from 0 to 1" would rewrite every tenant of version 1 onto itself, each run.
#[tokio::test]
async fn a_migration_from_version_0_is_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&v2()).unwrap());
    cli.add_tenant("acme", "pro@1", None).await.unwrap();
    for (from, to) in [(0, 1), (1, 0), (0, 2)] {
        let e = cli.migrate_plan("pro", from, to, None, 100, true).await.unwrap_err().to_string();
        assert!(e.contains("version 0"), "{from}→{to}: {e}");
    }
    assert_eq!(plan_of(&store, "acme").await, "pro", "nothing moved");
}

/// `pro` at version 3 (2 and 1 kept), `enterprise` above it; each a price.
fn two_plans(current: u32) -> String {
    let versions: String = (1..current)
        .map(|v| {
            format!(
                "[plans.pro.versions.{v}]\nquotas.requests = {{ limit = {v}, period = \"day\", mode = \"hard\" }}\n"
            )
        })
        .collect();
    format!(
        "[plans.enterprise]\n[plans.pro]\nversion = {current}\n\
         quotas.requests = {{ limit = {current}, period = \"day\", mode = \"hard\" }}\n{versions}\
         [stripe]\nplan_order = [\"enterprise\", \"pro\"]\n\
         [stripe.prices]\nprice_pro = \"pro\"\nprice_enterprise = \"enterprise\"\n\
         [stripe.subscription_status]\npast_due = \"ignore\"\nunpaid = \"ignore\"\ncanceled = \"ignore\"\n\
         paused = \"ignore\"\nincomplete = \"ignore\"\nincomplete_expired = \"ignore\"\n"
    )
}

/// `kind` of acme's subscription `sub` on `price`, `status`.
fn subscription_event(id: &str, kind: &str, sub: &str, price: &str, status: &str, created: i64) -> String {
    let mut event: Value = serde_json::from_str(&renewal(id, created)).unwrap();
    event["type"] = json!(kind);
    let s = &mut event["data"]["object"];
    s["id"] = json!(sub);
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!(price);
    event.to_string()
}

/// A subscription's end that leaves the tenant on another live subscription's plan puts it on
/// that plan's current version, not on the version that plan had when its subscription began:
/// a plan other than the tenant's is always its current version.
#[tokio::test]
async fn a_plan_another_subscription_gives_back_is_its_current_version() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let node = Harness::with_store(&two_plans(2), store.clone(), NOON);
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&two_plans(2)).unwrap());
    cli.add_tenant("acme", "pro", Some("cus_acme")).await.unwrap();
    let handler = node.tollgate.webhook_handler_with_secrets(vec![Secret::new(SECRET)]);
    let send = |payload: String| {
        let handler = &handler;
        async move {
            let signature = stripe_webhook::Webhook::generate_test_header(&payload, SECRET, Some(NOON));
            let reply = handler.handle(Some(&signature), payload.as_bytes()).await;
            assert_eq!(reply.status().as_u16(), 200, "{:?}", reply.outcome);
        }
    };
    let updated = "customer.subscription.updated";
    send(subscription_event("evt_1", updated, "sub_pro", "price_pro", "active", NOON)).await;
    assert_eq!(plan_of(&store, "acme").await, "pro@2");
    send(subscription_event("evt_2", updated, "sub_ent", "price_enterprise", "active", NOON + 1)).await;
    assert_eq!(plan_of(&store, "acme").await, "enterprise");

    // pro gets a version 3; then the enterprise subscription ends: acme goes back to pro, now 3.
    node.tollgate.reload(Config::from_toml_str(&two_plans(3)).unwrap()).await.unwrap();
    let deleted = "customer.subscription.deleted";
    send(subscription_event("evt_3", deleted, "sub_ent", "price_enterprise", "canceled", NOON + 2)).await;
    assert_eq!(plan_of(&store, "acme").await, "pro@3", "the current version of the plan it goes back to");
    node.tollgate.shutdown().await.unwrap();
}

/// `set_tier` to a version named (`pro@1`, the current being 2) puts the tenant on that
/// version, as `set_plan` does.
#[tokio::test]
async fn a_tier_set_at_a_version_is_that_version() {
    let toml = "[plans.free]\n[plans.pro]\nversion = 2\n[plans.pro.versions.1]\n\
                [billing]\ncurrency = \"usd\"\n\
                [tiers.api]\norder = [\"free\", \"pro\"]\npro = { paid = \"5.00\" }\n[stripe]\n";
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cli = Admin::new(store.clone()).with_quota(store.clone()).with_config(Config::from_toml_str(toml).unwrap());
    cli.add_tenant("acme", "free", None).await.unwrap();
    assert_eq!(cli.set_tier("acme", Some("pro@1")).await.unwrap().plan.as_str(), "pro");
    assert_eq!(plan_of(&store, "acme").await, "pro", "version 1, as named");
    assert_eq!(cli.set_tier("acme", Some("pro")).await.unwrap().plan.as_str(), "pro@2");
    assert_eq!(plan_of(&store, "acme").await, "pro@2", "the bare name: the current version");
}

/// An import line naming the plan keeps the tenant's version of it; one naming a version
/// puts it there.
#[tokio::test]
async fn an_import_naming_a_version_puts_the_tenant_on_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&v2()).unwrap());
    cli.add_tenant("acme", "pro@1", None).await.unwrap();
    let report = cli.import_csv("tenant,plan\nacme,pro\n").await.unwrap();
    assert_eq!((report.tenants_updated, plan_of(&store, "acme").await), (0, "pro".to_owned()), "kept on version 1");
    let report = cli.import_csv("tenant,plan,customer\nacme,pro@2,cus_acme\n").await.unwrap();
    assert_eq!(report.tenants_updated, 1);
    assert_eq!(plan_of(&store, "acme").await, "pro@2", "the version named");
    let record = store.tenant(&"acme".into()).await.unwrap().unwrap();
    assert_eq!(record.customer.as_deref(), Some("cus_acme"));
    assert_eq!(store.tenant_by_customer("cus_acme").await.unwrap().unwrap().id.as_str(), "acme");
}
