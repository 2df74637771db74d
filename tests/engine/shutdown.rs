//! Nothing is lost at shutdown or through a store outage: a store that does not outlive the
//! process exports every window at shutdown, open ones included; a store down at shutdown
//! is retried until a deadline and the loss is reported; an outage longer than a window keeps
//! usage in its own window.

use crate::common;

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use common::{Collect, Harness, NOON};
use tollgate::clock::FakeClock;
use tollgate::store::prelude::*;
use tollgate::{
    clock::Clock,
    store::{ExportKey, MemoryStore, UsageBatch},
    Config, Tollgate,
};

const TOML: &str = "[usage]\nflush_interval = \"10s\"\nwindow = \"1h\"\ngrace = \"5m\"\nshutdown_timeout = \"300ms\"\n[plans.p]\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n";

fn engine(store: Arc<dyn Store>, sink: Collect, at: i64) -> (Tollgate, tollgate::clock::FakeClock, Harness) {
    let (clock, handle) = Clock::fake_at_unix(at);
    let config = Config::from_toml_str(TOML).unwrap();
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).billing_sink(sink).clock(clock).build();
    let layer = tollgate::TollgateLayer::new(engine);
    let tollgate = layer.handle().clone();
    let h = Harness::from_layer(layer, handle.clone());
    (tollgate, handle, h)
}

#[tokio::test]
async fn shutdown_on_a_store_that_dies_with_the_process_exports_open_windows() {
    let sink = Collect::default();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // 12:10: the window 12:00–13:00 is open.
    let (tollgate, clock, h) = engine(store.clone(), sink.clone(), NOON + 600);
    for _ in 0..7 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    tollgate.shutdown().await.unwrap();
    let events = sink.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].value, events[0].revision, events[0].window_start), (7, 0, NOON));
    assert!(events[0].timestamp <= NOON + 600, "no later than now: {}", events[0].timestamp);

    // Usage that arrives later for the same window goes out as a new revision.
    clock.advance(Duration::from_secs(60));
    let (tollgate, _, h) = engine(store.clone(), sink.clone(), NOON + 660);
    for _ in 0..2 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    tollgate.shutdown().await.unwrap();
    let events = sink.0.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!((events[1].value, events[1].revision), (2, 1));
}

#[tokio::test]
async fn a_store_down_at_shutdown_is_retried_then_the_loss_is_reported() {
    let store = Arc::new(common::Faulty::default());
    let (tollgate, _, h) = engine(store.clone(), Collect::default(), NOON);
    for _ in 0..5 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    store.usage_down.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let err = tollgate.shutdown().await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(180), "retried until two thirds of the budget");
    assert_eq!((err.records(), err.units()), (1, 5), "{err}");
    assert!(err.to_string().contains("5 units"), "{err}");
}

/// One shutdown order for every door: once it begins no request is admitted (its usage would
/// come after the final flush, its lease after the leases went back), the usage is flushed,
/// and leases a store does not take back in time are reported, within the budget.
#[tokio::test]
async fn once_shutdown_begins_no_request_is_admitted_and_what_was_not_done_is_reported() {
    let store = Arc::new(common::Faulty::default());
    let toml = TOML
        .replace("[plans.p]\n", "[plans.p]\nquotas.requests = { limit = 1000, period = \"day\", mode = \"hard\" }\n");
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(&toml).unwrap();
    let (engine, _worker) =
        Tollgate::builder(config).store_arc(store.clone()).billing_sink(Collect::default()).clock(clock).build();
    let layer = tollgate::TollgateLayer::new(engine.clone());
    let h = Harness::from_layer(layer, handle);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    // The store holds every quota call: the lease cannot be given back.
    store.stall(true);
    let report = engine.shutdown().await.unwrap();
    assert_eq!(report.flush.units, 3, "{report:?}");
    assert!(report.keys_settled);
    assert!(!report.leases_returned, "{report:?}");
    // A request that reaches the engine now is refused, never admitted after the final flush.
    assert_eq!(h.status("/", "key-t").await, 503);
    store.stall(false);
}

#[tokio::test]
async fn an_outage_longer_than_a_window_keeps_usage_in_its_own_window() {
    let store = Arc::new(common::Faulty::default());
    let (tollgate, clock, h) = engine(store.clone(), Collect::default(), NOON);
    store.usage_down.store(true, Ordering::SeqCst);
    // Three windows of usage while the store is down, the worker's flushes failing.
    for (window, n) in [(0, 3u64), (1, 4), (2, 5)] {
        for _ in 0..n {
            assert_eq!(h.status("/", "key-t").await, 200);
        }
        assert!(tollgate.flush().await.is_err());
        clock.advance(Duration::from_secs(3600));
        let _ = window;
    }
    store.usage_down.store(false, Ordering::SeqCst);
    tollgate.flush().await.unwrap();
    for (i, want) in [3u64, 4, 5].into_iter().enumerate() {
        let key = ExportKey::new("t".into(), "requests".into(), NOON + 3600 * i as i64);
        let got = store.usage(&key).await.unwrap().map_or(0, |a| a.quantity);
        assert_eq!(got, want, "window {i}");
    }
}

/// Export pages go on past aggregates that cannot progress; dead letters can be listed.
#[tokio::test]
async fn dead_letters_are_listed_and_do_not_starve_the_rest() {
    let store = MemoryStore::new();
    let batch = UsageBatch::new(
        tollgate::store::FlushId::new("f"),
        (0..250)
            .map(|i| tollgate::store::UsageRecord::new(format!("t{i:03}").into(), "requests".into(), 0, 1))
            .collect(),
    );
    store.commit_usage(&batch).await.unwrap();
    let mut after: Option<ExportKey> = None;
    let mut seen = 0;
    loop {
        let page = store.pending_exports(3600, after.as_ref(), 100).await.unwrap();
        if page.is_empty() {
            break;
        }
        for a in &page {
            if seen % 2 == 0 {
                store.dead_letter(a, "refused").await.unwrap();
            }
            seen += 1;
        }
        after = page.last().map(|a| a.key.clone());
    }
    assert_eq!(seen, 250);
    let dead = store.dead_letters(None, 1000).await.unwrap();
    assert_eq!(dead.len(), 125);
    assert_eq!(dead[0].reason, "refused");
}

/// No flush at all for three windows (a frozen Lambda, a stopped worker): the counter slot of
/// the first window is reused by the third only after its usage was moved out.
#[tokio::test]
async fn usage_left_unflushed_for_two_windows_stays_in_its_window() {
    let store = Arc::new(MemoryStore::new());
    let (tollgate, clock, h) = engine(store.clone(), Collect::default(), NOON);
    for n in [3u64, 4, 5] {
        for _ in 0..n {
            assert_eq!(h.status("/", "key-t").await, 200);
        }
        clock.advance(Duration::from_secs(3600));
    }
    tollgate.flush().await.unwrap();
    for (i, want) in [3u64, 4, 5].into_iter().enumerate() {
        let key = ExportKey::new("t".into(), "requests".into(), NOON + 3600 * i as i64);
        let got = store.usage(&key).await.unwrap().map_or(0, |a| a.quantity);
        assert_eq!(got, want, "window {i}");
    }
}

fn buffered_engine(store: Arc<common::Faulty>, policy: &str) -> (Tollgate, FakeClock, Harness) {
    let toml = format!(
        "[usage]\nmax_buffered_records = 2\non_store_error = \"{policy}\"\nwindow = \"1h\"\n\
         [plans.p]\nrate = \"1000/s\"\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n[tenants.u]\nplan = \"p\"\nkeys = [\"key-u\"]\n"
    );
    let config = Config::from_toml_str(&toml).unwrap();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let (tollgate, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(tollgate.clone()), handle.clone());
    (tollgate, handle, h)
}

/// A store that does not take usage for long fills the bounded buffer (two records here: one
/// per tenant, meter and window). Fail-closed tenants are then refused with 503 until the
/// store takes the usage; nothing admitted is lost.
#[tokio::test]
async fn a_full_usage_buffer_refuses_fail_closed_tenants_until_the_store_takes_it() {
    let store = Arc::new(common::Faulty::default());
    let (tollgate, clock, h) = buffered_engine(store.clone(), "fail-closed");
    store.usage_down.store(true, Ordering::SeqCst);
    assert_eq!(h.status("/", "key-t").await, 200);
    assert!(tollgate.flush().await.is_err());
    assert_eq!(h.status("/", "key-t").await, 200, "one record of two held");
    clock.advance(Duration::from_secs(3600));
    assert_eq!(h.status("/", "key-t").await, 200);
    assert!(tollgate.flush().await.is_err());
    let refused = h.get("/", "key-t").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(h.status("/", "key-u").await, 503, "every fail-closed tenant");
    assert_eq!(tollgate.stats().buffer_full, 1);
    store.usage_down.store(false, Ordering::SeqCst);
    tollgate.flush().await.unwrap();
    assert_eq!(h.status("/", "key-t").await, 200, "room again");
    tollgate.flush().await.unwrap();
    let stored = store.usage_range(&"t".into(), 0, i64::MAX).await.unwrap();
    assert_eq!(stored.iter().map(|a| a.quantity).sum::<u64>(), 4);
    assert_eq!(tollgate.stats().dropped_units, 0);
}

/// Under fail-open the requests go on; usage past the bound is dropped, counted and logged,
/// and what was held is written once the store is back.
#[tokio::test]
async fn a_full_usage_buffer_drops_and_counts_fail_open_usage() {
    let store = Arc::new(common::Faulty::default());
    let (tollgate, clock, h) = buffered_engine(store.clone(), "fail-open");
    store.usage_down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert!(tollgate.flush().await.is_err());
    clock.advance(Duration::from_secs(3600));
    for _ in 0..2 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    assert!(tollgate.flush().await.is_err());
    for _ in 0..4 {
        assert_eq!(h.status("/", "key-u").await, 200, "fail-open tenants are never refused");
    }
    assert!(tollgate.flush().await.is_err());
    let stats = tollgate.stats();
    assert_eq!((stats.buffer_full, stats.dropped_units), (2, 4), "{stats:?}");
    store.usage_down.store(false, Ordering::SeqCst);
    tollgate.flush().await.unwrap();
    let t = store.usage_range(&"t".into(), 0, i64::MAX).await.unwrap();
    assert_eq!(t.iter().map(|a| a.quantity).sum::<u64>(), 5);
    assert!(store.usage_range(&"u".into(), 0, i64::MAX).await.unwrap().is_empty());
}

/// Before a SnapStart snapshot, usage that cannot be flushed fails the hook: each copy
/// restored from the snapshot would otherwise flush the same usage again. Once the store is
/// back, the hook settles it, and every lease is back.
#[tokio::test]
async fn a_snapshot_is_refused_while_usage_cannot_be_flushed() {
    let store = Arc::new(common::Faulty::default());
    let (tollgate, _, h) = engine(store.clone(), Collect::default(), NOON);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    store.usage_down.store(true, Ordering::SeqCst);
    assert!(tollgate.before_snapshot().await.is_err(), "nothing may be owed in a snapshot");
    store.usage_down.store(false, Ordering::SeqCst);
    let report = tollgate.before_snapshot().await.unwrap();
    assert_eq!(report.units, 3);
    assert_eq!(tollgate.stats().tracked_tenants, 0);
    let node = tollgate.node_id();
    tollgate.after_restore().await;
    assert_ne!(tollgate.node_id(), node);
    assert_eq!(h.status("/", "key-t").await, 200, "a restored copy serves as before");
}

/// What a snapshot still holds is in every copy restored from it: no copy may give its
/// leases back or flush its usage (each would). `after_restore` forgets it.
#[tokio::test]
async fn tenant_state_left_in_a_snapshot_is_forgotten_by_each_copy() {
    let h = Harness::new(
        "[plans.p]\nquotas.requests = { limit = 1000, period = \"day\", mode = \"hard\" }\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n",
    );
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    let key = common::day_key("t", NOON);
    let leased = h.reserved(&key).await;
    assert!(leased > 3, "a lease is held: {leased}");
    // No before_snapshot: the state (a lease, 3 unflushed units) is in the "snapshot".
    h.tollgate.after_restore().await;
    h.tollgate.flush().await.unwrap();
    assert_eq!(h.reserved(&key).await, leased, "the lease is not given back");
    let store = h.memory.clone().unwrap();
    assert_eq!(common::committed(&*store, "t", "requests", NOON - 86_400, NOON + 86_400, 3600).await, 0);
    assert_eq!(h.tollgate.stats().tracked_tenants, 0);
    assert_eq!(h.status("/", "key-t").await, 200, "the copy serves on with a lease of its own");
}
