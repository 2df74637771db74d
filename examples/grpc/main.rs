//! tollgate in front of a tonic gRPC server: a gRPC client gets gRPC statuses it understands.
//!
//! ```text
//! cargo run --features tonic --example grpc
//! ```
//!
//! It starts a gRPC server (`test.Echo/Say`, raw-bytes messages) behind `TollgateLayer` on a
//! free loopback port, with one tenant (`x-api-key: key-acme`) whose plan allows 3 calls a day,
//! then calls it as a tonic client: three calls pass (with `ratelimit` metadata), the fourth
//! gets `RESOURCE_EXHAUSTED` with `retry-after` in its metadata, a call with an unknown key
//! gets `UNAUTHENTICATED`. Try changing the plan in `CONFIG`, or the key.

mod echo;

use bytes::Bytes;
use echo::{Echo, Raw, SAY};
use http::uri::PathAndQuery;
use tollgate::{Config, Tollgate, TollgateLayer};

const CONFIG: &str = r#"
[plans.free]
quotas.requests = { limit = 3, period = "day", mode = "hard" }
[tenants.acme]
plan = "free"
keys = ["key-acme"]
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (engine, worker) = Tollgate::builder(Config::from_toml_str(CONFIG)?).build();
    tokio::spawn(worker.run());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(TollgateLayer::new(engine.clone()))
            .add_service(Echo)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    println!("gRPC server behind tollgate on {addr}");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    for (n, key) in [(1, "key-acme"), (2, "key-acme"), (3, "key-acme"), (4, "key-acme"), (5, "key-nobody")] {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await?;
        let mut request = tonic::Request::new(Bytes::from_static(b"hello"));
        request.metadata_mut().insert("x-api-key", key.parse()?);
        match client.unary(request, PathAndQuery::from_static(SAY), Raw).await {
            Ok(reply) => println!(
                "call {n} ({key}): OK {:?}, ratelimit: {:?}",
                reply.get_ref(),
                reply.metadata().get("ratelimit")
            ),
            Err(status) => println!(
                "call {n} ({key}): {:?} \"{}\", retry-after: {:?}",
                status.code(),
                status.message(),
                status.metadata().get("retry-after")
            ),
        }
    }
    engine.shutdown().await?;
    Ok(())
}
