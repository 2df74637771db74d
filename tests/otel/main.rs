//! OpenTelemetry (issue 91, deliverable 5; feature `otel`): a request's admission and its
//! store calls, an export pass and its call to the billing system, and the engine's counters,
//! as a real OTLP receiver gets them (scripts/otlp-receiver.py: OTLP/HTTP decoded with the
//! official protobuf definitions, PyPI's opentelemetry-proto). A binary of its own: the SDK's
//! providers it installs are the process's global ones, which no other test shares.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::{
    billing::{MetronomeSink, Secret},
    clock::Clock,
    otel::Otel,
    store::{DirectoryStore, KeyHash, SqliteStore, TenantRecord},
    Config, Tollgate, TollgateLayer,
};

use common::{metronome::StandIn, Harness, NOON};

/// OTLP's span kinds.
const INTERNAL: i64 = 1;
const SERVER: i64 = 2;
const CLIENT: i64 = 3;

/// The requests' W3C trace contexts: their traces and the caller's span.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REFUSED: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// The receiver, a process of its own (killed when dropped).
struct Receiver {
    child: Child,
    port: u16,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Started with the test environment's Python (`None`: none, skipped loudly outside CI).
    fn start() -> Option<Self> {
        let python = common::alerts::test_python("opentelemetry-proto")?;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/otlp-receiver.py");
        let mut child = Command::new(python)
            .args([script.as_os_str(), "0".as_ref()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the OTLP receiver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok());
        let port = port.unwrap_or_else(|| panic!("the OTLP receiver did not start: {line:?}"));
        Some(Self { child, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What it received at `path` (`/spans`, `/metrics`).
    async fn received(&self, path: &str) -> Vec<Value> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        serde_json::from_str(body).unwrap()
    }
}

fn config(metronome: &str) -> String {
    format!(
        r#"
[usage]
window = "15m"
grace = "5m"
[export]
sink = "metronome"
[meters.requests]
event_name = "api_requests"
[plans.p]
quotas.requests = {{ limit = 2, period = "day", mode = "hard" }}
[metronome]
api_base = "{metronome}"
"#
    )
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The tenant's first request comes with a W3C `traceparent`: its admission (the tenant read
/// from the directory, its quota leased) is a server span under the caller's span, with the
/// tenant, plan, decision, policy and units, and each store call it waited on is its child
/// (`db.system` sqlite, the operation, the outcome). Its third request, past a quota of 2, is
/// a refused span (429, the refusal's kind). An export pass is a span of its own whose
/// children are its store calls and its call to Metronome (the stand-in); the engine's
/// counters arrive as metrics, running totals as monotonic sums and levels as gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_admission_and_its_store_calls_reach_a_collector_as_spans() {
    let Some(receiver) = Receiver::start() else { return };
    let otel = Otel::to_endpoint("tollgate-otel-test", &receiver.url()).unwrap();
    let standin = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("otel.db")).await.unwrap());
    let tenant = TenantRecord::new("otel-acme".into(), "p".into()).with_metronome_customer("acme-account");
    store.put_tenant(&tenant, &[KeyHash::of(b"key-otel")]).await.unwrap();
    let config = Config::from_toml_str(&config(&standin.url)).unwrap();
    let m = config.metronome().unwrap();
    let sink = MetronomeSink::new(&Secret::new(common::metronome::TOKEN), m.api_base.as_deref(), m.timeout).unwrap();
    let (clock, fake) = Clock::fake_at_unix(NOON);
    standin.set_now(NOON);
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).billing_sink(sink).build();
    let h = Harness::from_layer(TollgateLayer::new(engine), fake);
    otel.observe(&h.tollgate);

    let mut first = common::req("GET", "/", Some("key-otel"), None);
    first.headers_mut().insert("traceparent", format!("00-{TRACE}-{CALLER}-01").parse().unwrap());
    assert_eq!(h.send(first).await.status, 200);
    assert_eq!(h.status("/", "key-otel").await, 200);
    let mut third = common::req("GET", "/", Some("key-otel"), None);
    third.headers_mut().insert("traceparent", format!("00-{REFUSED}-{CALLER}-01").parse().unwrap());
    assert_eq!(h.send(third).await.status, 429, "past the quota of 2");
    h.tollgate.flush().await.unwrap();
    h.clock.set_unix(NOON + 3600);
    standin.set_now(NOON + 3600);
    let report = h.tollgate.export().await.unwrap();
    assert_eq!(report.events, 1, "{report:?}");
    let otel = tokio::task::spawn_blocking(move || otel.flush().map(|()| otel)).await.unwrap().unwrap();

    let spans: Vec<Value> =
        receiver.received("/spans").await.into_iter().filter(|s| s["service"] == "tollgate-otel-test").collect();
    // The admission, under the caller's span.
    let admitted: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == TRACE && s["kind"] == SERVER).collect();
    let [admitted] = admitted.as_slice() else { panic!("one admission in the caller's trace: {spans:#?}") };
    assert_eq!(admitted["name"], "GET tollgate");
    assert_eq!(admitted["parent_span_id"], CALLER, "the request's traceparent is its parent");
    assert_eq!(admitted["scope"], "tollgate");
    assert_eq!(attr(admitted, "tollgate.decision"), "admitted");
    assert_eq!(attr(admitted, "tollgate.tenant"), "otel-acme");
    assert_eq!(attr(admitted, "tollgate.plan"), "p");
    assert_eq!(attr(admitted, "tollgate.units"), 1);
    assert_eq!(
        (attr(admitted, "http.request.method"), attr(admitted, "url.path")),
        (&Value::from("GET"), &Value::from("/"))
    );
    let policy = attr(admitted, "tollgate.policy").as_str().unwrap_or_default();
    assert!(policy.contains("q=2"), "the quota's policy: {policy:?}");
    // Its store calls, its children.
    let calls: Vec<&Value> = spans.iter().filter(|s| s["parent_span_id"] == admitted["span_id"]).collect();
    assert!(!calls.is_empty(), "the directory read and the lease are its children: {spans:#?}");
    for call in &calls {
        assert_eq!((call["trace_id"].as_str(), call["kind"].as_i64()), (Some(TRACE), Some(CLIENT)), "{call}");
        assert_eq!(attr(call, "db.system"), "sqlite", "{call}");
        assert_eq!(attr(call, "tollgate.outcome"), "ok", "{call}");
        assert_eq!(attr(call, "db.operation.name"), &call["name"], "{call}");
        assert!(["directory", "quota"].contains(&attr(call, "tollgate.store.role").as_str().unwrap_or("")), "{call}");
    }
    let ops: Vec<&str> = calls.iter().filter_map(|c| c["name"].as_str()).collect();
    assert!(ops.iter().any(|o| o.contains("reserve")), "the quota's lease: {ops:?}");
    // The refusal.
    let refused: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == REFUSED).collect();
    let [refused] = refused.as_slice() else { panic!("one refusal: {spans:#?}") };
    assert_eq!(attr(refused, "tollgate.refusal"), "quota_exceeded");
    assert_eq!(attr(refused, "http.response.status_code"), 429);
    assert_eq!(attr(refused, "tollgate.tenant"), "otel-acme");
    assert_eq!(
        (attr(refused, "tollgate.decision"), attr(refused, "tollgate.plan")),
        (&Value::from("refused"), &Value::from("p"))
    );
    assert_eq!(refused["status"], 0, "a 4xx is not the server's error");
    // The export pass: a root span, its call to Metronome and its store calls its children.
    let passes: Vec<&Value> = spans.iter().filter(|s| s["name"] == "tollgate export").collect();
    let [pass] = passes.as_slice() else { panic!("one export pass: {spans:#?}") };
    assert_eq!((pass["kind"].as_i64(), pass["parent_span_id"].as_str()), (Some(INTERNAL), Some("")));
    let under: Vec<&Value> = spans.iter().filter(|s| s["parent_span_id"] == pass["span_id"]).collect();
    let send: Vec<&&Value> = under.iter().filter(|s| s["name"] == "metronome send").collect();
    let [send] = send.as_slice() else { panic!("one call to Metronome: {under:#?}") };
    assert_eq!(
        (attr(send, "tollgate.sink"), attr(send, "tollgate.events")),
        (&Value::from("metronome"), &Value::from(1))
    );
    assert_eq!((send["kind"].as_i64(), attr(send, "tollgate.outcome").as_str()), (Some(CLIENT), Some("ok")));
    assert!(under.iter().any(|s| attr(s, "db.system") == "sqlite"), "its store calls: {under:#?}");
    assert_eq!(standin.events().len(), 1, "Metronome took the window");

    // The counters.
    let points = receiver.received("/metrics").await;
    let point = |name: &str| points.iter().rev().find(|p| p["name"] == name).cloned();
    let flushes = point("tollgate.flushes").expect("the flushes counted");
    assert_eq!((flushes["kind"].as_str(), flushes["monotonic"].as_bool()), (Some("sum"), Some(true)));
    assert!(flushes["value"].as_i64() >= Some(1), "{flushes}");
    let tenants = point("tollgate.tracked_tenants").expect("the tenants tracked");
    assert_eq!((tenants["kind"].as_str(), tenants["value"].as_i64()), (Some("gauge"), Some(1)));
    tokio::task::spawn_blocking(move || otel.shutdown()).await.unwrap().unwrap();
}
