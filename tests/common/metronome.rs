//! A Metronome stand-in: a small HTTP/1.1 server on a free loopback port that implements
//! `POST /v1/ingest` by Metronome's documented rules, for tollgate's `MetronomeSink` (reqwest)
//! to talk to.
//!
//! The rules, from Metronome's API reference "Ingest events"
//! (<https://docs.metronome.com/api-reference/usage/ingest-events>), its guide "Send usage
//! events" (<https://docs.metronome.com/guides/events/send-usage-events>) and its idempotency
//! page (<https://docs.metronome.com/api-reference/idempotency>):
//!
//! - `Authorization: Bearer <token>` must match (401 otherwise); the body is JSON
//!   (`Content-Type: application/json`, 400 otherwise).
//! - The body is a JSON array of between 1 and 100 usage events (400 otherwise).
//! - Each event has `transaction_id`, `customer_id`, `event_type` (non-empty strings) and
//!   `timestamp`, an RFC 3339 string with a four-digit year; `properties` is an object. An event
//!   that breaks a rule makes the whole call a 400 naming it. Metronome's documentation does
//!   not say whether the valid events of such a call are taken: the stand-in takes none, and
//!   the tests' totals hold either way (a re-sent event is ignored by its transaction id).
//! - `customer_id` is not checked: Metronome takes events for an id no customer has yet (an
//!   ingest alias added later), so a wrong customer id is never refused.
//! - Events may be backdated up to 34 days; timestamps more than 24 hours ahead are refused
//!   (400), both by the stand-in's clock.
//! - `transaction_id` is the idempotency key: once an event is accepted, an event with the same
//!   id within 34 days is a duplicate, answered 200 and ignored.
//! - Injectable faults for the next calls: a status with Metronome's JSON error body, 429 with a
//!   `Retry-After`, a body that is not JSON, a dropped connection, "take it, then fail" (the
//!   events are taken and a 5xx answered: a gateway's timeout), or "take it and never answer"
//!   (the caller is then killed: a crash between send and mark).
//! - Totals per (customer, event type): the sum of `properties.value` over accepted events.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::BufReader,
    net::{TcpListener, TcpStream},
};

// Declared by each stand-in: the examples include one stand-in file alone.
#[allow(clippy::duplicate_mod)]
#[path = "standin_http.rs"]
mod http;
use http::{read_request, write_answer, Request};

pub const TOKEN: &str = "mtr_test_standin";

const DAY: i64 = 86_400;

/// A fault for the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status with Metronome's JSON error body (nothing taken).
    Status(u16),
    /// 429 with `Retry-After` of this many seconds (nothing taken).
    RateLimited(u64),
    /// This status with a body that is not JSON (nothing taken).
    NotJson(u16),
    /// Close the connection without an answer (nothing taken).
    Drop,
    /// Take the events, then answer this status.
    TakeAndFail(u16),
    /// Take the events, then never answer.
    TakeAndHang,
}

/// One accepted usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub transaction_id: String,
    pub customer_id: String,
    pub event_type: String,
    pub timestamp: i64,
    pub value: i64,
    pub properties: BTreeMap<String, String>,
}

#[derive(Default)]
struct State {
    events: Vec<Accepted>,
    /// Accepted transaction ids, with when they were accepted.
    transactions: HashMap<String, i64>,
    faults: VecDeque<Fault>,
    now: Option<i64>,
    calls: u64,
    /// Events ignored as duplicates.
    duplicates: u64,
    /// Calls refused with 400.
    refusals: u64,
    /// Sizes of the calls taken.
    batch_sizes: Vec<usize>,
}

impl State {
    fn now(&self) -> i64 {
        self.now.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        })
    }
}

pub struct StandIn {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                tokio::spawn(connection(socket, shared.clone()));
            }
        });
        Self { url, state, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Now for the timestamp rules (the system clock by default).
    pub fn set_now(&self, unix: i64) {
        self.lock().now = Some(unix);
    }

    pub fn fail_next(&self, faults: &[Fault]) {
        self.lock().faults.extend(faults.iter().copied());
    }

    pub fn events(&self) -> Vec<Accepted> {
        self.lock().events.clone()
    }

    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    pub fn duplicates(&self) -> u64 {
        self.lock().duplicates
    }

    pub fn refusals(&self) -> u64 {
        self.lock().refusals
    }

    pub fn batch_sizes(&self) -> Vec<usize> {
        self.lock().batch_sizes.clone()
    }

    /// (customer, event type) → the sum of the accepted values.
    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        let mut out = BTreeMap::new();
        for e in &self.lock().events {
            *out.entry((e.customer_id.clone(), e.event_type.clone())).or_insert(0) += e.value;
        }
        out
    }
}

/// An answer: status, extra headers, body, content type.
type Answer = (u16, String, String, &'static str);

async fn connection(socket: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(socket);
    while let Some(req) = read_request(&mut reader).await {
        let Some((status, headers, body, content_type)) = handle(&req, &state).await else { return };
        if !write_answer(&mut reader, status, content_type, &headers, &body).await {
            return;
        }
    }
}

fn error(status: u16, message: &str) -> Answer {
    (status, String::new(), serde_json::json!({ "message": message }).to_string(), "application/json")
}

/// A timestamp as Metronome takes it: RFC 3339 with a four-digit year.
fn timestamp(v: &serde_json::Value) -> Option<i64> {
    let s = v.as_str()?;
    if s.len() < 4 || !s[..4].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

async fn handle(req: &Request, state: &Arc<Mutex<State>>) -> Option<Answer> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let fault = {
        let mut s = lock();
        s.calls += 1;
        s.faults.pop_front()
    };
    if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        return Some(error(401, "Unauthorized"));
    }
    if req.method != "POST" || req.path != "/v1/ingest" {
        return Some(error(404, "Not Found"));
    }
    if !req.headers.get("content-type").is_some_and(|t| t.starts_with("application/json")) {
        lock().refusals += 1;
        return Some(error(400, "the body must be JSON (Content-Type: application/json)"));
    }
    match fault {
        Some(Fault::Status(st)) => return Some(error(st, "injected fault")),
        Some(Fault::RateLimited(secs)) => {
            let mut answer = error(429, "Too many requests");
            answer.1 = format!("retry-after: {secs}\r\n");
            return Some(answer);
        }
        Some(Fault::NotJson(st)) => {
            return Some((st, String::new(), "<html>bad gateway</html>".into(), "text/html"));
        }
        Some(Fault::Drop) => return None,
        _ => {}
    }
    let refuse = |message: String| {
        lock().refusals += 1;
        Some(error(400, &message))
    };
    let Ok(serde_json::Value::Array(events)) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return refuse("the body must be a JSON array of usage events".into());
    };
    if events.is_empty() || events.len() > 100 {
        return refuse(format!("between 1 and 100 events per request, not {}", events.len()));
    }
    let now = lock().now();
    let mut batch = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let text = |k: &str| e.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_owned);
        let (Some(transaction_id), Some(customer_id), Some(event_type)) =
            (text("transaction_id"), text("customer_id"), text("event_type"))
        else {
            return refuse(format!("event {i}: transaction_id, customer_id and event_type are required strings"));
        };
        let Some(ts) = e.get("timestamp").and_then(timestamp) else {
            return refuse(format!("event {i}: timestamp must be RFC 3339 with a 4-digit year"));
        };
        if ts < now - 34 * DAY {
            return refuse(format!("event {i}: timestamp is more than 34 days in the past"));
        }
        if ts > now + DAY {
            return refuse(format!("event {i}: timestamp is more than 24 hours in the future"));
        }
        let properties: BTreeMap<String, String> = match e.get("properties") {
            None => BTreeMap::new(),
            Some(serde_json::Value::Object(m)) => {
                m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
            }
            Some(_) => return refuse(format!("event {i}: properties must be an object")),
        };
        let value = properties.get("value").and_then(|v| v.parse().ok()).unwrap_or(0);
        batch.push(Accepted { transaction_id, customer_id, event_type, timestamp: ts, value, properties });
    }
    // The call takes a little time, so concurrent calls overlap.
    tokio::time::sleep(Duration::from_millis(2)).await;
    {
        let mut s = lock();
        s.transactions.retain(|_, at| *at + 34 * DAY > now);
        s.batch_sizes.push(batch.len());
        for e in batch {
            if s.transactions.contains_key(&e.transaction_id) {
                s.duplicates += 1;
                continue;
            }
            s.transactions.insert(e.transaction_id.clone(), now);
            s.events.push(e);
        }
    }
    if fault == Some(Fault::TakeAndHang) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return None;
    }
    if let Some(Fault::TakeAndFail(st)) = fault {
        return Some(error(st, "injected failure after the events were taken"));
    }
    Some((200, String::new(), String::new(), "application/json"))
}
