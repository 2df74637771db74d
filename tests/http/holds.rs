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
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

type Frames = mpsc::Receiver<Result<Frame<Bytes>, std::convert::Infallible>>;
type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::convert::Infallible>>>;

/// An engine, and a service whose handler hands the test its context and answers with
/// `status` and a body the test streams.
struct Node {
    engine: Tollgate,
    contexts: Arc<Mutex<Vec<TenantContext>>>,
}

impl Node {
    fn new() -> Self {
        let (clock, _handle) = Clock::fake_at_unix(NOON);
        let config = Config::from_toml_str(TOML).unwrap();
        let (engine, _worker) = Tollgate::builder(config).store_arc(Arc::new(MemoryStore::new())).clock(clock).build();
        Self { engine, contexts: Arc::default() }
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
        let service = tollgate::TollgateLayer::new(self.engine.clone()).streamed_bodies().layer(tower::service_fn(
            move |req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
                let (contexts, rx) = (contexts.clone(), rx.clone());
                async move {
                    if let Some(ctx) = req.extensions().get::<TenantContext>() {
                        contexts.lock().unwrap().push(ctx.clone());
                    }
                    let rx = rx.lock().unwrap().take().expect("one call");
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    Ok::<_, std::convert::Infallible>(http::Response::builder().status(status).body(body).unwrap())
                }
            },
        ));
        let mut request = http::Request::post(path).header("x-api-key", "key-t");
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
        self.contexts.lock().unwrap().clear();
        self.engine.flush().await.unwrap();
        common::committed(&**self.engine.usage_store(), "t", "tokens", NOON - 86_400, NOON + 86_400, 3600).await
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
