//! The DynamoDB store behind engines, on the local DynamoDB-compatible server that
//! `scripts/test.sh` starts: `Builder::open` follows `[store] kind = "dynamodb"` with the standard
//! AWS environment, and engines of a fleet share a hard quota without passing it.
#![cfg(feature = "dynamodb")]
#![allow(missing_docs)]

mod common;

use std::sync::Arc;

use common::{day_key, dynamo, Harness, NOON};
use tollgate::{
    clock::Clock,
    store::{StoreError, StoreInspect},
    BuildError, Config, Tollgate, TollgateLayer,
};

fn config(table: &str, endpoint: &str, plan: &str) -> Config {
    Config::from_toml_str(&format!(
        "[store]\nkind = \"dynamodb\"\ntable = \"{table}\"\nendpoint = \"{endpoint}\"\n{}",
        common::one_tenant(plan)
    ))
    .unwrap()
}

/// The standard AWS environment of a local server: any credentials, a region.
fn aws_env() {
    for (k, v) in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")] {
        if std::env::var_os(k).is_none() {
            // Safety of set_var: the tests of this file set the same values.
            std::env::set_var(k, v);
        }
    }
}

#[tokio::test]
async fn the_builder_opens_the_configured_table_and_names_a_missing_one() {
    let Some(store) = dynamo::table().await else { return };
    let endpoint = dynamo::endpoint().unwrap();
    aws_env();
    let err = Tollgate::builder(config("no-such-table", &endpoint, "")).open().await.unwrap_err();
    assert!(matches!(err, BuildError::Store(StoreError::Unusable(_))), "{err:?}");
    assert!(err.to_string().contains("no-such-table") && err.to_string().contains("does not exist"), "{err}");

    let (engine, _worker) = Tollgate::builder(config(store.table(), &endpoint, "")).open().await.unwrap();
    assert!(format!("{:?}", engine.store()).contains(store.table()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engines_of_a_fleet_share_a_hard_quota_without_passing_it() {
    let Some(store) = dynamo::table().await else { return };
    let endpoint = dynamo::endpoint().unwrap();
    aws_env();
    let plan = "rate = \"100000/s\"\nquotas.requests = { limit = 120, period = \"day\", mode = \"hard\", lease = 4 }";
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let (clock, handle) = Clock::fake_at_unix(NOON);
        let (engine, worker) =
            Tollgate::builder(config(store.table(), &endpoint, plan)).clock(clock).open().await.unwrap();
        tokio::spawn(worker.run());
        nodes.push(Arc::new(Harness::from_layer(TollgateLayer::new(engine), handle)));
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let h = nodes[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..25 {
                match h.status("/", "key-t").await {
                    200 => admitted += 1,
                    429 => {}
                    other => panic!("status {other}"),
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    // 200 asked for 120: never more; at most a lease per node stranded while the others ran out.
    assert!((120 - 4 * 8..=120).contains(&admitted), "admitted {admitted}");
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
    assert_eq!(store.reserved(&day_key("t", NOON)).await.unwrap(), admitted, "every unused unit went back");
    let committed = common::committed(&store, "t", "requests", NOON, NOON + 3600, 3600).await;
    assert_eq!(committed, admitted, "the usage stored is the requests admitted");
}
