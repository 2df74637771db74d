//! Plan features and per-tenant overrides: a route that needs a feature refuses tenants
//! whose plan lacks it with 403 (nothing charged), handlers see features, overrides in the
//! file and in the store's directory are merged over the plan, a change in the store reaches
//! another node within the directory TTL, and headers and rejections name the limits in
//! force.

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{Harness, NOON};
use tollgate::door::Admission;
use tollgate::door::Credential;
use tollgate::door::RequestInfo;
use tollgate::store::prelude::*;
use tollgate::{
    admin::Admin,
    clock::Clock,
    store::{MemoryStore, TenantRecord},
    Config, Tollgate,
};

const TOML: &str = r#"
[limits]
directory_ttl = "60s"
[plans.free]
rate = "2/s"
burst = 2
quotas.requests = { limit = 100, period = "day" }
[plans.pro]
rate = "50/s"
features = ["invoice_export", "sso"]
[[routes]]
path = "/v1/invoices/export"
feature = "invoice_export"
[tenants.small]
plan = "free"
keys = ["key-small"]
[tenants.big]
plan = "pro"
keys = ["key-big"]
[tenants.vip]
plan = "free"
keys = ["key-vip"]
[tenants.vip.overrides]
rate = "100/s"
quotas.requests = { limit = 3, period = "day" }
features = ["invoice_export"]
"#;

#[tokio::test]
async fn a_route_needing_a_feature_refuses_plans_without_it_and_charges_nothing() {
    let h = Harness::new(TOML);
    let r = h.get("/v1/invoices/export", "key-small").await;
    assert_eq!(r.status.as_u16(), 403);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(body["title"], "Feature not in plan");
    assert!(body["detail"].as_str().unwrap().contains("`invoice_export`"), "{body}");
    assert!(body["type"].as_str().unwrap().ends_with("FeatureNotInPlan"));
    // Refused before the rate: the burst of 2 is whole, and no usage was recorded.
    for _ in 0..3 {
        assert_eq!(h.status("/v1/invoices/export", "key-small").await, 403);
    }
    assert_eq!(h.status("/", "key-small").await, 200);
    assert_eq!(h.status("/", "key-small").await, 200);
    assert_eq!(h.status("/", "key-small").await, 429);
    h.tollgate.flush().await.unwrap();
    let used =
        common::committed(&**h.tollgate.usage_store(), "small", "requests", NOON - 3600, NOON + 3600, 3600).await;
    assert_eq!(used, 2, "the 403s recorded nothing");
    // The plan with the feature passes.
    assert_eq!(h.status("/v1/invoices/export", "key-big").await, 200);
}

#[tokio::test]
async fn handlers_see_the_features_of_the_plan_and_its_overrides() {
    let h = Harness::new(TOML);
    let mut door = h.tollgate.front_door();
    let mut features = |key: &'static [u8]| {
        let admission = door.admit_with(|_| RequestInfo::new("GET", "/", Credential::ApiKey(key)));
        let tollgate = h.tollgate.clone();
        async move {
            let ticket = match admission {
                Admission::Admitted(t) => t,
                Admission::Pending(p) => tollgate.resolve(p).await.unwrap(),
                Admission::Rejected(r) => panic!("{r}"),
            };
            let ctx = ticket.context();
            let out: Vec<String> = ctx.features().map(str::to_owned).collect();
            assert_eq!(ctx.has_feature("sso"), out.iter().any(|f| f == "sso"));
            let _ = ticket.complete(200);
            out
        }
    };
    assert_eq!(features(b"key-big").await, ["invoice_export", "sso"]);
    assert_eq!(features(b"key-small").await, Vec::<String>::new());
    assert_eq!(features(b"key-vip").await, ["invoice_export"]);
}

/// The file's overrides merge over the plan: the override's rate and quota are enforced and
/// named by the headers and the rejection; the feature opens the route.
#[tokio::test]
async fn overrides_in_the_file_are_the_limits_in_force_and_named_as_such() {
    let h = Harness::new(TOML);
    let r = h.get("/v1/invoices/export", "key-vip").await;
    assert_eq!(r.status.as_u16(), 200);
    let policy = r.header("ratelimit-policy").unwrap().to_owned();
    assert!(policy.contains("\"rate\";q=100;w=1") && policy.contains("\"requests-day\";q=3;"), "{policy}");
    // The plan's own tenants keep the plan's policy.
    let small = h.get("/", "key-small").await;
    let plain = small.header("ratelimit-policy").unwrap();
    assert!(plain.contains("\"rate\";q=2;w=1") && plain.contains("\"requests-day\";q=100;"), "{plain}");
    // Burst 100 (the rate's), far above the plan's 2; the quota of 3 is the one enforced.
    assert_eq!(h.status("/", "key-vip").await, 200);
    assert_eq!(h.status("/", "key-vip").await, 200);
    let refused = h.get("/", "key-vip").await;
    assert_eq!(refused.status.as_u16(), 429);
    let detail = refused.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("quota of 3 requests"), "{detail}");
}

/// A tenant of the directory gets overrides in the store (as `tollgate tenants set-override`
/// writes them), with both workers running and the clock moving: the node that made the change
/// sees it at once, another node once it follows the directory's feed of tenants changed (its
/// worker does each second). Removed by a write to the store that tells no feed, the overrides
/// leave the other node within the directory TTL (its revalidation); the plan alone again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_changed_in_the_store_reaches_another_node_within_the_ttl() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store
        .put_tenant(&TenantRecord::new("acme".into(), "free".into()), &[tollgate::store::KeyHash::of(b"key-acme")])
        .await
        .unwrap();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let a = common::node_with_worker(TOML, store.clone(), clock.clone(), handle.clone());
    let b = common::node_with_worker(TOML, store.clone(), clock, handle.clone());
    for h in [&a, &b] {
        assert_eq!(h.status("/v1/invoices/export", "key-acme").await, 403);
    }
    let admin = Admin::for_engine(&a.tollgate);
    let json = r#"{"rate": "40/s", "burst": 40, "features": ["invoice_export"]}"#;
    let record = admin.set_overrides("acme", Some(json)).await.unwrap();
    assert!(record.overrides.as_deref().unwrap().contains("invoice_export"));
    // Node A made the change: at once.
    let r = a.get("/v1/invoices/export", "key-acme").await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.header("ratelimit-policy").unwrap().contains("\"rate\";q=40;w=1"));
    // Node B: once it follows the feed Admin told.
    b.tollgate.follow_directory().await.unwrap();
    let r = b.get("/v1/invoices/export", "key-acme").await;
    assert_eq!(r.status.as_u16(), 200, "B follows the feed");
    assert!(r.header("ratelimit-policy").unwrap().contains("\"rate\";q=40;w=1"), "B names the override's rate");
    // Removed in the store alone (no feed told): B within the TTL, by its revalidation, run
    // here as the clock moves (the worker's pass is paced by real time).
    let update = tollgate::store::TenantUpdate::Overrides("acme".into(), None);
    assert!(store.update_tenant(&update, tollgate::store::UpdateWhen::Always).await.unwrap());
    let mut seen_after = None;
    for step in 1..=8 {
        handle.advance(Duration::from_secs(10));
        b.tollgate.revalidate().await;
        if b.status("/v1/invoices/export", "key-acme").await == 403 {
            seen_after = Some(step * 10);
            break;
        }
    }
    let after = seen_after.expect("node B never saw the overrides removed");
    assert!(after <= 60, "seen {after} s after the change: later than the 60 s TTL");
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().overrides, None);
}

#[tokio::test]
async fn overrides_that_do_not_fit_the_configuration_are_refused_with_their_key() {
    let config = Config::from_toml_str(TOML).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let admin = Admin::new(store.clone()).with_config(config);
    admin.add_tenant("acme", "free", None).await.unwrap();
    for (json, names) in [
        (r#"{"rate": "fast"}"#, "overrides.rate"),
        (r#"{"quotas": {"nope": {"limit": 5, "period": "day"}}}"#, "overrides.quotas.nope"),
        (r#"{"colour": "red"}"#, "colour"),
        (r#"{"features": ["a b"]}"#, "overrides.features[0]"),
        (r#"{"burst": 0}"#, "overrides.burst"),
        ("not json", "overrides"),
    ] {
        let e = admin.set_overrides("acme", Some(json)).await.unwrap_err().to_string();
        assert!(e.contains(names), "{json}: {e}");
    }
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().overrides, None, "nothing was written");
    assert!(admin.set_overrides("nobody", Some("{}")).await.is_err());
    // In the file: file, line and key.
    let bad = TOML.replace("rate = \"100/s\"", "rate = \"100/s\"\nburst = 0");
    let e = Config::from_toml_str(&bad).unwrap_err();
    assert_eq!(e.key(), "tenants.vip.overrides.burst");
    assert!(e.line().is_some());
    // An undeclared meter in an override.
    let e = Config::from_toml_str(&format!(
        "{TOML}\n[tenants.vip2]\nplan = \"free\"\noverrides.quotas.tokens = {{ limit = 1, period = \"day\" }}\n"
    ))
    .unwrap_err();
    assert_eq!(e.key(), "tenants.vip2.overrides.quotas.tokens", "{e}");
    // The merged plan must hold: a burst below a route's cost, a hard quota no route enforces.
    let costly = format!("{TOML}\n[[routes]]\npath = \"/bulk\"\ncost = 2\n");
    Config::from_toml_str(&costly).expect("every plan's burst covers the route");
    let e = Config::from_toml_str(&costly.replace("rate = \"100/s\"", "rate = \"100/s\"\nburst = 1")).unwrap_err();
    assert_eq!(e.key(), "tenants.vip.overrides", "{e}");
    assert!(e.to_string().contains("burst is 1"), "{e}");
    let metered = format!("[meters.tokens]\n{TOML}");
    let unreachable = metered.replace(
        "quotas.requests = { limit = 3, period = \"day\" }",
        "quotas.requests = { limit = 3, period = \"day\" }\nquotas.tokens = { limit = 3, period = \"day\" }",
    );
    assert_ne!(unreachable, metered, "the replacement applies");
    let e = Config::from_toml_str(&unreachable).unwrap_err();
    assert_eq!(e.key(), "tenants.vip.overrides.quotas", "{e}");
    // The same checks for overrides set in the store.
    let config = Config::from_toml_str(&format!("[meters.tokens]\n{TOML}")).unwrap();
    let admin = Admin::new(store.clone()).with_config(config);
    let e = admin
        .set_overrides("acme", Some(r#"{"quotas": {"tokens": {"limit": 5, "period": "day"}}}"#))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tokens"), "{e}");
}

/// An override in the directory that this configuration cannot serve (written by hand, or
/// for a meter removed since) is not half-applied: the tenant's requests get 503, logged.
#[tokio::test]
async fn an_unreadable_override_in_the_store_is_refused_not_half_applied() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut record = TenantRecord::new("acme".into(), "free".into());
    record.overrides = Some(r#"{"quotas": {"gone": {"limit": 5, "period": "day"}}}"#.into());
    store.put_tenant(&record, &[tollgate::store::KeyHash::of(b"key-acme")]).await.unwrap();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(TOML).unwrap();
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine), handle);
    assert_eq!(h.status("/", "key-acme").await, 503);
}
