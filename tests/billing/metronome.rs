//! The Metronome export end to end: requests through the layer, the store, the shared
//! exporter, the real `MetronomeSink` (reqwest over rustls) and a local Metronome stand-in
//! (`common::metronome`) that follows Metronome's documented rules. On every store, with faults
//! at each hop (a flush whose answer is lost, 500s, a 429 with `Retry-After`, an error body that
//! is not JSON, dropped connections, a crash between send and mark, two nodes exporting at
//! once), the stand-in's totals equal the billable usage: nothing lost, nothing doubled.
#![cfg(feature = "metronome")]

use crate::common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::{
    metronome::{Fault, StandIn, TOKEN},
    Faulty, Harness, NOON,
};
use tollgate::{
    billing::{MetronomeSink, Secret},
    clock::{Clock, FakeClock},
    store::{FlushId, StoreInspect, UsageBatch, UsageRecord},
    Config, Tollgate, TollgateLayer,
};

use super::stripe::{sigkill, Backend, Kind};

const MIN: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn config(url: &str) -> String {
    format!(
        r#"
[usage]
window = "15m"
grace = "5m"
flush_interval = "10s"
[export]
sink = "metronome"
calls_per_second = 1000
concurrency = 4
unconfirmed_after = "30d"
[meters.requests]
event_name = "api_requests"
[meters.tokens]
event_name = "llm_tokens"
[plans.p]
[tenants.acme]
plan = "p"
keys = ["key-acme"]
metronome_customer = "acme-account"
[tenants.globex]
plan = "p"
keys = ["key-globex"]
metronome_customer = "globex-account"
stripe_customer = "cus_globex"
[tenants.hobby]
plan = "p"
keys = ["key-hobby"]
stripe_customer = "cus_hobby"
[metronome]
api_base = "{url}"
timeout = "60s"
"#
    )
}

fn sink(config: &Config) -> MetronomeSink {
    let m = config.metronome().unwrap();
    MetronomeSink::new(&Secret::new(TOKEN), m.api_base.as_deref(), m.timeout).unwrap()
}

/// A node: an engine with the Metronome sink over `store`, on a fake clock at `at`.
fn node(toml: &str, store: Arc<dyn StoreInspect>, at: i64) -> Harness {
    let config = Config::from_toml_str(toml).unwrap();
    let (clock, fake) = Clock::fake_at_unix(at);
    let sink = sink(&config);
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).billing_sink(sink).build();
    Harness::from_layer(TollgateLayer::new(engine), fake)
}

fn at(clock: &FakeClock, standin: &StandIn, unix: i64) {
    clock.set_unix(unix);
    standin.set_now(unix);
}

/// What the test sent and expects billed: (Metronome customer, event type) → units.
#[derive(Default)]
struct Billable(BTreeMap<(String, String), i64>);

impl Billable {
    async fn send(&mut self, h: &Harness, tenant: &str, path: &str, n: usize) {
        for _ in 0..n {
            assert_eq!(h.status(path, &format!("key-{tenant}")).await, 200);
        }
        // hobby has a Stripe customer but no Metronome one: not billed by this sink.
        let customer = match tenant {
            "hobby" => return,
            t => format!("{t}-account"),
        };
        *self.0.entry((customer.clone(), "api_requests".into())).or_default() += n as i64;
        if let Some(tokens) = path.strip_prefix("/tokens/") {
            let tokens: i64 = tokens.parse().unwrap();
            *self.0.entry((customer, "llm_tokens".into())).or_default() += n as i64 * tokens;
        }
    }
}

async fn drain(nodes: &[&Harness], standin: &StandIn, mut now: i64) -> i64 {
    for _ in 0..40 {
        for n in nodes {
            n.tollgate.export().await.unwrap();
        }
        let pending = nodes[0].tollgate.usage_store().pending_exports(i64::MAX, None, 10).await.unwrap();
        if pending.is_empty() {
            return now;
        }
        now += 2 * MIN;
        for n in nodes {
            at(&n.clock, standin, now);
        }
    }
    panic!("exports still pending after 40 passes");
}

const CHILD: &str = "TOLLGATE_METRONOME_CHILD";

/// In a child process: export on the store the parent names, then hang in the call the
/// stand-in never answers, until killed.
async fn child() -> bool {
    let Ok(kind) = std::env::var(CHILD) else { return false };
    let toml = std::fs::read_to_string(std::env::var("TG_CONFIG").unwrap()).unwrap();
    let now: i64 = std::env::var("TG_NOW").unwrap().parse().unwrap();
    let store: Arc<dyn StoreInspect> = match kind.as_str() {
        "sqlite" => Arc::new(tollgate::store::SqliteStore::open(std::env::var("TG_DB").unwrap()).await.unwrap()),
        "postgres" => {
            super::stripe::reopen_postgres(&(std::env::var("TG_ENDPOINT").unwrap(), std::env::var("TG_TABLE").unwrap()))
                .await
        }
        _ => super::stripe::reopen_dynamo(&(std::env::var("TG_ENDPOINT").unwrap(), std::env::var("TG_TABLE").unwrap())),
    };
    let h = node(&toml, store, now);
    let report = h.tollgate.export().await;
    panic!("the export should hang until the process is killed: {report:?}");
}

/// The crash between send and mark: the batch reaches the stand-in, which takes its events and
/// never answers; the exporter dies there (SIGKILL for a durable store; the engine dropped
/// mid-call for the memory store).
async fn crash_between_send_and_mark(b: &Backend, test: &str, toml: &str, now: i64, standin: &StandIn) {
    let before = standin.events().len();
    standin.fail_next(&[Fault::TakeAndHang]);
    match b.kind {
        Kind::Memory => {
            let h = node(toml, b.store.clone(), now);
            let export = tokio::time::timeout(Duration::from_secs(3), h.tollgate.export()).await;
            assert!(export.is_err(), "the call hangs: {export:?}");
            drop(h);
        }
        Kind::Sqlite | Kind::Dynamo | Kind::Postgres => {
            let path = b.dir.path().join("config.toml");
            std::fs::write(&path, toml).unwrap();
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            let kind = match b.kind {
                Kind::Sqlite => "sqlite",
                Kind::Postgres => "postgres",
                _ => "dynamodb",
            };
            cmd.args([&common::test_name(module_path!(), test), "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, kind)
                .env("TG_CONFIG", &path)
                .env("TG_NOW", now.to_string())
                .env("TG_DB", b.dir.path().join("t.db"))
                .stdout(std::process::Stdio::null());
            if let Some((endpoint, table)) = &b.table {
                cmd.env("TG_ENDPOINT", endpoint).env("TG_TABLE", table);
            }
            let child = cmd.spawn().unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while standin.events().len() == before {
                assert!(tokio::time::Instant::now() < deadline, "the child never sent");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sigkill(child);
        }
    }
    assert!(standin.events().len() > before, "the batch was taken before the crash");
}

async fn exactly_once_through_faults(kind: Kind, test: &str) {
    if child().await {
        return;
    }
    let Some(b) = Backend::new(kind).await else { return };
    let standin = StandIn::start().await;
    let toml = config(&standin.url);
    let mut billable = Billable::default();

    // Usage of two 15-minute windows; the first flush's answer is lost (retried, same id).
    let faulty = Arc::new(Faulty::over(b.store.clone()));
    faulty.lose_commit_answers.store(1, std::sync::atomic::Ordering::SeqCst);
    let a = node(&toml, faulty.clone(), NOON);
    at(&a.clock, &standin, NOON);
    billable.send(&a, "acme", "/", 20).await;
    billable.send(&a, "acme", "/tokens/7", 3).await;
    billable.send(&a, "globex", "/", 10).await;
    billable.send(&a, "hobby", "/", 5).await;
    a.tollgate.flush().await.unwrap();
    assert_eq!(faulty.lose_commit_answers.load(std::sync::atomic::Ordering::SeqCst), 0, "an answer was lost");
    at(&a.clock, &standin, NOON + 20 * MIN);
    billable.send(&a, "acme", "/", 20).await;
    billable.send(&a, "acme", "/tokens/5", 2).await;
    billable.send(&a, "globex", "/", 15).await;
    a.tollgate.flush().await.unwrap();

    // Both windows closed. 500s, a 429 asking for 30 s, an error body that is not JSON and a
    // dropped connection, each for a whole batch; nothing is taken until they pass.
    let mut now = NOON + HOUR + 5 * MIN;
    at(&a.clock, &standin, now);
    standin.fail_next(&[
        Fault::Status(500),
        Fault::RateLimited(30),
        Fault::NotJson(502),
        Fault::Drop,
        Fault::Status(503),
    ]);
    let first = a.tollgate.export().await.unwrap();
    assert_eq!((first.events, first.retries), (0, 6), "the six aggregates went in one call: {first:?}");
    assert_eq!(standin.calls(), 1);
    now += 5;
    at(&a.clock, &standin, now);
    let second = a.tollgate.export().await.unwrap();
    assert_eq!((second.events, second.retries), (0, 6), "{second:?}");
    // The 429's `Retry-After` is honoured: nothing is retried before 30 s.
    let pending = a.tollgate.usage_store().pending_exports(i64::MAX, None, 10).await.unwrap();
    assert_eq!(pending.len(), 6);
    assert!(pending.iter().all(|p| p.claimed_until.is_some_and(|t| t >= now + 30)), "{pending:?}");
    // Then Metronome takes the batch but answers 502 (a gateway gave up): re-sent under the
    // same transaction ids, ignored.
    standin.fail_next(&[Fault::TakeAndFail(502)]);
    now = drain(&[&a], &standin, now).await;
    assert_eq!(standin.totals(), billable.0);
    assert!(standin.batch_sizes().iter().any(|&n| n > 1), "events went in batches: {:?}", standin.batch_sizes());
    assert_eq!(standin.duplicates(), 6, "the batch taken before the 502 was sent again and ignored");

    // A crash between send and mark: the batch reached Metronome, the marks did not reach the
    // store. Another node re-sends it under the same transaction ids, which Metronome ignores.
    now += HOUR;
    at(&a.clock, &standin, now);
    billable.send(&a, "acme", "/", 4).await;
    billable.send(&a, "globex", "/tokens/3", 2).await;
    a.tollgate.flush().await.unwrap();
    drop(a);
    now += 20 * MIN;
    standin.set_now(now);
    crash_between_send_and_mark(&b, test, &toml, now, &standin).await;
    let taken = standin.events().len();
    // The claim of the dead exporter holds 5 minutes; then a new node takes over.
    now += 6 * MIN;
    let c = node(&toml, b.reopen().await, now);
    at(&c.clock, &standin, now);
    now = drain(&[&c], &standin, now).await;
    assert_eq!(standin.duplicates(), 6 + 3, "the three events taken before the crash were re-sent and ignored");
    assert_eq!(standin.events().len(), taken, "nothing new was taken on the re-send");
    assert_eq!(standin.totals(), billable.0, "the crash doubled nothing");

    // Two nodes export at once over one store.
    let d = node(&toml, b.reopen().await, now);
    for n in [&c, &d] {
        at(&n.clock, &standin, now);
        for t in ["acme", "globex"] {
            billable.send(n, t, "/", 3).await;
            billable.send(n, t, "/tokens/2", 2).await;
        }
        n.tollgate.flush().await.unwrap();
    }
    now += HOUR + 6 * MIN;
    for n in [&c, &d] {
        at(&n.clock, &standin, now);
    }
    let duplicates = standin.duplicates();
    let (x, y) = tokio::join!(c.tollgate.export(), d.tollgate.export());
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.events + y.events, 4, "each aggregate once, by one node or the other: {x:?} {y:?}");
    assert_eq!(standin.duplicates(), duplicates, "claims kept the two nodes off each other's aggregates");
    drain(&[&c, &d], &standin, now).await;
    assert_eq!(standin.totals(), billable.0, "two exporters doubled nothing");
    let dead = c.tollgate.usage_store().dead_letters(None, 10).await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metronome_exactly_once_through_faults_on_memory() {
    exactly_once_through_faults(Kind::Memory, "metronome_exactly_once_through_faults_on_memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metronome_exactly_once_through_faults_on_sqlite() {
    exactly_once_through_faults(Kind::Sqlite, "metronome_exactly_once_through_faults_on_sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metronome_exactly_once_through_faults_on_dynamodb() {
    exactly_once_through_faults(Kind::Dynamo, "metronome_exactly_once_through_faults_on_dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metronome_exactly_once_through_faults_on_postgres() {
    exactly_once_through_faults(Kind::Postgres, "metronome_exactly_once_through_faults_on_postgres").await;
}

/// Commits `quantity` units of `tenant`'s `meter` in the window starting at `window`.
async fn late(store: &dyn StoreInspect, id: &str, tenant: &str, meter: &str, window: i64, quantity: u64) {
    let batch =
        UsageBatch::new(FlushId::new(id), vec![UsageRecord::new(tenant.into(), meter.into(), window, quantity)]);
    store.commit_usage(&batch).await.unwrap();
}

/// A batch Metronome refuses for one bad event is bisected: the halves go again under the same
/// transaction ids until the refused event is alone, which is dead-lettered; every other event
/// is taken once, a half that fails with a 503 meanwhile is retried later. The bad event here is
/// one Metronome's clock finds more than 34 days old (its clock two hours ahead of the node's),
/// a documented refusal. Metronome's horizon is its own: 34 days, not Stripe's 35.
async fn a_refused_event_is_found_by_bisection_and_old_windows_meet_metronome_s_horizon(kind: Kind) {
    let Some(b) = Backend::new(kind).await else { return };
    let standin = StandIn::start().await;
    let mut tenants = String::new();
    for i in 0..9 {
        tenants.push_str(&format!("[tenants.t{i}]\nplan = \"p\"\nmetronome_customer = \"acct-{i}\"\n"));
    }
    let toml = config(&standin.url).replace("[metronome]", &format!("{tenants}[metronome]"));
    let h = node(&toml, b.store.clone(), NOON);
    h.clock.set_unix(NOON);
    standin.set_now(NOON + 2 * HOUR);
    for i in 0..9 {
        late(&*b.store, &format!("f{i}"), &format!("t{i}"), "requests", NOON - HOUR, 10 + i).await;
    }
    // 34 days less 1.5 hours old by the node's clock (sent), 34.5 days by Metronome's (refused).
    let skewed = NOON - 34 * DAY + HOUR + 15 * MIN;
    late(&*b.store, "skew", "t4", "requests", skewed, 5).await;
    // 34.5 days old by the node's clock: past Metronome's horizon (within Stripe's 35 days).
    late(&*b.store, "old", "t0", "requests", NOON - 34 * DAY - 12 * HOUR, 5).await;
    // The first call is refused (a 400 injected), its first half then meets a 503: that half
    // is retried later, the second half goes through.
    standin.fail_next(&[Fault::Status(400), Fault::Status(503)]);
    let r = h.tollgate.export().await.unwrap();
    assert_eq!((r.events, r.dead_letters, r.retries), (5, 1, 5), "{r:?}");
    // The retried half holds the skewed event: refused by Metronome itself, bisected to it.
    h.clock.set_unix(NOON + 10 * MIN);
    let r = h.tollgate.export().await.unwrap();
    assert_eq!((r.events, r.dead_letters, r.retries), (4, 1, 0), "{r:?}");
    let totals = standin.totals();
    assert_eq!(totals.len(), 9, "{totals:?}");
    assert_eq!(totals.values().sum::<i64>(), (10..19).sum::<i64>(), "the skewed window alone is missing");
    assert_eq!(standin.duplicates(), 0, "no event was taken twice while bisecting");
    let dead = h.tollgate.usage_store().dead_letters(None, 10).await.unwrap();
    let reasons: Vec<(i64, &str)> = dead.iter().map(|d| (d.key.window_start, d.reason.as_str())).collect();
    assert!(
        reasons.iter().any(|(w, r)| *w == skewed && r.starts_with("refused: 400") && r.contains("34 days")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|(_, r)| r.starts_with("too old") && r.contains("34 days")), "{reasons:?}");
}

macro_rules! on_every_store {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(Kind::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dynamodb() {
                super::$name(Kind::Dynamo).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(Kind::Postgres).await;
            }
        }
    };
}

on_every_store!(a_refused_event_is_found_by_bisection_and_old_windows_meet_metronome_s_horizon);

/// A refused token stops the pass and parks nothing; the next pass with the right token sends.
#[tokio::test]
async fn a_refused_token_stops_the_pass_and_parks_nothing() {
    let standin = StandIn::start().await;
    let toml = config(&standin.url);
    let config = Config::from_toml_str(&toml).unwrap();
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let wrong = MetronomeSink::new(
        &Secret::new("mtr_wrong"),
        config.metronome().unwrap().api_base.as_deref(),
        Duration::from_secs(5),
    )
    .unwrap();
    let (engine, _w) =
        Tollgate::builder(config.clone()).store_arc(store.clone()).clock(clock).billing_sink(wrong).build();
    let h = Harness::from_layer(TollgateLayer::new(engine), fake);
    at(&h.clock, &standin, NOON);
    h.status("/", "key-acme").await;
    h.status("/", "key-globex").await;
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR);
    let r = h.tollgate.export().await.unwrap();
    assert!(r.halted && r.dead_letters == 0 && r.events == 0, "{r:?}");
    let right = node(&toml, store, NOON + HOUR);
    let r = right.tollgate.export().await.unwrap();
    assert_eq!(r.events, 2, "{r:?}");
    assert_eq!(standin.totals().values().sum::<i64>(), 2);
}

/// The configuration: Metronome's rules at load, naming file, line and key.
#[test]
fn metronome_settings_are_checked_at_load() {
    let ok = config("http://127.0.0.1:9/");
    let c = Config::from_toml_str(&ok).unwrap();
    assert_eq!(c.export().sink, Some(tollgate::config::SinkKind::Metronome));
    assert_eq!(c.export().unconfirmed_after, Duration::from_secs(30 * DAY as u64));
    assert_eq!(c.tenants()[0].metronome_customer(), Some("acme-account"));
    let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
    // A pre-aggregated meter is Stripe's notion.
    let e = err(&ok.replace("event_name = \"llm_tokens\"", "event_name = \"llm_tokens\"\naggregation = \"hour\""));
    assert!(e.contains("meters.tokens.aggregation") && e.contains("metronome"), "{e}");
    // Metronome's 34 days bound unconfirmed_after; Stripe's 24 hours bound it without it.
    let e = err(&ok.replace("\"30d\"", "\"34d\""));
    assert!(e.contains("export.unconfirmed_after") && e.contains("33 days"), "{e}");
    let e = err(&ok.replace("sink = \"metronome\"\n", ""));
    assert!(e.contains("export.unconfirmed_after") && e.contains("23 hours"), "{e}");
    let e = err(&ok.replace("sink = \"metronome\"", "sink = \"metronom\""));
    assert!(e.contains("export.sink") && e.contains("metronom"), "{e}");
    let e = err(&ok.replace("sink = \"metronome\"", "sink = \"jsonl\"").replace("\"30d\"", "\"1h\""));
    assert!(e.contains("export.sink") && e.contains("export.file"), "{e}");
    let e = err(&ok
        .replace("sink = \"metronome\"", "sink = \"stripe\"")
        .replace("\"30d\"", "\"1h\"")
        .replace("[metronome]\napi_base = \"http://127.0.0.1:9/\"\ntimeout = \"60s\"\n", ""));
    assert!(e.contains("[stripe]"), "{e}");
    let e = err(&ok.replace("api_base = \"http://127.0.0.1:9/\"", "api_base = \"http://127.0.0.1:9/v1\""));
    assert!(e.contains("metronome.api_base"), "{e}");
    let e = err(&ok.replace("timeout = \"60s\"", "timeout = \"200s\""));
    assert!(e.contains("export.claim") && e.contains("metronome.timeout"), "{e}");
    let e = err(&ok.replace("metronome_customer = \"globex-account\"", "metronome_customer = \"acme-account\""));
    assert!(e.contains("tenants.globex.metronome_customer") && e.contains("acme"), "{e}");
    let e = err(&ok.replace("[metronome]", "[metronome]\napi_token = \"x\""));
    assert!(e.contains("api_token"), "{e}");
    // Without the section, Metronome's defaults: a 30 s timeout the claim must outlast, and
    // unconfirmed exports re-sent for 33 days.
    let bare = ok.replace("[metronome]\napi_base = \"http://127.0.0.1:9/\"\ntimeout = \"60s\"\n", "");
    let c = Config::from_toml_str(&bare.replace("unconfirmed_after = \"30d\"\n", "")).unwrap();
    assert!(c.metronome().is_none());
    assert_eq!(c.export().unconfirmed_after, Duration::from_secs(33 * DAY as u64));
    let e = err(&bare.replace("concurrency = 4", "concurrency = 4\nclaim = \"50s\""));
    assert!(e.contains("export.claim") && e.contains("metronome.timeout"), "{e}");
    // A [metronome] section is for the Metronome sink.
    let e = err(&ok.replace("sink = \"metronome\"\n", "").replace("\"30d\"", "\"1h\""));
    assert!(e.contains("metronome") && e.contains("export.sink"), "{e}");
    let e = err(&ok.replace("timeout = \"60s\"", "timeout = \"500ms\""));
    assert!(e.contains("metronome.timeout"), "{e}");
    let e = err(&ok.replace("\"acme-account\"", "\" acme-account\""));
    assert!(e.contains("tenants.acme.metronome_customer"), "{e}");
}

/// With a `[stripe]` section beside the Metronome sink (plan changes by Stripe webhooks), a
/// late revision keeps its window's time: Stripe's invoice-grace restamping is Stripe's.
#[tokio::test]
async fn late_revisions_keep_their_window_s_time_in_metronome() {
    let standin = StandIn::start().await;
    let toml = config(&standin.url).replace("[metronome]", "[stripe]\ninvoice_grace = \"1h\"\n[metronome]");
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    h.status("/", "key-acme").await;
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR);
    assert_eq!(h.tollgate.export().await.unwrap().events, 1);
    // Late usage of the 12:00 window, exported five hours after it (past the grace).
    late(&*store, "late", "acme", "requests", NOON, 2).await;
    at(&h.clock, &standin, NOON + 5 * HOUR);
    assert_eq!(h.tollgate.export().await.unwrap().events, 1);
    let stamps: Vec<(i64, i64)> = standin.events().iter().map(|e| (e.timestamp, e.value)).collect();
    assert_eq!(stamps, [(NOON + 15 * MIN - 1, 1), (NOON + 15 * MIN - 1, 2)], "both in the window");
}

/// An attempt that may have been taken (Metronome took it and answered 503) and then ran past
/// the horizon is parked `unconfirmed`, never `too old … bill it by hand`: reconciliation looks
/// at it where the sink can be read back, and a person checks the billing system before
/// billing anything by hand.
#[tokio::test]
async fn a_possibly_taken_attempt_past_the_horizon_is_parked_unconfirmed() {
    let standin = StandIn::start().await;
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&config(&standin.url), store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    // 34 days less 2 hours old: within the 34 days less an hour Metronome takes.
    let window = NOON - 34 * DAY + 2 * HOUR;
    late(&*store, "w", "acme", "requests", window, 7).await;
    standin.fail_next(&[Fault::TakeAndFail(503)]);
    let r = h.tollgate.export().await.unwrap();
    assert_eq!((r.events, r.dead_letters), (0, 0), "{r:?}");
    assert_eq!(standin.totals().values().sum::<i64>(), 7, "taken, though answered 503");
    // Two hours later it is past the horizon, still unconfirmed.
    at(&h.clock, &standin, NOON + 2 * HOUR);
    h.tollgate.export().await.unwrap();
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("unconfirmed"), "{}", dead[0].reason);
    assert!(!dead[0].reason.contains("by hand"), "{}", dead[0].reason);
    assert_eq!(standin.totals().values().sum::<i64>(), 7, "never sent again");
}

/// Metronome cannot be read back, so it is not reconciled: the engine says so once, at build
/// (not as a warning every `reconcile_interval`), and a Stripe sink is not said to be.
#[test]
fn metronome_is_said_at_build_not_to_be_reconciled() {
    let (lines, _guard) = crate::common::Lines::capture();
    let config = Config::from_toml_str(&config("http://127.0.0.1:9/")).unwrap();
    let (_engine, _worker) = Tollgate::builder(config.clone()).billing_sink(sink(&config)).build();
    let logged = String::from_utf8_lossy(&lines.0.lock().unwrap()).to_string();
    assert_eq!(logged.matches("not reconciled").count(), 1, "{logged}");
    let quiet = Config::from_toml_str(&config_text_without_reconciliation()).unwrap();
    let before = lines.0.lock().unwrap().len();
    let (_engine, _worker) = Tollgate::builder(quiet.clone()).billing_sink(sink(&quiet)).build();
    assert_eq!(lines.0.lock().unwrap().len(), before, "reconcile_interval = \"0s\" says it already");
}

fn config_text_without_reconciliation() -> String {
    config("http://127.0.0.1:9/").replace("[export]\n", "[export]\nreconcile_interval = \"0s\"\n")
}

/// Money is never billed as units: on a plan with a spend cap the priced meters go out to
/// Metronome, the meter `spend` never (its usage stays in the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_never_sent_to_metronome_only_the_priced_meters_are() {
    let standin = StandIn::start().await;
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let toml = config(&standin.url).replace(
        "[plans.p]\n",
        "[billing]\ncurrency = \"usd\"\n[plans.p]\nprices.requests = \"0.001\"\nprices.tokens = \"0.00000015\"\n\
         spend = { limit = \"100.00\", mode = \"soft\" }\n",
    );
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    for _ in 0..3 {
        assert_eq!(h.status("/tokens/10", "key-acme").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let spent = common::committed(&*store, "acme", "spend", NOON - HOUR, NOON + HOUR, 15 * MIN).await;
    assert_eq!(spent, 3 * (1_000_000 + 1_500));
    drain(&[&h], &standin, NOON + HOUR + 5 * MIN).await;
    let types: std::collections::BTreeSet<String> = standin.events().into_iter().map(|e| e.event_type).collect();
    assert_eq!(types, ["api_requests".to_owned(), "llm_tokens".to_owned()].into(), "only the priced meters");
    let totals = standin.totals();
    assert_eq!(totals[&("acme-account".to_owned(), "llm_tokens".to_owned())], 30);
}

/// Tokens by model and kind sent to Metronome: each series' events carry its values as
/// properties a billable metric groups by, beside the usual ones; each (tenant, series,
/// window) once; the total of a meter's events is what its series counted.
#[tokio::test]
async fn series_carry_their_values_as_properties() {
    let standin = StandIn::start().await;
    let toml = config(&standin.url).replace(
        "[meters.tokens]\nevent_name = \"llm_tokens\"\n",
        "[meters.tokens]\nevent_name = \"llm_tokens\"\ndimensions = [\"model\", \"kind\"]\n\
         values.model = [\"m-small\", \"m-large\"]\nvalues.kind = [\"input\", \"output\"]\n\
         [[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n",
    );
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    let mut sent = BTreeMap::new();
    for (model, kind, units) in [("m-large", "output", 240u64), ("m-small", "input", 31), ("m-large", "output", 9)] {
        let info =
            tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-acme"));
        let ticket = crate::common::admitted_ticket(&h.tollgate, &info).await;
        let d = tollgate::Dimensions::new().with("model", model).with("kind", kind);
        ticket.context().record_with("tokens", units, &d).unwrap();
        assert!(ticket.complete(200));
        *sent.entry((model.to_owned(), kind.to_owned())).or_insert(0i64) += units as i64;
    }
    h.tollgate.flush().await.unwrap();
    drain(&[&h], &standin, NOON + HOUR).await;
    let tokens: Vec<_> = standin.events().into_iter().filter(|e| e.event_type == "llm_tokens").collect();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    let mut got = BTreeMap::new();
    for e in &tokens {
        let p = &e.properties;
        assert_eq!(p["meter"], format!("tokens{{model={},kind={}}}", p["model"], p["kind"]));
        assert!(got.insert((p["model"].clone(), p["kind"].clone()), e.value).is_none());
    }
    assert_eq!(got, sent);
}
