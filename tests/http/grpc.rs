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
