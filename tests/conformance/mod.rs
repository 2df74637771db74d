//! One behaviour in every front door: a table of scenarios, run against the bare tower layer
//! and against each door (axum, actix-web, Lambda). Each door's test builds the same little
//! application over a fresh engine per scenario and sends the same requests; the statuses,
//! headers, bodies and the usage the store holds afterwards must be those of the bare tower
//! layer, whose own statuses are checked against the table.
//!
//! Included with `#[path]` by each door's test; every door serves:
//! - `GET /v1/items` → 200 `items`;
//! - `POST /v1/reports` → 200 `report` (the route costs 5);
//! - `GET /v1/fail` → 500 `fail` (not billed: 5xx give back);
//! - `POST /v1/generate` → 200 `generated`, the handler records 7 `tokens`;
//! - `GET /v1/stream` → 200 `ab` in two chunks, 3 `tokens` recorded after the head;
//! - `POST /v1/orders` → 201 `created` (the body is not read);
//! - `POST /v1/complete` → 200 `completed` with `x-usage-tokens: 2` (the route holds its
//!   `x-max-tokens` and settles on that header);
//! - `POST /v1/draw` → 200 `drawn` (the route holds 3 tokens, billed in full);
//! - `POST /v1/echo` → 200 `echo: <the body>`, with `x-call: <n>`, the number of this call of
//!   the handler in the process ([`echo`]): a replay answered by the handler again would carry
//!   a new one;
//! - `POST /v1/slow` → 201 `created` once [`RELEASE`] is notified (it notifies [`ENTERED`]);
//! - `POST /stripe/webhook` → the Stripe webhook handler (feature `stripe`);
//! - `/v1/usage` → the tenant's own usage route (`Tollgate::tenant_usage`), outside the
//!   layer (every method reaches it: it answers 405 itself).
//!
//! Every response the handlers make has `content-type: text/plain`.
#![allow(dead_code, unreachable_pub)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tollgate::store::prelude::*;
use tollgate::store::KeyHash;
use tollgate::{
    clock::Clock,
    store::{MemoryStore, TenantRecord},
    Tollgate,
};

/// 2026-03-14T12:00:00Z
pub const NOON: i64 = 1_773_489_600;

/// The signing secret of the webhook route.
pub const WEBHOOK_SECRET: &str = "whsec_conformance";

pub const CONFIG: &str = r#"
[identify]
source = "api-key"
header = "x-api-key"
unknown = "reject"

[limits]
headers = "draft"
fleet_size_hint = 2

[usage]
window = "1h"

[billing]
currency = "usd"

[meters.requests]
price = "0.05"
[meters.tokens]
price = "0.01"

[plans.free]
rate = "5/s"
burst = 5
quotas.requests = { limit = 10, period = "day", mode = "hard" }
quotas.tokens = { limit = 10, period = "day", mode = "hard" }

[plans.soft]
rate = "100/s"
burst = 100
quotas.requests = { limit = 2, period = "day", mode = "soft" }
features = ["streaming"]

[plans.pro]
rate = "100/s"
burst = 100

[plans.single]
rate = "100/s"
burst = 100
concurrency = 1

[plans.fleet]
rate = "5/s"
burst = 5
rate_scope = "fleet"

[plans.one]
rate = "100/s"
burst = 100
concurrency = 1
concurrency_scope = "fleet"

[[routes]]
method = "POST"
path = "/v1/reports"
cost = 5

[[routes]]
method = "POST"
path = "/v1/generate"
reports = ["tokens"]

[[routes]]
method = "GET"
path = "/v1/stream"
feature = "streaming"

[[routes]]
method = "POST"
path = "/v1/complete"
reports = ["tokens"]
hold.tokens = { header = "x-max-tokens", default = 4, max = 8 }
actual_header = "x-usage-tokens"

[[routes]]
method = "POST"
path = "/v1/draw"
reports = ["tokens"]
hold.tokens = 3
settle = "estimate"

[plans.capped]
rate = "100/s"
burst = 100
spend = { limit = "0.20", period = "month", mode = "hard" }

[tenants.stark]
plan = "capped"
keys = ["key-capped"]

[tenants.acme]
plan = "free"
keys = ["key-free"]

[tenants.globex]
plan = "soft"
keys = ["key-soft"]

[tenants.initech]
plan = "single"
keys = ["key-single"]

[tenants.umbrella]
plan = "fleet"
keys = ["key-fleet"]

[tenants.hooli]
plan = "one"
keys = ["key-one"]

[stripe.events]
"payment_method.attached" = "pro"
"#;

/// Held through an overlap step: the two notifies below are shared by every test of a binary.
pub static OVERLAP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The handler of `POST /v1/slow` notifies this when it starts...
pub static ENTERED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// ...and answers once this is notified.
pub static RELEASE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Calls of `/v1/echo`'s handler in this process.
pub static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What `POST /v1/echo` answers to `body`: the number of this call (its `x-call` header) and
/// its body.
pub fn echo(body: &[u8]) -> (String, String) {
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    (n.to_string(), format!("echo: {}", String::from_utf8_lossy(body)))
}

/// What the handlers record.
pub const GENERATE_TOKENS: u64 = 7;
pub const STREAM_TOKENS: u64 = 3;
/// What `POST /v1/complete` says it used, in `x-usage-tokens`.
pub const COMPLETE_TOKENS: u64 = 2;

/// A request of a scenario.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: &'static str,
    pub path: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Req {
    pub fn new(method: &'static str, path: &'static str) -> Self {
        Self { method, path, headers: Vec::new(), body: String::new() }
    }

    pub fn key(self, key: &str) -> Self {
        self.header("x-api-key", key)
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn body(mut self, body: String) -> Self {
        self.body = body;
        self
    }
}

/// A response as compared: the status, the headers (lowercase names, repeated values joined
/// with `, `; without those the frameworks add themselves), the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Headers a framework or server adds on its own, not compared.
pub const FRAMEWORK_HEADERS: &[&str] = &["date", "content-length", "server", "connection", "transfer-encoding"];

impl Resp {
    /// A response from its parts, leaving out [`FRAMEWORK_HEADERS`].
    pub fn new<'a>(status: u16, headers: impl IntoIterator<Item = (&'a str, &'a [u8])>, body: Vec<u8>) -> Self {
        let mut map = BTreeMap::<String, String>::new();
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            if FRAMEWORK_HEADERS.contains(&name.as_str()) {
                continue;
            }
            let value = String::from_utf8_lossy(value).into_owned();
            map.entry(name).and_modify(|v| *v = format!("{v}, {value}")).or_insert(value);
        }
        Self { status, headers: map, body: String::from_utf8(body).expect("a UTF-8 body") }
    }
}

/// A front door serving the application above over one engine.
#[allow(async_fn_in_trait)]
pub trait Door {
    /// Whether the door resolves dot segments (`..`, `%2E%2E`) before the engine and the
    /// application see the path (Lambda: `lambda_http` parses the event's path as a WHATWG
    /// URL). Such a door is compared with the tower layer serving the resolved paths: what it
    /// charges must be what it serves.
    const RESOLVES_DOT_SEGMENTS: bool = false;

    async fn send(&self, req: Req) -> Resp;
}

/// `path` with its dot segments resolved as a WHATWG URL parser does (`.`, `..`, and their
/// forms with `%2E`).
pub fn resolve_dot_segments(path: &str) -> String {
    let (path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match segment.to_ascii_lowercase().replace("%2e", ".").as_str() {
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            "." => {
                if last {
                    out.push("");
                }
            }
            _ => out.push(segment),
        }
    }
    let mut resolved = format!("/{}", out.join("/"));
    if let Some(q) = query {
        resolved.push('?');
        resolved.push_str(q);
    }
    resolved
}

impl Scenario {
    /// The scenario with every request's path resolved ([`resolve_dot_segments`]).
    pub fn with_dot_segments_resolved(&self) -> Scenario {
        let resolve = |mut req: Req| {
            req.path = Box::leak(resolve_dot_segments(req.path).into_boxed_str());
            req
        };
        let steps = self
            .steps
            .iter()
            .cloned()
            .map(|step| match step {
                Send(req, status) => Send(resolve(req), status),
                Overlap(a, b, sa, sb) => Overlap(resolve(a), resolve(b), sa, sb),
                Cancel(req) => Cancel(resolve(req)),
                Replay(req, status) => Replay(resolve(req), status),
                OtherNode(req, status) => OtherNode(resolve(req), status),
                OverlapOther(a, b, sa, sb) => OverlapOther(resolve(a), resolve(b), sa, sb),
                Advance(by) => Advance(by),
                UsageOf(req, tenant) => UsageOf(resolve(req), tenant),
                Revalidate(req, status) => Revalidate(resolve(req), status),
                UsageMatches(usage, next, item, cost) => UsageMatches(resolve(usage), resolve(next), item, cost),
                Polls(keys, rounds, refreshes) => Polls(keys, rounds, refreshes),
            })
            .collect();
        Scenario { steps, ..self.clone() }
    }
}

/// What a scenario does.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send a request; the bare layer must answer with this status.
    Send(Req, u16),
    /// Send `first`; while its handler runs, send `second`; then let `first` finish. The two
    /// statuses expected.
    Overlap(Req, Req, u16, u16),
    /// Send a request (to `/v1/slow`) and drop it once its handler has started: the client
    /// went away. No response.
    Cancel(Req),
    /// Move the engine's clock forward.
    Advance(Duration),
    /// Send a request that replays an earlier one's `Idempotency-Key`: on every door it must
    /// be answered with that request's response (its body, and its `x-call` if it has one),
    /// marked `Idempotent-Replayed: true`, with this status.
    Replay(Req, u16),
    /// Send a request through a second node: the same door over a second engine sharing the
    /// first's store and clock (a fleet of two behind a load balancer).
    OtherNode(Req, u16),
    /// [`Overlap`](Step::Overlap), the second request sent through the second node.
    OverlapOther(Req, Req, u16, u16),
    /// Send a request of the usage route: 200, the JSON of docs/usage.schema.json, of this
    /// tenant.
    UsageOf(Req, &'static str),
    /// Send a request with the `ETag` of the last response as its `If-None-Match`; the
    /// status expected (304: not modified, and no view made).
    Revalidate(Req, u16),
    /// Send the usage request, then the next request: the next response's `RateLimit` item
    /// (named) says the usage's `remaining` of its meter less the request's cost.
    UsageMatches(Req, Req, &'static str, u64),
    /// Poll the usage route with each key in turn, this many rounds (all in one second of
    /// the clock): every answer 200 and of the key's own tenant, and exactly this many
    /// views made on the node.
    Polls(&'static [&'static str], u32, u64),
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub steps: Vec<Step>,
    /// The usage the store holds afterwards on the bare layer: (tenant, meter, units).
    pub usage: Vec<(&'static str, &'static str, u64)>,
    /// Whether every door must answer as the bare layer does. Routers differ on some paths
    /// (actix-web serves `/v1/gener%61te` as `/v1/generate`, axum answers 404; axum serves
    /// `HEAD` with the `GET` handler): there only what is charged and checked must agree, the
    /// usage stored.
    pub same_responses: bool,
}

/// What a door did in a scenario: every response, and the usage the store holds afterwards
/// (per tenant and meter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub responses: Vec<Resp>,
    pub usage: BTreeMap<(String, String), u64>,
}

fn get(path: &'static str) -> Req {
    Req::new("GET", path)
}

fn post(path: &'static str) -> Req {
    Req::new("POST", path)
}

use Step::{Advance, Cancel, OtherNode, Overlap, OverlapOther, Polls, Replay, Revalidate, Send, UsageMatches, UsageOf};

/// The table.
pub fn scenarios() -> Vec<Scenario> {
    let mut table = vec![
        Scenario {
            name: "the tenant's own usage: its own numbers, as the headers say them, charging nothing",
            steps: vec![
                Send(get("/v1/items").key("key-free"), 200),
                UsageOf(get("/v1/usage").key("key-free"), "acme"),
                // Past the plan's burst (5) in one second: the route charges nothing.
                Send(get("/v1/usage").key("key-free"), 200),
                Send(get("/v1/usage").key("key-free"), 200),
                Send(get("/v1/usage").key("key-free"), 200),
                Send(get("/v1/usage").key("key-free"), 200),
                Send(get("/v1/usage").key("key-free"), 200),
                // A tenant of the directory, looked up.
                UsageOf(get("/v1/usage").key("key-beta"), "beta"),
                Revalidate(get("/v1/usage").key("key-beta"), 304),
                Send(post("/v1/usage").key("key-free"), 405),
                Send(Req::new("DELETE", "/v1/usage").key("key-free"), 405),
                Send(get("/v1/usage"), 401),
                Send(get("/v1/usage").key("key-nobody"), 401),
                Send(get("/v1/usage").key(""), 400),
                Send(get("/v1/usage").key("key-free").key("key-soft"), 400),
                Advance(Duration::from_secs(1)),
                // 1,000 polls in one second: one view made per tenant.
                Polls(&["key-free", "key-beta", "key-soft", "key-capped"], 250, 4),
                Advance(Duration::from_secs(1)),
                UsageMatches(get("/v1/usage").key("key-free"), get("/v1/items").key("key-free"), "requests-day", 1),
                Advance(Duration::from_secs(1)),
                UsageMatches(get("/v1/usage").key("key-free"), post("/v1/reports").key("key-free"), "requests-day", 5),
                Advance(Duration::from_secs(1)),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 8)],
            same_responses: true,
        },
        Scenario {
            name: "missing, unknown and malformed keys",
            steps: vec![
                Send(get("/v1/items"), 401),
                Send(get("/v1/items").key("key-nobody"), 401),
                Send(get("/v1/items").key("key-free").key("key-soft"), 400),
                // What a proxy (API Gateway's HTTP APIs) makes of the repeated header.
                Send(get("/v1/items").key("key-free,key-soft"), 400),
                Send(get("/v1/items").key(""), 400),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 1)],
            same_responses: true,
        },
        Scenario {
            name: "rate: the burst, then 429 with Retry-After, then the refill",
            steps: vec![
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 429),
                Advance(Duration::from_millis(400)),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 200),
                Send(get("/v1/items").key("key-free"), 429),
            ],
            usage: vec![("acme", "requests", 7)],
            same_responses: true,
        },
        Scenario {
            name: "hard quota and route cost",
            steps: vec![
                Send(post("/v1/reports").key("key-free"), 200),
                Advance(Duration::from_secs(1)),
                Send(post("/v1/reports").key("key-free"), 200),
                Advance(Duration::from_secs(1)),
                Send(get("/v1/items").key("key-free"), 429),
                Send(post("/v1/reports").key("key-free"), 429),
            ],
            usage: vec![("acme", "requests", 10)],
            same_responses: true,
        },
        Scenario {
            name: "holds from the configuration: estimates, actuals, bad estimates",
            steps: vec![
                // An estimate that does not parse, or above the route's `max`: 400, nothing taken.
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "abc"), 400),
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "9"), 400),
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "0"), 400),
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "4").header("x-max-tokens", "4"), 400),
                // Holds 8, billed the 2 its `x-usage-tokens` says.
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "8"), 200),
                // Holds 3, billed in full (`settle = "estimate"`).
                Send(post("/v1/draw").key("key-free"), 200),
                // 5 tokens left: a hold of 6 is refused before the work, its request not billed.
                Send(post("/v1/complete").key("key-free").header("x-max-tokens", "6"), 429),
                // The default estimate, 4: billed 2.
                Send(post("/v1/complete").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 3), ("acme", "tokens", 7)],
            same_responses: true,
        },
        Scenario {
            name: "held routes of a tenant without a hard quota, and a keyed one: billed as the route says",
            steps: vec![
                // The soft plan has no quota on tokens: the holds hold nothing, and are billed
                // all the same: the estimate, then the actual its header says.
                Send(post("/v1/draw").key("key-soft"), 200),
                Send(post("/v1/complete").key("key-soft").header("x-max-tokens", "8"), 200),
                // A first keyed request is billed its actual once; its replay holds nothing.
                Send(
                    post("/v1/complete").key("key-soft").header("x-max-tokens", "8").header("idempotency-key", "c-1"),
                    200,
                ),
                Replay(
                    post("/v1/complete").key("key-soft").header("x-max-tokens", "8").header("idempotency-key", "c-1"),
                    200,
                ),
            ],
            usage: vec![("globex", "requests", 3), ("globex", "tokens", 7)],
            same_responses: true,
        },
        Scenario {
            name: "a fleet rate: two nodes behind a balancer share one bucket",
            steps: vec![
                // A burst of 5 for the fleet: three on one node, two on the other, then
                // neither node has a cell left.
                Send(get("/v1/items").key("key-fleet"), 200),
                OtherNode(get("/v1/items").key("key-fleet"), 200),
                Send(get("/v1/items").key("key-fleet"), 200),
                OtherNode(get("/v1/items").key("key-fleet"), 200),
                Send(get("/v1/items").key("key-fleet"), 200),
                OtherNode(get("/v1/items").key("key-fleet"), 429),
                Send(get("/v1/items").key("key-fleet"), 429),
                // A fifth of a second later, one cell, for either node.
                Advance(Duration::from_millis(200)),
                OtherNode(get("/v1/items").key("key-fleet"), 200),
                Send(get("/v1/items").key("key-fleet"), 429),
            ],
            usage: vec![("umbrella", "requests", 6)],
            same_responses: true,
        },
        Scenario {
            name: "soft quota: admitted past the limit, counted",
            steps: vec![
                Send(get("/v1/items").key("key-soft"), 200),
                Send(get("/v1/items").key("key-soft"), 200),
                Send(get("/v1/items").key("key-soft"), 200),
                Send(post("/v1/reports").key("key-soft"), 200),
            ],
            usage: vec![("globex", "requests", 8)],
            same_responses: true,
        },
        Scenario {
            name: "5xx give back",
            steps: vec![
                Send(get("/v1/fail").key("key-free"), 500),
                Send(get("/v1/fail").key("key-free"), 500),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 1)],
            same_responses: true,
        },
        Scenario {
            name: "idempotency: replay, mismatch, malformed",
            steps: vec![
                Send(post("/v1/orders").key("key-free").header("idempotency-key", "order-1"), 201),
                Send(post("/v1/orders").key("key-free").header("idempotency-key", "order-1"), 201),
                Send(post("/v1/reports").key("key-free").header("idempotency-key", "order-1"), 422),
                Send(
                    post("/v1/orders")
                        .key("key-free")
                        .header("idempotency-key", "order-2")
                        .header("idempotency-key", "order-3"),
                    400,
                ),
                Send(post("/v1/orders").key("key-free").header("idempotency-key", &"x".repeat(300)), 400),
                Send(post("/v1/orders").key("key-free").header("idempotency-key", "order-2,order-3"), 400),
                // The same parameters in another order (a proxy may rebuild the query): a replay.
                Send(post("/v1/orders?a=1&b=2").key("key-free").header("idempotency-key", "order-q"), 201),
                Send(post("/v1/orders?b=2&a=1").key("key-free").header("idempotency-key", "order-q"), 201),
                // GET does not honour the key: charged each time.
                Send(get("/v1/items").key("key-free").header("idempotency-key", "order-1"), 200),
            ],
            usage: vec![("acme", "requests", 3)],
            same_responses: true,
        },
        Scenario {
            name: "idempotency: replays answered from the store, bodies compared",
            steps: vec![
                Send(post("/v1/echo").key("key-free").header("idempotency-key", "e-1").body("hello".into()), 200),
                Replay(post("/v1/echo").key("key-free").header("idempotency-key", "e-1").body("hello".into()), 200),
                // The same key with another body: 422 (the IETF draft).
                Send(post("/v1/echo").key("key-free").header("idempotency-key", "e-1").body("other".into()), 422),
                Send(post("/v1/echo").key("key-free").header("idempotency-key", "e-1"), 422),
                Advance(Duration::from_secs(1)),
                // A handler that does not read the body: what it left is fingerprinted.
                Send(post("/v1/orders").key("key-free").header("idempotency-key", "o-1").body("x".into()), 201),
                Send(post("/v1/orders").key("key-free").header("idempotency-key", "o-1").body("y".into()), 422),
                Replay(post("/v1/orders").key("key-free").header("idempotency-key", "o-1").body("x".into()), 201),
                // A 5xx is not stored: its key is free again.
                Send(get("/v1/fail").key("key-free"), 500),
            ],
            usage: vec![("acme", "requests", 2)],
            same_responses: true,
        },
        Scenario {
            name: "idempotency: in flight",
            steps: vec![Overlap(
                post("/v1/slow").key("key-soft").header("idempotency-key", "slow-1"),
                post("/v1/slow").key("key-soft").header("idempotency-key", "slow-1"),
                201,
                409,
            )],
            usage: vec![("globex", "requests", 1)],
            same_responses: true,
        },
        Scenario {
            name: "concurrency: one request of the tenant in flight at once",
            steps: vec![
                // The second is refused while the first runs (429, Retry-After, the
                // `concurrent-requests` policy), and charged nothing.
                Overlap(post("/v1/slow").key("key-single"), get("/v1/items").key("key-single"), 201, 429),
                // Once the first has answered and its body gone, the place is free again.
                Send(get("/v1/items").key("key-single"), 200),
                Send(get("/v1/items").key("key-single"), 200),
            ],
            usage: vec![("initech", "requests", 3)],
            same_responses: true,
        },
        Scenario {
            name: "a fleet concurrency: one request in flight across two nodes",
            steps: vec![
                // The second node is refused while the first node's request runs: the place is
                // the fleet's.
                OverlapOther(post("/v1/slow").key("key-one"), get("/v1/items").key("key-one"), 201, 429),
                // The refused client waits its `Retry-After` (the second node's reading of a
                // full fleet holds that long).
                Advance(Duration::from_secs(1)),
                // A sequential client is never refused: the node that served the last request
                // keeps the place as its spare, marked so in the store, and the other node
                // takes it.
                Send(get("/v1/items").key("key-one"), 200),
                OtherNode(get("/v1/items").key("key-one"), 200),
                Send(get("/v1/items").key("key-one"), 200),
                OtherNode(get("/v1/items").key("key-one"), 200),
            ],
            usage: vec![("hooli", "requests", 5)],
            same_responses: true,
        },
        Scenario {
            name: "a spend cap: priced requests and tokens, then 402 with Retry-After until the month ends",
            steps: vec![
                // 0.05 a request, 0.01 a token, a cap of 0.20 a month.
                Send(get("/v1/items").key("key-capped"), 200),
                // 0.05, and the 7 tokens its handler records: 0.17 in all.
                Send(post("/v1/generate").key("key-capped"), 200),
                // 0.05 more does not fit: refused before the work, charged nothing.
                Send(get("/v1/items").key("key-capped"), 402),
                Send(post("/v1/reports").key("key-capped"), 402),
                Advance(Duration::from_secs(2)),
                Send(get("/v1/items").key("key-capped"), 402),
            ],
            usage: vec![
                ("stark", "requests", 2),
                ("stark", "tokens", GENERATE_TOKENS),
                ("stark", "spend", 170_000_000),
            ],
            same_responses: true,
        },
        Scenario {
            name: "handler-reported usage, and its hard quota",
            steps: vec![
                Send(post("/v1/generate").key("key-free"), 200),
                Send(post("/v1/generate").key("key-free"), 200),
                Advance(Duration::from_secs(1)),
                Send(post("/v1/generate").key("key-free"), 429),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 3), ("acme", "tokens", 2 * GENERATE_TOKENS)],
            same_responses: true,
        },
        Scenario {
            name: "usage recorded while the response streams",
            steps: vec![Send(get("/v1/stream").key("key-soft"), 200), Send(get("/v1/stream").key("key-soft"), 200)],
            usage: vec![("globex", "requests", 2), ("globex", "tokens", 2 * STREAM_TOKENS)],
            same_responses: true,
        },
        Scenario {
            name: "a request cut off once its handler started is billed",
            steps: vec![
                // The handler may have done its work (sent the mail): the request is charged.
                Cancel(post("/v1/slow").key("key-soft")),
                Send(get("/v1/items").key("key-soft"), 200),
            ],
            usage: vec![("globex", "requests", 2)],
            same_responses: true,
        },
        // Route rules match what the application serves, on every door: the path as the
        // routers decode it, HEAD as GET, and no dot segments.
        Scenario {
            name: "an encoded path is charged and checked as its route",
            steps: vec![
                // `/v1/reports` with an `o` written `%6F`: the route costs 5 (and the tower app,
                // which matches raw paths, answers 404, billed as a client error).
                Send(post("/v1/rep%6Frts").key("key-free"), 404),
                Advance(Duration::from_secs(1)),
                Send(post("/v1/rep%6frts").key("key-free"), 404),
                Advance(Duration::from_secs(1)),
                // The hard quota of 10 is spent.
                Send(get("/v1/items").key("key-free"), 429),
                // An encoded `/` stays encoded: not the route (cost 1).
                Send(post("/v1%2Freports").key("key-soft"), 404),
            ],
            usage: vec![("acme", "requests", 10), ("globex", "requests", 1)],
            same_responses: false,
        },
        Scenario {
            name: "HEAD is checked as GET",
            steps: vec![
                // `GET /v1/stream` needs the `streaming` feature, which acme's plan lacks: so
                // does HEAD (axum serves HEAD with the GET handler).
                Send(Req::new("HEAD", "/v1/stream").key("key-free"), 403),
                Send(get("/v1/stream").key("key-free"), 403),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 1)],
            same_responses: false,
        },
        Scenario {
            // As actix-web's `NormalizePath` and most proxies merge them: a route rule (its
            // cost, its feature) holds on `/v1//reports` too.
            name: "empty segments are merged before route rules match",
            steps: vec![
                Send(get("/v1//stream").key("key-free"), 403),
                Send(get("/v1///stream/").key("key-free"), 403),
                Send(post("/v1//reports").key("key-soft"), 404),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 1), ("globex", "requests", 5)],
            same_responses: false,
        },
        Scenario {
            name: "dot segments are refused",
            steps: vec![
                Send(post("/v1/x/../reports").key("key-free"), 400),
                Send(post("/v1/./reports").key("key-free"), 400),
                Send(post("/v1/x/%2E%2E/reports").key("key-free"), 400),
                Send(post("/v1/x/.%2e/reports").key("key-free"), 400),
                // A dot inside a segment is no dot segment.
                Send(get("/v1/items.json").key("key-free"), 404),
                Send(get("/v1/items").key("key-free"), 200),
            ],
            usage: vec![("acme", "requests", 2)],
            same_responses: false,
        },
    ];
    if cfg!(feature = "stripe") {
        // Verified against the engine's clock.
        let now = NOON;
        let payload = format!(
            r#"{{"id":"evt_1","object":"event","type":"payment_method.attached","created":{now},"data":{{"object":{{"object":"payment_method","customer":"cus_beta"}}}}}}"#
        );
        let signed = |secret: &str| stripe_signature(&payload, secret, now);
        table.push(Scenario {
            name: "webhook: a bad signature changes nothing, a good one moves the plan",
            steps: vec![
                Send(post("/v1/reports").key("key-beta"), 200),
                Advance(Duration::from_secs(1)),
                Send(post("/v1/reports").key("key-beta"), 200),
                Advance(Duration::from_secs(1)),
                Send(get("/v1/items").key("key-beta"), 429),
                Send(
                    post("/stripe/webhook").header("stripe-signature", &signed("whsec_other")).body(payload.clone()),
                    400,
                ),
                Send(get("/v1/items").key("key-beta"), 429),
                Send(
                    post("/stripe/webhook").header("stripe-signature", &signed(WEBHOOK_SECRET)).body(payload.clone()),
                    200,
                ),
                Send(post("/stripe/webhook").header("stripe-signature", &signed(WEBHOOK_SECRET)).body(payload), 200),
                Send(get("/v1/items").key("key-beta"), 200),
            ],
            usage: vec![("beta", "requests", 11)],
            same_responses: true,
        });
        // Stripe's event objects can be long (an invoice's lines, metadata): every door takes a
        // body up to `WebhookHandler::MAX_BODY` (actix-web's 256 KiB default refused them with
        // its own 413), and refuses a longer one with the handler's 413 problem+json.
        let sized = |id: &str, len: usize| {
            let head = format!(
                r#"{{"id":"{id}","object":"event","type":"payment_method.attached","created":{now},"data":{{"object":{{"object":"payment_method","customer":"cus_beta"}}}},"padding":""#
            );
            let padding = "x".repeat(len - head.len() - 2);
            format!("{head}{padding}\"}}")
        };
        let long = sized("evt_long", 300 * 1024);
        let too_long = sized("evt_too_long", tollgate::billing::WebhookHandler::MAX_BODY + 1);
        table.push(Scenario {
            name: "webhook: a long event is taken, one past the cap gets 413",
            steps: vec![
                Send(
                    post("/stripe/webhook")
                        .header("stripe-signature", &stripe_signature(&too_long, WEBHOOK_SECRET, now))
                        .body(too_long.clone()),
                    413,
                ),
                Send(get("/v1/items").key("key-beta"), 200),
                Send(
                    post("/stripe/webhook")
                        .header("stripe-signature", &stripe_signature(&long, WEBHOOK_SECRET, now))
                        .body(long.clone()),
                    200,
                ),
                Send(get("/v1/items").key("key-beta"), 200),
            ],
            usage: vec![("beta", "requests", 2)],
            same_responses: true,
        });
    }
    table
}

/// The `Stripe-Signature` value Stripe would send for `payload` signed with `secret` at `t`.
#[cfg(feature = "stripe")]
fn stripe_signature(payload: &str, secret: &str, t: i64) -> String {
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(t))
}

#[cfg(not(feature = "stripe"))]
fn stripe_signature(_: &str, _: &str, _: i64) -> String {
    unreachable!("the webhook scenario needs the stripe feature")
}

/// The body of a usage route's answer: 200, JSON, valid against docs/usage.schema.json (its
/// required fields and types, checked here; the whole schema by `scripts/check-json.py` in
/// the engine's tests).
pub fn usage_json(scenario: &str, i: usize, resp: &Resp) -> serde_json::Value {
    assert_eq!(resp.status, 200, "{scenario}: step {i}: {resp:?}");
    assert_eq!(resp.headers.get("content-type").map(String::as_str), Some("application/json"), "{scenario}: {i}");
    assert_eq!(
        resp.headers.get("cache-control").map(String::as_str),
        Some("private, max-age=1"),
        "{scenario}: step {i}"
    );
    assert!(resp.headers.contains_key("etag"), "{scenario}: step {i}: an ETag");
    assert!(!resp.headers.contains_key("ratelimit"), "{scenario}: step {i}: not through the layer");
    let body: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(body["version"], 1, "{scenario}: step {i}: {body}");
    for field in ["quotas", "balances", "usage"] {
        assert!(body[field].is_array(), "{scenario}: step {i}: {field}: {body}");
    }
    body
}

/// The webhook handler of a door over `engine`, verifying with [`WEBHOOK_SECRET`].
#[cfg(feature = "stripe")]
pub fn webhooks(engine: &Tollgate) -> Arc<tollgate::billing::WebhookHandler> {
    Arc::new(engine.webhook_handler_with_secrets(vec![tollgate::billing::Secret::new(WEBHOOK_SECRET)]))
}

/// The application on `http` types, for the tower layer (and Lambda, whose requests are
/// `http` requests): generic over the request body.
pub async fn app<B>(req: http::Request<B>) -> Result<http::Response<AppBody>, std::convert::Infallible>
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    if req.method() == "POST" && req.uri().path() == "/v1/echo" {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let (call, text) = echo(&body);
        return Ok(http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("x-call", call)
            .body(AppBody::Full(Some(bytes::Bytes::from(text))))
            .unwrap());
    }
    let ctx = req.extensions().get::<tollgate::TenantContext>().cloned();
    let text = |status: u16, body: &'static str| {
        http::Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(AppBody::Full(Some(bytes::Bytes::from_static(body.as_bytes()))))
            .unwrap()
    };
    Ok(match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/items") => text(200, "items"),
        ("POST", "/v1/reports") => text(200, "report"),
        ("GET", "/v1/fail") => text(500, "fail"),
        ("POST", "/v1/generate") => {
            ctx.expect("a tenant").record("tokens", GENERATE_TOKENS).unwrap();
            text(200, "generated")
        }
        ("GET", "/v1/stream") => http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(AppBody::Stream { ctx: Some(ctx.expect("a tenant")), sent: 0 })
            .unwrap(),
        ("POST", "/v1/orders") => text(201, "created"),
        ("POST", "/v1/complete") => http::Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .header("x-usage-tokens", COMPLETE_TOKENS.to_string())
            .body(AppBody::Full(Some(bytes::Bytes::from_static(b"completed"))))
            .unwrap(),
        ("POST", "/v1/draw") => text(200, "drawn"),
        ("POST", "/v1/slow") => {
            ENTERED.notify_one();
            RELEASE.notified().await;
            text(201, "created")
        }
        _ => text(404, "not found"),
    })
}

/// The application's response body: whole, or `a` then `b` with [`STREAM_TOKENS`] recorded
/// between them (after the response head has gone).
#[derive(Debug)]
pub enum AppBody {
    Full(Option<bytes::Bytes>),
    Stream { ctx: Option<tollgate::TenantContext>, sent: u8 },
}

impl http_body::Body for AppBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = match self.get_mut() {
            AppBody::Full(data) => data.take(),
            AppBody::Stream { ctx, sent } => {
                *sent += 1;
                match *sent {
                    1 => Some(bytes::Bytes::from_static(b"a")),
                    2 => {
                        ctx.take().expect("a tenant").record("tokens", STREAM_TOKENS).unwrap();
                        Some(bytes::Bytes::from_static(b"b"))
                    }
                    _ => None,
                }
            }
        };
        std::task::Poll::Ready(frame.map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// The bare tower layer, the reference: the layer over [`app`], and the webhook route beside
/// it (outside the layer).
pub struct Tower {
    engine: Tollgate,
}

impl Tower {
    pub fn new(engine: Tollgate) -> Self {
        Self { engine }
    }
}

impl Door for Tower {
    async fn send(&self, req: Req) -> Resp {
        use http_body_util::BodyExt;
        use tower::{Layer, ServiceExt};
        let mut builder = http::Request::builder().method(req.method).uri(req.path);
        for (name, value) in &req.headers {
            builder = builder.header(*name, value.as_str());
        }
        let request = builder.body(http_body_util::Full::new(bytes::Bytes::from(req.body))).unwrap();
        if req.path == "/v1/usage" {
            let reply = self.engine.tenant_usage(&request).await;
            let (parts, body) = reply.into_parts();
            return Resp::new(
                parts.status.as_u16(),
                parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
                body.to_vec(),
            );
        }
        if req.path == "/stripe/webhook" {
            #[cfg(feature = "stripe")]
            {
                let (parts, body) = request.into_parts();
                let signature = parts.headers.get("stripe-signature").and_then(|v| v.to_str().ok());
                let body = body.collect().await.unwrap().to_bytes();
                let reply = webhooks(&self.engine).handle(signature, &body).await.into_response();
                let (parts, body) = reply.into_parts();
                return Resp::new(
                    parts.status.as_u16(),
                    parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
                    body.to_vec(),
                );
            }
        }
        // `Full` cannot hold another body: the app receives a `RequestBody` (the axum door
        // checks the default, axum's body handed on as it came).
        let service = tollgate::TollgateLayer::new(self.engine.clone()).streamed_bodies().layer(tower::service_fn(app));
        let response = service.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp::new(parts.status.as_u16(), parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())), body.to_vec())
    }
}

/// A fresh engine for a scenario: a memory store whose directory holds `beta` (plan `free`,
/// key `key-beta`, Stripe customer `cus_beta`), a fake clock at [`NOON`]. The worker is not
/// run: usage is flushed by [`run`].
pub async fn engine() -> (Tollgate, tollgate::clock::FakeClock, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let beta = TenantRecord::new("beta".into(), "free".into()).with_customer("cus_beta");
    store.put_tenant(&beta, &[KeyHash::of(b"key-beta")]).await.unwrap();
    let (clock, fake) = Clock::fake_at_unix(NOON);
    (engine_on(store.clone(), clock), fake, store)
}

/// An engine of the conformance configuration over `store`, on `clock` (a second node of a
/// fleet shares both with the first).
pub fn engine_on(store: Arc<MemoryStore>, clock: Clock) -> Tollgate {
    let config = tollgate::Config::from_toml_str(CONFIG).expect("the conformance configuration");
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).build();
    engine
}

/// Runs one scenario on a door `make` builds over a fresh engine.
/// The rules of the rate-limit fields (ratelimit-headers draft-10, `headers = "draft"`), checked
/// on every response of every door:
/// - `qu` takes only the draft's registered units; another unit is `tollgate-unit`;
/// - a 429 of the rate, a quota or concurrency has the draft's `quota-exceeded` problem type,
///   whose `violated-policies` name items of its `RateLimit-Policy`, with tollgate's `kind`;
/// - its `Retry-After` is never earlier than the `t` of a violated policy.
pub fn check_fields(scenario: &str, i: usize, resp: &Resp) {
    let policy = resp.headers.get("ratelimit-policy").map(String::as_str).unwrap_or_default();
    for item in policy.split(", ").filter(|i| !i.is_empty()) {
        for param in item.split(';').skip(1) {
            if let Some(unit) = param.strip_prefix("qu=") {
                assert!(
                    ["\"requests\"", "\"content-bytes\"", "\"concurrent-requests\""].contains(&unit),
                    "{scenario}: response {i}: an unregistered qu: {policy}"
                );
            }
        }
    }
    let problem = resp.headers.get("content-type").is_some_and(|c| c == "application/problem+json");
    if resp.status == 402 && problem {
        // A spent spend cap: it comes back with the period, so Retry-After and the cap's `t`
        // say when, and the cap is a policy of the answer.
        let body: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        if let Some(cap) = body["policy"].as_str().filter(|p| p.starts_with("spend-")) {
            assert_eq!(body["title"], "Spend cap reached", "{scenario}: {i}: {body}");
            let retry: u64 = resp.headers.get("retry-after").expect("a spent cap says when").parse().unwrap();
            let items = resp.headers.get("ratelimit").map(String::as_str).unwrap_or_default();
            let t = items
                .split(", ")
                .find(|item| item.starts_with(&format!("\"{cap}\";")))
                .and_then(|item| item.split(';').find_map(|p| p.strip_prefix("t=")))
                .map(|t| t.parse::<u64>().unwrap())
                .unwrap_or_else(|| panic!("{scenario}: {i}: no `t` of {cap} in RateLimit: {items}"));
            assert!(retry >= t && t > 0, "{scenario}: {i}: Retry-After {retry}, t={t} of {cap}");
            assert!(
                policy.contains(&format!("\"{cap}\";q=")),
                "{scenario}: {i}: {cap} not in RateLimit-Policy: {policy}"
            );
        }
    }
    if resp.status != 429 || !problem {
        return;
    }
    let body: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(
        body["type"], "https://iana.org/assignments/http-problem-types#quota-exceeded",
        "{scenario}: {i}: {body}"
    );
    assert!(body["kind"].is_string(), "{scenario}: {i}: tollgate's kind kept: {body}");
    let names: Vec<&str> =
        policy.split(", ").filter_map(|i| i.split(';').next()).map(|n| n.trim_matches('"')).collect();
    let retry: u64 = resp.headers.get("retry-after").expect("a 429 says when").parse().unwrap();
    let items = resp.headers.get("ratelimit").map(String::as_str).unwrap_or_default();
    for violated in body["violated-policies"].as_array().expect("violated-policies") {
        let violated = violated.as_str().unwrap();
        assert!(names.contains(&violated), "{scenario}: {i}: {violated} is not in RateLimit-Policy: {policy}");
        let t = items
            .split(", ")
            .find(|item| item.split(';').next().map(|n| n.trim_matches('"')) == Some(violated))
            .and_then(|item| item.split(';').find_map(|p| p.strip_prefix("t=")))
            .map(|t| t.parse::<u64>().unwrap());
        if let Some(t) = t {
            assert!(retry >= t, "{scenario}: {i}: Retry-After {retry} is earlier than t={t} of {violated}");
        }
    }
}

pub async fn run<D: Door>(scenario: &Scenario, make: &impl Fn(Tollgate) -> D, check_statuses: bool) -> Outcome {
    let (engine, clock, store) = engine().await;
    let door = make(engine.clone());
    // The second node, for the steps that need it.
    let other = scenario
        .steps
        .iter()
        .any(|s| matches!(s, OtherNode(..) | OverlapOther(..)))
        .then(|| engine_on(store.clone(), clock.clock()));
    let other_door = other.clone().map(make);
    let mut responses = Vec::new();
    // The first answer to each `Idempotency-Key`, for the replays.
    let mut firsts: BTreeMap<String, Resp> = BTreeMap::new();
    let key_of = |req: &Req| req.headers.iter().find(|(n, _)| *n == "idempotency-key").map(|(_, v)| v.clone());
    for (i, step) in scenario.steps.iter().enumerate() {
        match step.clone() {
            Replay(req, status) => {
                let key = key_of(&req).expect("a replay has an Idempotency-Key");
                let resp = door.send(req).await;
                let first =
                    firsts.get(&key).unwrap_or_else(|| panic!("{}: step {i}: nothing to replay", scenario.name));
                assert_eq!(resp.status, status, "{}: step {i}: {resp:?}", scenario.name);
                assert_eq!(
                    resp.headers.get("idempotent-replayed").map(String::as_str),
                    Some("true"),
                    "{}: step {i}: {resp:?}",
                    scenario.name
                );
                assert_eq!(
                    (&resp.body, resp.headers.get("x-call")),
                    (&first.body, first.headers.get("x-call")),
                    "{}: step {i}: the first answer, not the handler's again",
                    scenario.name
                );
                responses.push(resp);
            }
            Send(req, status) => {
                let key = key_of(&req);
                if let Some(other) = &other {
                    assert!(other.places_released(Duration::from_secs(5)).await);
                }
                let resp = door.send(req).await;
                if let Some(key) = key.filter(|_| resp.status < 300) {
                    firsts.entry(key).or_insert_with(|| resp.clone());
                }
                if check_statuses {
                    assert_eq!(resp.status, status, "{}: step {i}: {resp:?}", scenario.name);
                    if status == 201 && resp.body != "created" {
                        panic!("{}: step {i}: {resp:?}", scenario.name);
                    }
                }
                responses.push(resp);
            }
            Overlap(first, second, status_first, status_second)
            | OverlapOther(first, second, status_first, status_second) => {
                let second_door = match step {
                    OverlapOther(..) => other_door.as_ref().expect("a second node"),
                    _ => &door,
                };
                let _one_at_a_time = OVERLAP.lock().await;
                let overlap = async {
                    tokio::join!(door.send(first), async {
                        ENTERED.notified().await;
                        let b = second_door.send(second).await;
                        RELEASE.notify_one();
                        b
                    })
                };
                let (a, b) = tokio::time::timeout(Duration::from_secs(10), overlap).await.unwrap_or_else(|_| {
                    panic!("{}: step {i}: the first request never reached its handler", scenario.name)
                });
                if check_statuses {
                    assert_eq!((a.status, b.status), (status_first, status_second), "{}: step {i}", scenario.name);
                }
                responses.push(a);
                responses.push(b);
            }
            Cancel(req) => {
                let _one_at_a_time = OVERLAP.lock().await;
                let send = door.send(req);
                tokio::pin!(send);
                let entered = tokio::time::timeout(Duration::from_secs(10), async {
                    tokio::select! {
                        reply = &mut send => panic!("{}: step {i}: answered before it was cut off: {reply:?}", scenario.name),
                        () = ENTERED.notified() => {}
                    }
                });
                entered.await.unwrap_or_else(|_| panic!("{}: step {i}: the handler never started", scenario.name));
                // The client is gone: the request's future is dropped with the handler in it.
            }
            OtherNode(req, status) => {
                let door = other_door.as_ref().expect("a second node");
                // The client's next request comes after the first node's places freed by the
                // last one reached the store (in the background, after its body went).
                assert!(engine.places_released(Duration::from_secs(5)).await);
                let resp = door.send(req).await;
                if check_statuses {
                    assert_eq!(resp.status, status, "{}: step {i} (the second node): {resp:?}", scenario.name);
                }
                responses.push(resp);
            }
            Advance(by) => clock.advance(by),
            UsageOf(req, tenant) => {
                let resp = door.send(req).await;
                if check_statuses {
                    let body = usage_json(scenario.name, i, &resp);
                    assert_eq!(body["tenant"], tenant, "{}: step {i}: another tenant's usage", scenario.name);
                }
                responses.push(resp);
            }
            Revalidate(req, status) => {
                let etag = responses.last().and_then(|r: &Resp| r.headers.get("etag")).expect("an ETag").clone();
                let made = engine.stats().usage_refreshes;
                let resp = door.send(req.header("if-none-match", &etag)).await;
                if check_statuses {
                    assert_eq!(resp.status, status, "{}: step {i}: {resp:?}", scenario.name);
                    assert_eq!(
                        engine.stats().usage_refreshes,
                        made,
                        "{}: step {i}: a 304 reads nothing",
                        scenario.name
                    );
                }
                responses.push(resp);
            }
            UsageMatches(usage, next, item, cost) => {
                let resp = door.send(usage).await;
                let next = door.send(next).await;
                if check_statuses {
                    let body = usage_json(scenario.name, i, &resp);
                    let meter = item.rsplit_once('-').map_or(item, |(m, _)| m);
                    let quota = body["quotas"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|q| q["meter"] == meter)
                        .unwrap_or_else(|| panic!("{}: step {i}: no quota of {meter}: {body}", scenario.name));
                    let remaining = quota["remaining"].as_u64().unwrap();
                    let header = next.headers.get("ratelimit").map(String::as_str).unwrap_or_default();
                    let r: u64 = header
                        .split(", ")
                        .find(|it| it.starts_with(&format!("\"{item}\";")))
                        .and_then(|it| it.split(';').find_map(|p| p.strip_prefix("r=")))
                        .unwrap_or_else(|| panic!("{}: step {i}: no {item} in RateLimit: {header}", scenario.name))
                        .parse()
                        .unwrap();
                    assert_eq!(
                        r,
                        remaining - cost,
                        "{}: step {i}: the route said {remaining} remaining; the next request ({cost}) {header}",
                        scenario.name
                    );
                }
                responses.push(resp);
                responses.push(next);
            }
            Polls(keys, rounds, refreshes) => {
                let made = engine.stats().usage_refreshes;
                let mut tenants: BTreeMap<&str, String> = BTreeMap::new();
                let mut last = None;
                for _ in 0..rounds {
                    for key in keys {
                        let resp = door.send(get("/v1/usage").key(key)).await;
                        if check_statuses {
                            let body = usage_json(scenario.name, i, &resp);
                            let tenant = body["tenant"].as_str().unwrap().to_owned();
                            let first = tenants.entry(key).or_insert_with(|| tenant.clone());
                            assert_eq!(*first, tenant, "{}: step {i}: {key} answered another tenant", scenario.name);
                        }
                        last = Some(resp);
                    }
                }
                if check_statuses {
                    let distinct: std::collections::BTreeSet<&String> = tenants.values().collect();
                    assert_eq!(distinct.len(), keys.len(), "{}: step {i}: each key its own tenant", scenario.name);
                }
                assert_eq!(
                    engine.stats().usage_refreshes - made,
                    refreshes,
                    "{}: step {i}: views made for {} polls",
                    scenario.name,
                    rounds as usize * keys.len()
                );
                responses.extend(last);
            }
        }
    }
    for (i, resp) in responses.iter().enumerate() {
        check_fields(scenario.name, i, resp);
    }
    engine.flush().await.expect("the memory store takes every flush");
    if let Some(other) = &other {
        other.flush().await.expect("the memory store takes every flush");
    }
    let mut usage = BTreeMap::new();
    for tenant in ["acme", "globex", "beta", "initech", "umbrella", "hooli", "stark"] {
        for a in store.usage_range(&tenant.into(), 0, i64::MAX).await.unwrap() {
            *usage.entry((tenant.to_owned(), a.key.meter.to_string())).or_insert(0) += a.quantity;
        }
    }
    if check_statuses {
        let expected: BTreeMap<(String, String), u64> =
            scenario.usage.iter().map(|(t, m, n)| ((t.to_string(), m.to_string()), *n)).collect();
        assert_eq!(usage, expected, "{}: the usage stored", scenario.name);
    }
    Outcome { responses, usage }
}

/// Runs the whole table on the bare tower layer (`reference`, whose statuses are checked) and
/// on `door`, and asserts that they agree on every response and on the usage stored.
pub async fn assert_same<R: Door, D: Door>(reference: impl Fn(Tollgate) -> R, door: impl Fn(Tollgate) -> D) {
    let table = scenarios();
    assert!(table.len() >= 13);
    for scenario in &table {
        let mut expected = run(scenario, &reference, true).await;
        if D::RESOLVES_DOT_SEGMENTS {
            let resolved = scenario.with_dot_segments_resolved();
            if resolved.steps.iter().zip(&scenario.steps).any(|(a, b)| format!("{a:?}") != format!("{b:?}")) {
                // The door serves the resolved paths: it must charge as the tower layer does
                // for them.
                expected = run(&resolved, &reference, false).await;
            }
        }
        let got = run(scenario, &door, false).await;
        if scenario.same_responses {
            // `x-call` numbers the handler's calls in the process: compared within a run only.
            let strip = |r: &Resp| {
                let mut r = r.clone();
                r.headers.remove("x-call");
                r
            };
            for (i, (e, g)) in expected.responses.iter().zip(&got.responses).enumerate() {
                assert_eq!(strip(g), strip(e), "{}: response {i} differs from the tower layer's", scenario.name);
            }
        }
        assert_eq!(got.responses.len(), expected.responses.len(), "{}", scenario.name);
        assert_eq!(got.usage, expected.usage, "{}: the usage stored differs from the tower layer's", scenario.name);
    }
}
