//! The counters reach the `metrics` facade, labelled as documented.

use crate::common;

use std::{
    collections::BTreeMap,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use common::{req, NOON};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tollgate::{clock::Clock, Config, Tollgate};
use tower::{Layer, ServiceExt};

#[derive(Default)]
struct Recording {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

fn name(key: &Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    labels.sort();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl Recording {
    fn get(&self, key: &str) -> u64 {
        self.counters.lock().unwrap().get(key).map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.counters.lock().unwrap().entry(name(key)).or_default().clone())
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.counters.lock().unwrap().entry(name(key)).or_default().clone())
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn counters_follow_admissions_rejections_usage_and_flushes() {
    let config = Config::from_toml_str(
        r#"
        [plans.p]
        rate = "1/min"
        burst = 2
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
        "#,
    )
    .unwrap();
    let recorder = Recording::default();
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = metrics::with_local_recorder(&recorder, || Tollgate::builder(config).clock(clock).build());
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let svc = layer.layer(tower::service_fn(
        |_r: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
        },
    ));
    for _ in 0..3 {
        svc.clone().oneshot(req("GET", "/", Some("key-t"), None)).await.unwrap();
    }
    svc.clone().oneshot(req("GET", "/", None, None)).await.unwrap();
    svc.clone().oneshot(req("GET", "/", Some("key-t"), Some("once"))).await.unwrap();
    layer.handle().flush().await.unwrap();

    assert_eq!(recorder.get("tollgate_requests_admitted_total"), 2);
    assert_eq!(recorder.get("tollgate_requests_rejected_total{reason=rate_limited}"), 2);
    assert_eq!(recorder.get("tollgate_requests_rejected_total{reason=missing_credentials}"), 1);
    assert_eq!(recorder.get("tollgate_usage_recorded_units_total"), 2);
    assert_eq!(recorder.get("tollgate_flushes_total"), 1);
    assert_eq!(recorder.get("tollgate_usage_flushed_units_total"), 2);
    assert_eq!(recorder.get("tollgate_store_errors_total"), 0);
    assert_eq!(recorder.get("tollgate_tenants_tracked"), 1f64.to_bits());
}

/// A request that waits for its tenant's spend lease, on a route meter without a quota, is
/// admitted and counted as every admission is (it was not counted before).
#[tokio::test]
async fn a_request_admitted_after_waiting_for_its_spend_lease_is_counted() {
    let config = Config::from_toml_str(
        r#"
        [billing]
        currency = "usd"
        [meters.requests]
        price = "0.01"
        [plans.p]
        spend = { limit = "5.00", period = "month", mode = "hard" }
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
        "#,
    )
    .unwrap();
    let recorder = Recording::default();
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = metrics::with_local_recorder(&recorder, || Tollgate::builder(config).clock(clock).build());
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let svc = layer.layer(tower::service_fn(
        |_r: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
        },
    ));
    for _ in 0..3 {
        let r = svc.clone().oneshot(req("GET", "/", Some("key-t"), None)).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(recorder.get("tollgate_requests_admitted_total"), 3, "the first waited for its spend lease");
}

use common::Lines;

/// `Builder::build()` keeps in memory every role not given a store in code, and says so for
/// each role the file gives a durable store, its own section's included.
#[test]
fn build_warns_of_each_role_whose_durable_store_it_does_not_open() {
    let (lines, _guard) = Lines::capture();
    let text = |lines: &Lines| String::from_utf8_lossy(&lines.0.lock().unwrap()).to_string();
    let config = tollgate::Config::from_toml_str(
        "[store]\nkind = \"memory\"\n[store.directory]\nkind = \"sqlite\"\npath = \"d.db\"\n[plans.free]\n",
    )
    .unwrap();
    let (_engine, _worker) = tollgate::Tollgate::builder(config.clone()).build();
    let logged = text(&lines);
    assert!(logged.contains("Builder::open") && logged.contains("directory"), "{logged}");
    assert!(!logged.contains("quota"), "the quota role's store is memory: {logged}");
    // Given in code, the role's store is the one the code chose: nothing to say, once the
    // audit kept beside the directory is given too.
    lines.0.lock().unwrap().clear();
    let directory = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let (_engine, _worker) =
        tollgate::Tollgate::builder(config.clone()).directory_store(directory.clone()).audit_store(directory).build();
    assert_eq!(text(&lines), "");
    // A directory alone: its audit would be kept in memory, and that is said.
    let directory = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let (_engine, _worker) = tollgate::Tollgate::builder(config).directory_store(directory).build();
    let logged = text(&lines);
    assert!(logged.contains("without an audit store") && logged.contains("Builder::audit_store"), "{logged}");
}

/// A store outage is counted per error and logged once per burst, not once per request.
#[tokio::test(flavor = "current_thread")]
async fn store_errors_are_counted_each_and_logged_once_per_burst() {
    use std::sync::atomic::Ordering;
    let (lines, _guard) = Lines::capture();

    let toml = common::one_tenant("on_store_error = \"fail-open\"\nquotas.requests = { limit = 1000, period = \"day\", mode = \"hard\", lease = 1 }");
    let store = std::sync::Arc::new(common::Faulty::default());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(common::NOON);
    let h = common::Harness::build(&toml, store.clone(), clock, handle);
    store.down.store(true, Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(h.status("/", "key-t").await, 200, "fail-open");
    }
    let errors = h.tollgate.stats().store_errors;
    assert!(errors >= 50, "every error counted: {errors}");
    let logged =
        |lines: &Lines| String::from_utf8_lossy(&lines.0.lock().unwrap()).matches("since the last such line").count();
    assert_eq!(logged(&lines), 1, "one line for the burst:\n{}", String::from_utf8_lossy(&lines.0.lock().unwrap()));
    // Ten seconds later the burst goes on: one more line, with the count since the first.
    h.clock.advance(std::time::Duration::from_secs(11));
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(logged(&lines), 2);
    let after = h.tollgate.stats().store_errors;
    let text = String::from_utf8_lossy(&lines.0.lock().unwrap()).to_string();
    assert!(text.contains(&format!("({} since the last such line)", after - 1)), "{text}");
}

/// Shadow mode: what would have been refused is counted by reason, and nothing is refused.
#[tokio::test]
async fn shadow_mode_counts_what_it_would_refuse_by_reason() {
    let config = Config::from_toml_str(
        r#"
        [limits]
        shadow = true
        [plans.p]
        rate = "1/min"
        burst = 1
        quotas.requests = { limit = 2, period = "day", mode = "hard", lease = 1 }
        [[routes]]
        path = "/sso"
        feature = "sso"
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
        "#,
    )
    .unwrap();
    let recorder = Recording::default();
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = metrics::with_local_recorder(&recorder, || Tollgate::builder(config).clock(clock).build());
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let svc = layer.layer(tower::service_fn(
        |_r: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
        },
    ));
    for _ in 0..3 {
        let r = svc.clone().oneshot(req("GET", "/", Some("key-t"), None)).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(svc.clone().oneshot(req("GET", "/sso", Some("key-t"), None)).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(req("GET", "/", None, None)).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(req("GET", "/", Some("key-nobody"), None)).await.unwrap().status(), 200);
    let would = |reason: &str| recorder.get(&format!("tollgate_shadow_would_refuse_total{{reason={reason}}}"));
    // Requests 2, 3 and 4 of the tenant: over the rate; 3 and 4: over the quota of 2.
    assert_eq!(would("rate_limited"), 3);
    assert_eq!(would("quota_exceeded"), 2);
    assert_eq!(would("feature_not_in_plan"), 1);
    assert_eq!(would("missing_credentials"), 1);
    assert_eq!(would("unknown_credentials"), 1);
    assert_eq!(recorder.get("tollgate_requests_rejected_total{reason=rate_limited}"), 0);
    assert_eq!(recorder.get("tollgate_usage_recorded_units_total"), 4, "the tenant's requests are billed");
    assert_eq!(layer.handle().stats().shadow_would_refuse, 8);
}

/// Holds are counted by outcome, with the units they gave back.
#[tokio::test]
async fn holds_are_counted_by_outcome() {
    let config = Config::from_toml_str(common::holds::TOML).unwrap();
    let recorder = Recording::default();
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = metrics::with_local_recorder(&recorder, || Tollgate::builder(config).clock(clock).build());
    let info = tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-t"));
    let ticket = match engine.admit(&info) {
        tollgate::door::Admission::Admitted(t) => t,
        tollgate::door::Admission::Pending(p) => engine.resolve(p).await.unwrap(),
        tollgate::door::Admission::Rejected(r) => panic!("{r}"),
    };
    let ctx = ticket.context();
    let mut hold = ctx.hold("tokens", 100).await.unwrap();
    hold.record(40).unwrap();
    hold.extend(10).await.unwrap();
    hold.settle();
    assert!(ctx.hold("tokens", 501).await.is_err());
    assert!(ticket.complete(200));
    assert_eq!(recorder.get("tollgate_holds_total{outcome=taken}"), 1);
    assert_eq!(recorder.get("tollgate_holds_total{outcome=extended}"), 1);
    assert_eq!(recorder.get("tollgate_holds_total{outcome=settled}"), 1);
    assert_eq!(recorder.get("tollgate_holds_total{outcome=refused_spent}"), 1);
    assert_eq!(recorder.get("tollgate_hold_returned_units_total"), 70);
}

/// A request on a route that holds is counted refunded when its hold is refused, and when it
/// is dropped while its hold waits on the store (its client gone), as a ticket given back is:
/// its route cost went back both times.
#[tokio::test]
async fn a_request_whose_hold_is_refused_or_abandoned_is_counted_refunded() {
    use futures_util::FutureExt;
    use std::sync::atomic::Ordering::SeqCst;
    let config = Config::from_toml_str(
        r#"
        [meters.tokens]
        [plans.p]
        quotas.tokens = { limit = 100, period = "day", mode = "hard", lease = 10 }
        [[routes]]
        path = "/draw"
        reports = ["tokens"]
        hold.tokens = 60
        [[routes]]
        path = "/one"
        reports = ["tokens"]
        [tenants.t]
        plan = "p"
        keys = ["key-t"]
        [tenants.u]
        plan = "p"
        keys = ["key-u"]
        "#,
    )
    .unwrap();
    let recorder = Recording::default();
    let store = Arc::new(common::Faulty::default());
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = metrics::with_local_recorder(&recorder, || {
        Tollgate::builder(config).store_arc(store.clone()).clock(clock).build()
    });
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let svc = layer.layer(tower::service_fn(
        move |_r: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| {
            let rx = rx.lock().unwrap().take();
            async move {
                // The first request's work runs until the test lets it end: its hold stays.
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
            }
        },
    ));
    let first = tokio::spawn(svc.clone().oneshot(req("GET", "/draw", Some("key-t"), None)));
    while store.quota_calls.load(SeqCst) == 0 || recorder.get("tollgate_holds_total{outcome=taken}") == 0 {
        tokio::task::yield_now().await;
    }
    // 40 of 100 left: a hold of 60 is refused.
    let refused = svc.clone().oneshot(req("GET", "/draw", Some("key-t"), None)).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(recorder.get("tollgate_usage_refunded_units_total"), 1);
    // The first ends; another tenant's hold waits on the store (its lease of 10 holds its
    // route's unit, not its hold), and its client goes.
    tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(req("GET", "/one", Some("key-u"), None)).await.unwrap().status(), 200);
    store.stall(true);
    let calls = store.quota_calls.load(SeqCst);
    let waiting = svc.clone().oneshot(req("GET", "/draw", Some("key-u"), None)).now_or_never();
    assert!(waiting.is_none(), "its hold waits on the store");
    assert!(store.quota_calls.load(SeqCst) > calls, "it asked the store");
    store.stall(false);
    assert_eq!(recorder.get("tollgate_usage_refunded_units_total"), 2);
    assert_eq!(recorder.get("tollgate_usage_recorded_units_total"), 2, "the first request and /one are billed");
}
