//! The cost of `Idempotency-Key` handling, in one criterion run:
//! - `fingerprint`: reading a request body of 1 KiB and of 1 MiB (in 16 KiB frames, as a
//!   server hands them over) without (`read`) and with (`fingerprinted`) its SHA-256, as the
//!   layer takes it while the handler reads a first request's body or while it drains a
//!   replay's: the added cost of fingerprinting is the difference.
//! - `replay`: a replay through the tower layer over a memory store (the rate check, one read
//!   of the stored response, the answer built from it), beside `first_seen_request`: a request
//!   without a key to the same handler. The store read is the replay's only store call (the
//!   test suite counts it: `a_replay_is_answered_with_the_stored_response_without_running_the_handler`).
//!
//! Run with: `cargo bench --bench idempotency`. Compare within one run only.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tollgate::door::BodyPrint;
use tower::{Layer, ServiceExt};

const FRAME: usize = 16 * 1024;

/// A body of `len` bytes in frames of at most [`FRAME`].
struct Frames(Bytes);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.0.len().min(FRAME);
        std::task::Poll::Ready(Some(Ok(Frame::data(self.0.split_to(n)))))
    }
}

fn body(len: usize) -> Frames {
    Frames(Bytes::from(vec![0x5a; len]))
}

/// Reads a body to its end, keeping nothing.
async fn read<B: Body + Unpin>(mut body: B) -> usize {
    let mut n = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            n += bytes::Buf::remaining(d);
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("fingerprint");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for (name, len) in [("1KiB", 1024usize), ("1MiB", 1 << 20)] {
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("read", name), &len, |b, &len| b.iter(|| rt.block_on(read(body(len)))));
        group.bench_with_input(BenchmarkId::new("fingerprinted", name), &len, |b, &len| {
            b.iter(|| rt.block_on(BodyPrint::of_body(body(len), 2 << 20)).expect("within the bound"))
        });
    }
    group.finish();

    let config = tollgate::Config::from_toml_str(
        "[limits]\nheaders = \"none\"\n[plans.p]\nrate = \"1000000000/s\"\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n",
    )
    .unwrap();
    let store = Arc::new(tollgate::store::MemoryStore::new());
    let (engine, worker) = rt.block_on(async { tollgate::Tollgate::builder(config).store_arc(store).build() });
    rt.spawn(worker.run());
    let svc = tollgate::TollgateLayer::new(engine).streamed_bodies().layer(tower::service_fn(
        |_req: http::Request<tollgate::layer::RequestBody<http_body_util::Full<Bytes>>>| async {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(b"created"))))
        },
    ));
    let request = |key: Option<&str>| {
        let mut r = http::Request::post("/orders").header("x-api-key", "key-t");
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.body(http_body_util::Full::new(Bytes::from_static(b"{\"n\":1}"))).unwrap()
    };
    let send = |key: Option<&str>| {
        let svc = svc.clone();
        let r = request(key);
        rt.block_on(async move {
            let response = svc.oneshot(r).await.unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            response.into_body().collect().await.unwrap();
            replayed
        })
    };
    send(None);
    send(Some("order-1"));
    // The first request's settlement lands in the background.
    while !send(Some("order-1")) {
        rt.block_on(tokio::time::sleep(Duration::from_millis(1)));
    }
    let mut group = c.benchmark_group("replay");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    group.bench_function("first_seen_request", |b| b.iter(|| send(None)));
    group.bench_function("replay", |b| b.iter(|| assert!(send(Some("order-1")))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
