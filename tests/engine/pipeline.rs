//! The usage pipeline: flushing conserves usage, the tenant cap holds, reloads keep counters,
//! closed windows are exported exactly once.

use crate::common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use common::{req, Harness, NOON};
use proptest::prelude::*;
use tollgate::store::prelude::*;
use tollgate::{
    billing::{BillingSink, JsonlSink, MeterEvent, SinkError},
    clock::Clock,
    config::ConfigErrorKind,
    store::MemoryStore,
    Config, Tollgate,
};

fn tenants_config(n: usize, extra: &str) -> String {
    let mut s =
        format!("{extra}\n[plans.p]\nrate = \"1000/s\"\nquotas.requests = {{ limit = 1000000, period = \"day\" }}\n");
    for i in 0..n {
        s.push_str(&format!("[tenants.t{i}]\nplan = \"p\"\nkeys = [\"key-{i}\"]\n"));
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any interleaving of requests (billable or not), flushes, clock moves and evictions:
    /// what the store holds equals what was billed, no more, no less.
    #[test]
    fn flushing_conserves_usage(ops in proptest::collection::vec((0usize..4, 0u8..6), 1..120)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = Harness::new(&tenants_config(4, "[limits]\nmax_tenants = 2\nidle_timeout = \"30s\""));
            let mut billed = [0u64; 4];
            for (tenant, op) in ops {
                let key = format!("key-{tenant}");
                match op {
                    0 | 1 => if h.status("/", &key).await == 200 { billed[tenant] += 1 },
                    2 => assert_eq!(h.status("/fail", &key).await, 500),
                    3 => { h.tollgate.flush().await.unwrap(); }
                    4 => h.clock.advance(Duration::from_secs(17 * 60)),
                    _ => { h.tollgate.sweep().await; }
                }
            }
            h.tollgate.flush().await.unwrap();
            // Retired states are drained once nobody holds them: a second flush sees them gone.
            h.tollgate.flush().await.unwrap();
            for (i, want) in billed.iter().enumerate() {
                let got = common::committed(&**h.tollgate.usage_store(), &format!("t{i}"), "requests", NOON - 3600, NOON + 40 * 3600, 3600).await;
                assert_eq!(got, *want, "tenant t{i}");
            }
            assert!(h.tollgate.stats().tracked_tenants <= 4);
        });
    }
}

#[tokio::test]
async fn the_tenant_cap_holds_and_evicted_usage_is_kept() {
    let h = Harness::new(&tenants_config(25, "[limits]\nmax_tenants = 10"));
    for i in 0..25 {
        assert_eq!(h.status("/", &format!("key-{i}")).await, 200);
        h.clock.advance(Duration::from_secs(1));
    }
    // The cap holds as tenants arrive (no worker runs here): the least recently seen go.
    assert_eq!(h.tollgate.stats().tracked_tenants, 10);
    assert_eq!(h.tollgate.sweep().await, 0);
    // The most recently seen stay.
    for i in 15..25 {
        assert_eq!(h.status("/", &format!("key-{i}")).await, 200);
    }
    assert_eq!(h.tollgate.stats().tracked_tenants, 10);
    h.tollgate.flush().await.unwrap();
    let store = h.tollgate.usage_store().clone();
    for i in 0..25 {
        let want = if i >= 15 { 2 } else { 1 };
        assert_eq!(
            common::committed(&*store, &format!("t{i}"), "requests", NOON - 3600, NOON + 3600, 3600).await,
            want
        );
    }
    assert_eq!(h.tollgate.stats().evictions, 15);
}

#[tokio::test]
async fn idle_tenants_are_evicted_and_their_lease_returned() {
    let h = Harness::new(&tenants_config(1, "[limits]\nidle_timeout = \"10m\""));
    assert_eq!(h.status("/", "key-0").await, 200);
    let key = common::day_key("t0", NOON);
    // A lease is a sixteenth of the limit, at most 10,000 units.
    assert_eq!(h.reserved(&key).await, 10_000);
    h.clock.advance(Duration::from_secs(601));
    assert_eq!(h.tollgate.sweep().await, 1);
    assert_eq!(h.reserved(&key).await, 1, "the unused units went back");
    assert_eq!(h.tollgate.stats().tracked_tenants, 0);
}

#[tokio::test]
async fn a_reload_keeps_counters_and_applies_new_plans() {
    let v1 = &common::one_tenant(
        r#"rate = "10/s"
        quotas.requests = { limit = 5, period = "day", lease = 2 }"#,
    );
    let h = Harness::new(v1);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    let r = h.get("/", "key-t").await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"rate\";q=10;w=1, \"requests-day\";q=5;w=86400"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, v1.replace("10/s", "20/s")).unwrap();
    h.tollgate.reload(Config::from_path(&path).unwrap()).await.unwrap();
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 200, "the fifth unit");
    assert_eq!(r.header("ratelimit-policy"), Some("\"rate\";q=20;w=1, \"requests-day\";q=5;w=86400"));
    assert_eq!(h.status("/", "key-t").await, 429, "4 before the reload + 1 after = the limit of 5");
    h.tollgate.flush().await.unwrap();
    assert_eq!(
        common::committed(&**h.tollgate.usage_store(), "t", "requests", NOON - 3600, NOON + 3600, 3600).await,
        5
    );
    // A bad file changes nothing and says where it is wrong.
    std::fs::write(&path, "[plans.p]\nrate = \"fast\"\n").unwrap();
    let err = Config::from_path(&path).unwrap_err();
    assert_eq!(err.file(), Some(path.as_path()));
    assert_eq!((err.line(), err.column(), err.key()), (Some(2), Some(8), "plans.p.rate"));
    assert_eq!(err.kind(), ConfigErrorKind::InvalidValue);
    assert!(err.to_string().starts_with(&format!("{}:2:8: `plans.p.rate`: ", path.display())), "{err}");
}

/// A sink that records events and fails on demand, as a network would.
#[derive(Debug, Default)]
struct Recording {
    events: Mutex<Vec<MeterEvent>>,
    /// Fail (after "sending") this many `tokens` events with a retryable error.
    lose_acks: AtomicUsize,
    /// Refuse events of this tenant for good.
    refuse: Option<&'static str>,
}

#[async_trait]
impl BillingSink for Recording {
    async fn send(&self, event: &MeterEvent) -> Result<(), SinkError> {
        if self.refuse == Some(event.tenant.as_str()) {
            return Err(SinkError::Permanent("no such customer".into()));
        }
        self.events.lock().unwrap().push(event.clone());
        if event.meter.as_str() == "tokens" && self.lose_acks.load(Ordering::SeqCst) > 0 {
            self.lose_acks.fetch_sub(1, Ordering::SeqCst);
            return Err(SinkError::retryable("connection reset after the request was sent"));
        }
        Ok(())
    }
}

/// A sink that records into a [`Recording`] the test keeps.
#[derive(Debug)]
struct Shared(Arc<Recording>);

#[async_trait]
impl BillingSink for Shared {
    async fn send(&self, e: &MeterEvent) -> Result<(), SinkError> {
        self.0.send(e).await
    }
}

fn engine_with_sink(config: &str, sink: Arc<Recording>) -> (Harness, Tollgate) {
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let h = Harness::build(config, store.clone(), clock.clone(), handle);
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(config).unwrap())
        .store_arc(store)
        .clock(clock)
        .billing_sink(Shared(sink))
        .build();
    (h, engine)
}

/// Commits usage for acme's tokens in the 12:00 window, as a flush arriving late would.
async fn commit_late_tokens(h: &Harness, quantity: u64) {
    let late = tollgate::store::UsageBatch::new(
        tollgate::store::FlushId::new(format!("late-{quantity}")),
        vec![tollgate::store::UsageRecord::new("acme".into(), "tokens".into(), NOON, quantity)],
    );
    h.tollgate.usage_store().commit_usage(&late).await.unwrap();
}

const EXPORT: &str = r#"
[usage]
window = "1h"
grace = "5m"
flush_interval = "10s"
[meters.tokens]
event_name = "llm_tokens"
[plans.p]
[tenants.acme]
plan = "p"
keys = ["key-acme"]
stripe_customer = "cus_123"
[tenants.bad]
plan = "p"
keys = ["key-bad"]
"#;

/// A directory kept in another store than the usage (the team's own database, here a SQLite
/// file; quotas and usage in a store of their own): the tenant is found through the directory
/// role, and its windows are exported with the customer the directory names, read when the
/// export pass meets the tenant. Nothing of the directory is in the usage store, nor the
/// reverse.
#[tokio::test]
async fn a_directory_in_another_store_gives_exported_windows_their_customer() {
    let dir = tempfile::tempdir().unwrap();
    let directory = Arc::new(tollgate::store::SqliteStore::open(dir.path().join("directory.db")).await.unwrap());
    let acme = tollgate::store::TenantRecord::new("acme".into(), "p".into()).with_customer("cus_old");
    directory.put_tenant(&acme, &[tollgate::store::KeyHash::of(b"key-dir")]).await.unwrap();
    let usage = Arc::new(MemoryStore::new());
    let sink = Arc::new(Recording::default());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let config = "[usage]\nwindow = \"1h\"\ngrace = \"5m\"\n[plans.p]\nrate = \"100/s\"\n";
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(config).unwrap())
        .store_arc(usage.clone())
        .directory_store(directory.clone())
        .clock(clock)
        .billing_sink(Shared(sink.clone()))
        .build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine.clone()), handle);
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-dir").await, 200);
    }
    assert_eq!(h.status("/", "key-unknown").await, 401);
    engine.flush().await.unwrap();

    // Usage of a tenant the directory does not hold (yet: a lagging replica, a new file).
    let ghost = tollgate::store::UsageBatch::new(
        tollgate::store::FlushId::new("ghost"),
        vec![tollgate::store::UsageRecord::new("ghost".into(), "requests".into(), NOON, 4)],
    );
    usage.commit_usage(&ghost).await.unwrap();
    // The customer changes in the directory before the window closes: the export reads it then.
    let acme = acme.with_customer("cus_dir");
    directory.put_tenant(&acme, &[tollgate::store::KeyHash::of(b"key-dir")]).await.unwrap();
    h.clock.advance(Duration::from_secs(3600 + 300));
    let report = engine.export().await.unwrap();
    assert_eq!((report.events, report.units, report.unbillable), (1, 3, 0));
    let events = sink.events.lock().unwrap().clone();
    assert_eq!(events[0].customer.as_deref(), Some("cus_dir"));
    assert_eq!((events[0].tenant.as_str(), events[0].value), ("acme", 3));
    // The unknown tenant's window is neither sent nor written off: it stays pending.
    let pending = usage.pending_exports(i64::MAX, None, 10).await.unwrap();
    assert_eq!(
        pending.iter().map(|a| (a.key.tenant.as_str(), a.quantity, a.exported)).collect::<Vec<_>>(),
        [("ghost", 4, 0)]
    );

    // Each store holds its own role only.
    assert_eq!(common::committed(&*usage, "acme", "requests", NOON, NOON + 3600, 3600).await, 3);
    assert!(directory.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().is_empty());
    assert!(usage.tenant(&"acme".into()).await.unwrap().is_none());
    assert_eq!(engine.directory_store().tenant(&"acme".into()).await.unwrap(), Some(acme));
}

/// A tenant whose directory record cannot be read is left pending for this export pass (read
/// once per pass, the store error counted), the pass going on with the tenants after it; its
/// windows go out once the directory answers. A directory failing for three tenants in a row
/// (down, not one bad record) ends the pass with its error rather than waiting out a timeout
/// per tenant; failures between successes do not add up.
#[tokio::test]
async fn a_tenant_the_directory_cannot_read_waits_without_stopping_the_export_pass() {
    let directory = Arc::new(common::Faulty::default());
    let mut tenants = vec!["a-bad".to_owned()];
    tenants.extend((0..120).map(|i| if i % 40 == 7 { format!("t{i:03}-bad") } else { format!("t{i:03}") }));
    for t in &tenants {
        let record =
            tollgate::store::TenantRecord::new(t.as_str().into(), "p".into()).with_customer(format!("cus_{t}"));
        directory.put_tenant(&record, &[]).await.unwrap();
    }
    let usage = Arc::new(MemoryStore::new());
    // Two windows of every tenant, on two meters.
    let records = tenants
        .iter()
        .flat_map(|t| {
            [
                tollgate::store::UsageRecord::new(t.as_str().into(), "requests".into(), NOON, 2),
                tollgate::store::UsageRecord::new(t.as_str().into(), "tokens".into(), NOON, 1),
            ]
        })
        .collect();
    usage.commit_usage(&tollgate::store::UsageBatch::new(tollgate::store::FlushId::new("f"), records)).await.unwrap();
    let sink = Arc::new(Recording::default());
    let (clock, _handle) = Clock::fake_at_unix(NOON + 3600 + 300);
    let config =
        "[usage]\nwindow = \"1h\"\ngrace = \"5m\"\n[export]\ncalls_per_second = 1000\n[meters.tokens]\n[plans.p]\n";
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(config).unwrap())
        .store_arc(usage.clone())
        .directory_store(directory.clone())
        .clock(clock)
        .billing_sink(Shared(sink.clone()))
        .build();
    let errors = engine.stats().store_errors;

    // Four tenants cannot be read, the first listed among them, the others between good ones.
    *directory.unreadable_tenants.lock().unwrap() = Some("bad".into());
    let reads = directory.tenant_reads.load(Ordering::SeqCst);
    let report = engine.export().await.unwrap();
    assert_eq!((report.events, report.units, report.waiting), (2 * 117, 3 * 117, 2 * 4), "{report:?}");
    assert_eq!(directory.tenant_reads.load(Ordering::SeqCst) - reads, 121, "each tenant read once in the pass");
    assert_eq!(engine.stats().store_errors, errors + 4, "each failed read counted");
    assert_eq!(engine.stats().waiting_windows, 8);
    let pending = usage.pending_exports(i64::MAX, None, 100).await.unwrap();
    let mut waiting: Vec<&str> = pending.iter().map(|a| a.key.tenant.as_str()).collect();
    waiting.dedup();
    assert_eq!(waiting, ["a-bad", "t007-bad", "t047-bad", "t087-bad"]);

    // The directory down: the pass ends with the error after three reads, nothing marked.
    let more: Vec<_> = tenants[1..21]
        .iter()
        .map(|t| tollgate::store::UsageRecord::new(t.as_str().into(), "requests".into(), NOON, 1))
        .collect();
    usage.commit_usage(&tollgate::store::UsageBatch::new(tollgate::store::FlushId::new("g"), more)).await.unwrap();
    *directory.unreadable_tenants.lock().unwrap() = Some(String::new());
    let reads = directory.tenant_reads.load(Ordering::SeqCst);
    engine.export().await.unwrap_err();
    assert_eq!(directory.tenant_reads.load(Ordering::SeqCst) - reads, 3, "three reads, not one per tenant");
    assert_eq!(sink.events.lock().unwrap().len(), 2 * 117, "nothing sent without its customer");
    assert_eq!(usage.pending_exports(i64::MAX, None, 100).await.unwrap().len(), 8 + 19);

    // The directory answers again: everything goes out, once.
    *directory.unreadable_tenants.lock().unwrap() = None;
    let report = engine.export().await.unwrap();
    assert_eq!((report.events, report.waiting), (8 + 19, 0), "{report:?}");
    assert!(usage.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
    let events = sink.events.lock().unwrap().clone();
    assert_eq!(events.iter().filter(|e| e.tenant.as_str() == "a-bad").count(), 2);
    assert_eq!(events.iter().map(|e| e.value).sum::<u64>(), 3 * 121 + 20);
}

/// A window whose tenant's customer is never found is parked as a dead letter once it is too
/// old to send (listed for the operator), not left to be pruned unseen; and with a usage store
/// that dies with the process, shutdown does not report success while windows wait.
#[tokio::test]
async fn windows_that_wait_too_long_are_parked_and_shutdown_does_not_drop_them() {
    let directory = Arc::new(common::Faulty::default());
    let record = tollgate::store::TenantRecord::new("x".into(), "p".into()).with_customer("cus_x");
    directory.put_tenant(&record, &[]).await.unwrap();
    *directory.unreadable_tenants.lock().unwrap() = Some("x".into());
    let usage = Arc::new(MemoryStore::new());
    let day = 86_400;
    let records = vec![
        tollgate::store::UsageRecord::new("x".into(), "requests".into(), NOON - 35 * day, 3),
        tollgate::store::UsageRecord::new("x".into(), "requests".into(), NOON, 4),
    ];
    usage.commit_usage(&tollgate::store::UsageBatch::new(tollgate::store::FlushId::new("f"), records)).await.unwrap();
    let sink = Arc::new(Recording::default());
    let (clock, _handle) = Clock::fake_at_unix(NOON + 3600 + 300);
    let config = "[usage]\nwindow = \"1h\"\ngrace = \"5m\"\nshutdown_timeout = \"1s\"\n[plans.p]\n";
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(config).unwrap())
        .store_arc(usage.clone())
        .directory_store(directory.clone())
        .clock(clock)
        .billing_sink(Shared(sink.clone()))
        .build();
    let report = engine.export().await.unwrap();
    assert_eq!((report.events, report.dead_letters, report.waiting), (0, 1, 1), "{report:?}");
    let parked = usage.dead_letters(None, 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].key.window_start, parked[0].units), (NOON - 35 * day, 3));
    assert!(parked[0].reason.contains("could not be read"), "{}", parked[0].reason);

    // The memory store dies with the process: the waiting window makes shutdown fail (after
    // retrying until usage.shutdown_timeout), loudly.
    let err = engine.shutdown().await.unwrap_err();
    assert!(err.to_string().contains("wait for their tenant's billing customer"), "{err}");
    assert!(sink.events.lock().unwrap().is_empty());
}

/// The same mixed setup named by the file: `[store.directory]` a SQLite file, every other role
/// `[store]`'s memory. `Admin::open` (what the `tollgate` command runs) writes the tenant, its
/// customer and its key to the directory's file; `Builder::open` serves the key from it and
/// exports the window with that customer; a reload that moves the directory is refused.
#[tokio::test]
async fn a_directory_named_by_the_file_is_used_by_admin_and_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("directory.db");
    let toml = format!(
        "[store]\nkind = \"memory\"\n\n[store.directory]\nkind = \"sqlite\"\npath = {:?}\n\n\
         [usage]\nwindow = \"1h\"\ngrace = \"5m\"\n[plans.p]\nrate = \"100/s\"\n",
        db.display().to_string()
    );
    let config = Config::from_toml_str(&toml).unwrap();
    let admin = tollgate::admin::Admin::open(&config).await.unwrap();
    admin.add_tenant("acme", "p", Some("cus_file")).await.unwrap();
    let key = admin.issue_key("acme", tollgate::admin::KeyOptions::default()).await.unwrap();

    let sink = Arc::new(Recording::default());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) =
        Tollgate::builder(config.clone()).clock(clock).billing_sink(Shared(sink.clone())).open().await.unwrap();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine.clone()), handle);
    assert_eq!(h.status("/", &key.key).await, 200);
    assert_eq!(h.status("/", &key.key).await, 200);
    engine.flush().await.unwrap();
    h.clock.advance(Duration::from_secs(3600 + 300));
    assert_eq!(engine.export().await.unwrap().events, 1);
    assert_eq!(sink.events.lock().unwrap()[0].customer.as_deref(), Some("cus_file"));
    // The directory is the file; usage is in the memory store, not in the file.
    assert!(format!("{:?}", engine.directory_store()).contains("directory.db"));
    assert!(!format!("{:?}", engine.usage_store()).contains("directory.db"));
    let file = tollgate::store::SqliteStore::open(&db).await.unwrap();
    assert!(file.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().is_empty());
    assert_eq!(common::committed(&**engine.usage_store(), "acme", "requests", NOON, NOON + 3600, 3600).await, 2);

    // A reload that moves the directory elsewhere is refused, naming the role's section.
    let moved = toml.replace("directory.db", "other.db");
    let err = engine.reload(Config::from_toml_str(&moved).unwrap()).await.unwrap_err();
    assert_eq!((err.key(), err.line(), err.kind()), ("store.directory", Some(4), ConfigErrorKind::Conflict));
}

#[tokio::test]
async fn closed_windows_are_exported_once_and_late_usage_as_a_new_revision() {
    let sink = Arc::new(Recording { refuse: Some("bad"), ..Default::default() });
    let (h, exporter) = engine_with_sink(EXPORT, sink.clone());
    for _ in 0..3 {
        h.get("/tokens/10", "key-acme").await;
    }
    h.get("/", "key-bad").await;
    h.tollgate.flush().await.unwrap();
    // The 12:00 window is open: nothing is exported.
    assert_eq!(exporter.export().await.unwrap().events, 0);
    h.clock.advance(Duration::from_secs(3600 + 299));
    assert_eq!(exporter.export().await.unwrap().events, 0, "still in the grace period");
    h.clock.advance(Duration::from_secs(1));
    let report = exporter.export().await.unwrap();
    assert_eq!((report.events, report.units, report.dead_letters), (2, 33, 1));
    let events = sink.events.lock().unwrap().clone();
    assert_eq!(events.len(), 2);
    let requests = events.iter().find(|e| e.meter.as_str() == "requests").unwrap();
    let tokens = events.iter().find(|e| e.meter.as_str() == "tokens").unwrap();
    assert_eq!((requests.value, tokens.value), (3, 30));
    assert_eq!(tokens.event_name, "llm_tokens");
    assert_eq!(tokens.customer.as_deref(), Some("cus_123"));
    assert_eq!((tokens.window_start, tokens.window_end, tokens.timestamp), (NOON, NOON + 3600, NOON + 3599));
    // On a store that does not outlive the process, identifiers are salted per store: a
    // restarted process never reuses one.
    assert_ne!(tokens.identifier, tollgate::billing::identifier(&"acme".into(), &"tokens".into(), NOON, 0));
    assert!(tokens.identifier.starts_with("tg_") && tokens.identifier.len() == 43);
    // Exported once: a second export sends nothing.
    assert_eq!(exporter.export().await.unwrap().events, 0);
    assert_eq!(exporter.stats().dead_letters, 1);

    // Late usage for the 12:00 window (recorded then, flushed now) becomes revision 1.
    commit_late_tokens(&h, 7).await;
    assert_eq!(exporter.export().await.unwrap().units, 7);
    let last = sink.events.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.value, last.revision), (7, 1));
    assert_ne!(last.identifier, tokens.identifier);
}

#[tokio::test]
async fn a_lost_acknowledgement_resends_the_same_event() {
    let sink = Arc::new(Recording { lose_acks: AtomicUsize::new(1), ..Default::default() });
    let (h, exporter) = engine_with_sink(EXPORT, sink.clone());
    h.get("/tokens/10", "key-acme").await;
    h.tollgate.flush().await.unwrap();
    h.clock.advance(Duration::from_secs(2 * 3600));
    let first = exporter.export().await.unwrap();
    assert!(first.deferred);
    // Retried only once its next-attempt time has come.
    assert_eq!(exporter.export().await.unwrap().events, 0, "waits for its next attempt");
    // Late usage arrives between the lost acknowledgement and the retry.
    h.clock.set_unix(NOON + 2 * 3600 + 60);
    commit_late_tokens(&h, 5).await;
    while exporter.export().await.unwrap().events > 0 {}
    let events = sink.events.lock().unwrap().clone();
    let tokens: Vec<_> = events.iter().filter(|e| e.meter.as_str() == "tokens").collect();
    // The retry re-sends exactly what was sent (same identifier, same value): the receiver
    // de-duplicates it; the late 5 go as the next revision.
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!((tokens[0].value, tokens[2].value, tokens[2].revision), (10, 5, 1));
    let distinct: std::collections::HashSet<_> = tokens.iter().map(|e| (&e.identifier, e.value)).collect();
    assert_eq!(distinct.iter().map(|(_, v)| v).sum::<u64>(), 15, "after de-duplication: everything, once");
}

#[tokio::test]
async fn the_jsonl_sink_writes_what_would_be_billed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.jsonl");
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(EXPORT).unwrap();
    let (engine, worker) = Tollgate::builder(config).clock(clock).billing_sink(JsonlSink::new(&path)).build();
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    let tollgate = layer.handle().clone();
    let running = tokio::spawn(worker.run());
    let svc = tower::Layer::layer(
        &layer,
        tower::service_fn(
            |_req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<bytes::Bytes>>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
            },
        ),
    );
    for _ in 0..4 {
        let r = tower::ServiceExt::oneshot(svc.clone(), req("GET", "/", Some("key-acme"), None)).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    fake.advance(Duration::from_secs(3 * 3600));
    let report = tollgate.shutdown().await.unwrap();
    assert_eq!((report.flush.units, report.export.events), (4, 1));
    running.await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    let e = &lines[0];
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["customer"], "cus_123");
    assert_eq!(e["meter"], "requests");
    assert_eq!(e["event_name"], "requests");
    assert_eq!(e["value"], 4);
    assert_eq!(e["revision"], 0);
    assert_eq!(e["window_start"], NOON);
    assert!(e["identifier"].as_str().unwrap().starts_with("tg_"));
}

/// A batch whose commit landed but whose answers were lost is retried with its flush id only
/// while the store surely remembers it: after waiting longer than that (the store kept failing
/// for five weeks), it is dropped and counted, never committed again under an id the store may
/// have forgotten (which would count it twice).
#[tokio::test]
async fn a_batch_is_never_retried_after_the_store_may_have_forgotten_its_id() {
    let faulty = Arc::new(common::Faulty::default());
    let h = Harness::with_store(&tenants_config(1, ""), faulty.clone(), NOON);
    for _ in 0..5 {
        assert_eq!(h.status("/", "key-0").await, 200);
    }
    // Every attempt's answer is lost (the first lands).
    faulty.lose_commit_answers.store(3, Ordering::SeqCst);
    assert!(h.tollgate.flush().await.is_err());
    assert_eq!(common::committed(&*faulty, "t0", "requests", NOON - 3600, NOON + 3600, 3600).await, 5);
    // A day later it is retried, and answered as applied already.
    h.clock.advance(Duration::from_secs(86_400));
    faulty.lose_commit_answers.store(3, Ordering::SeqCst);
    assert!(h.tollgate.flush().await.is_err());
    assert_eq!(h.tollgate.stats().dropped_units, 0, "retried, not dropped");
    // Five weeks on: past what the store keeps flush ids for. Dropped, counted, not sent.
    h.clock.advance(Duration::from_secs(35 * 86_400));
    h.tollgate.flush().await.unwrap();
    assert_eq!(h.tollgate.stats().dropped_units, 5);
    assert_eq!(common::committed(&*faulty, "t0", "requests", NOON - 3600, NOON + 3600, 3600).await, 5, "counted once");
}

/// A sink whose first answer is lost (the call may have been taken) and whose second says the
/// billing system holds the identifier already: the answer Stripe gives a re-send once it
/// forgot the idempotency key.
#[derive(Debug, Default)]
struct HeldAfterALostAnswer {
    calls: std::sync::atomic::AtomicU32,
    identifiers: Mutex<Vec<String>>,
}

#[derive(Debug)]
struct HeldSink(Arc<HeldAfterALostAnswer>);

#[async_trait]
impl BillingSink for HeldSink {
    async fn send(&self, e: &MeterEvent) -> Result<(), SinkError> {
        self.0.identifiers.lock().unwrap().push(e.identifier.clone());
        match self.0.calls.fetch_add(1, Ordering::SeqCst) {
            0 => Err(SinkError::Unknown("the answer was lost".into())),
            _ => Err(SinkError::AlreadyHeld(format!("An event already exists with identifier {}.", e.identifier))),
        }
    }
}

/// "Already exists" answered to a re-send of a revision an earlier attempt of which may have
/// reached the billing system, in a store with a namespace: that attempt's, delivered, marked
/// exported under the same identifier. Answered to a first attempt (a copy of the store, a
/// restored backup), it is parked for reconciliation (tests/billing/stripe.rs).
#[tokio::test]
async fn already_held_after_an_attempt_that_may_have_reached_is_delivered() {
    let sink = Arc::new(HeldAfterALostAnswer::default());
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(&tenants_config(1, "[usage]\nwindow = \"1h\"\ngrace = \"1m\"\n")).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (engine, _worker) =
        Tollgate::builder(config).store_arc(store.clone()).clock(clock).billing_sink(HeldSink(sink.clone())).build();
    let t0 = tollgate::config::TenantId::from("t0");
    engine
        .record_event(tollgate::events::Event::new(
            "e1",
            t0,
            "requests".into(),
            3,
            std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(NOON as u64),
        ))
        .await
        .unwrap();
    handle.set_unix(NOON + 2 * 3600);
    let first = engine.export().await.unwrap();
    assert_eq!((first.events, first.retries), (0, 1), "{first:?}");
    handle.set_unix(NOON + 4 * 3600);
    let second = engine.export().await.unwrap();
    assert_eq!((second.events, second.units, second.dead_letters), (1, 3, 0), "{second:?}");
    let ids = sink.identifiers.lock().unwrap().clone();
    assert!(ids.len() == 2 && ids[0] == ids[1], "the same identifier: {ids:?}");
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
}

/// Background work's store calls are bounded by `limits.background_timeout`: an export pass
/// and `Admin` end with the store's timeout rather than wait on a store that hangs (on main
/// they waited for good); a reload moves the bound, and `Admin` on stores alone takes its
/// configuration's.
#[tokio::test]
async fn background_store_calls_are_bounded_by_background_timeout() {
    use tollgate::{
        admin::{Admin, AdminError},
        store::StoreError,
    };
    let ms = Duration::from_millis;
    let bounded = |d: Duration| move |e: &StoreError| matches!(e, StoreError::Timeout(t) if *t == d);
    let store = Arc::new(common::Faulty::default());
    let config = |limit: &str| {
        Config::from_toml_str(&format!("[limits]\nbackground_timeout = \"{limit}\"\n[plans.p]\n")).unwrap()
    };
    let (engine, _worker) = Tollgate::builder(config("300ms"))
        .store_arc(store.clone())
        .billing_sink(Shared(Arc::new(Recording::default())))
        .build();
    store.hang.store(true, Ordering::SeqCst);

    let e = tokio::time::timeout(Duration::from_secs(60), engine.export())
        .await
        .expect("the export pass ends")
        .unwrap_err();
    assert!(bounded(ms(300))(&e), "{e:?}");
    let admin = Admin::for_engine(&engine);
    match tokio::time::timeout(Duration::from_secs(60), admin.tenants()).await.expect("Admin's call ends") {
        Err(AdminError::Store(e)) => assert!(bounded(ms(300))(&e), "{e:?}"),
        other => panic!("{other:?}"),
    }
    let errors = engine.stats().store_errors;
    assert!(errors >= 2, "each counted: {errors}");

    engine.reload(config("400ms")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), engine.export())
        .await
        .expect("the export pass ends")
        .unwrap_err();
    assert!(bounded(ms(400))(&e), "{e:?}");

    let alone = Admin::new(store.clone()).with_config(config("200ms"));
    match tokio::time::timeout(Duration::from_secs(60), alone.tenants()).await.expect("Admin's call ends") {
        Err(AdminError::Store(e)) => assert!(bounded(ms(200))(&e), "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Nothing failed fast: background calls never do.
    assert_eq!(engine.stats().store_fast_failures, 0);
}
