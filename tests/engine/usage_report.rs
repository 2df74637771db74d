//! What a tenant has used (`Tollgate::usage_report`): quotas used and remaining in the
//! current period and usage over a range, from the store with this node's unflushed usage,
//! counted once across a flush; and the threshold hook, once per threshold and period.

use crate::common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use common::{Harness, NOON};
use tollgate::report::ReportError;
use tollgate::report::ThresholdCrossed;
use tollgate::{clock::Clock, events::Event, store::MemoryStore, Config, Tollgate};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

const TOML: &str = r#"
[meters.tokens]
[plans.p]
quotas.requests = { limit = 10, period = "day", lease = 1 }
quotas.tokens = { limit = 1000, period = "month", mode = "soft" }
[tenants.t]
plan = "p"
keys = ["key-t"]
[events.products]
"tok" = "tokens"
"#;

fn quota(r: &tollgate::report::UsageReport, meter: &str) -> (u64, u64) {
    let q = r.quotas.iter().find(|q| q.meter.as_str() == meter).unwrap();
    (q.used, q.remaining)
}

#[tokio::test]
async fn the_report_counts_stored_and_unflushed_usage_once() {
    let store = Arc::new(MemoryStore::new());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let a = Harness::build(TOML, store.clone(), clock.clone(), handle.clone());
    let b = Harness::build(TOML, store.clone(), clock, handle);
    let t = "t".into();
    for _ in 0..3 {
        assert_eq!(a.status("/", "key-t").await, 200);
    }
    let r = a.tollgate.usage_report(&t, NOON - HOUR, NOON + HOUR).await.unwrap();
    assert_eq!(quota(&r, "requests"), (3, 7), "unflushed usage counts");
    assert_eq!(r.plan.as_str(), "p");
    a.tollgate.flush().await.unwrap();
    assert_eq!(a.status("/", "key-t").await, 200);
    assert_eq!(b.status("/", "key-t").await, 200);
    let r = a.tollgate.usage_report(&t, NOON - HOUR, NOON + HOUR).await.unwrap();
    // B's request, not flushed yet, is not in `used`; its unit is taken from the store all
    // the same, and not in `remaining`.
    assert_eq!(quota(&r, "requests"), (4, 5), "3 in the store, 1 here; node B's taken");
    b.tollgate.flush().await.unwrap();
    let r = a.tollgate.usage_report(&t, NOON - HOUR, NOON + HOUR).await.unwrap();
    assert_eq!(quota(&r, "requests"), (5, 5));
    // Usage from an event of earlier this month counts in the monthly soft quota.
    let at = UNIX_EPOCH + Duration::from_secs((NOON - 3 * DAY) as u64);
    a.tollgate.record_event(Event::new("e1", t.clone(), "tokens".into(), 250, at)).await.unwrap();
    let r = a.tollgate.usage_report(&t, NOON - 4 * DAY, NOON + HOUR).await.unwrap();
    assert_eq!(quota(&r, "tokens"), (250, 750));
    let windows: Vec<(String, i64, u64)> =
        r.usage.iter().map(|w| (w.meter.to_string(), w.window_start, w.quantity)).collect();
    assert_eq!(
        windows,
        [("requests".to_owned(), NOON, 5), ("tokens".to_owned(), NOON - 3 * DAY, 250)],
        "per meter and window over the range"
    );
    // The next day: a new period of the daily quota.
    a.clock.advance(Duration::from_secs(DAY as u64));
    let r = a.tollgate.usage_report(&t, NOON, NOON + 2 * DAY).await.unwrap();
    assert_eq!(quota(&r, "requests"), (0, 10));
    assert!(matches!(a.tollgate.usage_report(&"nobody".into(), 0, 1).await, Err(ReportError::UnknownTenant(_))));
}

#[tokio::test]
async fn the_threshold_hook_is_called_once_per_threshold_and_period() {
    let crossed: Arc<Mutex<Vec<(u16, i64, u64)>>> = Arc::default();
    let seen = crossed.clone();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(TOML).unwrap();
    let (engine, _worker) = Tollgate::builder(config)
        .clock(clock)
        .on_threshold(move |c: &ThresholdCrossed| {
            assert_eq!((c.tenant.as_str(), c.meter.as_str(), c.limit), ("t", "requests", 10));
            seen.lock().unwrap().push((c.percent, c.start, c.reserved));
        })
        .build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine), handle);
    let day = NOON - NOON.rem_euclid(DAY);
    for i in 1..=7 {
        assert_eq!(h.status("/", "key-t").await, 200, "request {i}");
    }
    assert!(crossed.lock().unwrap().is_empty(), "7 of 10: nothing yet");
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(*crossed.lock().unwrap(), [(80, day, 8)]);
    // A reload rebuilds every tenant's state: the 80% is not notified again.
    h.tollgate.reload(Config::from_toml_str(TOML).unwrap()).await.unwrap();
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(*crossed.lock().unwrap(), [(80, day, 8)], "once per period, across a reload");
    // A reload that adds a threshold: the new one is told (late), the 80% still not again.
    let more = TOML.replace("[plans.p]", "[usage]\nnotify_at = [50, 80, 100]\n[plans.p]");
    h.tollgate.reload(Config::from_toml_str(&more).unwrap()).await.unwrap();
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(*crossed.lock().unwrap(), [(80, day, 8), (50, day, 10), (100, day, 10)], "marked by percentage");
    for _ in 0..5 {
        assert_eq!(h.status("/", "key-t").await, 429);
    }
    assert_eq!(*crossed.lock().unwrap(), [(80, day, 8), (50, day, 10), (100, day, 10)], "each once");
    // The next day is a new period.
    h.clock.advance(Duration::from_secs(DAY as u64));
    for _ in 0..8 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert_eq!(crossed.lock().unwrap().last(), Some(&(80, day + DAY, 8)));
}

#[test]
fn thresholds_are_percentages_each_listed_once() {
    let e = Config::from_toml_str("[usage]\nnotify_at = [80, 0]\n").unwrap_err();
    assert_eq!(e.key(), "usage.notify_at[1]");
    let e = Config::from_toml_str("[usage]\nnotify_at = [50, 50]\n").unwrap_err();
    assert_eq!(e.key(), "usage.notify_at[1]");
    let c = Config::from_toml_str("[usage]\nnotify_at = [100, 50, 90]\n").unwrap();
    assert_eq!(c.usage().notify_at, [50, 90, 100]);
}
