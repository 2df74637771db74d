//! Holds from the configuration (`[[routes]] hold`) through the tower layer: taken before the
//! handler, open while the response streams, settled when its body ends with what the work
//! recorded, what its header or trailer says, or the estimate.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tollgate::{clock::Clock, store::MemoryStore, Config, RecordError, TenantContext, Tollgate};
use tower::{Layer, ServiceExt};

use crate::common::{self, NOON};

const TOML: &str = r#"
[meters.tokens]
[plans.p]
quotas.tokens = { limit = 100, period = "day", mode = "hard", lease = 100 }
[[routes]]
path = "/chat"
reports = ["tokens"]
hold.tokens = 40
overrun = "refuse"
actual_header = "x-usage-tokens"
[[routes]]
path = "/draw"
reports = ["tokens"]
hold.tokens = 40
settle = "estimate"
[[routes]]
path = "/stream"
reports = ["tokens"]
hold.tokens = 40
overrun = "refuse"
[plans.soft]
quotas.tokens = { limit = 100, period = "day", mode = "soft" }
[plans.none]
[plans.rated]
rate = "1/min"
burst = 2
quotas.tokens = { limit = 50, period = "day", mode = "hard", lease = 50 }
[tenants.r]
plan = "rated"
keys = ["key-r"]
[tenants.t]
plan = "p"
keys = ["key-t"]
[tenants.s]
plan = "soft"
keys = ["key-s"]
[tenants.n]
plan = "none"
keys = ["key-n"]
"#;

type Frames = mpsc::Receiver<Result<Frame<Bytes>, std::convert::Infallible>>;
type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::convert::Infallible>>>;

/// An engine, and a service whose handler hands the test its context and answers with
/// `status` and a body the test streams.
struct Node {
    engine: Tollgate,
    contexts: Arc<Mutex<Vec<TenantContext>>>,
    clock: tollgate::clock::FakeClock,
    /// The API key requests are sent with.
    key: &'static str,
    /// Headers the handler's response carries.
    headers: Vec<(&'static str, &'static str)>,
}

impl Node {
    fn new() -> Self {
        Self::with("", false)
    }

    /// A node of `toml` added to the file's, its worker running when `worker`.
    fn with(toml: &str, worker: bool) -> Self {
        let (clock, handle) = Clock::fake_at_unix(NOON);
        let config = Config::from_toml_str(&format!("{TOML}\n{toml}")).unwrap();
        let (engine, w) = Tollgate::builder(config).store_arc(Arc::new(MemoryStore::new())).clock(clock).build();
        if worker {
            tokio::spawn(w.run());
        }
        Self { engine, contexts: Arc::default(), clock: handle, key: "key-t", headers: Vec::new() }
    }

    /// Sends `POST path`: the response (its body still streaming from what is sent on the
    /// returned sender), once the handler answered with `status`.
    async fn send(
        &self,
        path: &'static str,
        status: u16,
        key: Option<&str>,
    ) -> (
        http::Response<tollgate::layer::TollgateBody<Body>>,
        mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>,
    ) {
        // The contexts of earlier requests are done with (their work, and their holds, end).
        self.contexts.lock().unwrap().clear();
        let (tx, rx): (_, Frames) = mpsc::channel(8);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let contexts = self.contexts.clone();
        let headers = self.headers.clone();
        let service = tollgate::TollgateLayer::new(self.engine.clone()).streamed_bodies().layer(tower::service_fn(
            move |req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
                let (contexts, rx, headers) = (contexts.clone(), rx.clone(), headers.clone());
                async move {
                    if let Some(ctx) = req.extensions().get::<TenantContext>() {
                        contexts.lock().unwrap().push(ctx.clone());
                    }
                    let rx = rx.lock().unwrap().take().expect("one call");
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    let mut response = http::Response::builder().status(status);
                    for (name, value) in headers {
                        response = response.header(name, value);
                    }
                    Ok::<_, std::convert::Infallible>(response.body(body).unwrap())
                }
            },
        ));
        let mut request = http::Request::post(path).header("x-api-key", self.key);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = service.oneshot(request.body(http_body_util::Full::new(Bytes::new())).unwrap()).await.unwrap();
        (response, tx)
    }

    /// The context the handler was given (taken: the test holds the work's part of the hold).
    fn context(&self) -> TenantContext {
        self.contexts.lock().unwrap().pop().expect("the handler ran")
    }

    async fn billed(&self) -> u64 {
        self.billed_to("t").await
    }

    async fn billed_to(&self, tenant: &str) -> u64 {
        self.contexts.lock().unwrap().clear();
        self.engine.flush().await.unwrap();
        common::committed(&**self.engine.usage_store(), tenant, "tokens", NOON - 86_400, NOON + 86_400, 3600).await
    }
}

fn data(text: &'static str) -> Result<Frame<Bytes>, std::convert::Infallible> {
    Ok(Frame::data(Bytes::from_static(text.as_bytes())))
}

/// The hold stays open while the answer streams: the handler's records come out of it (past
/// it, `overrun = "refuse"` refuses), and what it did not record goes back when the body ends.
#[tokio::test]
async fn a_held_route_settles_when_its_streamed_body_ends() {
    let node = Node::new();
    let (response, tx) = node.send("/stream", 200, None).await;
    assert_eq!(response.status(), 200);
    let ctx = node.context();
    ctx.record("tokens", 10).unwrap();
    assert_eq!((node.engine.stats().holds_open, node.engine.stats().units_held), (1, 30), "open while it streams");
    assert_eq!(ctx.record("tokens", 200), Err(RecordError::Overrun(170)), "past the hold and the lease");
    tx.send(data("a")).await.unwrap();
    ctx.record("tokens", 5).unwrap();
    drop(tx);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "a");
    assert_eq!(node.engine.stats().holds_open, 1, "the work may still record");
    // The handler's work is done.
    drop(ctx);
    assert_eq!((node.engine.stats().holds_open, node.engine.stats().units_held), (0, 0), "settled at the end");
    assert_eq!(node.billed().await, 15);
    // 85 left: two more holds of 40 fit, a third does not.
    for _ in 0..2 {
        let (response, tx) = node.send("/draw", 200, None).await;
        assert_eq!(response.status(), 200);
        drop(tx);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(node.billed().await, 95, "settle = \"estimate\" bills the hold in full");
    let (response, _tx) = node.send("/stream", 200, None).await;
    assert_eq!(response.status(), 429);
}

/// The actual the response names in its trailers is billed (beyond what was recorded).
#[tokio::test]
async fn the_actual_in_a_trailer_is_billed() {
    let node = Node::new();
    let (response, tx) = node.send("/chat", 200, None).await;
    node.context().record("tokens", 5).unwrap();
    tx.send(data("a")).await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-usage-tokens", http::HeaderValue::from_static("25"));
    tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.billed().await, 25, "the trailer's total, the 5 recorded among them");
}

/// A request that is not billed (a 5xx) gives its hold back, minus what it recorded; one cut
/// off while its body streams is billed (`usage.bill_cancelled`), and on a route whose actual
/// comes in its response (`actual_header`), never said, the estimate is billed in full: a
/// client that leaves before the trailer gets no work for free.
#[tokio::test]
async fn a_failed_request_returns_its_hold_and_a_cut_off_one_bills_its_estimate() {
    let node = Node::new();
    let (response, tx) = node.send("/chat", 500, None).await;
    node.context().record("tokens", 4).unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.engine.stats().units_held, 0);
    assert_eq!(node.billed().await, 4, "recorded is billed, the rest went back");

    let (response, tx) = node.send("/chat", 200, None).await;
    node.context().record("tokens", 7).unwrap();
    tx.send(data("a")).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    // The client goes away mid-stream.
    drop(body);
    drop(tx);
    assert_eq!(node.engine.stats().units_held, 0);
    assert_eq!(node.billed().await, 44, "4, then the estimate of 40 (7 of it recorded)");
    // 56 left: a hold of 40 fits once.
    let (response, tx) = node.send("/draw", 200, None).await;
    assert_eq!(response.status(), 200);
    drop(tx);
    response.into_body().collect().await.unwrap();
    let (response, _tx) = node.send("/draw", 200, None).await;
    assert_eq!(response.status(), 429);
}

/// A first request with an `Idempotency-Key` is billed at its head (its response is stored as
/// it streams), and keeps its hold while the body streams: what the work records goes through
/// it (past it, refused), and it settles once the body has gone, its actual read from the head
/// (here none: the estimate in full).
#[tokio::test]
async fn a_keyed_request_keeps_its_hold_while_its_body_streams() {
    let node = Node::new();
    let (response, tx) = node.send("/chat", 200, Some("k-chat")).await;
    assert_eq!(response.status(), 200);
    let ctx = node.context();
    ctx.record("tokens", 10).unwrap();
    assert_eq!(ctx.record("tokens", 200), Err(RecordError::Overrun(170)), "the hold's overrun applies");
    assert_eq!(node.engine.stats().holds_open, 1, "open while the body streams");
    tx.send(data("a")).await.unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    drop(ctx);
    assert_eq!((node.engine.stats().holds_open, node.engine.stats().units_held), (0, 0));
    assert_eq!(node.billed().await, 40, "no actual in the head: the estimate");
}

/// A replay of an `Idempotency-Key` takes no hold: with the quota spent by the first request,
/// the replay is still answered.
#[tokio::test]
async fn a_replay_takes_no_hold() {
    let node = Node::new();
    let (response, tx) = node.send("/draw", 200, Some("k-1")).await;
    assert_eq!(response.status(), 200);
    tx.send(data("drawn")).await.unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    let (response, tx) = node.send("/draw", 200, None).await;
    assert_eq!(response.status(), 200);
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.billed().await, 80);
    let (response, _tx) = node.send("/draw", 200, None).await;
    assert_eq!(response.status(), 429, "20 left: a hold of 40 does not fit");
    let (response, _tx) = node.send("/draw", 200, Some("k-1")).await;
    assert_eq!(response.status(), 200, "the replay holds nothing");
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "drawn");
    assert_eq!(node.billed().await, 80);
}

/// A handler on a held route that panics (the layer's future unwinds) gives the route's hold
/// back whole: the request is not billed.
#[tokio::test]
async fn a_panicking_handler_returns_its_routes_hold() {
    let node = Node::new();
    let service = tollgate::TollgateLayer::new(node.engine.clone()).streamed_bodies().layer(tower::service_fn(
        |_: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| async move {
            if true {
                panic!("the handler fails");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
        },
    ));
    let request =
        http::Request::post("/draw").header("x-api-key", "key-t").body(http_body_util::Full::new(Bytes::new()));
    let task = tokio::spawn(service.oneshot(request.unwrap()));
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!((node.engine.stats().holds_open, node.engine.stats().units_held), (0, 0));
    assert_eq!(node.billed().await, 0, "not billed, its estimate back");
    for _ in 0..2 {
        let (response, tx) = node.send("/draw", 200, None).await;
        assert_eq!(response.status(), 200, "the whole limit is there");
        drop(tx);
        response.into_body().collect().await.unwrap();
    }
}

/// A tenant whose plan has no hard quota on the held meter (a soft quota, or none) holds
/// nothing, and is billed all the same: the estimate on a route that bills it, or on one whose
/// `actual_header` the response never says; what the header says when it does.
#[tokio::test]
async fn a_tenant_without_a_hard_quota_is_billed_what_a_held_route_bills() {
    for (tenant, key) in [("s", "key-s"), ("n", "key-n")] {
        let mut node = Node::new();
        node.key = key;
        for path in ["/draw", "/chat"] {
            let (response, tx) = node.send(path, 200, None).await;
            assert_eq!(response.status(), 200);
            drop(tx);
            response.into_body().collect().await.unwrap();
        }
        node.headers = vec![("x-usage-tokens", "7")];
        let (response, tx) = node.send("/chat", 200, None).await;
        drop(tx);
        response.into_body().collect().await.unwrap();
        assert_eq!(node.billed_to(tenant).await, 87, "{tenant}: the estimate twice, then the actual said");
    }
}

/// A hold the node settles past its `hold_timeout` while the response still streams: the
/// route's estimate is billed when the body ends all the same (past the limit, as debt,
/// counted), so a client that reads slowly gets no work for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_route_whose_hold_expired_still_bills_its_estimate() {
    let node = Node::with("[limits]\nhold_timeout = \"2s\"", true);
    let (response, tx) = node.send("/draw", 200, None).await;
    assert_eq!(response.status(), 200);
    node.clock.advance(std::time::Duration::from_secs(3));
    for _ in 0..300 {
        if node.engine.stats().holds_expired == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(node.engine.stats().holds_expired, 1);
    tx.send(data("slow")).await.unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.billed().await, 40, "the estimate, billed when the body ended");
    assert_eq!(node.engine.stats().records_after_settle, 1);
}

/// A request cut off before its handler answered, on a route whose actual comes in the
/// response (`actual_header`), bills what the work recorded and gives the rest of its hold
/// back: no response, no work delivered beyond what was recorded.
#[tokio::test]
async fn a_request_cut_off_before_its_answer_bills_what_it_recorded() {
    let node = Node::new();
    let (started, mut ready) = mpsc::channel::<TenantContext>(1);
    let service = tollgate::TollgateLayer::new(node.engine.clone()).streamed_bodies().layer(tower::service_fn(
        move |req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
            let started = started.clone();
            async move {
                let ctx = req.extensions().get::<TenantContext>().cloned().unwrap();
                ctx.record("tokens", 5).unwrap();
                started.send(ctx).await.unwrap();
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
            }
        },
    ));
    let request =
        http::Request::post("/chat").header("x-api-key", "key-t").body(http_body_util::Full::new(Bytes::new()));
    let call = tokio::spawn(service.oneshot(request.unwrap()));
    let ctx = ready.recv().await.unwrap();
    call.abort();
    let _ = call.await;
    drop(ctx);
    assert_eq!((node.engine.stats().holds_open, node.engine.stats().units_held), (0, 0));
    assert_eq!(node.billed().await, 5, "what it recorded, not the estimate");
}

/// A response that says more than its route held is billed in full (the work was done), past
/// the limit as debt, and counted.
#[tokio::test]
async fn an_actual_past_the_hold_is_billed_and_counted() {
    let mut node = Node::new();
    node.headers = vec![("x-usage-tokens", "60")];
    let (response, tx) = node.send("/chat", 200, None).await;
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.billed().await, 60);
    assert_eq!(node.engine.stats().hold_overruns, 1);
}

/// A held answer with a `Content-Length` is billed when its last announced byte is read: a
/// server stops polling the body there, and drops it, which must not count as a cut-off.
#[tokio::test]
async fn a_held_answer_of_announced_length_is_billed_at_its_last_byte() {
    let mut node = Node::with("[usage]\nbill_cancelled = false", false);
    node.headers = vec![("content-length", "4")];
    let (response, tx) = node.send("/draw", 200, None).await;
    tx.send(data("ab")).await.unwrap();
    tx.send(data("cd")).await.unwrap();
    // As hyper does: frames until the announced length is written, then the body is dropped.
    let mut body = response.into_body();
    let mut seen = 0;
    while seen < 4 {
        seen += body.frame().await.unwrap().unwrap().into_data().unwrap().len();
    }
    drop(body);
    drop(tx);
    assert_eq!(node.billed().await, 40);
}

/// A route's hold refused at admission (here `Units held`: another request holds the units)
/// spends none of the request's rate cells, as a request refused for its quota does: a client
/// told to retry in a second is not rate limited for having asked.
#[tokio::test]
async fn a_refused_hold_spends_no_rate_cells() {
    let mut node = Node::new();
    node.key = "key-r";
    let (first, tx) = node.send("/draw", 200, None).await;
    assert_eq!(first.status(), 200);
    let (refused, _tx) = node.send("/draw", 200, None).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.extensions().get::<tollgate::Rejection>().unwrap().kind(), tollgate::RejectionKind::UnitsHeld);
    drop(tx);
    first.into_body().collect().await.unwrap();
    let (plain, _tx) = node.send("/plain", 200, None).await;
    assert_eq!(plain.status(), 200, "the burst of 2 is spent by 2 requests served, not by the refusal");
}

/// Trailers that come after the announced length (as HTTP/2 sends them) still say the actual
/// of a held answer: billed what they say, not the estimate.
#[tokio::test]
async fn trailers_after_the_announced_length_say_the_actual() {
    let mut node = Node::new();
    node.headers = vec![("content-length", "4")];
    let (response, tx) = node.send("/chat", 200, None).await;
    tx.send(data("ab")).await.unwrap();
    tx.send(data("cd")).await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-usage-tokens", http::HeaderValue::from_static("25"));
    tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(node.billed().await, 25);
}

/// A handler whose record its hold refuses answers tollgate's refusal
/// (`TenantContext::refusal`): 429 `Quota exceeded` with `Retry-After`, as the engine's own,
/// and the request is not billed (no `requests` unit, no tokens), its whole hold back. As the
/// quickstart's `/v1/complete` does.
#[tokio::test]
async fn a_record_its_hold_refuses_is_answered_with_tollgates_refusal_and_not_billed() {
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let config = Config::from_toml_str(TOML).unwrap();
    let (engine, _w) = Tollgate::builder(config).store_arc(Arc::new(MemoryStore::new())).clock(clock).build();
    let service = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
        |req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| async move {
            let ctx = req.extensions().get::<TenantContext>().unwrap().clone();
            // 40 held of a quota of 50: 60 do not fit.
            let response = match ctx.record("tokens", 60) {
                Ok(()) => http::Response::new(http_body_util::Full::new(Bytes::from_static(b"generated"))),
                Err(e) => {
                    let refusal = ctx.refusal("tokens", &e).expect("a record its hold refused");
                    tollgate::response::respond(&tollgate::response::ProblemJson, refusal)
                        .map(http_body_util::Full::new)
                }
            };
            Ok::<_, std::convert::Infallible>(response)
        },
    ));
    let request = http::Request::post("/chat")
        .header("x-api-key", "key-r")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.extensions().get::<tollgate::Rejection>().map(tollgate::Rejection::kind),
        Some(tollgate::RejectionKind::QuotaExceeded)
    );
    response.into_body().collect().await.unwrap();
    engine.flush().await.unwrap();
    let billed = |meter: &'static str| {
        let engine = engine.clone();
        async move { common::committed(&**engine.usage_store(), "r", meter, NOON - 86_400, NOON + 86_400, 3600).await }
    };
    assert_eq!((billed("requests").await, billed("tokens").await), (0, 0), "a refusal by the handler is not billed");
}
