//! `Idempotency-Key` through a real HTTP/1.1 server (axum over hyper on a socket): a server
//! stops polling a body once it wrote the length it announced, and never polls an empty one,
//! so the first response must be stored by its last frame, not by an end the server never
//! asks for. A raw client over TCP sends each request on its own connection.

use std::{convert::Infallible, sync::Arc};

use axum::{
    body::Bytes,
    routing::{get, post},
    Router,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::{Config, Tollgate, TollgateLayer};

const TOML: &str = r#"
[plans.p]
rate = "1000/s"
burst = 1000
[tenants.t]
plan = "p"
keys = ["key-t"]
"#;

/// Calls of the handlers, by route: a replay must not add one.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn called() -> u64 {
    CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

async fn serve() -> (std::net::SocketAddr, Tollgate, Arc<tollgate::store::MemoryStore>) {
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (engine, worker) = Tollgate::builder(Config::from_toml_str(TOML).unwrap()).store_arc(store.clone()).build();
    tokio::spawn(worker.run());
    let app = Router::new()
        // A known length: the server writes `Content-Length` and stops at it.
        .route("/orders", post(|| async { format!("order #{}", called()) }))
        // No body at all.
        .route(
            "/empty",
            post(|| async {
                called();
                http::StatusCode::NO_CONTENT
            }),
        )
        // Streamed in two frames, without a length.
        .route(
            "/stream",
            post(|| async {
                let n = called();
                let chunks = [Ok::<_, Infallible>(Bytes::from(format!("part 1 of #{n}, "))), Ok(Bytes::from("part 2"))];
                axum::body::Body::from_stream(tokio_stream::iter(chunks))
            }),
        )
        // A proxied upstream: `Content-Length` announced by the handler, the body streamed
        // with no length of its own. The server stops polling once that many bytes are out.
        .route(
            "/proxied",
            post(|| async {
                let n = called();
                let (a, b) = (format!("upstream #{n:04}, "), "part 2".to_owned());
                let len = a.len() + b.len();
                let chunks = [Ok::<_, Infallible>(Bytes::from(a)), Ok(Bytes::from(b))];
                http::Response::builder()
                    .header(http::header::CONTENT_LENGTH, len)
                    .body(axum::body::Body::from_stream(tokio_stream::iter(chunks)))
                    .unwrap()
            }),
        )
        // Reads its body.
        .route("/echo", post(|body: Bytes| async move { format!("#{}: {}", called(), String::from_utf8_lossy(&body)) }))
        .route("/", get(|| async { "ok" }))
        .layer(TollgateLayer::new(engine.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, engine, store)
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.head.to_ascii_lowercase().contains("\r\nidempotent-replayed: true")
    }
}

/// One request on its own connection (`Connection: close`), read to its end.
async fn send(addr: std::net::SocketAddr, path: &str, key: &str, body: &str) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nx-api-key: key-t\r\nidempotency-key: {key}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    // A chunked body: its chunks joined.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size, 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    Answer { status, head: head.to_owned(), body }
}

/// Each kind of response a server sends (a length, none, a stream; a body the handler read or
/// not) is stored with its key: the retry is answered with it, the handler not called again,
/// nothing billed twice.
#[tokio::test]
async fn a_real_server_stores_every_kind_of_response_for_its_replays() {
    let (addr, engine, store) = serve().await;
    let mut expected_calls = 0;
    for (path, status) in [("/orders", 200), ("/empty", 204), ("/stream", 200), ("/proxied", 200), ("/echo", 200)] {
        let key = format!("key{path}");
        let first = send(addr, path, &key, "a body").await;
        assert_eq!(first.status, status, "{path}: {}", first.head);
        assert!(!first.replayed());
        expected_calls += 1;
        // The settlement lands in the background: a retry on this node waits for it.
        let mut replay = send(addr, path, &key, "a body").await;
        for _ in 0..50 {
            if replay.status != 409 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            replay = send(addr, path, &key, "a body").await;
        }
        assert_eq!(replay.status, status, "{path}: {}", replay.head);
        assert!(replay.replayed(), "{path}: stored and replayed: {}", replay.head);
        assert_eq!(replay.body, first.body, "{path}");
        let other = send(addr, path, &key, "another body").await;
        assert_eq!(other.status, 422, "{path}: {}", other.head);
    }
    assert!(CALLS.load(std::sync::atomic::Ordering::SeqCst) >= expected_calls);
    engine.flush().await.unwrap();
    use tollgate::store::prelude::*;
    let billed: u64 = store.usage_range(&"t".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum();
    assert_eq!(billed, 5, "each first request once, no replay");
    assert_eq!(engine.stats().responses_stored, 5);
}
