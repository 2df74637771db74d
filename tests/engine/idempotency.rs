//! `Idempotency-Key` (IETF httpapi draft): bound to the tenant, method and concrete path; 409
//! while the first request is in flight, 422 when reused elsewhere; a replay passes the rate
//! check, needs a hard quota's units and is never billed twice; a dropped request releases it.

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{req, Harness, NOON};
use tollgate::door::Admission;
use tollgate::door::Credential;
use tollgate::door::RequestInfo;
use tollgate::store::prelude::*;
use tollgate::RejectionKind;

const TOML: &str = r#"
[plans.p]
quotas.requests = { limit = 3, period = "day", mode = "hard", lease = 1 }
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

fn post(path: &str, key: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req("POST", path, Some("key-t"), Some(key))
}

async fn billed(h: &Harness) -> u64 {
    h.tollgate.flush().await.unwrap();
    common::committed(&**h.tollgate.usage_store(), "t", "requests", NOON - 7200, NOON + 7200, 3600).await
}

#[tokio::test]
async fn a_key_reused_on_another_method_or_path_gets_422() {
    let h = Harness::new(TOML);
    assert_eq!(h.send(post("/orders?x=1", "k")).await.status, 200);
    for (method, path) in [("POST", "/orders?x=2"), ("POST", "/other"), ("PATCH", "/orders?x=1")] {
        let r = h.send(req(method, path, Some("key-t"), Some("k"))).await;
        assert_eq!(r.status, 422, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.rejection.unwrap().kind(), RejectionKind::IdempotencyKeyMismatch);
    }
    // The same request replays.
    assert_eq!(h.send(post("/orders?x=1", "k")).await.status, 200);
    assert_eq!(billed(&h).await, 1);
}

#[tokio::test]
async fn a_key_still_in_flight_gets_409_then_replays() {
    let h = Harness::new(TOML);
    let info = RequestInfo::new("POST", "/orders", Credential::ApiKey(b"key-t")).with_idempotency_key(b"k");
    let first = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    match h.tollgate.admit(&info) {
        Admission::Rejected(r) => {
            assert_eq!(r.kind(), RejectionKind::IdempotencyKeyInUse);
            assert_eq!(r.status_code(), 409);
        }
        other => panic!("expected 409, got {other:?}"),
    }
    assert!(first.complete(201));
    // The lease is empty: the replay asks the store whether units are left (takes none).
    let replay = match h.tollgate.admit(&info) {
        Admission::Admitted(t) => t,
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        Admission::Rejected(r) => panic!("{r}"),
    };
    assert!(replay.is_replay());
    assert!(!replay.complete(201), "a replay is never billed");
    assert_eq!(billed(&h).await, 1);
}

#[tokio::test]
async fn a_replay_needs_the_units_of_a_hard_quota() {
    let h = Harness::new(TOML);
    assert_eq!(h.send(post("/", "a")).await.status, 200);
    assert_eq!(h.send(post("/", "a")).await.status, 200, "replayed while units are left");
    assert_eq!(h.send(post("/", "b")).await.status, 200);
    assert_eq!(h.send(post("/", "c")).await.status, 200);
    assert_eq!(h.send(post("/", "d")).await.status, 429);
    let r = h.send(post("/", "a")).await;
    assert_eq!(r.status, 429, "no uncharged work past the limit");
    assert_eq!(r.json()["policy"], "requests-day");
    assert_eq!(billed(&h).await, 3);
}

#[tokio::test]
async fn a_repeated_idempotency_key_header_gets_400() {
    let h = Harness::new(TOML);
    let mut r = post("/", "a");
    r.headers_mut().append("idempotency-key", "b".parse().unwrap());
    let reply = h.send(r).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.rejection.unwrap().kind(), RejectionKind::MalformedIdempotencyKey);
    assert_eq!(billed(&h).await, 0);
}

/// A request dropped while it waits on the store releases its key (its retry is charged, not
/// a free replay) and takes no units.
#[tokio::test]
async fn a_request_dropped_while_waiting_releases_its_key_and_units() {
    let store = Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(TOML, store.clone(), clock, handle);
    assert_eq!(h.send(post("/", "a")).await.status, 200);
    store.stall(true);
    let dropped = tokio::time::timeout(Duration::from_millis(50), h.send(post("/", "b"))).await;
    assert!(dropped.is_err(), "the request waits on the stalled store");
    store.stall(false);
    // The store's claim is released in the background right after the drop; a retry on this
    // node waits for that.
    assert_eq!(h.send(post("/", "b")).await.status, 200, "the key was released, not left in flight");
    assert_eq!(h.send(post("/", "c")).await.status, 200);
    assert_eq!(billed(&h).await, 3, "the retry was charged");
    h.tollgate.shutdown().await.unwrap();
    let key = common::day_key("t", NOON);
    assert_eq!(store.reserved(&key).await.unwrap(), 3, "no unit leaked");
}

/// An `Idempotency-Key` holds across the nodes of a fleet (here two engines on one store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_answers_the_same_on_every_node() {
    let store: Arc<dyn tollgate::store::Store> = Arc::new(tollgate::store::MemoryStore::new());
    common::idempotency_holds_across_nodes(store.clone(), store, "t", "key-t").await;
}

/// The same on SQLite, two engines sharing one database file.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_answers_the_same_on_every_node_of_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    let b = tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    common::idempotency_holds_across_nodes(Arc::new(a), Arc::new(b), "t", "key-t").await;
}

/// Without the store's claim, node B would not know node A's key: it would charge the retry.
#[tokio::test]
async fn a_store_that_does_not_answer_follows_the_policy() {
    let store = Arc::new(common::Faulty::default());
    let toml = format!("{TOML}\n[usage]\non_store_error = \"fail-closed\"\n");
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(&toml, store.clone(), clock, handle);
    assert_eq!(h.send(post("/", "warm")).await.status, 200);
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = h.send(post("/", "k")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.rejection.unwrap().kind(), RejectionKind::StoreUnavailable);
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.send(post("/", "k")).await.status, 200, "the refused request did not bind the key");
}

/// A caller over its rate costs no store write for its `Idempotency-Key`s: the key is claimed
/// in the store only for a request that passed the rate (and feature) checks. 100 POSTs with
/// fresh keys at `rate = "1/s"` cost the one admitted request's claim and settlement.
#[tokio::test]
async fn a_caller_over_its_rate_costs_no_idempotency_writes() {
    let store = Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let toml = "[plans.p]\nrate = \"1/s\"\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n";
    let h = Harness::build(toml, store.clone(), clock, handle);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..100 {
        let r = common::req("POST", "/", Some("key-t"), Some(&format!("order-{i}")));
        *statuses.entry(h.send(r).await.status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(200, 1), (429, 99)].into_iter().collect());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let writes = store.idempotency_writes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(writes <= 2, "{writes} store writes for one admitted request");
}
