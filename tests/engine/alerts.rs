//! Alerts: threshold crossings written once per fleet to the outbox and delivered as signed
//! webhooks, verified by the official Standard Webhooks library (scripts/alert-receiver.py).
#![cfg(feature = "alerts")]

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use crate::common;

use common::alerts::{secret_file, section, Receiver, SECRET};
use common::{node_with_worker, Faulty, Harness, NOON};
use tollgate::store::{AlertQuery, AlertState, OutboxStore};

/// Tenant `t` on a plan of 100 requests a day (hard), alerts at 80%.
fn plan(alerts: &str) -> String {
    format!(
        "[usage]\nnotify_at = [80]\nstore_timeout = \"4s\"\n{alerts}\n\
         [plans.p]\nrate = \"100000/s\"\nquotas.requests = {{ limit = 100, period = \"day\" }}\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n"
    )
}

/// Every delivery verified by the Standard Webhooks library and valid by the schema.
fn all_sound(got: &[common::alerts::Delivery]) {
    for d in got {
        assert!(d.verified && d.valid, "{d:?}");
    }
}

/// Awaits the workers' deliveries: every row in the outbox delivered, and no node finding
/// one left to deliver (a second delivery, were there one, would have been made by then).
async fn settled(store: &Arc<dyn tollgate::store::StoreInspect>, nodes: &[Arc<Harness>]) {
    common::eventually("every alert delivered", Duration::from_secs(15), || async {
        let rows = store.list_alerts(&AlertQuery::new(100)).await.unwrap();
        !rows.is_empty() && rows.iter().all(|r| r.state == AlertState::Delivered)
    })
    .await;
    for h in nodes {
        assert_eq!(h.tollgate.deliver_alerts().await.claimed, 0, "nothing left to deliver");
    }
}

/// Four engines cross 80% of a quota together: each sees the crossing in its store's answers
/// and writes it, and the receiver gets exactly one alert, verified by the official library.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_crossing_together_send_one_alert() {
    let Some(receiver) = Receiver::start() else { return };
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, ""));
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        (0..4).map(|_| Arc::new(node_with_worker(&toml, store.clone(), clock.clone(), handle.clone()))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8usize {
        let h = nodes[i % 4].clone();
        tasks.spawn(async move {
            for _ in 0..12 {
                let _ = h.get("/", "key-t").await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Every node writes what it saw (its flush), then the workers deliver.
    for h in &nodes {
        h.tollgate.flush().await.unwrap();
    }
    receiver.wait_for(Duration::from_secs(10), |got| !got.is_empty()).await;
    settled(&store, &nodes).await;
    let got = receiver.received().await;
    all_sound(&got);
    // The fleet crossed 80%, and (the leases of four nodes) reached the limit: one alert
    // each, each delivered once.
    let crossed: Vec<_> = got.iter().filter(|d| d.kind.as_deref() == Some("quota.threshold_crossed")).collect();
    assert_eq!(crossed.len(), 1, "one alert for the fleet: {got:?}");
    let mut ids: Vec<_> = got.iter().map(|d| d.id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "each alert delivered once: {got:?}");
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    assert_eq!(rows.len(), got.len(), "one row per alert: {rows:?}");
    assert!(rows.iter().all(|r| r.state == AlertState::Delivered));
    assert!(
        rows.iter().any(|r| Some(r.key.id.as_str()) == crossed[0].id.as_deref()),
        "the webhook-id is the alert's id"
    );
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
}

/// A receiver down for a while: the alert is tried again, with backoff, under the same id,
/// and arrives once the receiver is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_arrives_once_its_receiver_is_back() {
    let Some(receiver) = Receiver::start() else { return };
    receiver.mode("down", 0).await;
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, ""));
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = node_with_worker(&toml, store.clone(), clock, handle.clone());
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    receiver.wait_for(Duration::from_secs(5), |got| !got.is_empty()).await;
    // Down for a minute of the engine's clock: retried, backing off.
    for _ in 0..6 {
        handle.advance(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    receiver.mode("ok", 0).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        handle.advance(Duration::from_secs(30));
        got = receiver.wait_for(Duration::from_millis(1_500), |got| got.iter().any(|d| d.mode == "ok")).await;
        if got.iter().any(|d| d.mode == "ok") {
            break;
        }
    }
    all_sound(&got);
    assert!(got.len() >= 2, "tried while down, then delivered: {got:?}");
    assert!(got.iter().all(|d| d.id == got[0].id), "every attempt under one id: {got:?}");
    assert_eq!(got.iter().filter(|d| d.mode == "ok").count(), 1, "delivered once it was back: {got:?}");
    // The receiver answers before the node settles the row: its settle lands just after.
    let mut rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    for _ in 0..50 {
        if rows[0].state == AlertState::Delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    }
    assert_eq!((rows[0].state, rows[0].attempts as usize), (AlertState::Delivered, got.len()));
    h.tollgate.shutdown().await.unwrap();
}

/// Past `alerts.retry_for` (3 days on the engine's clock), an alert is a dead letter;
/// `Admin::retry_alert` (what `tollgate alerts retry` calls) sends it again, under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_retry_horizon_an_alert_is_a_dead_letter_that_can_be_sent_again() {
    let Some(receiver) = Receiver::start() else { return };
    receiver.mode("down", 0).await;
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, ""));
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = node_with_worker(&toml, store.clone(), clock, handle.clone());
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let mut dead = Vec::new();
    for _ in 0..200 {
        handle.advance(Duration::from_secs(3_600));
        tokio::time::sleep(Duration::from_millis(60)).await;
        h.tollgate.deliver_alerts().await;
        dead = store.list_alerts(&AlertQuery::new(10).state(AlertState::Dead)).await.unwrap();
        if !dead.is_empty() {
            break;
        }
    }
    assert_eq!(
        dead.len(),
        1,
        "a dead letter after 3 days: {:?}",
        store.list_alerts(&AlertQuery::new(10)).await.unwrap()
    );
    let tried = receiver.received().await.len();
    assert!((10..40).contains(&tried), "{tried} attempts over 3 days, backing off");
    assert!(dead[0].last_error.as_deref().unwrap_or_default().contains("503"), "{dead:?}");
    // Nothing more is tried.
    handle.advance(Duration::from_secs(86_400));
    h.tollgate.deliver_alerts().await;
    assert_eq!(receiver.received().await.len(), tried);
    // Sent again by hand, once the receiver is back.
    receiver.mode("ok", 0).await;
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    assert_eq!(admin.alert_dead_letters(None, 10).await.unwrap().len(), 1);
    assert_eq!(admin.retry_alert(&dead[0].key.id).await.unwrap(), 1);
    h.tollgate.deliver_alerts().await;
    let got = receiver.wait_for(Duration::from_secs(5), |got| got.iter().any(|d| d.mode == "ok")).await;
    assert_eq!(got.iter().filter(|d| d.mode == "ok").count(), 1);
    all_sound(&got);
    assert_eq!(got.last().unwrap().id.as_deref(), Some(dead[0].key.id.as_str()), "the same webhook-id");
    assert!(admin.alert_dead_letters(None, 10).await.unwrap().is_empty());
    h.tollgate.shutdown().await.unwrap();
}

/// An alert is tried until its `retry_for` window ends, not given up when the next backoff
/// step would pass it (with `retry_for = "1m"` it went dead 35–41 s after it was written);
/// sent again by hand, it gets a new window from then, tried again at its end (issue 53).
/// No worker: the deliveries and the clock are the test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_tried_until_its_window_ends_and_a_retry_gives_a_new_window() {
    let Some(receiver) = Receiver::start() else { return };
    receiver.mode("down", 0).await;
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, "retry_for = \"1m\""));
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = Harness::build(&toml, store.clone(), clock, handle.clone());
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    // Each second of the engine's clock, the deliveries due: the second it goes dead.
    let dead_at = |from: i64| {
        let (h, store, handle) = (&h, &store, &handle);
        async move {
            for second in 0..120 {
                h.tollgate.deliver_alerts().await;
                let dead = store.list_alerts(&AlertQuery::new(10).state(AlertState::Dead)).await.unwrap();
                if !dead.is_empty() {
                    return (second, dead[0].clone());
                }
                handle.advance(Duration::from_secs(1));
            }
            panic!("never a dead letter from {from}");
        }
    };
    let (second, dead) = dead_at(0).await;
    assert!(second >= 60, "given up {second} s after it was written, within its 1 minute: {dead:?}");
    assert!(second <= 61, "tried past its window: {second} s");
    let tried = receiver.received().await.len();
    assert!(tried >= 4, "{tried} attempts within the window");
    // Sent again by hand: a new window from now, tried at least twice more, dead at its end.
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    assert_eq!(admin.retry_alert(&dead.key.id).await.unwrap(), 1);
    let (again, _) = dead_at(1).await;
    assert!(again >= 60, "dead again {again} s after it was sent again");
    assert!(receiver.received().await.len() >= tried + 2, "tried again, and at its window's end");
}

/// A crossing whose write failed (the outbox's store down) is written when a later refill
/// sees it again: nothing is lost, nothing written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crossing_not_written_is_written_at_a_later_refill() {
    let Some(receiver) = Receiver::start() else { return };
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, ""));
    let store = Arc::new(Faulty::default());
    store.alerts_down.store(true, Ordering::SeqCst);
    let h = Harness::with_store(&toml, store.clone(), NOON);
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    store.alerts_down.store(false, Ordering::SeqCst);
    assert!(store.list_alerts(&AlertQuery::new(10)).await.unwrap().is_empty());
    // More requests: a refill sees the crossing again.
    for _ in 0..10 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    assert_eq!(store.list_alerts(&AlertQuery::new(10)).await.unwrap().len(), 1);
    assert_eq!(h.tollgate.deliver_alerts().await.delivered, 1);
    all_sound(&receiver.received().await);
}

/// A slow endpoint does not hold up the others: each delivery runs beside the rest, within
/// `alerts.timeout`; a redirect is not followed; a huge answer is not read past its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_stall_the_others_and_redirects_are_not_followed() {
    let (Some(slow), Some(fast), Some(moved), Some(huge), Some(lazy)) =
        (Receiver::start(), Receiver::start(), Receiver::start(), Receiver::start(), Receiver::start())
    else {
        return;
    };
    slow.mode("slow", 30).await;
    moved.mode("redirect", 0).await;
    huge.mode("huge", 0).await;
    lazy.mode("slowbody", 30).await;
    let (_dir, secret) = secret_file();
    let alerts = format!(
        "{}[alerts.endpoints.fast]\nurl = \"{}\"\nsecret_file = \"{secret}\"\n\
         [alerts.endpoints.moved]\nurl = \"{}\"\nsecret_file = \"{secret}\"\n\
         [alerts.endpoints.huge]\nurl = \"{}\"\nsecret_file = \"{secret}\"\n\
         [alerts.endpoints.lazy]\nurl = \"{}\"\nsecret_file = \"{secret}\"\n",
        section(&slow.url("/hook"), &secret, ""),
        fast.url("/hook"),
        moved.url("/hook"),
        huge.url("/hook"),
        lazy.url("/hook")
    );
    let toml = plan(&alerts);
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = node_with_worker(&toml, store.clone(), clock, handle);
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let started = std::time::Instant::now();
    let got = fast.wait_for(Duration::from_secs(10), |got| !got.is_empty()).await;
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(3), "the fast endpoint waited for the slow one");
    all_sound(&got);
    let redirected = moved.wait_for(Duration::from_secs(5), |got| !got.is_empty()).await;
    assert!(redirected.iter().all(|d| d.path == "/hook"), "the redirect was followed: {redirected:?}");
    // The slow one times out (3 s) and is due again; the redirect's failure is recorded:
    // awaited.
    common::eventually("every endpoint's attempt recorded", Duration::from_secs(20), || async {
        let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
        let state = |to: &str| rows.iter().find(|r| r.key.destination == to).map(|r| (r.state, r.last_error.is_some()));
        ["endpoint:fast", "endpoint:huge", "endpoint:lazy"]
            .iter()
            .all(|to| state(to) == Some((AlertState::Delivered, false)))
            && state("endpoint:moved").is_some_and(|(_, e)| e)
            && state("endpoint:ops").is_some_and(|(_, e)| e)
    })
    .await;
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    let row = |to: &str| rows.iter().find(|r| r.key.destination == to).unwrap();
    assert_eq!(row("endpoint:fast").state, AlertState::Delivered);
    // A 2xx with a gigabyte of answer: delivered, its answer read no further than its bound.
    assert_eq!(row("endpoint:huge").state, AlertState::Delivered);
    // A 2xx whose body comes late: the status decides, delivered.
    assert_eq!(row("endpoint:lazy").state, AlertState::Delivered);
    assert!(row("endpoint:moved").last_error.as_deref().unwrap_or_default().contains("redirect"), "{rows:?}");
    assert!(row("endpoint:ops").last_error.as_deref().unwrap_or_default().contains("no answer"), "{rows:?}");
    h.tollgate.shutdown().await.unwrap();
}

/// A tenant's own endpoint: registered only on a plan that sends alerts to tenants, only https
/// to public addresses (unless `alerts.allow_private` names the range), and checked again at
/// every connection: an endpoint whose name resolves to a private address is never connected
/// to, whatever registration saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_endpoints_reach_only_addresses_they_may() {
    let Some(receiver) = Receiver::start() else { return };
    let toml = "[usage]\nnotify_at = [80]\n[alerts]\ntimeout = \"3s\"\nallow_private = [\"127.0.0.1/32\"]\n\
         [plans.p]\nrate = \"100000/s\"\ntenant_alerts = true\nquotas.requests = { limit = 100, period = \"day\" }\n\
         [plans.free]\nrate = \"10/s\"\n"
        .to_owned();
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let h = node_with_worker(&toml, store.clone(), clock, handle);
    let admin = tollgate::admin::Admin::for_engine(&h.tollgate);
    admin.add_tenant("t", "p", None).await.unwrap();
    admin.add_tenant("u", "p", None).await.unwrap();
    admin.add_tenant("v", "p", None).await.unwrap();
    admin.add_tenant("w", "p", None).await.unwrap();
    admin.add_tenant("x", "p", None).await.unwrap();
    admin.add_tenant("f", "free", None).await.unwrap();
    let key = admin.issue_key("t", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let key_u = admin.issue_key("u", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let refused = |r: Result<Option<String>, tollgate::admin::AdminError>| {
        assert!(matches!(r, Err(tollgate::admin::AdminError::AlertEndpoint(_))), "{r:?}");
    };
    refused(admin.set_alert_endpoint("f", Some("https://hooks.example.com/x")).await);
    for private in
        ["https://10.1.2.3/hook", "https://169.254.169.254/latest/meta-data", "http://127.0.0.2:9/x", "ftp://x/"]
    {
        refused(admin.set_alert_endpoint("t", Some(private)).await);
    }
    let record = h.tollgate.directory_store().tenant(&"t".into()).await.unwrap().unwrap();
    assert_eq!(record.alert_endpoint, None, "nothing stored");
    // Allowed (the range is in allow_private): a secret of its own, kept in the directory.
    let secret = admin.set_alert_endpoint("t", Some(&receiver.url("/tenant"))).await.unwrap().unwrap();
    assert!(secret.starts_with("whsec_") && secret != SECRET);
    receiver.add_secret(&secret).await;
    for _ in 0..85 {
        assert_eq!(h.status("/", &key).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let got = receiver.wait_for(Duration::from_secs(5), |got| !got.is_empty()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/tenant");
    all_sound(&got);
    // The operator no longer allows loopback; a name that resolves to it, written as if it
    // resolved elsewhere at registration: refused at the connection.
    let strict = toml.replace("allow_private = [\"127.0.0.1/32\"]\n", "");
    h.tollgate.reload(tollgate::Config::from_toml_str(&strict).unwrap()).await.unwrap();
    let rebound = format!(r#"{{"url":"https://localhost:{}/tenant","secrets":["{SECRET}"]}}"#, receiver.port);
    let update = tollgate::store::TenantUpdate::AlertEndpoint("u".into(), Some(rebound));
    h.tollgate.directory_store().update_tenant(&update, tollgate::store::UpdateWhen::Always).await.unwrap();
    // Private addresses written in the record itself (never through registration): refused
    // when delivered, never connected to.
    for (tenant, url) in [("v", "https://10.1.2.3/hook"), ("w", "https://169.254.169.254/latest/meta-data")] {
        let text = format!(r#"{{"url":"{url}","secrets":["{SECRET}"]}}"#);
        let update = tollgate::store::TenantUpdate::AlertEndpoint(tenant.into(), Some(text));
        h.tollgate.directory_store().update_tenant(&update, tollgate::store::UpdateWhen::Always).await.unwrap();
    }
    for tenant in ["v", "w"] {
        let key = admin.issue_key(tenant, tollgate::admin::KeyOptions::default()).await.unwrap().key;
        for _ in 0..85 {
            assert_eq!(h.status("/", &key).await, 200);
        }
    }
    for _ in 0..85 {
        assert_eq!(h.status("/", &key_u).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    // Each tenant's attempt made and refused: awaited.
    common::eventually("the attempts for u, v and w", Duration::from_secs(15), || async {
        let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
        ["u", "v", "w"].iter().all(|t| rows.iter().any(|r| r.tenant.as_str() == *t && r.last_error.is_some()))
    })
    .await;
    assert_eq!(receiver.received().await.len(), 1, "connected to a private address");
    let rows: Vec<_> = store
        .list_alerts(&AlertQuery::new(10))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.tenant.as_str() == "u")
        .collect();
    assert_eq!(rows.len(), 1);
    let error = rows[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("refused") && error.contains("localhost"), "{error}");
    let all = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    for tenant in ["v", "w"] {
        let row = all.iter().find(|r| r.tenant.as_str() == tenant).unwrap();
        let error = row.last_error.clone().unwrap_or_default();
        assert!(row.state == AlertState::Pending && error.contains("not a public address"), "{row:?}");
    }
    // A tenant of the plan that registered no endpoint: its crossings have nowhere to go, and
    // leave no row (no dead letter of nothing).
    let key_x = admin.issue_key("x", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    for _ in 0..85 {
        assert_eq!(h.status("/", &key_x).await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let all = store.list_alerts(&AlertQuery::new(20)).await.unwrap();
    assert!(all.iter().all(|r| r.tenant.as_str() != "x"), "{all:?}");
}

/// Within a short budget (Lambda's, after an invocation), an attempt's time limit is the time
/// left, and the delivery is settled (tried again later, backing off), never cut off with its
/// claim held and its attempt unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_within_a_short_budget_is_settled_not_cut_off() {
    let Some(receiver) = Receiver::start() else { return };
    receiver.mode("slow", 3).await;
    let (_dir, secret) = secret_file();
    let toml = plan(&section(&receiver.url("/hook"), &secret, ""));
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let h = Harness::with_store(&toml, store.clone(), NOON);
    for _ in 0..85 {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    h.tollgate.flush().await.unwrap();
    let report = h.tollgate.deliver_alerts_within(Duration::from_millis(1_500)).await;
    assert_eq!((report.claimed, report.retried), (1, 1), "{report:?}");
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    assert_eq!((rows[0].attempts, rows[0].claim.0), (1, 0), "settled: its attempt counted, its claim gone");
    assert!(rows[0].next_at > NOW_SECS, "backing off");
    // Once the receiver answers in time, delivered.
    receiver.mode("ok", 0).await;
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(h.tollgate.deliver_alerts_within(Duration::from_secs(2)).await.delivered, 1);
}

const NOW_SECS: i64 = NOON;

/// A prepaid balance long low is alerted once, whichever node sees it and whenever; the same
/// limit reached again after its grants changed (a pack gone, the same pack bought again) is
/// a new alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_is_alerted_once_per_episode_of_its_grants() {
    let (_dir, secret) = secret_file();
    let toml = format!(
        "[usage]\nnotify_at = []\nnotify_left = [3]\n{}[plans.p]\nrate = \"100000/s\"\nquotas.requests = {{ period = \"prepaid\" }}\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n",
        section("http://127.0.0.1:9/hook", &secret, "")
    );
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let a = Harness::build(&toml, store.clone(), clock.clone(), handle.clone());
    let admin = tollgate::admin::Admin::for_engine(&a.tollgate);
    admin.grant_credits("t", "requests", 10, None, "pack-1").await.unwrap();
    for _ in 0..8 {
        assert_eq!(a.status("/", "key-t").await, 200);
    }
    a.tollgate.flush().await.unwrap();
    let low = |rows: &[tollgate::store::OutboxEntry]| rows.iter().filter(|r| r.event == "balance.low").count();
    assert_eq!(low(&store.list_alerts(&AlertQuery::new(10)).await.unwrap()), 1);
    // Another node, a day later, sees the same low balance: the same alert.
    handle.advance(Duration::from_secs(86_400));
    let b = Harness::build(&toml, store.clone(), clock.clone(), handle.clone());
    assert_eq!(b.status("/", "key-t").await, 200);
    b.tollgate.flush().await.unwrap();
    assert_eq!(low(&store.list_alerts(&AlertQuery::new(10)).await.unwrap()), 1, "once per episode");
    // The pack revoked, the same pack bought again: the same limit, a new episode.
    admin.revoke_credits("t", Some("requests"), "pack-1").await.unwrap();
    admin.grant_credits("t", "requests", 10, None, "pack-2").await.unwrap();
    let c = Harness::build(&toml, store.clone(), clock, handle);
    for _ in 0..8 {
        assert_eq!(c.status("/", "key-t").await, 200);
    }
    c.tollgate.flush().await.unwrap();
    assert_eq!(low(&store.list_alerts(&AlertQuery::new(10)).await.unwrap()), 2, "a new episode");
}

/// Four engines spending together past 80% of a spend cap: one `spend.threshold_crossed`
/// for the fleet (and at most one `spend.cap_reached`), in money, valid by the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_engines_spending_together_send_one_spend_alert() {
    let Some(receiver) = Receiver::start() else { return };
    let (_dir, secret) = secret_file();
    let toml = format!(
        "[usage]\nnotify_at = [80]\nstore_timeout = \"4s\"\n{}\n[billing]\ncurrency = \"usd\"\n\
         [meters.requests]\nprice = \"0.01\"\n\
         [plans.p]\nrate = \"100000/s\"\nspend = {{ limit = \"1.00\", period = \"month\" }}\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n",
        section(&receiver.url("/hook"), &secret, "")
    );
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Arc<Harness>> =
        (0..4).map(|_| Arc::new(node_with_worker(&toml, store.clone(), clock.clone(), handle.clone()))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8usize {
        let h = nodes[i % 4].clone();
        tasks.spawn(async move {
            for _ in 0..12 {
                let status = h.status("/", "key-t").await;
                assert!(status == 200 || status == 402, "{status}");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    for h in &nodes {
        h.tollgate.flush().await.unwrap();
    }
    receiver.wait_for(Duration::from_secs(10), |got| !got.is_empty()).await;
    settled(&store, &nodes).await;
    let got = receiver.received().await;
    all_sound(&got);
    let kinds: Vec<_> = got.iter().filter_map(|d| d.kind.clone()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "spend.threshold_crossed").count(), 1, "one for the fleet: {got:?}");
    assert!(kinds.iter().filter(|k| *k == "spend.cap_reached").count() <= 1, "{got:?}");
    assert!(kinds.iter().all(|k| k.starts_with("spend.")), "no alert of units for money: {kinds:?}");
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    let crossed = rows.iter().find(|r| r.event == "spend.threshold_crossed").unwrap();
    let body: serde_json::Value = serde_json::from_str(&crossed.body).unwrap();
    assert_eq!(body["data"]["currency"], "usd");
    assert_eq!(body["data"]["limit_amount"], "1");
    assert_eq!(body["data"]["meter"], "spend");
    assert_eq!(body["data"]["threshold"]["percent"], 80);
    for h in &nodes {
        h.tollgate.shutdown().await.unwrap();
    }
}

/// Units only leased never cross a threshold (issue 52): eight engines each serve one request
/// of a tenant with 16,000 a day and `notify_at = [50]`, their leases reserving half of it,
/// and no alert is written, at their refills nor at their flushes. Crossing 50% by use writes
/// one, seen within a lease (1,000) of the crossing.
#[tokio::test]
async fn leased_units_cross_no_threshold_and_use_crosses_it_once() {
    let (_dir, secret) = secret_file();
    let toml = format!(
        "[usage]\nnotify_at = [50]\n{}\n[plans.p]\nrate = \"1000000/s\"\n\
         quotas.requests = {{ limit = 16000, period = \"day\", lease = 1000 }}\n\
         [tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n",
        section("http://127.0.0.1:9/hook", &secret, "allow_private = [\"127.0.0.1/32\"]")
    );
    let store: Arc<dyn tollgate::store::StoreInspect> = Arc::new(tollgate::store::MemoryStore::new());
    let (clock, handle) = tollgate::clock::Clock::fake_at_unix(NOON);
    let nodes: Vec<Harness> =
        (0..8).map(|_| Harness::build(&toml, store.clone(), clock.clone(), handle.clone())).collect();
    for h in &nodes {
        assert_eq!(h.status("/", "key-t").await, 200);
    }
    for h in &nodes {
        h.tollgate.flush().await.unwrap();
    }
    let counter = store.counters(&"t".into(), &"requests".into()).await.unwrap().remove(0);
    assert!(counter.reserved >= 8_000, "the leases reserve half the quota: {counter:?}");
    assert_eq!(counter.used(), 8, "eight requests used: {counter:?}");
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    assert!(rows.is_empty(), "no alert for units only leased: {rows:?}");

    // Used past half, over the eight nodes in turn: one alert, within a lease of 8,000 used.
    let mut served = 8u64;
    while served < 8_200 {
        for h in &nodes {
            assert_eq!(h.status("/", "key-t").await, 200);
            served += 1;
        }
    }
    for h in &nodes {
        h.tollgate.flush().await.unwrap();
    }
    let rows = store.list_alerts(&AlertQuery::new(10)).await.unwrap();
    let crossed: Vec<_> = rows.iter().filter(|r| r.event == "quota.threshold_crossed").collect();
    assert_eq!(crossed.len(), 1, "one alert for the crossing by use: {rows:?}");
    let body: serde_json::Value = serde_json::from_str(&crossed[0].body).unwrap();
    let used = body["data"]["used"].as_u64().unwrap();
    assert!((8_000..=9_000).contains(&used), "seen within a lease of the crossing: {body}");
}
