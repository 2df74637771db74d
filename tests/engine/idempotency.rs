//! `Idempotency-Key` (IETF httpapi draft): bound to the tenant, method, concrete path and body;
//! 409 while the first request is in flight, 422 when reused elsewhere; a replay passes the
//! rate check, is answered with the stored response without running the handler, takes no
//! quota units and is never billed; a dropped request, a 5xx or a response that cannot be
//! stored releases it.

use crate::common;

use std::{sync::Arc, time::Duration};

use common::{req, req_with, Harness, NOON};
use std::sync::atomic::Ordering;
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
    let mut first = match h.tollgate.admit(&info) {
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
    let mut capture = first.capture().unwrap();
    capture.request_body().end();
    capture.head(201, []);
    capture.data(b"created");
    assert!(first.complete(201));
    capture.finish();
    // The replay reads the stored response (after this node's settlement of the key).
    let replay = match h.tollgate.admit(&info) {
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        other => panic!("a replay reads the store: {other:?}"),
    };
    assert!(replay.is_replay());
    let stored = replay.replayed_response().unwrap();
    assert_eq!((stored.status, &stored.body[..]), (201, &b"created"[..]));
    assert!(replay.check_replay_body(Some(sha256(b""))).is_ok());
    assert!(replay.check_replay_body(Some(sha256(b"x"))).is_err());
    assert!(replay.check_replay_body(None).is_err(), "a body past the bound is another body");
    assert!(!replay.complete(201), "a replay is never billed");
    assert_eq!(billed(&h).await, 1);
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A replay is answered with the first request's stored response (status, headers, body),
/// marked `Idempotent-Replayed: true`, without running the handler, for one store read and no
/// write; it is never billed.
#[tokio::test]
async fn a_replay_is_answered_with_the_stored_response_without_running_the_handler() {
    let store = Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(TOML, store.clone(), clock, handle);
    let since = std::time::Instant::now();
    let first = h.send(req_with("POST", "/echo", "key-t", "e-1", b"hello")).await;
    assert_eq!(first.status, 201);
    assert!(std::str::from_utf8(&first.body).unwrap().ends_with(": hello"));
    assert_eq!(first.header("idempotent-replayed"), None);
    // The claim and its settlement (in the background, after the response): awaited.
    assert!(h.tollgate.settlements_done(since, Duration::from_secs(10)).await);
    assert_eq!(store.idempotency_writes.load(Ordering::SeqCst), 2, "the claim and its settlement");
    let reads = store.idempotency_reads.load(Ordering::SeqCst);
    let writes = store.idempotency_writes.load(Ordering::SeqCst);
    let replay = h.send(req_with("POST", "/echo", "key-t", "e-1", b"hello")).await;
    assert_eq!(replay.status, 201);
    // Each call of the handler answers with a new number: this is the first's answer.
    assert_eq!(replay.body, first.body, "the stored answer, not a new one");
    assert_eq!(replay.header("x-call"), first.header("x-call"));
    assert_eq!(replay.header("content-type"), Some("text/plain"));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert!(replay.header("ratelimit-policy").is_some(), "this request's own rate-limit fields");
    let read = store.idempotency_reads.load(Ordering::SeqCst) - reads;
    let written = store.idempotency_writes.load(Ordering::SeqCst) - writes;
    assert_eq!((read, written), (1, 0), "a replay costs one store read");
    assert_eq!(billed(&h).await, 1);
    assert_eq!(h.tollgate.stats().responses_stored, 1);
}

/// A replay takes no quota units: it is answered even once the hard quota is spent (its work
/// was done and charged when the units were there).
#[tokio::test]
async fn a_replay_past_a_spent_quota_is_answered_and_takes_nothing() {
    let h = Harness::new(TOML);
    let first = h.send(post("/", "a")).await;
    assert_eq!(first.status, 200);
    assert_eq!(h.send(post("/", "b")).await.status, 200);
    assert_eq!(h.send(post("/", "c")).await.status, 200);
    assert_eq!(h.send(post("/", "d")).await.status, 429);
    let r = h.send(post("/", "a")).await;
    assert_eq!(r.status, 200, "answered from the store");
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(r.body, first.body);
    assert_eq!(billed(&h).await, 3);
}

/// The same key with another body is a misuse (422), whether the handler read the body
/// (`/echo`) or not (`/`: what it left is drained into the fingerprint).
#[tokio::test]
async fn a_replay_with_another_body_gets_422() {
    let h = Harness::new(&TOML.replace("limit = 3,", "limit = 100,"));
    for path in ["/echo", "/"] {
        let key = format!("b-{path}");
        let first = h.send(req_with("POST", path, "key-t", &key, b"one body")).await;
        assert!(first.status.is_success(), "{path}");
        let other = h.send(req_with("POST", path, "key-t", &key, b"another body")).await;
        assert_eq!(other.status, 422, "{path}");
        assert_eq!(other.rejection.unwrap().kind(), RejectionKind::IdempotencyKeyMismatch);
        let empty = h.send(req("POST", path, Some("key-t"), Some(&key))).await;
        assert_eq!(empty.status, 422, "{path}: no body is another body");
        let same = h.send(req_with("POST", path, "key-t", &key, b"one body")).await;
        assert_eq!((same.status, same.body), (first.status, first.body), "{path}");
    }
    assert_eq!(billed(&h).await, 2);
}

/// A first request's body longer than `limits.idempotency_max_request_body` binds the key
/// without a fingerprint (documented): any body replays it.
#[tokio::test]
async fn a_body_past_the_fingerprint_bound_is_not_compared() {
    let h = Harness::new(&format!("{TOML}\n[limits]\nidempotency_max_request_body = 4\n"));
    let first = h.send(req_with("POST", "/echo", "key-t", "long", b"longer than four")).await;
    assert_eq!(first.status, 201);
    let replay = h.send(req_with("POST", "/echo", "key-t", "long", b"other")).await;
    assert_eq!((replay.status, replay.header("idempotent-replayed")), (first.status, Some("true")));
    assert_eq!(replay.body, first.body);
    // Within the bound, bodies are compared.
    let short = h.send(req_with("POST", "/echo", "key-t", "short", b"abc")).await;
    assert_eq!(short.status, 201);
    assert_eq!(h.send(req_with("POST", "/echo", "key-t", "short", b"abd")).await.status, 422);
    assert_eq!(h.send(req_with("POST", "/echo", "key-t", "short", b"abcde")).await.status, 422);
}

/// A response that cannot be stored releases its key: a 5xx, or a body longer than
/// `limits.idempotency_max_body`. The retry runs again and is billed like any request.
#[tokio::test]
async fn a_response_that_cannot_be_stored_releases_its_key() {
    let toml = format!("{TOML}\n[limits]\nidempotency_max_body = 64\n");
    let h = Harness::new(&toml.replace("limit = 3,", "limit = 100,"));
    assert_eq!(h.send(post("/big/100", "big")).await.status, 200);
    let retry = h.send(post("/big/100", "big")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), None, "run again");
    assert_eq!(billed(&h).await, 2, "and billed again");
    assert_eq!(h.send(post("/fail", "fail")).await.status, 500);
    let retry = h.send(post("/fail", "fail")).await;
    assert_eq!((retry.status.as_u16(), retry.header("idempotent-replayed")), (500, None), "not 409: released");
    // Within the bound, stored.
    assert_eq!(h.send(post("/big/64", "fits")).await.status, 200);
    assert_eq!(h.send(post("/big/64", "fits")).await.header("idempotent-replayed"), Some("true"));
    let stats = h.tollgate.stats();
    assert_eq!((stats.responses_stored, stats.responses_not_stored), (1, 4));
    assert_eq!(stats.response_bytes_buffered, 0, "nothing held once the responses ended");
}

/// The bytes held per node while responses stream (`limits.idempotency_buffer_bytes`) and
/// stored per store (`limits.idempotency_store_bytes`) are bounded: past them a response is
/// not stored, its key released, counted.
#[tokio::test]
async fn stored_responses_are_bounded_per_node_and_per_store() {
    let toml = TOML.replace("limit = 3,", "limit = 100,");
    let h = Harness::new(&format!("{toml}\n[limits]\nidempotency_buffer_bytes = 50\n"));
    assert_eq!(h.send(post("/big/100", "a")).await.status, 200);
    assert_eq!(h.send(post("/big/100", "a")).await.header("idempotent-replayed"), None);
    assert_eq!(h.send(post("/big/10", "b")).await.status, 200);
    assert_eq!(h.send(post("/big/10", "b")).await.header("idempotent-replayed"), Some("true"));
    // A window holds half the store's bytes: 16,192 here (the least the configuration takes
    // for bodies of 8,000 bytes), two responses of 8,000 bytes and their encoding.
    let h = Harness::new(&format!("{toml}\n[limits]\nidempotency_store_bytes = 32384\nidempotency_max_body = 8000\n"));
    for key in ["c", "d", "e"] {
        assert_eq!(h.send(post("/big/8000", key)).await.status, 200);
    }
    assert_eq!(h.send(post("/big/8000", "c")).await.header("idempotent-replayed"), Some("true"));
    assert_eq!(h.send(post("/big/8000", "d")).await.header("idempotent-replayed"), Some("true"));
    assert_eq!(h.send(post("/big/8000", "e")).await.header("idempotent-replayed"), None, "the store was full");
    // The first "e", and maybe already its retry's (settled in the background).
    assert!(h.tollgate.stats().responses_not_stored >= 1);
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
    let since = std::time::Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..100 {
        let r = common::req("POST", "/", Some("key-t"), Some(&format!("order-{i}")));
        *statuses.entry(h.send(r).await.status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses, [(200, 1), (429, 99)].into_iter().collect());
    // The admitted request's settlement (in the background): awaited.
    assert!(h.tollgate.settlements_done(since, Duration::from_secs(10)).await);
    let writes = store.idempotency_writes.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(writes, 2, "{writes} store writes for one admitted request: its claim and settlement");
}

/// A body that sends one frame, then fails.
struct Failing(bool);

impl http_body::Body for Failing {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("the upstream went away"))));
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"partial")))))
    }
}

/// A keyed request is billed at its head, as every request: a response body that fails
/// midway (a client can make an echoing handler's fail with a malformed chunk) is billed, not
/// stored, and its key released: the retry runs again, billed again.
#[tokio::test]
async fn a_keyed_response_that_fails_midway_is_billed_and_not_stored() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    let (clock, _handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let config = tollgate::Config::from_toml_str(&TOML.replace("limit = 3,", "limit = 100,")).unwrap();
    let (engine, _worker) = tollgate::Tollgate::builder(config).store_arc(store.clone()).clock(clock).build();
    let svc = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
        |_req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Failing(false)))
        },
    ));
    for _ in 0..2 {
        let response = svc.clone().oneshot(post("/", "k")).await.unwrap();
        assert_eq!(response.headers().get("idempotent-replayed"), None);
        assert!(response.into_body().collect().await.is_err());
    }
    engine.flush().await.unwrap();
    let billed = common::committed(&*store, "t", "requests", NOON - 7200, NOON + 7200, 3600).await;
    assert_eq!(billed, 2, "billed at the head, each run");
    assert_eq!((engine.stats().responses_stored, engine.stats().responses_not_stored), (0, 2));
}

/// A request that runs longer than a claim's 5-minute hold keeps its `Idempotency-Key`: its
/// node renews the claim while it runs, so a retry on another node keeps getting 409 instead
/// of running it a second time (billed twice); up to `limits.idempotency_max_in_flight`, past
/// which the key is released and counted.
#[tokio::test(start_paused = true)]
async fn a_long_request_keeps_its_idempotency_key_across_the_fleet() {
    use tollgate::door::{Admission, Credential, RequestInfo};
    let store: std::sync::Arc<dyn tollgate::store::Store> = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let toml =
        "[limits]\nidempotency_max_in_flight = \"12m\"\n[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n";
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(common::NOON);
    let a = common::node_with_worker(toml, store.clone(), clock.clone(), handle.clone());
    let b = common::node_with_worker(toml, store.clone(), clock, handle.clone());
    let info = RequestInfo::new("POST", "/orders", Credential::ApiKey(b"key-t")).with_idempotency_key(b"order-9");
    let first = match a.tollgate.admit(&info) {
        Admission::Pending(p) => a.tollgate.resolve(p).await.unwrap(),
        other => panic!("a key this node has not seen asks the store: {other:?}"),
    };
    let retry = || common::req("POST", "/orders", Some("key-t"), Some("order-9"));
    // Ten minutes of work, the clock moving in steps; the retry is refused all along.
    for step in 1..=20 {
        handle.advance(std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        if step % 4 == 0 {
            assert_eq!(b.send(retry()).await.status, 409, "still running at {} s", step * 30);
        }
    }
    assert_eq!(b.tollgate.stats().responses_not_stored, 0);
    // Past twelve minutes the key is released (counted): a retry may run.
    for _ in 0..6 {
        handle.advance(std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
    assert_eq!(a.tollgate.stats().responses_not_stored, 1, "released past idempotency_max_in_flight");
    assert_eq!(b.send(retry()).await.status, 200, "runs now");
    drop(first);
}

/// Past the fleet's cap of keys (`limits.idempotency_keys_max`) a live binding is never deleted
/// to make room: a new key is not bound, its request is served without it and counted, and
/// the keys bound before keep answering their retries.
#[tokio::test]
async fn past_the_fleets_cap_of_keys_a_new_key_is_served_unkeyed_and_the_old_ones_hold() {
    let store: std::sync::Arc<dyn tollgate::store::Store> = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let toml = "[limits]\nidempotency_keys_max = 2\n[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n";
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(common::NOON);
    let a = common::node_with_worker(toml, store.clone(), clock, handle);
    let keyed = |key: &'static str| common::req("POST", "/orders", Some("key-t"), Some(key));
    for key in ["k1", "k2", "k3"] {
        assert_eq!(a.send(keyed(key)).await.status, 200);
    }
    assert_eq!(a.tollgate.stats().responses_not_stored, 1, "k3 was served without its key, counted");
    // k1 and k2 are replays; k3 was not bound: its retry runs again.
    for key in ["k1", "k2"] {
        let again = a.send(keyed(key)).await;
        assert_eq!(again.headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]), "{key}");
    }
    let again = a.send(keyed("k3")).await;
    assert_eq!(again.headers.get("idempotent-replayed"), None);
}

/// A request waiting on the store keeps the configuration it was decided under: a reload
/// landing while it waits does not change how its response is kept. On main the reload's
/// `idempotency_max_body` applied to it, its response was not stored, and its retry ran (and
/// was billed) again.
#[tokio::test]
async fn a_pending_admission_keeps_the_configuration_it_was_decided_under() {
    let kept = format!("[limits]\nidempotency_max_body = 65536\n{TOML}");
    let small = format!("[limits]\nidempotency_max_body = 4\n{TOML}");
    let h = Harness::new(&kept);
    let info = RequestInfo::new("POST", "/orders", Credential::ApiKey(b"key-t")).with_idempotency_key(b"k");
    let Admission::Pending(pending) = h.tollgate.admit(&info) else { panic!("an unseen tenant waits") };
    h.tollgate.reload(tollgate::Config::from_toml_str(&small).unwrap()).await.unwrap();
    let mut first = h.tollgate.resolve(pending).await.unwrap();
    let mut capture = first.capture().unwrap();
    capture.request_body().end();
    capture.head(201, []);
    capture.data(b"created");
    assert!(first.complete(201));
    capture.finish();
    let replay = match h.tollgate.admit(&info) {
        Admission::Pending(p) => h.tollgate.resolve(p).await.unwrap(),
        Admission::Admitted(t) => t,
        Admission::Rejected(r) => panic!("{r}"),
    };
    assert!(replay.is_replay(), "stored under the configuration it was decided under");
    assert_eq!(&replay.replayed_response().unwrap().body[..], b"created");
    assert_eq!(billed(&h).await, 1);
}
