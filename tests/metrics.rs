//! The counters reach the `metrics` facade, labelled as documented.
#![allow(missing_docs)]

mod common;

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
    let layer = tollgate::TollgateLayer::new(engine);
    let svc = layer.layer(tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    }));
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
