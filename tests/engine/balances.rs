//! Prepaid balances on the request path: a quota whose limit is the tenant's grants, spent
//! through the same leases by a fleet that never passes it, refused with 402 (or 429), shown in
//! the headers and the usage report, taken below zero only by usage reported after the work,
//! and notified at thresholds.

use crate::common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::{node_with_worker, Harness, NOON};
use tollgate::{
    admin::Admin,
    clock::Clock,
    report::ThresholdCrossed,
    store::{CreditBalance, SqliteStore, Store},
    Config, Tollgate,
};

/// A plan whose requests spend a prepaid balance (`requests`), with a route whose handler
/// reports tokens into another one.
fn toml(extra: &str) -> String {
    format!(
        "{extra}\n[meters.tokens]\nevent_name = \"tokens\"\n[[routes]]\npath = \"/tokens/{{n}}\"\nreports = [\"tokens\"]\n{}",
        common::one_tenant(
            "rate = \"100000/s\"\nquotas.requests = { period = \"prepaid\" }\nquotas.tokens = { period = \"prepaid\", lease = 5 }"
        )
    )
}

/// The `[usage]` of engines sharing one SQLite store: their calls wait for each other's turn
/// on its connection, and on a loaded machine (CI's other tests, its disk) a call passes the
/// default 250 ms and its request is answered 503. What these tests check is the balance, not
/// the store's speed.
const ONE_FILE: &str = "[usage]\nstore_timeout = \"30s\"";

async fn balance(admin: &Admin, meter: &str) -> CreditBalance {
    let (_, balances) = admin.credits("t").await.unwrap();
    balances.into_iter().find(|(m, _)| m.as_str() == meter).map(|(_, b)| b).unwrap_or_default()
}

#[tokio::test]
async fn an_empty_balance_answers_402_without_retry_after_until_a_grant() {
    let h = Harness::new(&toml(""));
    let admin = Admin::for_engine(&h.tollgate);
    // No grant yet: nothing to spend.
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 402);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), None, "a balance comes back with a payment, not with time");
    let body = r.json();
    assert_eq!(body["status"], 402);
    assert!(body["type"].as_str().unwrap().ends_with("#variant.CreditsExhausted"), "{body}");
    assert_eq!(r.rejection.unwrap().kind(), tollgate::response::RejectionKind::CreditsExhausted);

    // A grant through this node's Admin is seen at once (the tenant is forgotten here).
    admin.grant_credits("t", "requests", 3, None, "pi_1").await.unwrap();
    for i in (0..3).rev() {
        let r = h.get("/", "key-t").await;
        assert_eq!(r.status, 200, "request with {} left", i + 1);
        let limit = r.header("ratelimit").unwrap();
        assert!(limit.ends_with(&format!(", \"requests-prepaid\";r={i}")), "no reset, a balance never resets: {limit}");
        assert!(!r.header("ratelimit-policy").unwrap_or("").contains("prepaid"), "its quota is the tenant's own");
    }
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 402);
    assert!(r.header("ratelimit").unwrap().ends_with(", \"requests-prepaid\";r=0"));
    // A refused request costs nothing; a handler's 5xx is not billed and gives its unit back.
    admin.grant_credits("t", "requests", 1, None, "pi_2").await.unwrap();
    assert_eq!(h.status("/fail", "key-t").await, 500);
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(h.status("/", "key-t").await, 402);

    let report = h.tollgate.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let q = report.quotas.iter().find(|q| q.meter.as_str() == "requests").unwrap();
    assert_eq!((q.period, q.limit, q.used, q.remaining), (tollgate::config::Period::Prepaid, 4, 4, 0));
    h.tollgate.shutdown().await.unwrap();
    let b = balance(&admin, "requests").await;
    assert_eq!((b.granted, b.reserved), (4, 4), "every unit leased was used or given back");
}

#[tokio::test]
async fn an_empty_balance_may_answer_429_and_legacy_headers_carry_no_reset() {
    let h = Harness::new(&toml("[limits]\nbalance_status = 429\nheaders = \"legacy\""));
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "requests", 2, None, "pi_1").await.unwrap();
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 200);
    assert_eq!((r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining")), (Some("2"), Some("1")));
    assert_eq!(r.header("x-ratelimit-reset"), None);
    assert_eq!(h.status("/", "key-t").await, 200);
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(r.rejection.unwrap().kind(), tollgate::response::RejectionKind::QuotaExceeded);
    for bad in ["balance_status = 500", "balance_status = 0"] {
        let e = Config::from_toml_str(&format!("[limits]\n{bad}\n")).unwrap_err();
        assert_eq!(e.key(), "limits.balance_status", "{e}");
    }
}

#[test]
fn a_prepaid_quota_has_no_limit_key_and_is_hard() {
    for (plan, key) in [
        ("quotas.requests = { period = \"prepaid\", limit = 10 }", "plans.p.quotas.requests.limit"),
        ("quotas.requests = { period = \"prepaid\", mode = \"soft\" }", "plans.p.quotas.requests.mode"),
        ("quotas.requests = { period = \"prepaid\", anchor_day = 3 }", "plans.p.quotas.requests.anchor_day"),
        ("quotas.requests = { period = \"day\" }", "plans.p.quotas.requests.limit"),
        ("quotas.requests = { period = \"week\", limit = 3 }", "plans.p.quotas.requests.period"),
    ] {
        let e = Config::from_toml_str(&common::one_tenant(plan)).unwrap_err();
        assert_eq!(e.key(), key, "{plan}: {e}");
        assert!(e.line().is_some_and(|l| l > 0), "{e}");
    }
    let config = Config::from_toml_str(&toml("")).unwrap();
    let plan = &config.plans()[&tollgate::config::PlanId::from("p")];
    let q = &plan.quotas()[&tollgate::config::MeterId::from("requests")];
    assert_eq!(
        (q.period(), q.mode(), q.lease().get()),
        (tollgate::config::Period::Prepaid, tollgate::config::QuotaMode::Hard, 100)
    );
}

/// Usage known only after the work (a handler's report) is billed even past the balance: the
/// balance goes below zero, requests are refused, and the next grant pays the debt first.
#[tokio::test]
async fn reported_usage_takes_a_balance_below_zero_and_the_next_grant_pays_it_first() {
    let h = Harness::new(&toml(""));
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "requests", 100, None, "pi_r").await.unwrap();
    admin.grant_credits("t", "tokens", 10, None, "pi_t").await.unwrap();
    assert_eq!(h.status("/tokens/25", "key-t").await, 200, "admitted with tokens left; reports 25");
    assert_eq!(h.status("/tokens/1", "key-t").await, 402, "the balance is below zero");
    h.tollgate.shutdown().await.unwrap();
    let b = balance(&admin, "tokens").await;
    assert_eq!((b.granted, b.reserved, b.left()), (10, 25, -15), "billed past the balance");

    let h = Harness::with_store(&toml(""), h.memory.clone().unwrap(), NOON);
    admin.grant_credits("t", "tokens", 20, None, "pi_t2").await.unwrap();
    let admin = Admin::for_engine(&h.tollgate);
    // 30 granted, 25 used: 5 left.
    assert_eq!(h.status("/tokens/5", "key-t").await, 200);
    assert_eq!(h.status("/tokens/1", "key-t").await, 402);
    h.tollgate.shutdown().await.unwrap();
    let b = balance(&admin, "tokens").await;
    assert_eq!((b.granted, b.reserved), (30, 30));
}

/// A balance is spent from leases like any hard quota, not with a store call per request: the
/// first lease is the configured size (nothing is known of the balance before the store's first
/// answer, and the store's own rule keeps it to an eighth of what is left).
#[tokio::test]
async fn a_balance_is_spent_from_leases_not_a_store_call_per_request() {
    let store = Arc::new(common::Faulty::default());
    let toml = common::one_tenant("quotas.requests = { period = \"prepaid\", lease = 50 }");
    let h = Harness::with_store(&toml, store.clone(), NOON);
    Admin::for_engine(&h.tollgate).grant_credits("t", "requests", 1000, None, "pi_1").await.unwrap();
    let before = store.quota_calls.load(Ordering::SeqCst);
    for _ in 0..40 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    let calls = store.quota_calls.load(Ordering::SeqCst) - before;
    assert!(calls <= 3, "{calls} store calls for 40 requests on a lease of 50");
}

/// A usage event of work already done spends the balance whatever its time: one dated in an
/// earlier lease window (512 hours) is not let off, and takes the balance below zero.
#[tokio::test]
async fn a_usage_event_of_an_earlier_window_spends_the_balance() {
    let h = Harness::new(&toml(""));
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "requests", 100, None, "pi_r").await.unwrap();
    admin.grant_credits("t", "tokens", 10, None, "pi_t").await.unwrap();
    // A window starts every 512 hours: the last one began less than 512 hours ago; an hour
    // before it is an earlier window, well within an event's age limit.
    let window = 512 * 3600;
    let at = NOON - NOON.rem_euclid(window) - 3600;
    let event = tollgate::events::Event::new(
        "job-1",
        "t".into(),
        "tokens".into(),
        25,
        std::time::UNIX_EPOCH + Duration::from_secs(at as u64),
    );
    h.tollgate.record_event(event).await.unwrap();
    assert_eq!(h.status("/tokens/1", "key-t").await, 402, "the balance is below zero");
    h.tollgate.shutdown().await.unwrap();
    let b = balance(&admin, "tokens").await;
    assert_eq!((b.granted, b.reserved), (10, 25), "billed past the balance");
}

/// A balance fails closed when the quota store does not answer, whatever `on_store_error`
/// says: no work is served on credit the store cannot check.
#[tokio::test]
async fn a_balance_fails_closed_whatever_on_store_error_says() {
    let store = Arc::new(common::Faulty::default());
    let toml = toml("[usage]\non_store_error = \"fail-open\"\nstore_timeout = \"100ms\"");
    let h = Harness::with_store(&toml, store.clone(), NOON);
    store.down.store(true, Ordering::SeqCst);
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 503, "{:?}", r.body);
}

#[tokio::test]
async fn thresholds_fire_on_balances_by_percent_and_by_units_left() {
    let config = Config::from_toml_str(&toml("[usage]\nnotify_at = [50]\nnotify_left = [2]")).unwrap();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    // (percent, units left, limit, reserved) of each notification.
    type Mark = (u16, Option<u64>, u64, u64);
    let seen: Arc<Mutex<Vec<Mark>>> = Arc::default();
    let crossed = seen.clone();
    let (engine, _worker) = Tollgate::builder(config)
        .clock(clock)
        .on_threshold(move |c: &ThresholdCrossed| {
            assert_eq!(c.period, tollgate::config::Period::Prepaid);
            if c.meter.as_str() != "tokens" {
                return;
            }
            crossed.lock().unwrap().push((c.percent, c.left, c.limit, c.reserved));
        })
        .build();
    let h = Harness::from_layer(tollgate::TollgateLayer::new(engine), handle);
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "requests", 100, None, "pi_r").await.unwrap();
    admin.grant_credits("t", "tokens", 10, None, "pi_t").await.unwrap();
    // Tokens reported: each report past the lease asks the store (leases of 1 near the end).
    for _ in 0..9 {
        assert_eq!(h.status("/tokens/1", "key-t").await, 200);
    }
    let marks = seen.lock().unwrap().clone();
    assert!(marks.iter().any(|m| m.0 == 50 && m.1.is_none() && m.2 == 10), "{marks:?}");
    assert!(marks.iter().any(|m| m.1 == Some(2) && m.2 == 10 && m.3 >= 8), "{marks:?}");
    assert_eq!(marks.len(), 2, "once each: {marks:?}");
    // A top-up is a new limit: its thresholds start afresh.
    admin.grant_credits("t", "tokens", 90, None, "pi_t2").await.unwrap();
    for _ in 0..60 {
        assert_eq!(h.status("/tokens/1", "key-t").await, 200);
    }
    let marks = seen.lock().unwrap().clone();
    assert!(marks.iter().any(|m| m.0 == 50 && m.2 == 100), "{marks:?}");
}

/// Four engines with their workers, on one SQLite file, spend one balance from many tasks while
/// the clock moves and a grant arrives: none admits past the balance, and once they stop, the
/// store's count equals the units admitted (every unit leased used or given back). The run is
/// paced by what was spent, not by time: the grant comes once 200 units were admitted, and the
/// tasks stop once every engine was refused (402) by a request sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_spend_one_balance_concurrently_and_never_pass_it() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("b.db")).await.unwrap());
    let toml = toml(ONE_FILE);
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        (0..4).map(|_| Arc::new(node_with_worker(&toml, store.clone(), clock.clone(), handle.clone()))).collect();
    let admin = Admin::new(store.clone()).with_config(Config::from_toml_str(&toml).unwrap());
    admin.grant_credits("t", "requests", 300, None, "pi_1").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    // Set once the second grant is in; then, for each engine, whether a request sent after it
    // was refused for want of credit.
    let topped_up = Arc::new(AtomicBool::new(false));
    let dry: Arc<[AtomicBool; 4]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for i in 0..32 {
        let node = nodes[i % 4].clone();
        let (stop, admitted, topped_up, dry) = (stop.clone(), admitted.clone(), topped_up.clone(), dry.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let path = if n.is_multiple_of(6) { "/fail" } else { "/" };
                let after_grant = topped_up.load(Ordering::SeqCst);
                let r = node.get(path, "key-t").await;
                match r.status.as_u16() {
                    200 => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    402 if after_grant => dry[i % 4].store(true, Ordering::SeqCst),
                    500 | 402 => {}
                    // The clock stands still while the tasks run (it moves in steps): on a
                    // starved machine the plan's rate may refuse between two steps. What is
                    // checked is the balance.
                    429 if r.rejection.as_ref().is_some_and(|r| r.kind() == tollgate::RejectionKind::RateLimited) => {}
                    s => panic!("status {s}: {:?} {}", r.rejection.map(|r| r.kind()), String::from_utf8_lossy(&r.body)),
                }
                if n.is_multiple_of(5) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // The clock moves while they run; a second grant arrives once 200 units were spent. Once
    // every engine was refused after it, three seconds more: each engine asks the store again
    // (a balance found spent is trusted for the rest of its second).
    let (mut steps, mut after_dry) = (0, 0);
    while after_dry < 6 {
        if dry.iter().all(|d| d.load(Ordering::SeqCst)) {
            after_dry += 1;
        }
        steps += 1;
        assert!(steps < 10_000, "not spent after {steps} steps: admitted {}", admitted.load(Ordering::Relaxed));
        if tasks.iter().any(tokio::task::JoinHandle::is_finished) {
            break; // a task failed: its panic is told below
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        handle.advance(Duration::from_millis(500));
        if !topped_up.load(Ordering::SeqCst) && admitted.load(Ordering::Relaxed) >= 200 {
            admin.grant_credits("t", "requests", 200, None, "pi_2").await.unwrap();
            // A duplicate delivery of the same payment adds nothing.
            admin.grant_credits("t", "requests", 200, None, "pi_2").await.unwrap();
            // A refusal counts as the new balance spent only from the next second: within
            // the one the first balance ran out in, an engine trusts what the store said.
            handle.advance(Duration::from_secs(1));
            topped_up.store(true, Ordering::SeqCst);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert!(admitted <= 500, "admitted {admitted} of a 500-unit balance");
    for n in &nodes {
        n.tollgate.shutdown().await.unwrap();
    }
    let b = balance(&admin, "requests").await;
    assert_eq!(b.granted, 500);
    assert_eq!(b.reserved, admitted, "the balance's count is the units admitted");
    // Every engine refused for want of credit: the balance was spent, but for what the others
    // held in their last (shrinking) leases.
    assert!(admitted >= 500 - 3 * 8, "admitted {admitted}");
    eprintln!("admitted {admitted} of 500 in {steps} steps of the clock");
}

/// Spends a 50-unit balance until 402 on `nodes` engines with their workers (one SQLite file),
/// has another process grant 300 more, then sends 20 requests a second for 5 s, round robin:
/// returns the requests admitted in each second.
async fn top_up_after_402(nodes: usize) -> Vec<u32> {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("b.db")).await.unwrap());
    let toml = toml(ONE_FILE);
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let nodes: Vec<Harness> =
        (0..nodes).map(|_| node_with_worker(&toml, store.clone(), clock.clone(), handle.clone())).collect();
    // The CLI: another process on the same store, which no engine hears from.
    let cli = Admin::new(store.clone()).with_config(Config::from_toml_str(&toml).unwrap());
    cli.grant_credits("t", "requests", 50, None, "pi_1").await.unwrap();
    let mut spent = 0;
    'spend: for _ in 0..200 {
        for node in &nodes {
            match node.status("/", "key-t").await {
                200 => spent += 1,
                402 => break 'spend,
                s => panic!("status {s}"),
            }
        }
        handle.advance(Duration::from_millis(50));
    }
    assert!(spent <= 50, "spent {spent} of 50");
    cli.grant_credits("t", "requests", 300, None, "pi_2").await.unwrap();
    let mut seconds = vec![0u32; 5];
    for i in 0..100 {
        if nodes[i % nodes.len()].status("/", "key-t").await == 200 {
            seconds[i / 20] += 1;
        }
        handle.advance(Duration::from_millis(50));
        tokio::task::yield_now().await;
    }
    for n in &nodes {
        n.tollgate.shutdown().await.unwrap();
    }
    let b = balance(&cli, "requests").await;
    assert_eq!(b.granted, 350);
    assert!(b.reserved <= 350, "{b:?}");
    seconds
}

/// A top-up granted by another process (the CLI, a webhook on another node) after a 402 is
/// spent within a second, then at the full request rate, on one node and on four: the store's
/// "spent" is trusted for at most the rest of that second, and a later full grant clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_after_402_is_spent_within_a_second_on_one_node_and_on_four() {
    for nodes in [1, 4] {
        let seconds = top_up_after_402(nodes).await;
        assert!(seconds[0] >= 1, "{nodes} node(s): nothing admitted in the first second: {seconds:?}");
        assert_eq!(&seconds[1..], &[20, 20, 20, 20], "{nodes} node(s): every request after the first second");
    }
}

/// The 402 text claims no stale count: the store, not this node's last answer, knows what
/// is left.
#[tokio::test]
async fn the_402_text_names_no_cached_count() {
    let h = Harness::new(&toml(""));
    let admin = Admin::for_engine(&h.tollgate);
    admin.grant_credits("t", "requests", 2, None, "pi_1").await.unwrap();
    assert_eq!(h.status("/", "key-t").await, 200);
    assert_eq!(h.status("/", "key-t").await, 200);
    let r = h.get("/", "key-t").await;
    assert_eq!(r.status, 402);
    let detail = r.json()["detail"].as_str().unwrap().to_owned();
    assert!(!detail.chars().any(|c| c.is_ascii_digit()), "{detail}");
    assert!(detail.contains("requests"), "{detail}");
}
