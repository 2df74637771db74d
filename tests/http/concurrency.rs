//! Per-tenant concurrency limits on the tower layer: a request counts from its admission to
//! the end of its response body (a streaming answer holds its place while it streams), one over
//! the limit gets 429 with `Retry-After` and the `concurrent-requests` policy and is charged
//! nothing, and a body that ends, fails or is dropped frees its place.

use crate::common;

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use common::NOON;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tollgate::{clock::Clock, store::MemoryStore, Config, Tollgate};
use tower::{Layer, Service, ServiceExt};

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type Streamed = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type In = tollgate::layer::RequestBody<Full<Bytes>>;

/// A service whose every answer streams until the test sends its chunks (or drops its sender):
/// the senders, in call order.
fn streaming(
    senders: Arc<Mutex<Vec<Chunks>>>,
) -> impl Service<Request<In>, Response = Response<Streamed>, Error = Infallible, Future: Send> + Clone {
    tower::service_fn(move |_req: Request<In>| {
        let senders = senders.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            senders.lock().await.push(tx);
            Ok::<_, Infallible>(Response::new(StreamBody::new(ReceiverStream::new(rx))))
        }
    })
}

fn get() -> Request<Full<Bytes>> {
    Request::get("/").header("x-api-key", "key-t").body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn a_streaming_answer_holds_its_place_until_its_body_has_gone() {
    let toml =
        common::one_tenant("rate = \"1000/s\"\nconcurrency = 2\nquotas.requests = { limit = 100, period = \"day\" }");
    let (clock, _handle) = Clock::fake_at_unix(NOON);
    let store = Arc::new(MemoryStore::new());
    let (engine, _worker) =
        Tollgate::builder(Config::from_toml_str(&toml).unwrap()).store_arc(store).clock(clock).build();
    let senders: Arc<Mutex<Vec<Chunks>>> = Arc::default();
    let svc = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies().layer(streaming(senders.clone()));

    let first = svc.clone().oneshot(get()).await.unwrap();
    let second = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    // Two answers stream: a third request is one too many.
    let refused = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(refused.status(), 429);
    let h = refused.headers();
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["content-type"], "application/problem+json");
    let policy = h["ratelimit-policy"].to_str().unwrap();
    assert!(policy.ends_with("\"concurrency\";q=2;qu=\"concurrent-requests\""), "{policy}");
    assert!(policy.contains("\"requests-day\";q=100"), "the others stay: {policy}");
    assert!(h["ratelimit"].to_str().unwrap().ends_with("\"concurrency\";r=0"), "{:?}", h["ratelimit"]);
    let rejection = refused.extensions().get::<tollgate::Rejection>().unwrap().clone();
    assert_eq!(rejection.kind(), tollgate::response::RejectionKind::ConcurrencyLimited);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "https://iana.org/assignments/http-problem-types#quota-exceeded", "{problem}");
    assert_eq!(problem["violated-policies"], serde_json::json!(["concurrency"]));
    assert_eq!(problem["kind"], "concurrency_limited");

    // The tenant's state replaced while its answers stream (an eviction, a revalidation, a
    // plan change): the count is the tenant's, not the state's.
    engine.invalidate_tenant(&"t".into());
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 429, "still two in flight");
    // A first request with an `Idempotency-Key` is refused before its key is claimed.
    let keyed = Request::post("/")
        .header("x-api-key", "key-t")
        .header("idempotency-key", "k-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(svc.clone().oneshot(keyed).await.unwrap().status(), 429);

    // The first answer ends: its place is free.
    let tx = senders.lock().await.remove(0);
    tx.send(Ok(Frame::data(Bytes::from_static(b"done")))).await.unwrap();
    drop(tx);
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "done");
    let third = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(third.status(), 200);
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 429, "the second and third stream");
    // A client that goes away mid-stream frees its place too.
    drop(second);
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 200);

    drop(third);
    engine.shutdown().await.unwrap();
    let report = engine.usage_report(&"t".into(), NOON - 3600, NOON + 3600).await.unwrap();
    let used: u64 = report.usage.iter().map(|w| w.quantity).sum();
    assert_eq!(used, 4, "the refused requests were charged nothing");
}

#[tokio::test]
async fn with_legacy_headers_the_refusal_names_the_limit_and_no_place_left() {
    let toml = common::one_tenant("concurrency = 1");
    let toml = format!("[limits]\nheaders = \"legacy\"\n{toml}");
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(&toml).unwrap()).build();
    let senders: Arc<Mutex<Vec<Chunks>>> = Arc::default();
    let svc = tollgate::TollgateLayer::new(engine).streamed_bodies().layer(streaming(senders.clone()));
    let first = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(first.status(), 200);
    let refused = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(refused.status(), 429);
    let h = refused.headers();
    assert_eq!((h["x-ratelimit-limit"].to_str().unwrap(), h["x-ratelimit-remaining"].to_str().unwrap()), ("1", "0"));
    assert_eq!(h["retry-after"], "1");
    assert!(h.get("x-ratelimit-reset").is_none());
}

#[test]
fn the_anonymous_plan_has_no_concurrency_limit() {
    let toml = "[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"open\"\n[plans.open]\nconcurrency = 4\n";
    let e = Config::from_toml_str(toml).unwrap_err();
    assert_eq!(e.key(), "plans.open.concurrency", "{e}");
}

#[test]
fn a_concurrency_limit_is_a_number_of_requests() {
    for bad in ["0", "-1", "1000001", "\"2\""] {
        let toml = common::one_tenant(&format!("concurrency = {bad}"));
        let e = Config::from_toml_str(&toml).unwrap_err();
        assert_eq!(e.key(), "plans.p.concurrency", "{bad}: {e}");
    }
    let config = Config::from_toml_str(&common::one_tenant("concurrency = 8")).unwrap();
    let plan = &config.plans()[&tollgate::config::PlanId::from("p")];
    assert_eq!(plan.concurrency().map(|n| n.get()), Some(8));
}
