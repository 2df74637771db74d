//! The Stripe export end to end: requests through the layer, the store, the export, the real
//! async-stripe client, and a local Stripe stand-in (`common::stripe`) that follows Stripe's
//! documented rules. On every store, with faults at each hop (a flush whose answer is lost, a
//! crash between send and mark, repeated 500s, a 429 storm for one customer, dropped
//! connections, two nodes exporting at once), the stand-in's totals equal the billable usage:
//! nothing lost, nothing doubled.
//!
//! A crash is a real process killed with SIGKILL for SQLite, DynamoDB and PostgreSQL (the test binary runs
//! itself as the child); for the memory store the engine is dropped mid-call and another built
//! over the same store.
#![cfg(feature = "stripe")]

use crate::common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::{
    stripe::{Fault, StandIn, SECRET},
    Faulty, Harness, NOON,
};
use tollgate::{
    billing::{Secret, StripeSink},
    clock::{Clock, FakeClock},
    config::TenantId,
    report::{DriftAction, ReconcileRequest},
    store::{ExportKey, FlushId, StoreInspect, UsageBatch, UsageRecord},
    Config, Tollgate, TollgateLayer,
};

const MIN: i64 = 60;
const HOUR: i64 = 3600;

fn config(url: &str) -> String {
    format!(
        r#"
[usage]
window = "15m"
grace = "5m"
flush_interval = "10s"
[export]
calls_per_second = 1000
concurrency = 4
[meters.requests]
event_name = "api_requests"
[meters.tokens]
event_name = "llm_tokens"
aggregation = "hour"
[plans.p]
[tenants.acme]
plan = "p"
keys = ["key-acme"]
stripe_customer = "cus_acme"
[tenants.globex]
plan = "p"
keys = ["key-globex"]
stripe_customer = "cus_globex"
[tenants.hobby]
plan = "p"
keys = ["key-hobby"]
[stripe]
api_base = "{url}"
timeout = "60s"
"#
    )
}

fn sink(config: &Config) -> StripeSink {
    let s = config.stripe().unwrap();
    StripeSink::new(&Secret::new(SECRET), s.api_base.as_deref(), s.timeout).unwrap()
}

/// A node: an engine with the Stripe sink over `store`, on a fake clock at `at`.
fn node(toml: &str, store: Arc<dyn StoreInspect>, at: i64) -> Harness {
    let config = Config::from_toml_str(toml).unwrap();
    let (clock, fake) = Clock::fake_at_unix(at);
    let sink = sink(&config);
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).billing_sink(sink).build();
    Harness::from_layer(TollgateLayer::new(engine), fake)
}

/// The stand-in's meters: `api_requests` sums, `llm_tokens` is pre-aggregated per hour.
async fn stand_in() -> StandIn {
    StandIn::start(&[("api_requests", None), ("llm_tokens", Some(HOUR))]).await
}

/// What the test sent and expects billed: (customer, event name) → units.
#[derive(Default)]
struct Billable(BTreeMap<(String, String), i64>);

impl Billable {
    /// `n` requests of `tenant` to `path`, each answered 200.
    async fn send(&mut self, h: &Harness, tenant: &str, path: &str, n: usize) {
        for _ in 0..n {
            assert_eq!(h.status(path, &format!("key-{tenant}")).await, 200);
        }
        let customer = match tenant {
            "hobby" => return,
            t => format!("cus_{t}"),
        };
        *self.0.entry((customer.clone(), "api_requests".into())).or_default() += n as i64;
        if let Some(tokens) = path.strip_prefix("/tokens/") {
            let tokens: i64 = tokens.parse().unwrap();
            *self.0.entry((customer, "llm_tokens".into())).or_default() += n as i64 * tokens;
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Memory,
    Sqlite,
    Dynamo,
    Postgres,
}

/// A store of `kind`, and how to open it again (another process, a restarted node).
pub(crate) struct Backend {
    pub(crate) kind: Kind,
    pub(crate) store: Arc<dyn StoreInspect>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) table: Option<(String, String)>,
}

impl Backend {
    pub(crate) async fn new(kind: Kind) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let (store, table): (Arc<dyn StoreInspect>, _) = match kind {
            Kind::Memory => (Arc::new(tollgate::store::MemoryStore::new()), None),
            Kind::Sqlite => {
                (Arc::new(tollgate::store::SqliteStore::open(dir.path().join("t.db")).await.unwrap()), None)
            }
            Kind::Dynamo => dynamo().await?,
            Kind::Postgres => postgres().await?,
        };
        Some(Self { kind, store, dir, table })
    }

    /// The store as another process opens it (the same object for the memory store).
    pub(crate) async fn reopen(&self) -> Arc<dyn StoreInspect> {
        match self.kind {
            Kind::Memory => self.store.clone(),
            Kind::Sqlite => Arc::new(tollgate::store::SqliteStore::open(self.dir.path().join("t.db")).await.unwrap()),
            Kind::Dynamo => reopen_dynamo(self.table.as_ref().unwrap()),
            Kind::Postgres => reopen_postgres(self.table.as_ref().unwrap()).await,
        }
    }
}

/// A schema of its own on the PostgreSQL test server; (url, schema) to open it again.
#[cfg(feature = "postgres")]
async fn postgres() -> Option<(Arc<dyn StoreInspect>, Option<(String, String)>)> {
    let (store, options) = common::postgres::store().await?;
    Some((Arc::new(store), Some((options.url, options.schema))))
}

#[cfg(not(feature = "postgres"))]
async fn postgres() -> Option<(Arc<dyn StoreInspect>, Option<(String, String)>)> {
    assert!(std::env::var_os("CI").is_none(), "CI runs the Stripe tests with the postgres feature");
    eprintln!("SKIPPED: the PostgreSQL store needs the postgres feature");
    None
}

#[cfg(feature = "postgres")]
pub(crate) async fn reopen_postgres((url, schema): &(String, String)) -> Arc<dyn StoreInspect> {
    let options = tollgate::store::PostgresOptions::new(url.clone()).schema(schema.clone()).pool_size(4);
    Arc::new(tollgate::store::PostgresStore::open(&options).await.unwrap())
}

#[cfg(not(feature = "postgres"))]
pub(crate) async fn reopen_postgres(_: &(String, String)) -> Arc<dyn StoreInspect> {
    unreachable!()
}

#[cfg(feature = "dynamodb")]
async fn dynamo() -> Option<(Arc<dyn StoreInspect>, Option<(String, String)>)> {
    let store = common::dynamo::table().await?;
    let table = (common::dynamo::endpoint().unwrap(), store.table().to_owned());
    Some((Arc::new(store), Some(table)))
}

#[cfg(not(feature = "dynamodb"))]
async fn dynamo() -> Option<(Arc<dyn StoreInspect>, Option<(String, String)>)> {
    assert!(std::env::var_os("CI").is_none(), "CI runs the Stripe tests with the dynamodb feature");
    eprintln!("SKIPPED: the DynamoDB store needs the dynamodb feature");
    None
}

#[cfg(feature = "dynamodb")]
pub(crate) fn reopen_dynamo((endpoint, table): &(String, String)) -> Arc<dyn StoreInspect> {
    Arc::new(tollgate::store::DynamoStore::new(common::dynamo::client(endpoint), table.clone()))
}

#[cfg(not(feature = "dynamodb"))]
pub(crate) fn reopen_dynamo(_: &(String, String)) -> Arc<dyn StoreInspect> {
    unreachable!()
}

/// Moves a node's clock and the stand-in's "now" together.
fn at(clock: &FakeClock, standin: &StandIn, unix: i64) {
    clock.set_unix(unix);
    standin.set_now(unix);
}

const CHILD: &str = "TOLLGATE_STRIPE_CHILD";

/// In a child process: export on the store the parent names, then hang in the call the
/// stand-in never answers, until killed.
async fn child() -> bool {
    let Ok(kind) = std::env::var(CHILD) else { return false };
    let toml = std::fs::read_to_string(std::env::var("TG_CONFIG").unwrap()).unwrap();
    let now: i64 = std::env::var("TG_NOW").unwrap().parse().unwrap();
    let store: Arc<dyn StoreInspect> = match kind.as_str() {
        "sqlite" => Arc::new(tollgate::store::SqliteStore::open(std::env::var("TG_DB").unwrap()).await.unwrap()),
        "postgres" => {
            reopen_postgres(&(std::env::var("TG_ENDPOINT").unwrap(), std::env::var("TG_TABLE").unwrap())).await
        }
        _ => reopen_dynamo(&(std::env::var("TG_ENDPOINT").unwrap(), std::env::var("TG_TABLE").unwrap())),
    };
    let h = node(&toml, store, now);
    println!("@@ exporting");
    let report = h.tollgate.export().await;
    panic!("the export should hang until the process is killed: {report:?}");
}

/// Kills `child` with SIGKILL and reaps it.
pub(crate) fn sigkill(mut child: std::process::Child) {
    use std::os::unix::process::ExitStatusExt;
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

/// The crash between send and mark: the export's call reaches the stand-in, which takes the
/// event and never answers; the exporter dies there.
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
            cmd.args([&common::test_name(module_path!(), test), "--exact", "--nocapture", "--test-threads=1"])
                .env(
                    CHILD,
                    match b.kind {
                        Kind::Sqlite => "sqlite",
                        Kind::Postgres => "postgres",
                        _ => "dynamodb",
                    },
                )
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
    assert_eq!(standin.events().len(), before + 1, "the event was taken before the crash");
}

/// Exports until nothing is left, moving the clock past each next-attempt time.
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

async fn exactly_once_through_faults(kind: Kind, test: &str) {
    if child().await {
        return;
    }
    let Some(b) = Backend::new(kind).await else { return };
    let standin = stand_in().await;
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

    // The hour (the tokens meter's window) is closed. Repeated 500s, an error body that is
    // not JSON, a dropped connection; and a 429 storm for globex alone.
    let mut now = NOON + HOUR + 5 * MIN;
    at(&a.clock, &standin, now);
    standin.fail_next(&[Fault::Status(500), Fault::Status(500), Fault::NotJson(502), Fault::Drop, Fault::Status(500)]);
    standin.fail_customer("cus_globex", Some(429));
    for _ in 0..6 {
        a.tollgate.export().await.unwrap();
        now += 2 * MIN;
        at(&a.clock, &standin, now);
    }
    let totals = standin.totals();
    assert_eq!(totals.get(&("cus_acme".into(), "api_requests".into())), Some(&45), "acme went on: {totals:?}");
    assert_eq!(totals.get(&("cus_acme".into(), "llm_tokens".into())), Some(&31));
    assert_eq!(totals.get(&("cus_globex".into(), "api_requests".into())), None, "globex waits");
    assert!(a.tollgate.stats().export_retries >= 5);
    standin.fail_customer("cus_globex", None);
    drain(&[&a], &standin, now).await;
    assert_eq!(standin.totals(), billable.0);
    assert_eq!(a.tollgate.stats().unbillable_windows, 0, "hobby has no customer: never a candidate");

    // A crash between send and mark: the event reached Stripe, the mark did not reach the
    // store. Another node re-sends it with the same identifier and idempotency key.
    now = NOON + 3 * HOUR;
    at(&a.clock, &standin, now);
    billable.send(&a, "acme", "/", 4).await;
    a.tollgate.flush().await.unwrap();
    drop(a);
    now += 20 * MIN;
    standin.set_now(now);
    crash_between_send_and_mark(&b, test, &toml, now, &standin).await;
    let replays = standin.replays();
    // The claim of the dead exporter holds 5 minutes; then a new node takes over.
    now += 6 * MIN;
    let c = node(&toml, b.reopen().await, now);
    at(&c.clock, &standin, now);
    now = drain(&[&c], &standin, now).await;
    assert_eq!(standin.replays(), replays + 1, "the re-send was answered as the first call");
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
    standin.reset_sends();
    let replays = standin.replays();
    let (x, y) = tokio::join!(c.tollgate.export(), d.tollgate.export());
    assert_eq!(standin.replays(), replays, "no call was repeated under its key");
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.events + y.events, 4, "each aggregate once, by one node or the other: {x:?} {y:?}");
    assert_eq!(standin.max_sends_per_identifier(), 1, "claims kept the two nodes off each other's aggregates");
    drain(&[&c, &d], &standin, now).await;
    assert_eq!(standin.totals(), billable.0, "two exporters doubled nothing");
    assert_eq!(standin.duplicates(), 0, "no identifier was taken twice");
    let dead = c.tollgate.usage_store().dead_letters(None, 10).await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_on_memory() {
    exactly_once_through_faults(Kind::Memory, "exactly_once_through_faults_on_memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_on_sqlite() {
    exactly_once_through_faults(Kind::Sqlite, "exactly_once_through_faults_on_sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_on_dynamodb() {
    exactly_once_through_faults(Kind::Dynamo, "exactly_once_through_faults_on_dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_through_faults_on_postgres() {
    exactly_once_through_faults(Kind::Postgres, "exactly_once_through_faults_on_postgres").await;
}

/// Commits `quantity` units of `tenant`'s `meter` in the window starting at `window` (a flush
/// from another node arriving late).
async fn late(store: &dyn StoreInspect, id: &str, tenant: &str, meter: &str, window: i64, quantity: u64) {
    let batch =
        UsageBatch::new(FlushId::new(id), vec![UsageRecord::new(tenant.into(), meter.into(), window, quantity)]);
    store.commit_usage(&batch).await.unwrap();
}

/// A store of `kind` (kept alive by the returned backend), the stand-in, and a node at noon on
/// the test configuration (with `extra` declarations before the plans); `None`: skipped.
async fn on_store(kind: Kind, extra: Option<&str>) -> Option<(Backend, Arc<dyn StoreInspect>, StandIn, Harness)> {
    let b = Backend::new(kind).await?;
    let store = b.store.clone();
    let standin = stand_in().await;
    let toml = config(&standin.url).replace("[plans.p]", &format!("{}[plans.p]", extra.unwrap_or_default()));
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    Some((b, store, standin, h))
}

async fn late_usage_goes_out_as_new_revisions_for_both_kinds_of_meter(kind: Kind) {
    let Some((_b, store, standin, h)) = on_store(kind, None).await else { return };
    for _ in 0..3 {
        h.status("/tokens/10", "key-acme").await;
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR + 5 * MIN);
    h.tollgate.export().await.unwrap();
    // 3 requests (sum) in the 12:00 quarter; 30 tokens (pre-aggregated) in the 12:00 hour.
    let key = |t: &str| ("cus_acme".to_owned(), t.to_owned());
    assert_eq!(standin.totals()[&key("api_requests")], 3);
    assert_eq!(standin.totals()[&key("llm_tokens")], 30);

    // Late usage, after both were exported: the sum meter gets the delta as revision 1;
    // the pre-aggregated one the hour's running total, one second later than the first.
    late(&*store, "late-1", "acme", "requests", NOON, 2).await;
    late(&*store, "late-2", "acme", "tokens", NOON, 4).await;
    h.tollgate.export().await.unwrap();
    late(&*store, "late-3", "acme", "tokens", NOON, 1).await;
    h.tollgate.export().await.unwrap();
    let events = standin.events();
    let sums: Vec<i64> = events.iter().filter(|e| e.event_name == "api_requests").map(|e| e.value).collect();
    let hour: Vec<(i64, i64)> =
        events.iter().filter(|e| e.event_name == "llm_tokens").map(|e| (e.timestamp, e.value)).collect();
    assert_eq!(sums, [3, 2], "deltas");
    assert_eq!(hour, [(NOON, 30), (NOON + 1, 34), (NOON + 2, 35)], "running totals, strictly later");
    assert_eq!(standin.totals()[&key("api_requests")], 5);
    assert_eq!(standin.totals()[&key("llm_tokens")], 35, "Stripe keeps the newest of the hour");
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "every revision has its own identifier");
}

async fn permanent_refusals_unknown_failures_and_old_windows_are_dead_lettered_and_listed(kind: Kind) {
    // A meter Stripe does not have: refused with 400, for good.
    let ghost = "[meters.ghost]\nevent_name = \"ghost_meter\"\n[[routes]]\npath = \"/ghost\"\nmeter = \"ghost\"\n";
    let Some((_b, store, standin, h)) = on_store(kind, Some(ghost)).await else { return };
    h.status("/ghost", "key-acme").await;
    h.status("/", "key-globex").await;
    h.tollgate.flush().await.unwrap();
    // Usage 40 days old (a node that was down): beyond Stripe's 35 days.
    late(&*store, "old", "acme", "requests", NOON - 40 * 86_400, 9).await;
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    // globex's calls fail with 500s ten times (counted as attempts, not as failures without
    // a status), then without a status (dropped connections): parked after the 8th of those.
    standin.fail_customer("cus_globex", Some(500));
    let mut now = NOON + 20 * MIN + 1;
    for pass in 0..18 {
        if pass == 10 {
            let globex = ExportKey::new(TenantId::from("globex"), "requests".into(), NOON);
            let agg = store.usage(&globex).await.unwrap().unwrap();
            assert_eq!((agg.attempts, agg.unknown_failures, agg.in_flight), (10, 0, Some(1)));
            standin.fail_customer("cus_globex", Some(0));
        }
        h.tollgate.export().await.unwrap();
        if pass == 16 {
            let dead = store.dead_letters(None, 10).await.unwrap();
            assert!(!dead.iter().any(|d| d.key.tenant.as_str() == "globex"), "7 failures without a status: not yet");
        }
        now += HOUR;
        at(&h.clock, &standin, now);
    }
    let dead = store.dead_letters(None, 10).await.unwrap();
    let reasons: BTreeMap<(String, String), &str> =
        dead.iter().map(|d| ((d.key.tenant.to_string(), d.key.meter.to_string()), d.reason.as_str())).collect();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(reasons[&("acme".into(), "ghost".into())].starts_with("refused: 400"), "{reasons:?}");
    assert!(reasons[&("acme".into(), "requests".into())].starts_with("too old"), "{reasons:?}");
    assert!(reasons[&("globex".into(), "requests".into())].contains("without a status"), "{reasons:?}");
    let refused = dead.iter().find(|d| d.key.meter.as_str() == "ghost").unwrap();
    assert_eq!(refused.send.as_ref().map(|s| (s.value, s.customer.clone())), Some((1, Some("cus_acme".into()))));
    assert_eq!(h.tollgate.stats().dead_letters, 3);
    // Listed, never sent again, never silently dropped.
    let calls = standin.calls();
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.calls(), calls);
    // Requeued after the cause is fixed: a new revision, sent once.
    standin.fail_customer("cus_globex", None);
    let key = ExportKey::new(TenantId::from("globex"), "requests".into(), NOON);
    assert!(store.requeue_dead_letter(&key).await.unwrap());
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.totals()[&("cus_globex".into(), "api_requests".into())], 1);
}

async fn an_export_never_confirmed_is_parked_as_unconfirmed_not_sent_again(kind: Kind) {
    let Some((_b, store, standin, h)) = on_store(kind, None).await else { return };
    h.status("/", "key-acme").await;
    h.tollgate.flush().await.unwrap();
    // Stripe fails while executing the first call and keeps that answer under its
    // idempotency key: every retry gets the same 500.
    standin.fail_next(&[Fault::Saved(500)]);
    let mut now = NOON + 20 * MIN + 1;
    at(&h.clock, &standin, now);
    h.tollgate.export().await.unwrap();
    // Retried (with backoff) for 20 hours, then parked: Stripe forgets identifiers after
    // about 24 hours, so a later re-send could be billed twice.
    while now < NOON + 21 * HOUR {
        now += HOUR;
        at(&h.clock, &standin, now);
        h.tollgate.export().await.unwrap();
    }
    let stats = h.tollgate.stats();
    assert_eq!((stats.unconfirmed_exports, stats.dead_letters), (1, 1));
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert!(dead[0].reason.starts_with("unconfirmed"), "{dead:?}");
    assert_eq!(dead[0].send.as_ref().unwrap().value, 1, "what was sent, for reconciliation");
    assert!(standin.replays() > 5, "retried under the same key: {}", standin.replays());
    let calls = standin.calls();
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.calls(), calls, "not sent again");
    // Reconciled by hand: Stripe had it. Confirming marks it exported.
    let mut agg = store.usage(&dead[0].key).await.unwrap().unwrap();
    agg.revision = dead[0].revision;
    assert!(store.finish_export(&agg, 1_000).await.unwrap());
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
}

/// A key Stripe refuses (401) stops the pass without parking anything; a 424 is retried.
#[tokio::test]
async fn a_refused_key_stops_the_pass_and_a_424_is_retried() {
    let standin = stand_in().await;
    let toml = config(&standin.url);
    let config = Config::from_toml_str(&toml).unwrap();
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let revoked =
        StripeSink::new(&Secret::new("sk_test_revoked"), Some(&standin.url), Duration::from_secs(30)).unwrap();
    let (engine, _worker) =
        Tollgate::builder(config).store_arc(store.clone()).clock(clock).billing_sink(revoked).build();
    let h = Harness::from_layer(TollgateLayer::new(engine), fake);
    for n in 0..6 {
        // Six windows each: more than one call per lane.
        at(&h.clock, &standin, NOON + n * 15 * MIN);
        for t in ["acme", "globex"] {
            assert_eq!(h.status("/", &format!("key-{t}")).await, 200);
        }
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 3 * HOUR);
    let report = h.tollgate.export().await.unwrap();
    assert!(report.halted && report.events == 0 && report.dead_letters == 0, "{report:?}");
    assert!(standin.calls() <= 4, "the pass stopped: {} calls", standin.calls());
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    // With the right key (another node: the claims were let go), a 424 first: retried, then
    // everything goes.
    let good = node(&toml, store.clone(), NOON + 3 * HOUR);
    at(&good.clock, &standin, NOON + 3 * HOUR);
    standin.fail_next(&[Fault::Status(424)]);
    drain(&[&good], &standin, NOON + 3 * HOUR).await;
    assert_eq!(good.tollgate.stats().export_retries, 1);
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 6);
    assert_eq!(standin.totals()[&("cus_globex".into(), "api_requests".into())], 6);
}

macro_rules! on_every_store {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$test(super::Kind::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test(super::Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dynamodb() {
                super::$test(super::Kind::Dynamo).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Kind::Postgres).await;
            }
        }
    };
}

on_every_store!(late_usage_goes_out_as_new_revisions_for_both_kinds_of_meter);
on_every_store!(permanent_refusals_unknown_failures_and_old_windows_are_dead_lettered_and_listed);
on_every_store!(an_export_never_confirmed_is_parked_as_unconfirmed_not_sent_again);

/// Shutdown while the worker's export pass waits on Stripe, on the memory store: the final
/// export re-sends what was in flight (this node's own claim does not hold it back) and sends
/// the open windows too; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_an_export_pass_loses_nothing_on_the_memory_store() {
    let standin = stand_in().await;
    let toml = config(&standin.url)
        .replace("flush_interval = \"10s\"", "flush_interval = \"1s\"")
        .replace("[export]\n", "[export]\ninterval = \"1s\"\n");
    let config = Config::from_toml_str(&toml).unwrap();
    let (clock, fake) = Clock::fake_at_unix(NOON);
    standin.set_now(NOON);
    let sink = sink(&config);
    let (engine, worker) = Tollgate::builder(config).clock(clock).billing_sink(sink).build();
    let h = Harness::from_layer(TollgateLayer::new(engine), fake);
    let running = tokio::spawn(worker.run());
    for _ in 0..5 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    at(&h.clock, &standin, NOON + 20 * MIN);
    standin.fail_next(&[Fault::TakeAndHang]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while standin.events().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the worker never exported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The worker's call hangs; two more requests land in the open window.
    for _ in 0..2 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    h.tollgate.shutdown().await.unwrap();
    running.await.unwrap();
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 7);
    assert_eq!(standin.replays(), 1, "the hung call was re-sent under its key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_keep_one_call_per_customer_and_meter_and_bounded_concurrency() {
    let standin = stand_in().await;
    let mut toml = config(&standin.url);
    for i in 0..24 {
        toml.push_str(&format!(
            "[tenants.t{i}]\nplan = \"p\"\nkeys = [\"key-t{i}\"]\nstripe_customer = \"cus_t{i}\"\n"
        ));
    }
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    for i in 0..24 {
        // Two windows each: one lane sends them one after the other.
        h.status("/", &format!("key-t{i}")).await;
    }
    at(&h.clock, &standin, NOON + 15 * MIN);
    for i in 0..24 {
        h.status("/", &format!("key-t{i}")).await;
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!(report.events, 48);
    assert_eq!(standin.lock_conflicts(), 0, "never two calls for one customer's meter");
    let max = standin.max_concurrent();
    assert!((2..=4).contains(&max), "export.concurrency = 4 bounds the calls in flight: {max}");
}

#[test]
fn stripe_settings_are_checked_at_load() {
    let err = |toml: &str| Config::from_toml_str(toml).unwrap_err();
    let e = err("[usage]\nwindow = \"2h\"\nflush_interval = \"10s\"\n[meters.t]\naggregation = \"hour\"\n[plans.p]\n");
    assert_eq!((e.key(), e.line()), ("meters.t.aggregation", Some(5)), "{e}");
    let e = err("[meters.t]\naggregation = \"max\"\n[plans.p]\n");
    assert_eq!(e.key(), "meters.t.aggregation", "{e}");
    let e = err("[plans.p]\n[stripe]\nsecret_key = \"sk_live_x\"\n");
    assert_eq!((e.key(), e.line()), ("stripe.secret_key", Some(3)), "a secret never goes in the file: {e}");
    let e = err("[plans.p]\n[stripe.prices]\nprice_1 = \"gold\"\n");
    assert_eq!(e.key(), "stripe.prices.price_1", "{e}");
    let e = err("[plans.p]\n[stripe.subscription_status]\nlate = \"p\"\n");
    assert_eq!(e.key(), "stripe.subscription_status.late", "{e}");
    let e = err("[plans.p]\n[export]\nunconfirmed_after = \"30h\"\n");
    assert_eq!(e.key(), "export.unconfirmed_after", "{e}");
    let e = err("[plans.p]\n[export]\nclaim = \"40s\"\n[stripe]\ntimeout = \"30s\"\n");
    assert_eq!(e.key(), "export.claim", "a claim must outlast its call: {e}");
    // What Stripe would refuse is refused at load, naming the key and line.
    let e = err("[plans.p]\n[tenants.t]\nplan = \"p\"\nstripe_customer = \"\"\n");
    assert_eq!((e.key(), e.line()), ("tenants.t.stripe_customer", Some(4)), "{e}");
    let long = "x".repeat(101);
    let e = err(&format!("[meters.t]\nevent_name = \"{long}\"\n[plans.p]\n"));
    assert_eq!((e.key(), e.line()), ("meters.t.event_name", Some(2)), "{e}");
    assert!(e.to_string().contains("100"), "{e}");
    let e = err("[meters.a]\nevent_name = \"calls\"\n[meters.b]\nevent_name = \"calls\"\n[plans.p]\n");
    assert_eq!(e.key(), "meters.b.event_name", "{e}");
    assert!(e.to_string().contains("meters.a"), "names the other meter: {e}");
    let e = err("[plans.p]\n[tenants.a]\nplan = \"p\"\nstripe_customer = \"cus_1\"\n[tenants.b]\nplan = \"p\"\nstripe_customer = \"cus_1\"\n");
    assert_eq!((e.key(), e.line()), ("tenants.b.stripe_customer", Some(7)), "a customer belongs to one tenant: {e}");
    let e = err("[meters.calls]\n[meters.b]\nevent_name = \"calls\"\n[plans.p]\n");
    assert_eq!(e.key(), "meters.b.event_name", "a meter's name is its event name by default: {e}");
    let e = err("[plans.p]\n[stripe.events]\n\"customer.subscription.delete\" = \"p\"\n");
    assert_eq!((e.key(), e.line()), ("stripe.events.\"customer.subscription.delete\"", Some(3)), "{e}");
    assert!(e.to_string().contains("does not send"), "{e}");
    for base in ["https://api.stripe.com/v1", "https://proxy.example/stripe/", "http://h:1/?x=1"] {
        let e = err(&format!("[plans.p]\n[stripe]\napi_base = \"{base}\"\n"));
        assert_eq!((e.key(), e.line()), ("stripe.api_base", Some(3)), "{base}: {e}");
    }
    Config::from_toml_str("[plans.p]\n[stripe]\napi_base = \"http://127.0.0.1:8080\"\n").unwrap();
    Config::from_toml_str("[plans.p]\n[stripe.events]\n\"customer.subscription.deleted\" = \"p\"\n").unwrap();
    let ok = Config::from_toml_str("[meters.t]\naggregation = \"day\"\n[plans.p]\n[stripe]\n").unwrap();
    assert_eq!(ok.meters()[1].aggregation(), tollgate::config::MeterAggregation::Day);
    assert_eq!(ok.export().calls_per_second, 25);
}

/// Two deployments (staging and production, or two regions with a store each) bill into one
/// Stripe account: each store draws its own identifier namespace when it is made, so the same
/// (tenant, meter, window, revision) in both is two events, both billed. With one namespace
/// for all, Stripe refuses the second deployment's event as "already exists" and its usage is
/// never billed.
async fn two_deployments_billing_one_account_are_both_billed(kind: Kind) {
    let Some(first) = Backend::new(kind).await else { return };
    let second = Backend::new(kind).await.unwrap();
    let standin = stand_in().await;
    let toml = config(&standin.url);
    let (x, y) = (node(&toml, first.store.clone(), NOON), node(&toml, second.store.clone(), NOON));
    for (h, n) in [(&x, 3), (&y, 2)] {
        at(&h.clock, &standin, NOON);
        for _ in 0..n {
            assert_eq!(h.status("/", "key-acme").await, 200);
        }
        h.tollgate.flush().await.unwrap();
    }
    let (ns1, ns2) =
        (first.store.identifier_namespace().await.unwrap(), second.store.identifier_namespace().await.unwrap());
    assert!(!ns1.is_empty() && ns1 != ns2, "each new store draws its own: {ns1:?} {ns2:?}");
    for h in [&x, &y] {
        at(&h.clock, &standin, NOON + 20 * MIN);
        h.tollgate.export().await.unwrap();
    }
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 5, "both deployments billed");
    assert_eq!(standin.duplicates(), 0);
    for b in [&first, &second] {
        assert!(b.store.dead_letters(None, 10).await.unwrap().is_empty());
        assert!(b.store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
    }
}

on_every_store!(two_deployments_billing_one_account_are_both_billed);

/// An export in flight keeps the identifier it began with when the namespace changes: the
/// re-send after a crash is answered from Stripe's idempotency layer, not billed again under a
/// new identifier.
async fn a_namespace_change_never_re_sends_an_export_in_flight_under_a_new_identifier(kind: Kind, test: &str) {
    if child().await {
        return;
    }
    let Some(b) = Backend::new(kind).await else { return };
    let standin = stand_in().await;
    let toml = config(&standin.url);
    let a = node(&toml, b.store.clone(), NOON);
    at(&a.clock, &standin, NOON);
    for _ in 0..4 {
        assert_eq!(a.status("/", "key-acme").await, 200);
    }
    a.tollgate.flush().await.unwrap();
    drop(a);
    let now = NOON + 20 * MIN;
    standin.set_now(now);
    crash_between_send_and_mark(&b, test, &toml, now, &standin).await;
    let store = b.reopen().await;
    let old = store.identifier_namespace().await.unwrap();
    assert!(store.set_identifier_namespace(&old, "restored-2026").await.unwrap());
    assert!(!store.set_identifier_namespace(&old, "another").await.unwrap(), "only over what was read");
    assert_eq!(store.identifier_namespace().await.unwrap(), "restored-2026");
    let in_flight = store.pending_exports(i64::MAX, None, 10).await.unwrap();
    let sent = standin.events()[0].identifier.clone();
    assert_eq!(in_flight[0].send.as_ref().and_then(|s| s.identifier.clone()), Some(sent.clone()), "kept");
    let c = node(&toml, store.clone(), now + 6 * MIN);
    at(&c.clock, &standin, now + 6 * MIN);
    drain(&[&c], &standin, now + 6 * MIN).await;
    assert_eq!(standin.replays(), 1, "re-sent under its first identifier and key");
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 4, "not billed twice");
    // The next window goes out in the new namespace.
    at(&c.clock, &standin, NOON + 2 * HOUR);
    assert_eq!(c.status("/", "key-acme").await, 200);
    c.tollgate.flush().await.unwrap();
    at(&c.clock, &standin, NOON + 3 * HOUR);
    c.tollgate.export().await.unwrap();
    let window = NOON + 2 * HOUR;
    let events = standin.events();
    assert_eq!(events.len(), 2);
    assert_ne!(events[1].identifier, tollgate::billing::identifier(&"acme".into(), &"requests".into(), window, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_change_never_re_sends_an_export_in_flight_on_memory() {
    a_namespace_change_never_re_sends_an_export_in_flight_under_a_new_identifier(
        Kind::Memory,
        "a_namespace_change_never_re_sends_an_export_in_flight_on_memory",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_change_never_re_sends_an_export_in_flight_on_sqlite() {
    a_namespace_change_never_re_sends_an_export_in_flight_under_a_new_identifier(
        Kind::Sqlite,
        "a_namespace_change_never_re_sends_an_export_in_flight_on_sqlite",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_change_never_re_sends_an_export_in_flight_on_dynamodb() {
    a_namespace_change_never_re_sends_an_export_in_flight_under_a_new_identifier(
        Kind::Dynamo,
        "a_namespace_change_never_re_sends_an_export_in_flight_on_dynamodb",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_change_never_re_sends_an_export_in_flight_on_postgres() {
    a_namespace_change_never_re_sends_an_export_in_flight_under_a_new_identifier(
        Kind::Postgres,
        "a_namespace_change_never_re_sends_an_export_in_flight_on_postgres",
    )
    .await;
}

/// A SQLite store restored from a backup taken before its windows were exported sends them
/// again under the same identifiers. Two hours later Stripe still has the idempotency keys:
/// the window sent with the same value is answered as before (exported); the one whose usage
/// grew after the backup is sent with another value and Stripe answers 400
/// `idempotency_error`, which proves nothing about what it holds: parked for reconciliation,
/// never requeued by `--requeue-all`. 25 hours later the keys are gone and Stripe answers 400
/// "An event already exists with identifier …" to the restored store's first attempts: parked
/// `unsettled` too (what Stripe holds may differ from the restored windows), never re-sent
/// under a new identifier (billed twice) nor marked exported unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_a_backup_is_never_billed_twice() {
    let b = Backend::new(Kind::Sqlite).await.unwrap();
    let standin = stand_in().await;
    // An invoice grace of 72 h: a re-sent window keeps its stamp (past the grace it would be
    // stamped anew and Stripe would answer idempotency_error within 24 h: parked too).
    let toml = config(&standin.url).replace("timeout = \"60s\"", "timeout = \"60s\"\ninvoice_grace = \"72h\"");
    let a = node(&toml, b.store.clone(), NOON);
    at(&a.clock, &standin, NOON);
    for (tenant, n) in [("acme", 3), ("globex", 2)] {
        for _ in 0..n {
            assert_eq!(a.status("/", &format!("key-{tenant}")).await, 200);
        }
    }
    a.tollgate.flush().await.unwrap();
    let backup = b.dir.path().join("backup.db");
    let conn = rusqlite::Connection::open(b.dir.path().join("t.db")).unwrap();
    conn.execute("VACUUM INTO ?1", [backup.to_str().unwrap()]).unwrap();
    drop(conn);
    // After the backup: two more requests of acme in the same window.
    for _ in 0..2 {
        assert_eq!(a.status("/", "key-acme").await, 200);
    }
    a.tollgate.flush().await.unwrap();
    at(&a.clock, &standin, NOON + 20 * MIN);
    a.tollgate.export().await.unwrap();
    let totals = || {
        let t = standin.totals();
        (t[&("cus_acme".into(), "api_requests".into())], t[&("cus_globex".into(), "api_requests".into())])
    };
    assert_eq!(totals(), (5, 2));
    drop(a);

    let restore = |name: &str| {
        let path = b.dir.path().join(name);
        std::fs::copy(&backup, &path).unwrap();
        path
    };
    // Restored two hours later.
    let store: Arc<dyn StoreInspect> =
        Arc::new(tollgate::store::SqliteStore::open(restore("two-hours.db")).await.unwrap());
    let h = node(&toml, store.clone(), NOON + 2 * HOUR);
    at(&h.clock, &standin, NOON + 2 * HOUR);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!(totals(), (5, 2), "nothing billed twice: {report:?}");
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key.tenant.as_str(), "acme");
    assert!(!dead[0].reason.starts_with("refused"), "Stripe may hold it: {}", dead[0].reason);
    assert!(dead[0].reason.contains("idempotency_error"), "{}", dead[0].reason);
    let admin = tollgate::admin::Admin::new(store.clone());
    assert_eq!(admin.requeue_refused_dead_letters().await.unwrap(), (0, 1), "left for reconciliation");
    h.tollgate.export().await.unwrap();
    assert_eq!(totals(), (5, 2), "--requeue-all sent nothing again");
    drop(h);

    // Restored 25 hours later: Stripe has forgotten the keys, not the identifiers. What it holds
    // under them may be more or less than the restored windows (usage flushed after the backup,
    // or after the restore): parked for reconciliation, never billed twice, never marked
    // exported unseen.
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::SqliteStore::open(restore("a-day.db")).await.unwrap());
    let h = node(&toml, store.clone(), NOON + 25 * HOUR);
    at(&h.clock, &standin, NOON + 25 * HOUR);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!(standin.duplicates(), 2, "Stripe refused both as already there");
    assert_eq!((report.events, report.dead_letters), (0, 2), "{report:?}");
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert!(dead.iter().all(|d| d.reason.starts_with("unsettled:") && d.reason.contains("already")), "{dead:?}");
    let admin = tollgate::admin::Admin::new(store.clone());
    assert_eq!(admin.requeue_refused_dead_letters().await.unwrap(), (0, 2));
    h.tollgate.export().await.unwrap();
    assert_eq!(totals(), (5, 2));

    // A new namespace for the restored store: refused while letters Stripe may hold remain.
    let err = admin.new_identifier_namespace().await.unwrap_err().to_string();
    assert!(err.contains("2 dead letters may be held") && err.contains("acme requests"), "{err}");
    // Reconciliation settles what it can prove: Stripe holds exactly globex's 2, so that letter
    // is confirmed; it holds 5 for acme's hour, not the restored 3: for a person.
    let r = reconcile(&h, NOON + 25 * HOUR).await;
    let actions: Vec<(&str, DriftAction)> = r.drift.iter().map(|d| (d.tenant.as_str(), d.action)).collect();
    assert_eq!(actions, [("acme", DriftAction::Ambiguous), ("globex", DriftAction::Confirmed)], "{r:?}");
    let err = admin.new_identifier_namespace().await.unwrap_err().to_string();
    assert!(err.contains("1 dead letters may be held"), "{err}");
    // The person sees the 5 in Stripe (the 2 flushed after the backup were billed before the
    // restore): confirmed by hand. Then the namespace changes.
    assert!(admin.confirm_dead_letter(&dead[0].key).await.unwrap());
    let old = store.identifier_namespace().await.unwrap();
    let (was, new) = admin.new_identifier_namespace().await.unwrap();
    assert_eq!(was, old);
    assert_ne!(new, old);
    assert_eq!(store.identifier_namespace().await.unwrap(), new);
    // New usage goes out under the new namespace; nothing was billed twice.
    for _ in 0..4 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 26 * HOUR + 30 * MIN);
    h.tollgate.export().await.unwrap();
    assert_eq!(totals(), (9, 2));
    let last = standin.events().pop().unwrap();
    let expected = tollgate::billing::identifier_in(&new, &"acme".into(), &"requests".into(), NOON + 25 * HOUR, 0);
    assert_eq!(last.identifier, expected, "under the new namespace");
}

/// Stripe unreachable for a day (the connection refused: no request left the machine), then
/// answering 429 for half a day, then refusing the key for a few hours: no call could have been
/// taken, so nothing is parked, neither as "may or may not have been taken" after
/// `max_unknown_failures` nor as unconfirmed after `unconfirmed_after`. Once Stripe takes calls,
/// every window is billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stripe_never_took_are_retried_without_limit_and_never_parked() {
    // A port nobody listens on, kept to bring Stripe up there later.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let toml = config(&format!("http://{addr}/"));
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&toml, store.clone(), NOON);
    for (tenant, n) in [("acme", 3), ("globex", 2)] {
        for _ in 0..n {
            assert_eq!(h.status("/", &format!("key-{tenant}")).await, 200);
        }
    }
    h.tollgate.flush().await.unwrap();
    let mut now = NOON + 20 * MIN;
    while now < NOON + 25 * HOUR {
        h.clock.set_unix(now);
        let report = h.tollgate.export().await.unwrap();
        assert_eq!((report.events, report.dead_letters), (0, 0), "{report:?}");
        now += HOUR;
    }
    assert!(h.tollgate.stats().export_retries >= 20);
    let standin = StandIn::start_at(&addr.to_string(), &[("api_requests", None), ("llm_tokens", Some(HOUR))]).await;
    standin.fail_customer("cus_acme", Some(429));
    standin.fail_customer("cus_globex", Some(429));
    while now < NOON + 38 * HOUR {
        at(&h.clock, &standin, now);
        h.tollgate.export().await.unwrap();
        now += HOUR;
    }
    standin.fail_customer("cus_acme", None);
    standin.fail_customer("cus_globex", None);
    let revoked =
        StripeSink::new(&Secret::new("sk_test_revoked"), Some(&standin.url), Duration::from_secs(30)).unwrap();
    let (clock, fake) = Clock::fake_at_unix(now);
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap())
        .store_arc(store.clone())
        .clock(clock)
        .billing_sink(revoked)
        .build();
    let refused = Harness::from_layer(TollgateLayer::new(engine), fake);
    for _ in 0..4 {
        at(&refused.clock, &standin, now);
        assert!(refused.tollgate.export().await.unwrap().halted);
        now += HOUR;
    }
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert!(dead.is_empty(), "nothing reached Stripe, nothing is parked: {dead:?}");
    assert_eq!(standin.events().len(), 0);
    at(&h.clock, &standin, now);
    drain(&[&h], &standin, now).await;
    let totals = standin.totals();
    assert_eq!(totals[&("cus_acme".into(), "api_requests".into())], 3);
    assert_eq!(totals[&("cus_globex".into(), "api_requests".into())], 2);
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
}

/// A tenant of a plan marked `billed` that has no Stripe customer yet: its windows stay pending
/// (never written off), and are billed once a customer is set after they closed. A tenant of a
/// plan that is not billed, without a customer (a free tier), is not billed. Past Stripe's 35
/// days, the billed tenant's windows without a customer are parked `no customer`.
async fn a_billed_plan_s_windows_wait_for_a_customer(kind: Kind) {
    let Some((_b, store, standin, h)) = on_store(kind, Some("[plans.paid]\nbilled = true\n")).await else { return };
    let newco = tollgate::store::TenantRecord::new("newco".into(), "paid".into());
    store.put_tenant(&newco, &[tollgate::store::KeyHash::of(b"key-newco")]).await.unwrap();
    for tenant in ["newco", "hobby"] {
        for _ in 0..3 {
            assert_eq!(h.status("/", &format!("key-{tenant}")).await, 200);
        }
    }
    h.tollgate.flush().await.unwrap();
    let mut now = NOON + 20 * MIN;
    for _ in 0..3 {
        at(&h.clock, &standin, now);
        let report = h.tollgate.export().await.unwrap();
        assert_eq!((report.events, report.dead_letters), (0, 0), "{report:?}");
        now += HOUR;
    }
    let pending: Vec<_> = store.pending_exports(i64::MAX, None, 10).await.unwrap();
    assert_eq!(
        pending.iter().map(|a| a.key.tenant.as_str()).collect::<Vec<_>>(),
        ["newco"],
        "waits; hobby is not billed"
    );
    assert!(pending[0].send.is_none(), "never begun without a customer");

    // The customer is set (in the directory) after the window closed: billed at the next pass.
    let admin = tollgate::admin::Admin::new(store.clone());
    admin.set_customer("newco", Some("cus_newco"), false).await.unwrap();
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.totals().get(&("cus_newco".into(), "api_requests".into())), Some(&3));
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());

    // Without a customer past 35 days: parked, saying so.
    admin.set_customer("newco", None, false).await.unwrap();
    at(&h.clock, &standin, now);
    assert_eq!(h.status("/", "key-newco").await, 200);
    h.tollgate.flush().await.unwrap();
    now += 36 * 86_400;
    at(&h.clock, &standin, now);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!(report.dead_letters, 1, "{report:?}");
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert!(dead[0].reason.contains("no customer"), "{}", dead[0].reason);
    // Billed by hand, then confirmed: done.
    assert!(admin.confirm_dead_letter(&dead[0].key).await.unwrap());
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
}

on_every_store!(a_billed_plan_s_windows_wait_for_a_customer);

/// Tenants of a plan that is not billed and without a customer (a free tier) are not export
/// candidates at all: their usage is stored (reports, retention) but an export pass never lists
/// it, so a pass does not grow with them. Tenants with a customer are billed whatever their
/// plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_tier_tenants_are_never_export_candidates() {
    const FREE: usize = 10_000;
    let Some((_b, store, standin, h)) = on_store(Kind::Memory, None).await else { return };
    for i in 0..FREE {
        let t = tollgate::store::TenantRecord::new(format!("f{i}").as_str().into(), "p".into());
        store.put_tenant(&t, &[tollgate::store::KeyHash::of(format!("key-f{i}").as_bytes())]).await.unwrap();
    }
    for i in 0..FREE {
        assert_eq!(h.status("/", &format!("key-f{i}")).await, 200);
    }
    for t in ["acme", "hobby"] {
        assert_eq!(h.status("/", &format!("key-{t}")).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let pending = store.pending_exports(i64::MAX, None, 100).await.unwrap();
    let listed: Vec<&str> = pending.iter().map(|a| a.key.tenant.as_str()).collect();
    assert_eq!(listed, ["acme"], "only the tenant with a customer is a candidate");
    let kept = common::committed(&*store, "f42", "requests", NOON - HOUR, NOON + HOUR, 15 * MIN).await;
    assert_eq!(kept, 1, "a free tenant's usage is kept");
    at(&h.clock, &standin, NOON + 20 * MIN);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!((report.events, report.unbillable), (1, 0), "nothing written off: never listed: {report:?}");
}

/// A 404 from Stripe (a wrong `api_base` given in code, a proxy that does not route the path)
/// stops the pass like a 401, parking nothing: every call would get it.
#[tokio::test]
async fn a_404_stops_the_pass_and_parks_nothing() {
    let standin = stand_in().await;
    let toml = config(&standin.url);
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let wrong = format!("{}wrong/", standin.url);
    let sink = StripeSink::new(&Secret::new(SECRET), Some(&wrong), Duration::from_secs(30)).unwrap();
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap())
        .store_arc(store.clone())
        .clock(clock)
        .billing_sink(sink)
        .build();
    let h = Harness::from_layer(TollgateLayer::new(engine), fake);
    for t in ["acme", "globex"] {
        assert_eq!(h.status("/", &format!("key-{t}")).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR);
    let report = h.tollgate.export().await.unwrap();
    assert!(report.halted && report.dead_letters == 0, "{report:?}");
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    let good = node(&toml, store.clone(), NOON + HOUR);
    drain(&[&good], &standin, NOON + HOUR).await;
    assert_eq!(standin.totals().len(), 2, "billed once the address is right");
}

/// Stripe bills a past period's usage only until its invoice is finalized (`stripe.invoice_grace`
/// after the period ends, 1 h by default): a `sum` revision exported later than that after its
/// window is stamped at export time, so it reaches the open invoice instead of being accepted
/// and never invoiced; one exported within the grace keeps its window's last second. A
/// pre-aggregated meter's running total must stay in its own window: it keeps its stamp, and
/// a revision that late is counted and logged (`Stats::late_revisions`).
async fn late_usage_past_the_invoice_grace_reaches_an_open_invoice(kind: Kind) {
    let Some((_b, store, standin, h)) = on_store(kind, None).await else { return };
    assert_eq!(h.status("/tokens/10", "key-acme").await, 200);
    h.tollgate.flush().await.unwrap();
    late(&*store, "late-1", "acme", "requests", NOON + 15 * MIN, 2).await;
    // Within the grace (35 and 20 minutes after the quarters ended): stamped in their window.
    at(&h.clock, &standin, NOON + 50 * MIN);
    h.tollgate.export().await.unwrap();
    at(&h.clock, &standin, NOON + HOUR + 10 * MIN);
    h.tollgate.export().await.unwrap();
    assert_eq!(h.tollgate.stats().late_revisions, 0);
    // Three hours on (past the grace): the `sum` delta is stamped at export time; the hour's
    // new running total stays in its hour, counted.
    let now = NOON + 3 * HOUR;
    late(&*store, "late-2", "acme", "requests", NOON, 4).await;
    late(&*store, "late-3", "acme", "tokens", NOON, 5).await;
    at(&h.clock, &standin, now);
    h.tollgate.export().await.unwrap();
    let stamps: Vec<(i64, i64)> =
        standin.events().iter().filter(|e| e.event_name == "api_requests").map(|e| (e.value, e.timestamp)).collect();
    assert_eq!(stamps, [(1, NOON + 15 * MIN - 1), (2, NOON + 30 * MIN - 1), (4, now)], "{stamps:?}");
    let tokens: Vec<(i64, i64)> =
        standin.events().iter().filter(|e| e.event_name == "llm_tokens").map(|e| (e.value, e.timestamp)).collect();
    assert_eq!(tokens, [(10, NOON), (15, NOON + 1)], "the running total stays in its hour");
    assert_eq!(h.tollgate.stats().late_revisions, 2);
}

on_every_store!(late_usage_past_the_invoice_grace_reaches_an_open_invoice);

/// Two deployments on stores made before namespaces (the empty namespace: the identifiers they
/// always sent) bill into one account: the second one's event is refused as "already exists",
/// which in the empty namespace proves nothing of its own usage. It is parked `unsettled` for
/// reconciliation, neither marked exported (its usage lost) nor requeued by `--requeue-all`
/// (billed twice if it was in fact this deployment's).
async fn in_the_empty_namespace_already_exists_is_parked_not_trusted(kind: Kind) {
    let Some(first) = Backend::new(kind).await else { return };
    let second = Backend::new(kind).await.unwrap();
    let standin = stand_in().await;
    let toml = config(&standin.url);
    for b in [&first, &second] {
        let ns = b.store.identifier_namespace().await.unwrap();
        assert!(b.store.set_identifier_namespace(&ns, "").await.unwrap(), "as a store made before namespaces");
    }
    let (x, y) = (node(&toml, first.store.clone(), NOON), node(&toml, second.store.clone(), NOON));
    // The second exports a day later: Stripe has forgotten the first one's idempotency key
    // (within the day, the key with other parameters is an idempotency_error: parked too).
    for (h, n, export_at) in [(&x, 3, NOON + 20 * MIN), (&y, 2, NOON + 25 * HOUR)] {
        at(&h.clock, &standin, NOON);
        for _ in 0..n {
            assert_eq!(h.status("/", "key-acme").await, 200);
        }
        h.tollgate.flush().await.unwrap();
        at(&h.clock, &standin, export_at);
        h.tollgate.export().await.unwrap();
    }
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 3, "the first one's");
    let dead = second.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("unsettled:") && dead[0].reason.contains("already"), "{}", dead[0].reason);
    let admin = tollgate::admin::Admin::new(second.store.clone());
    assert_eq!(admin.requeue_refused_dead_letters().await.unwrap(), (0, 1));
}

on_every_store!(in_the_empty_namespace_already_exists_is_parked_not_trusted);

/// Letters parked by versions before namespaces as `refused:` although Stripe said it holds an
/// event under the identifier ("already exists", `idempotency_error`) are left by
/// `--requeue-all`: a new revision would bill them twice. Other refusals are requeued.
#[tokio::test]
async fn requeue_all_leaves_refusals_that_say_stripe_holds_the_event() {
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let reasons = [
        "refused: 400 : An event already exists with identifier tg_0123.",
        "refused: 400 idempotency_key_in_use: Keys for idempotent requests can only be used with the same parameters",
        "refused: 400 resource_missing: No such customer: 'cus_gone'",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let window = NOON + i as i64 * 900;
        late(&*store, &format!("f{i}"), "acme", "requests", window, 1).await;
        let agg = store.usage(&ExportKey::new("acme".into(), "requests".into(), window)).await.unwrap().unwrap();
        store.dead_letter(&agg, reason).await.unwrap();
    }
    let admin = tollgate::admin::Admin::new(store.clone());
    assert_eq!(admin.requeue_refused_dead_letters().await.unwrap(), (1, 2), "only the missing customer");
    let left: Vec<String> = store.dead_letters(None, 10).await.unwrap().into_iter().map(|d| d.reason).collect();
    assert_eq!(left, reasons[..2]);
}

/// An attempt that may have reached Stripe (a 500 after executing) starts the count of
/// `unconfirmed_after`; calls Stripe did not take after it (429s) do not reset it: the export is
/// parked `unconfirmed` a day later, never re-sent under a new identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_not_taken_after_one_that_may_have_been_keep_the_unconfirmed_count() {
    let Some((_b, store, standin, h)) = on_store(Kind::Memory, None).await else { return };
    assert_eq!(h.status("/", "key-acme").await, 200);
    h.tollgate.flush().await.unwrap();
    let mut now = NOON + 20 * MIN + 1;
    at(&h.clock, &standin, now);
    standin.fail_next(&[Fault::Status(500)]);
    h.tollgate.export().await.unwrap();
    standin.fail_customer("cus_acme", Some(429));
    while now < NOON + 22 * HOUR {
        now += HOUR;
        at(&h.clock, &standin, now);
        h.tollgate.export().await.unwrap();
    }
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("unconfirmed"), "{}", dead[0].reason);
    assert!(standin.events().is_empty());
}

/// A `sum` revision begun within the invoice grace, then refused with 429s past it (nothing of
/// it reached Stripe), is planned anew when it is finally sent: stamped at export time, so it
/// reaches an open invoice, and with the usage that arrived meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_held_back_by_429s_past_the_invoice_grace_is_stamped_anew() {
    let Some((_b, store, standin, h)) = on_store(Kind::Memory, None).await else { return };
    assert_eq!(h.status("/", "key-acme").await, 200);
    h.tollgate.flush().await.unwrap();
    standin.fail_customer("cus_acme", Some(429));
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    late(&*store, "late", "acme", "requests", NOON, 2).await;
    standin.fail_customer("cus_acme", None);
    let now = NOON + 3 * HOUR;
    at(&h.clock, &standin, now);
    h.tollgate.export().await.unwrap();
    let sent: Vec<(i64, i64)> = standin.events().iter().map(|e| (e.value, e.timestamp)).collect();
    assert_eq!(sent, [(3, now)], "one event, stamped at export time, with the late usage");
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());
}

/// [`config`] (its Stripe at `URL`) with `tokens` (`llm_tokens`) by model and kind, plan `p`
/// with `plan` added, and a route `/generate` reporting it.
fn config_by_dimension(plan: &str) -> String {
    config("URL").replace("[meters.tokens]\nevent_name = \"llm_tokens\"\naggregation = \"hour\"\n", "").replace(
        "[plans.p]\n",
        &format!(
            "[meters.tokens]\nevent_name = \"llm_tokens\"\ndimensions = [\"model\", \"kind\"]\n\
             values.model = [\"m-small\", \"m-large\"]\nvalues.kind = [\"input\", \"output\"]\n\
             [plans.p]\n{plan}[[routes]]\npath = \"/generate\"\nreports = [\"tokens\"]\n"
        ),
    )
}

/// Reconciles the hours from noon to `now`, acting on what is proven.
async fn reconcile(h: &Harness, now: i64) -> tollgate::report::ReconcileReport {
    h.tollgate.reconcile(&ReconcileRequest::new(NOON, now).fix(true)).await.unwrap()
}

/// Reconciliation finds a window Stripe lost (accepted, then missing from its summaries) and
/// sends it again once: only after two passes an hour apart agree and its identifier is past
/// Stripe's 24-hour de-duplication, as a new revision under a new identifier; a window Stripe
/// holds is left alone, and a younger one is reported as settling.
async fn a_window_stripe_lost_is_found_and_sent_again_once(kind: Kind) {
    let Some((_b, store, standin, h)) = on_store(kind, None).await else { return };
    for (tenant, n) in [("acme", 3), ("globex", 2)] {
        for _ in 0..n {
            assert_eq!(h.status("/", &format!("key-{tenant}")).await, 200);
        }
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    let lost = standin.events().into_iter().find(|e| e.customer == "cus_acme").unwrap();
    assert!(standin.lose(&lost.identifier));

    // Exported 10 minutes ago: settling, not compared.
    at(&h.clock, &standin, NOON + 30 * MIN);
    let r = reconcile(&h, NOON + 30 * MIN).await;
    assert_eq!((r.compared, r.settling, r.drift.len()), (0, 2, 0), "{r:?}");

    // Found lacking: noted, not yet proven.
    let first = NOON + 2 * HOUR;
    at(&h.clock, &standin, first);
    let r = reconcile(&h, first).await;
    assert_eq!((r.compared, r.lacking_units, r.surplus_units, r.resent), (2, 3, 0, 0), "{r:?}");
    assert_eq!(r.drift.len(), 1, "{r:?}");
    let d = &r.drift[0];
    assert_eq!((d.tenant.as_str(), d.customer.as_str(), d.hour, d.expected, d.held), ("acme", "cus_acme", NOON, 3, 0));
    assert_eq!(d.action, DriftAction::Lacking { since: first });
    // Proven by a second pass an hour later, but within the 24 hours Stripe de-duplicates
    // its identifier: not yet sent again.
    at(&h.clock, &standin, first + HOUR + 1);
    let r = reconcile(&h, first + HOUR + 1).await;
    assert_eq!(r.drift[0].action, DriftAction::Lacking { since: first }, "{r:?}");
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.events().len(), 2, "nothing sent yet");

    // Past the horizon: sent again as a new revision, once.
    let later = NOON + 25 * HOUR;
    at(&h.clock, &standin, later);
    let r = reconcile(&h, later).await;
    assert_eq!((r.resent, r.drift[0].action), (1, DriftAction::Resent), "{r:?}");
    let r = reconcile(&h, later).await;
    assert_eq!(r.resent, 0, "once: {r:?}");
    let report = h.tollgate.export().await.unwrap();
    assert_eq!((report.events, report.units), (1, 3));
    let events = standin.events();
    assert_eq!(events.len(), 3);
    assert_ne!(events[2].identifier, lost.identifier, "a new identifier");
    assert_eq!((events[2].value, events[2].timestamp), (3, later), "stamped at export: the invoice is open");
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 3);
    assert!(store.pending_exports(i64::MAX, None, 10).await.unwrap().is_empty());

    // Settled: no drift, nothing sent again, however many passes follow.
    for step in 1..=3 {
        let now = later + step * 13 * HOUR;
        at(&h.clock, &standin, now);
        let r = reconcile(&h, now).await;
        assert_eq!((r.drift.len(), r.lacking_units, r.resent), (0, 0, 0), "{r:?}");
        h.tollgate.export().await.unwrap();
    }
    assert_eq!(standin.events().len(), 3);
    assert_eq!(standin.totals()[&("cus_acme".into(), "api_requests".into())], 3);
}

/// An event sent to Stripe outside tollgate (twice billed) is reported as surplus, in the
/// report and the metric, and never "fixed": nothing is sent.
async fn a_window_sent_twice_outside_tollgate_is_reported_never_fixed(kind: Kind) {
    let Some((_b, _store, standin, h)) = on_store(kind, None).await else { return };
    for _ in 0..3 {
        assert_eq!(h.status("/", "key-acme").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    standin.inject(common::stripe::Accepted {
        identifier: "sent-by-hand".into(),
        event_name: "api_requests".into(),
        customer: "cus_acme".into(),
        value: 3,
        timestamp: NOON + 14 * MIN,
    });
    let now = NOON + 3 * HOUR;
    at(&h.clock, &standin, now);
    for fix in [false, true] {
        let r = h.tollgate.reconcile(&ReconcileRequest::new(NOON, now).fix(fix)).await.unwrap();
        assert_eq!((r.surplus_units, r.lacking_units, r.drift.len()), (3, 0, 1), "{r:?}");
        let d = &r.drift[0];
        assert_eq!((d.expected, d.held, d.action), (3, 6, DriftAction::Reported));
    }
    // Events sent outside tollgate in 150 hours before: more than a page of Stripe's summaries,
    // each hour reported.
    for i in 1..=150 {
        standin.inject(common::stripe::Accepted {
            identifier: format!("old-{i}"),
            event_name: "api_requests".into(),
            customer: "cus_acme".into(),
            value: 1,
            timestamp: NOON - i * HOUR,
        });
    }
    let now = now + 5 * MIN;
    at(&h.clock, &standin, now);
    let r = h.tollgate.reconcile(&ReconcileRequest::new(NOON - 160 * HOUR, now)).await.unwrap();
    assert_eq!((r.surplus_units, r.drift.len(), r.reads), (153, 151, 1), "{r:?}");
    // Another tenant's request: nothing of acme's.
    let r = h
        .tollgate
        .reconcile(&ReconcileRequest::new(NOON, now).tenant(TenantId::from("globex")).fix(true))
        .await
        .unwrap();
    assert_eq!((r.compared, r.drift.len(), r.reads), (0, 0, 0), "{r:?}");
    h.tollgate.export().await.unwrap();
    assert_eq!(standin.events().len(), 152, "never sent as a negative value or otherwise");
}

/// Dead letters that may have been taken are settled: one Stripe took (its answer lost) is
/// confirmed; one it never took is requeued once two passes an hour apart agree, and sent.
async fn dead_letters_that_may_have_been_taken_are_settled(kind: Kind) {
    let b = match Backend::new(kind).await {
        Some(b) => b,
        None => return,
    };
    let store = b.store.clone();
    let standin = stand_in().await;
    let toml = config(&standin.url)
        .replace("concurrency = 4", "concurrency = 1\nmax_unknown_failures = 1")
        .replace("timeout = \"60s\"", "timeout = \"2s\"");
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    for tenant in ["acme", "globex"] {
        assert_eq!(h.status("/", &format!("key-{tenant}")).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    // acme's event is taken and its answer never comes; globex's connection drops before it
    // is executed. Both fail without a status: parked as "may or may not have been taken".
    standin.fail_next(&[Fault::TakeAndHang, Fault::Drop]);
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(standin.events().len(), 1, "acme's was taken");

    let first = NOON + 2 * HOUR;
    at(&h.clock, &standin, first);
    let r = reconcile(&h, first).await;
    assert_eq!((r.confirmed, r.requeued), (1, 0), "{r:?}");
    let actions: Vec<(&str, DriftAction)> = r.drift.iter().map(|d| (d.tenant.as_str(), d.action)).collect();
    assert_eq!(actions, [("acme", DriftAction::Confirmed), ("globex", DriftAction::Lacking { since: first })]);
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.iter().map(|d| d.key.tenant.as_str()).collect::<Vec<_>>(), ["globex"]);

    // Too soon for proof: still parked (its last attempt may have been taken late, and
    // Stripe's summaries lag: a day, as for the de-duplication of its identifier).
    for later in [first + 30 * MIN, first + 2 * HOUR, first + 23 * HOUR] {
        at(&h.clock, &standin, later);
        let r = reconcile(&h, later).await;
        assert_eq!((r.requeued, r.drift[0].action), (0, DriftAction::Lacking { since: first }), "{r:?}");
    }
    at(&h.clock, &standin, first + 24 * HOUR);
    let r = reconcile(&h, first + 24 * HOUR).await;
    assert_eq!(r.requeued, 1, "{r:?}");
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
    h.tollgate.export().await.unwrap();
    let totals = standin.totals();
    assert_eq!(totals[&("cus_acme".into(), "api_requests".into())], 1);
    assert_eq!(totals[&("cus_globex".into(), "api_requests".into())], 1);
    assert_eq!(standin.events().len(), 2, "each billed once");
    let later = first + 29 * HOUR;
    at(&h.clock, &standin, later);
    let r = reconcile(&h, later).await;
    assert_eq!((r.drift.len(), r.lacking_units, r.surplus_units), (0, 0, 0), "{r:?}");
}

on_every_store!(a_window_stripe_lost_is_found_and_sent_again_once);
on_every_store!(a_window_sent_twice_outside_tollgate_is_reported_never_fixed);
on_every_store!(dead_letters_that_may_have_been_taken_are_settled);

/// A thin event of Stripe's event destination, as it is delivered: `created` an RFC 3339
/// string, the meter as the related object, no data (Stripe's "Types of events" reference, v2).
fn thin_event(id: &str, kind: &str) -> String {
    serde_json::json!({
        "id": id, "object": "v2.core.event", "type": kind, "livemode": false,
        "created": "2026-03-14T12:20:05.000Z", "context": null, "reason": null,
        "related_object": { "id": "mtr_standin_0000", "type": "billing.meter", "url": "/v1/billing/meters/mtr_standin_0000" },
    })
    .to_string()
}

/// Stripe's asynchronous meter errors: a thin event verified with the event destination's
/// secret (not the webhook's), its full event read from `GET /v2/core/events/{id}` for the
/// window and the errors, logged and counted, and the hours around the window reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_s_meter_errors_are_verified_fetched_counted_and_reconciled() {
    const DESTINATION: &str = "whsec_destination";
    let Some((_b, _store, standin, h)) = on_store(Kind::Memory, None).await else { return };
    assert_eq!(h.status("/", "key-acme").await, 200);
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    let rfc = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
    standin.add_v2_event(serde_json::json!({
        "id": "evt_test_meter_1", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
        "created": rfc(NOON + 20 * MIN + 5), "livemode": false, "context": null, "reason": null,
        "related_object": { "id": "mtr_standin_0000", "type": "billing.meter", "url": "/v1/billing/meters/mtr_standin_0000" },
        "data": {
            "developer_message_summary": "There are 2 invalid events",
            "reason": { "error_count": 2, "error_types": [ {
                "code": "meter_event_customer_not_found", "error_count": 2,
                "sample_errors": [ { "error_message": "No such customer", "request": { "identifier": "tg_x" } } ],
            } ] },
            "validation_start": rfc(NOON + 20 * MIN), "validation_end": rfc(NOON + 20 * MIN + 10),
        },
    }));
    let now = NOON + 3 * HOUR;
    at(&h.clock, &standin, now);
    let handler = h.tollgate.webhook_handler_with_secrets(vec![Secret::new("whsec_webhooks")]).with_event_destination(
        vec![Secret::new(DESTINATION)],
        Some(Secret::new(SECRET)),
        Some(&standin.url),
        Duration::from_secs(5),
    );
    let sign = |payload: &str, secret: &str| stripe_webhook::Webhook::generate_test_header(payload, secret, Some(now));
    let e = thin_event("evt_test_meter_1", "v1.billing.meter.error_report_triggered");
    // Signed with the webhook endpoint's secret, not the destination's: refused.
    assert_eq!(handler.handle(Some(&sign(&e, "whsec_webhooks")), e.as_bytes()).await.status(), 400);
    let reads = standin.summary_reads();
    let reply = handler.handle(Some(&sign(&e, DESTINATION)), e.as_bytes()).await;
    let kind = "v1.billing.meter.error_report_triggered".to_owned();
    assert_eq!(reply.outcome, tollgate::billing::WebhookOutcome::MeterError { kind, errors: 2 });
    assert_eq!(reply.status().as_u16(), 200);
    assert!(reply.body().contains("meter_error"), "{}", reply.body());
    assert_eq!((standin.v2_reads(), h.tollgate.stats().meter_errors), (1, 1));
    // Delivered again (Stripe retries): a duplicate, not counted, not read again.
    let again = handler.handle(Some(&sign(&e, DESTINATION)), e.as_bytes()).await;
    assert_eq!(again.outcome, tollgate::billing::WebhookOutcome::Duplicate);
    assert_eq!((standin.v2_reads(), h.tollgate.stats().meter_errors), (1, 1));
    // A snapshot event signed with the destination's secret: not the webhook endpoint's.
    let snapshot = serde_json::json!({"id": "evt_snap", "object": "event", "type": "payment_method.attached",
        "created": now, "data": {"object": {"object": "payment_method", "customer": "cus_acme"}}})
    .to_string();
    assert_eq!(handler.handle(Some(&sign(&snapshot, DESTINATION)), snapshot.as_bytes()).await.status(), 400);
    // The hours around the window are reconciled in the background (a read of the summaries).
    let mut waited = 0;
    while standin.summary_reads() == reads && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(standin.summary_reads() > reads, "reconciled");
    // A full event Stripe does not return: counted all the same.
    let e2 = thin_event("evt_test_meter_2", "v1.billing.meter.no_meter_found");
    let reply = handler.handle(Some(&sign(&e2, DESTINATION)), e2.as_bytes()).await;
    let kind = "v1.billing.meter.no_meter_found".to_owned();
    assert_eq!(reply.outcome, tollgate::billing::WebhookOutcome::MeterError { kind, errors: 0 });
    // Another thin event: taken and ignored. A handler without a destination refuses thin events.
    let e3 = thin_event("evt_test_3", "v1.account.updated");
    let reply = handler.handle(Some(&sign(&e3, DESTINATION)), e3.as_bytes()).await;
    assert_eq!((reply.status().as_u16(), reply.outcome), (200, tollgate::billing::WebhookOutcome::Ignored));
    let plain = h.tollgate.webhook_handler_with_secrets(vec![Secret::new(DESTINATION)]);
    assert_eq!(plain.handle(Some(&sign(&e, DESTINATION)), e.as_bytes()).await.status(), 400);
    assert_eq!(h.tollgate.stats().meter_errors, 2);
}

/// A meter error report that comes while the reconciliation of an earlier one waits is
/// queued, not dropped: both windows are reconciled, one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_error_report_during_another_s_reconciliation_is_queued() {
    use tollgate::store::DirectoryEvents;
    let Some((_b, _store, standin, h)) = on_store(Kind::Memory, None).await else { return };
    assert_eq!(h.status("/", "key-acme").await, 200);
    h.tollgate.flush().await.unwrap();
    at(&h.clock, &standin, NOON + 20 * MIN + 1);
    h.tollgate.export().await.unwrap();
    // Each pass waits until its window has settled: the first one at once, the second (apart
    // from it, so never merged with it) a second later.
    let after = h.tollgate.config().export().reconcile_after.as_secs() as i64;
    let to = NOON + 20 * MIN + 30;
    at(&h.clock, &standin, to + after + 59);
    let reads = standin.summary_reads();
    h.tollgate.meter_error(NOON + 20 * MIN, NOON + 20 * MIN + 10);
    h.tollgate.meter_error(NOON + 20 * MIN + 20, to);
    let mut waited = 0;
    while standin.summary_reads() < reads + 2 && waited < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert_eq!(standin.summary_reads(), reads + 2, "one pass per report");
}

/// A reconciliation pass's store calls are bounded by `limits.background_timeout`: it ends
/// with the store's timeout rather than wait on a store that hangs (on main it waited for
/// good).
#[tokio::test]
async fn a_reconciliation_on_a_store_that_hangs_ends_at_the_background_timeout() {
    let standin = stand_in().await;
    let toml = format!("{}\n[limits]\nbackground_timeout = \"300ms\"\n", config(&standin.url));
    let store = Arc::new(Faulty::default());
    let h = node(&toml, store.clone(), NOON + 2 * HOUR);
    at(&h.clock, &standin, NOON + 2 * HOUR);
    store.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let request = ReconcileRequest::new(NOON, NOON + HOUR);
    let pass = h.tollgate.reconcile(&request);
    let e = tokio::time::timeout(Duration::from_secs(60), pass).await.expect("the pass ends").unwrap_err();
    assert!(
        matches!(e, tollgate::report::ReconcileError::Store(tollgate::store::StoreError::Timeout(d)) if d == Duration::from_millis(300)),
        "{e:?}"
    );
}

/// Money is never billed as units: on a plan with a spend cap, the priced meters go out to
/// the stand-in (which answers an `event_name` it has no meter for with 400, as Stripe does),
/// the meter `spend` never; its usage stays in the store, counted, reported, not exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_never_exported_only_the_priced_meters_are() {
    let standin = stand_in().await;
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let toml = config(&standin.url).replace(
        "[plans.p]\n",
        "[billing]\ncurrency = \"usd\"\n[plans.p]\nprices.requests = \"0.001\"\nprices.tokens = \"0.00000015\"\n\
         spend = { limit = \"100.00\" }\n",
    );
    let h = node(&toml, store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    for _ in 0..3 {
        assert_eq!(h.status("/tokens/10", "key-acme").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let spent = common::committed(&*store, "acme", "spend", NOON - HOUR, NOON + HOUR, 15 * MIN).await;
    assert_eq!(spent, 3 * (1_000_000 + 1_500), "the spend is recorded: 3 × (0.001 + 10 × 0.00000015)");
    // Before the export: what it would send has no spend.
    at(&h.clock, &standin, NOON + HOUR + 5 * MIN);
    let preview = h.tollgate.export_preview().await.unwrap();
    assert!(!preview.is_empty() && preview.iter().all(|e| e.event_name != "spend"), "{preview:?}");
    drain(&[&h], &standin, NOON + HOUR + 5 * MIN).await;
    let names: std::collections::BTreeSet<String> = standin.events().into_iter().map(|e| e.event_name).collect();
    assert_eq!(names, ["api_requests".to_owned(), "llm_tokens".to_owned()].into(), "only the priced meters");
    let key = |t: &str| ("cus_acme".to_owned(), t.to_owned());
    assert_eq!((standin.totals()[&key("api_requests")], standin.totals()[&key("llm_tokens")]), (3, 30));
    assert!(h.tollgate.usage_store().dead_letters(None, 10).await.unwrap().is_empty(), "nothing refused");
}

/// Tokens by model and kind exported to Stripe: one meter (`llm_tokens`) whose events carry
/// the series' values under its `dimension_payload_keys`, each (tenant, series, window) sent
/// once, the total and the selector never; reconciliation finds Stripe's totals equal to the
/// ledger's. A Stripe meter that does not list the dimensions refuses the events, which are
/// dead-lettered, never billed without them.
#[tokio::test]
async fn series_are_exported_once_each_with_their_dimensions() {
    let toml = config_by_dimension(
        "quotas.\"tokens{model=m-large}\" = { limit = 100000, period = \"day\", mode = \"soft\" }\n",
    );
    for declared in [true, false] {
        let standin = StandIn::start(&[("api_requests", None), ("llm_tokens", None)]).await;
        if declared {
            standin.set_dimension_keys("llm_tokens", &["model", "kind"]);
        }
        let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
        let h = node(&toml.replace("URL", &standin.url), store.clone(), NOON);
        at(&h.clock, &standin, NOON);
        let mut sent = BTreeMap::new();
        for (tenant, model, kind, units) in [
            ("acme", "m-large", "output", 240u64),
            ("acme", "m-large", "input", 812),
            ("acme", "m-small", "input", 31),
            ("globex", "m-large", "output", 7),
            ("acme", "m-large", "output", 10),
        ] {
            let key: &'static str = if tenant == "acme" { "key-acme" } else { "key-globex" };
            let info = tollgate::door::RequestInfo::new(
                "POST",
                "/generate",
                tollgate::door::Credential::ApiKey(key.as_bytes()),
            );
            let ticket = crate::common::admitted_ticket(&h.tollgate, &info).await;
            let d = tollgate::Dimensions::new().with("model", model).with("kind", kind);
            ticket.context().record_with("tokens", units, &d).unwrap();
            assert!(ticket.complete(200));
            *sent.entry((format!("cus_{tenant}"), model, kind)).or_insert(0) += units as i64;
        }
        h.tollgate.flush().await.unwrap();
        let now = drain(&[&h], &standin, NOON + HOUR).await;
        let tokens: Vec<_> = standin.events().into_iter().filter(|e| e.event_name == "llm_tokens").collect();
        if !declared {
            assert!(tokens.is_empty(), "a meter without the dimensions takes none: {tokens:?}");
            let dead = store.dead_letters(None, 10).await.unwrap();
            assert_eq!(dead.len(), 4, "each series' window dead-lettered: {dead:?}");
            assert!(dead.iter().all(|d| d.key.meter.as_str().starts_with("tokens{")), "{dead:?}");
            continue;
        }
        // One event per (tenant, series, window), with its values.
        assert_eq!(tokens.len(), 4, "{tokens:?}");
        let mut got = BTreeMap::new();
        for e in &tokens {
            let dims = standin.dimensions_of(&e.identifier);
            let key = (e.customer.clone(), dims["model"].clone(), dims["kind"].clone());
            assert!(got.insert(key, e.value).is_none(), "one event per series and window");
        }
        let want: BTreeMap<_, _> =
            sent.iter().map(|((c, m, k), v)| ((c.clone(), (*m).to_owned(), (*k).to_owned()), *v)).collect();
        assert_eq!(got, want);
        assert_eq!(standin.max_sends_per_identifier(), 1);
        assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
        let r = h.tollgate.reconcile(&ReconcileRequest::new(NOON, now + HOUR)).await.unwrap();
        assert_eq!((r.surplus_units, r.lacking_units, r.drift.len()), (0, 0, 0), "{r:?}");
    }
}

/// Tenant acme's three series of `tokens` in the noon hour (240 units of m-large output, 240 of
/// m-large input, 31 of m-small input) exported to a stand-in whose meter lists the dimension
/// keys; then Stripe loses the m-large input event, which is returned.
async fn three_series_one_lost() -> (StandIn, Arc<dyn StoreInspect>, Harness, common::stripe::Accepted) {
    let toml = config_by_dimension("");
    let standin = StandIn::start(&[("api_requests", None), ("llm_tokens", None)]).await;
    standin.set_dimension_keys("llm_tokens", &["model", "kind"]);
    let store: Arc<dyn StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = node(&toml.replace("URL", &standin.url), store.clone(), NOON);
    at(&h.clock, &standin, NOON);
    for (model, kind, units) in [("m-large", "output", 240u64), ("m-large", "input", 240), ("m-small", "input", 31)] {
        let info =
            tollgate::door::RequestInfo::new("POST", "/generate", tollgate::door::Credential::ApiKey(b"key-acme"));
        let ticket = crate::common::admitted_ticket(&h.tollgate, &info).await;
        ticket
            .context()
            .record_with("tokens", units, &tollgate::Dimensions::new().with("model", model).with("kind", kind))
            .unwrap();
        assert!(ticket.complete(200));
    }
    h.tollgate.flush().await.unwrap();
    drain(&[&h], &standin, NOON + HOUR).await;
    let tokens = || standin.events().into_iter().filter(|e| e.event_name == "llm_tokens").collect::<Vec<_>>();
    assert_eq!(tokens().len(), 3);
    let lost = tokens()
        .into_iter()
        .find(|e| standin.dimensions_of(&e.identifier)["kind"] == "input" && e.value == 240)
        .unwrap();
    assert_eq!(standin.dimensions_of(&lost.identifier)["model"], "m-large");
    assert!(standin.lose(&lost.identifier));
    (standin, store, h, lost)
}

/// Reconciliation reads Stripe's summaries grouped by the meter's dimension keys and compares
/// each series on its own: of two series with the same units in one hour, the one Stripe lost
/// is named (by its series id), proven, and sent again alone with its values; its twin is left
/// alone. Compared as a total, the shortfall would match both and be left to a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finds_the_series_stripe_lost_and_sends_it_again_alone() {
    let (standin, _store, h, lost) = three_series_one_lost().await;
    let tokens = || standin.events().into_iter().filter(|e| e.event_name == "llm_tokens").collect::<Vec<_>>();
    let series = "tokens{model=m-large,kind=input}";

    let first = NOON + 3 * HOUR;
    at(&h.clock, &standin, first);
    let r = reconcile(&h, first).await;
    let tokens_drift: Vec<_> = r.drift.iter().filter(|d| d.meter.as_str().starts_with("tokens")).collect();
    assert_eq!(tokens_drift.len(), 1, "{r:?}");
    let d = tokens_drift[0];
    assert_eq!((d.meter.as_str(), d.expected, d.held), (series, 240, 0), "{r:?}");
    assert_eq!(d.action, DriftAction::Lacking { since: first }, "named, not ambiguous: {r:?}");
    assert_eq!(r.lacking_units, 240, "{r:?}");
    at(&h.clock, &standin, first + HOUR + 1);
    reconcile(&h, first + HOUR + 1).await;

    // Past Stripe's de-duplication horizon: that series alone is sent again, with its values.
    let later = NOON + 26 * HOUR;
    at(&h.clock, &standin, later);
    let r = reconcile(&h, later).await;
    assert_eq!(r.resent, 1, "{r:?}");
    let report = h.tollgate.export().await.unwrap();
    assert_eq!((report.events, report.units), (1, 240));
    let again = tokens().pop().unwrap();
    assert_ne!(again.identifier, lost.identifier);
    let dims = standin.dimensions_of(&again.identifier);
    assert_eq!((dims["model"].as_str(), dims["kind"].as_str(), again.value), ("m-large", "input", 240));
    assert_eq!(standin.totals()[&("cus_acme".into(), "llm_tokens".into())], 511);
    for step in 1..=2 {
        let now = later + step * 13 * HOUR;
        at(&h.clock, &standin, now);
        let r = reconcile(&h, now).await;
        assert_eq!((r.drift.len(), r.lacking_units, r.surplus_units, r.resent), (0, 0, 0, 0), "{r:?}");
    }
    // A read by dimension refused (400: here, a key the Stripe meter no longer lists): the
    // meter's total is compared instead, never left unread.
    standin.set_dimension_keys("llm_tokens", &["model"]);
    let now = later + 40 * HOUR;
    at(&h.clock, &standin, now);
    let reads = standin.summary_reads();
    let r = h.tollgate.reconcile(&ReconcileRequest::new(NOON, now)).await.unwrap();
    assert_eq!((r.unread, r.drift.len(), r.lacking_units, r.surplus_units), (0, 0, 0, 0), "{r:?}");
    // Requests' hour, and tokens' two hours (noon's, and the one its loss was sent again in)
    // as totals; reads: requests, tokens by dimension (refused), tokens' total.
    assert_eq!((r.compared, r.reads), (3, 3), "{r:?}");
    assert_eq!(standin.summary_reads() - reads, 2, "the refused read is not answered");
}

/// A series' units Stripe holds under other values (here, none) are never taken for a loss:
/// the hour has a series holding more than the ledger, so the series that looks lost is left
/// to a person (`ambiguous`), never sent again, whatever the passes, and the surplus is
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_stripe_holds_under_other_values_is_never_sent_again() {
    let (standin, _store, h, lost) = three_series_one_lost().await;
    standin.inject(common::stripe::Accepted { identifier: "by-hand".into(), ..lost.clone() });
    for now in [NOON + 3 * HOUR, NOON + 4 * HOUR + 1, NOON + 26 * HOUR] {
        at(&h.clock, &standin, now);
        let r = reconcile(&h, now).await;
        assert_eq!(r.resent, 0, "{r:?}");
        let series = r.drift.iter().find(|d| d.meter.as_str() == "tokens{model=m-large,kind=input}").expect("named");
        assert_eq!((series.expected, series.held, series.action), (240, 0, DriftAction::Ambiguous), "{r:?}");
        let other = r.drift.iter().find(|d| d.meter.as_str() == "tokens").expect("the surplus, named by the meter");
        assert_eq!((other.expected, other.held), (0, 240), "{r:?}");
        assert_eq!(r.surplus_units, 240, "{r:?}");
    }
    assert_eq!(h.tollgate.export().await.unwrap().events, 0, "nothing put back in line");
}
