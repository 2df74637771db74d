//! The run the `*_traffic` examples share: API requests through the tower layer over many
//! tenants, a fake clock spread over the run, flushes at the flush interval and the directory
//! revalidated as the worker does. Each example measures its own store around it.

use std::time::{Duration, Instant};

use tollgate::{clock::FakeClock, Tollgate};
use tower::ServiceExt;

/// `requests` API requests over `tenants` tenants (keys `key-0` …), spread over `run` seconds
/// of the fake clock, flushed every `flush` seconds.
pub(crate) struct Run {
    pub(crate) tenants: u64,
    pub(crate) requests: u64,
    pub(crate) flush: u64,
    pub(crate) run: u64,
}

impl Run {
    /// Sends the run's requests for `path` through `svc`, one at a time, each with the API key
    /// of a tenant drawn at random (the same sequence in every run), each answered 200, the
    /// fake clock moved between them. Flushes as the worker does (a flush that fails keeps its
    /// usage and is tried again) and revalidates the directory every 15 s of the run. `second`
    /// is told the second of the run after each request. Returns how long each flush took.
    pub(crate) async fn drive<S, B>(
        &self,
        engine: &Tollgate,
        svc: S,
        fake: &FakeClock,
        path: &str,
        mut second: impl FnMut(u64),
    ) -> Vec<Duration>
    where
        S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>> + Clone,
        S::Error: std::fmt::Debug,
    {
        let Self { tenants, requests, flush, run } = *self;
        let keys: Vec<String> = (0..tenants).map(|i| format!("key-{i}")).collect();
        let step = Duration::from_nanos(run * 1_000_000_000 / requests);
        let (mut flushed_at, mut revalidated_at) = (0u64, 0u64);
        let mut flushes = Vec::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..requests {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = &keys[(rng % tenants) as usize];
            let req = http::Request::get(path).header("x-api-key", key).body(axum::body::Body::empty()).unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200, "request {i}");
            fake.advance(step);
            let elapsed = (i + 1) * run / requests;
            second(elapsed);
            if elapsed >= flushed_at + flush {
                flushed_at = elapsed;
                let started = Instant::now();
                let mut tries = 0;
                while let Err(e) = engine.flush().await {
                    tries += 1;
                    assert!(tries < 20, "the flush keeps failing: {e}");
                }
                flushes.push(started.elapsed());
            }
            if elapsed >= revalidated_at + 15 {
                revalidated_at = elapsed;
                engine.revalidate().await;
            }
        }
        flushes
    }
}
