//! A real tonic client and server through tollgate's tower layer: a gRPC client gets a gRPC
//! status it understands for each rejection (trailers-only, HTTP 200), with the retry delay
//! in the metadata, instead of a problem+json body.
#![allow(missing_docs)]

use std::{convert::Infallible, future::Future, pin::Pin};

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tollgate::{Config, Tollgate, TollgateLayer};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

/// Messages as raw bytes: no protobuf needed for the test.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `test.Echo/Say`: answers with what it was sent.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Say;

impl tonic::server::UnaryService<Bytes> for Say {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move { Ok(tonic::server::Grpc::new(Raw).unary(Say, request).await) })
    }
}

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
    client.unary(request, PathAndQuery::from_static("/test.Echo/Say"), Raw).await
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
