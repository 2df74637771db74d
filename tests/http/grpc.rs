//! A real tonic client and server through tollgate's tower layer: a gRPC client gets a gRPC
//! status it understands for each rejection (trailers-only, HTTP 200), with the retry delay
//! in the metadata, instead of a problem+json body.

#[path = "../../examples/grpc/echo.rs"]
mod echo;

use bytes::Bytes;
use echo::{Echo, Raw, SAY};
use http::uri::PathAndQuery;
use tollgate::{Config, Tollgate, TollgateLayer};
use tonic::{Code, Status};

const CONFIG: &str = r#"
[plans.free]
quotas.requests = { limit = 2, period = "day", mode = "hard" }
[tenants.acme]
plan = "free"
keys = ["key-acme"]
"#;

async fn say(channel: &tonic::transport::Channel, key: Option<&str>) -> Result<tonic::Response<Bytes>, Status> {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client.ready().await.unwrap();
    let mut request = tonic::Request::new(Bytes::from_static(b"hello"));
    if let Some(key) = key {
        request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    client.unary(request, PathAndQuery::from_static(SAY), Raw).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_gets_grpc_statuses_with_the_retry_delay_in_metadata() {
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(CONFIG).unwrap()).build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(TollgateLayer::new(engine))
        .add_service(Echo)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    for _ in 0..2 {
        let reply = say(&channel, Some("key-acme")).await.unwrap();
        assert_eq!(reply.get_ref(), &Bytes::from_static(b"hello"));
        assert!(reply.metadata().get("ratelimit").is_some(), "{:?}", reply.metadata());
    }
    let spent = say(&channel, Some("key-acme")).await.unwrap_err();
    assert_eq!(spent.code(), Code::ResourceExhausted, "{spent:?}");
    assert!(spent.message().contains("quota"), "{spent:?}");
    let retry: u64 = spent.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 86_400, "{retry}");
    assert!(spent.metadata().get("ratelimit-policy").is_some());

    let unknown = say(&channel, Some("key-nobody")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    let missing = say(&channel, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let malformed = say(&channel, Some("key\tacme")).await;
    assert!(matches!(malformed, Err(ref s) if s.code() == Code::InvalidArgument), "{malformed:?}");
    server.abort();
}

/// `test.Echo/Say` answering the status its message names (`"13"`: `INTERNAL`; `"0"`: OK),
/// as tonic sends a handler's error: trailers-only, `grpc-status` in the headers.
#[derive(Debug, Clone, Copy)]
struct Answers;

impl tonic::server::NamedService for Answers {
    const NAME: &'static str = "test.Echo";
}

struct Answer;

impl tonic::server::UnaryService<Bytes> for Answer {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let code: i32 = std::str::from_utf8(request.get_ref()).unwrap().parse().unwrap();
        std::future::ready(match Code::from_i32(code) {
            Code::Ok => Ok(tonic::Response::new(request.into_inner())),
            code => Err(Status::new(code, "as asked")),
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Answers {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, std::convert::Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).unary(Answer, request).await) })
    }
}

/// Billing goes by the gRPC status, not the HTTP 200 every gRPC answer has: server-side
/// failures (`INTERNAL`, `UNAVAILABLE`, …) are not billed, as HTTP 5xx are not; client errors
/// (`INVALID_ARGUMENT`, `NOT_FOUND`, …) are, as 4xx are; `OK` is. `usage.billable_grpc` sets
/// the codes billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_billed_by_their_grpc_status() {
    for (config, expected) in [("", 3), ("[usage]\nbillable_grpc = [\"OK\", \"INTERNAL\"]\n", 3)] {
        let toml = format!("{config}[plans.free]\n[tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\n");
        let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
        let (engine, _worker) =
            Tollgate::builder(Config::from_toml_str(&toml).unwrap()).store_arc(store.clone()).build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .layer(TollgateLayer::new(engine.clone()))
            .add_service(Answers)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        for code in ["0", "13", "14", "3", "5"] {
            let mut client = tonic::client::Grpc::new(channel.clone());
            client.ready().await.unwrap();
            let mut request = tonic::Request::new(Bytes::from(code));
            request.metadata_mut().insert("x-api-key", "key-acme".parse().unwrap());
            let reply = client.unary(request, PathAndQuery::from_static(SAY), Raw).await;
            assert_eq!(reply.err().map_or(0, |s| s.code() as i32).to_string(), code);
        }
        engine.flush().await.unwrap();
        use tollgate::store::prelude::*;
        let billed: u64 =
            store.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum();
        // Default: OK, INVALID_ARGUMENT and NOT_FOUND; configured: OK and INTERNAL (13) only.
        let want = if config.is_empty() { expected } else { 2 };
        assert_eq!(billed, want, "{config:?}");
        server.abort();
    }
}

/// A body of one data frame, then trailers with this `grpc-status`.
struct Trailed {
    data: Option<Bytes>,
    status: Option<&'static str>,
}

impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        std::task::Poll::Ready(self.status.take().map(|s| {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static(s));
            Ok(http_body::Frame::trailers(trailers))
        }))
    }
}

/// A gRPC answer whose status comes in its trailers (a success, or a stream that fails midway)
/// is billed by that status once the body ends: `INTERNAL` in the trailers is not billed,
/// `OK` is.
#[tokio::test]
async fn a_grpc_status_in_the_trailers_decides_the_billing() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    let toml = "[plans.free]\n[tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\n";
    let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(toml).unwrap()).store_arc(store.clone()).build();
    let svc = TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
        |req: http::Request<tollgate::layer::RequestBody<String>>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let status = if &body[..] == b"fail" { "13" } else { "0" };
            let body = Trailed { data: Some(Bytes::from_static(b"\0\0\0\0\x02hi")), status: Some(status) };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().header("content-type", "application/grpc").body(body).unwrap(),
            )
        },
    ));
    for body in ["ok", "fail", "fail", "ok"] {
        let request = http::Request::builder()
            .method("POST")
            .uri(SAY)
            .header("content-type", "application/grpc")
            .header("x-api-key", "key-acme")
            .body(body.to_owned())
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], if body == "fail" { "13" } else { "0" });
    }
    engine.flush().await.unwrap();
    use tollgate::store::prelude::*;
    let billed: u64 = store.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum();
    assert_eq!(billed, 2, "the two OK, not the two INTERNAL");
}

/// A gRPC body that says it has ended is not polled again by a server: its request is settled
/// by its HTTP status then, not billed as cut off when the body is dropped.
#[tokio::test]
async fn a_grpc_body_that_has_ended_is_settled_by_its_status() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    for (status, data, billed) in [(503, "", 0), (200, "x", 1)] {
        let toml =
            "[usage]\nbill_cancelled = false\n[plans.free]\n[tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\n";
        let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
        let (engine, _worker) =
            Tollgate::builder(Config::from_toml_str(toml).unwrap()).store_arc(store.clone()).build();
        let svc = TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
            move |_req: http::Request<tollgate::layer::RequestBody<String>>| async move {
                let body = http_body_util::Full::new(Bytes::from_static(data.as_bytes()));
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap(),
                )
            },
        ));
        let request = http::Request::builder()
            .method("POST")
            .uri(SAY)
            .header("content-type", "application/grpc")
            .header("x-api-key", "key-acme")
            .body(String::new())
            .unwrap();
        let mut body = svc.oneshot(request).await.unwrap().into_body();
        // Polled as a server polls it: until it says it has ended, then dropped.
        while !http_body::Body::is_end_stream(&body) {
            body.frame().await.unwrap().unwrap();
        }
        drop(body);
        engine.flush().await.unwrap();
        use tollgate::store::prelude::*;
        let used: u64 = store.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum();
        assert_eq!(used, billed, "status {status}");
    }
}

/// A gRPC answer is known by its `Content-Type` however many headers it has (the layer finds
/// it by comparing names in a small map and by the map's hash in a larger one), and gRPC-Web,
/// whose status travels in its body, is billed by its HTTP status: an `INTERNAL` trailers-only
/// gRPC answer is not billed with 0 to 10 other headers before or after its `Content-Type`, an
/// `OK` one is, and a gRPC-Web answer is billed as the HTTP 200 it is.
#[tokio::test]
async fn a_grpc_answer_is_known_by_its_content_type_with_any_number_of_headers() {
    use tower::{Layer, ServiceExt};
    let toml = "[plans.free]\n[tenants.acme]\nplan = \"free\"\nkeys = [\"key-acme\"]\n";
    let store = std::sync::Arc::new(tollgate::store::MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(Config::from_toml_str(toml).unwrap()).store_arc(store.clone()).build();
    let svc = TollgateLayer::new(engine.clone()).streamed_bodies().layer(tower::service_fn(
        |req: http::Request<tollgate::layer::RequestBody<String>>| async move {
            // The request's body: "<content type>,<grpc-status>,<headers before>,<headers after>".
            let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
            let asked: Vec<String> = std::str::from_utf8(&body).unwrap().split(',').map(str::to_owned).collect();
            let mut response = http::Response::builder();
            let extra = |i: usize| (format!("x-extra-{i}"), format!("v{i}"));
            let before: usize = asked[2].parse().unwrap();
            let after: usize = asked[3].parse().unwrap();
            for i in 0..before {
                let (n, v) = extra(i);
                response = response.header(n, v);
            }
            response = response.header("content-type", asked[0].as_str()).header("grpc-status", asked[1].as_str());
            for i in before..before + after {
                let (n, v) = extra(i);
                response = response.header(n, v);
            }
            Ok::<_, std::convert::Infallible>(response.body(String::new()).unwrap())
        },
    ));
    let mut expected = 0;
    for (content_type, status, billed) in
        [("application/grpc", "13", false), ("application/grpc", "0", true), ("application/grpc-web", "13", true)]
    {
        for (before, after) in [(0, 0), (2, 1), (4, 0), (0, 5), (5, 5), (10, 0)] {
            let request = http::Request::builder()
                .method("POST")
                .uri(SAY)
                .header("content-type", "application/grpc")
                .header("x-api-key", "key-acme")
                .body(format!("{content_type},{status},{before},{after}"))
                .unwrap();
            let response = svc.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            expected += u64::from(billed);
            engine.flush().await.unwrap();
            use tollgate::store::prelude::*;
            let total: u64 =
                store.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum();
            assert_eq!(total, expected, "{content_type} {status}, {before} headers before and {after} after");
        }
    }
}
