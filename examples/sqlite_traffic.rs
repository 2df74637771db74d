//! What tollgate asks of its SQLite file per million API requests: the measurement of
//! docs/performance.md (the store traffic of the issue 24 table), the embedded store's
//! counterpart of `postgres_traffic` and `dynamodb_traffic`. Drives the same API requests
//! through the tower layer (tenants spread over a fake clock, flushes at the flush interval,
//! the directory revalidated as the worker would), against a SQLite file, and reads the
//! process's write system calls and bytes from `/proc/self/io` over the run (the file and its
//! write-ahead log, and whatever else the process writes meanwhile, such as the runtime's
//! wake-ups: an upper bound), and the file's size at the end.
//!
//! `cargo run --release --example sqlite_traffic -- <tenants> <requests> <flush interval, s>
//!  <run time, s>` (defaults 1000 1000000 10 600). Under `strace -f -c -e trace=fdatasync,fsync`
//! the same run also counts the syncs.

use std::time::Instant;

#[path = "support/traffic.rs"]
mod traffic;

use tollgate::store::prelude::*;
use tollgate::store::{KeyHash, SqliteStore, TenantRecord};
use tollgate::{clock::Clock, Config, Tollgate, TollgateLayer};
use tower::Layer;
use traffic::Run;

/// (write calls, bytes written) of this process so far.
fn written() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io (Linux)");
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/io"))
    };
    (field("syscw:"), field("wchar:"))
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let (tenants, requests, flush, run) = match args[..] {
        [t, r, f, s] => (t, r, f, s),
        [] => (1000, 1_000_000, 10, 600),
        _ => panic!("usage: sqlite_traffic [<tenants> <requests> <flush interval, s> <run time, s>]"),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.db");
    let store = SqliteStore::open(&path).await.unwrap();
    for i in 0..tenants {
        let record = TenantRecord::new(format!("t{i}").into(), "metered".into());
        store.put_tenant(&record, &[KeyHash::of(format!("key-{i}").as_bytes())]).await.unwrap();
    }
    let config = Config::from_toml_str(&format!(
        "[usage]\nflush_interval = \"{flush}s\"\nwindow = \"1h\"\n[limits]\nheaders = \"none\"\n\
         [plans.metered]\nrate = \"1000000/s\"\n\
         quotas.requests = {{ limit = 100000000, period = \"month\", mode = \"hard\" }}\n"
    ))
    .unwrap();
    let start = 1_773_489_600; // 2026-03-14T12:00:00Z
    let (clock, fake) = Clock::fake_at_unix(start);
    let (engine, _worker) = Tollgate::builder(config).store(store).clock(clock).build();
    let layer = TollgateLayer::new(engine.clone());
    let svc = layer.layer(tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    }));

    let (calls_before, bytes_before) = written();
    let began = Instant::now();
    let mut flushes = Run { tenants, requests, flush, run }.drive(&engine, svc, &fake, "/", |_| {}).await;
    engine.shutdown().await.unwrap();
    let wall = began.elapsed();
    let (calls_after, bytes_after) = written();
    let (calls, bytes) = (calls_after - calls_before, bytes_after - bytes_before);
    flushes.sort();
    let p50 = flushes.get(flushes.len() / 2).copied().unwrap_or_default();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "{requests} API requests over {tenants} tenants, {run} s, flush every {flush} s: {calls} write system calls, \
         {:.1} MiB written ({:.1} write calls per thousand API requests); {} flushes, p50 {} µs; \
         the file {:.1} MiB; {:.1} s of wall time",
        bytes as f64 / 1_048_576.0,
        calls as f64 * 1e3 / requests as f64,
        flushes.len(),
        p50.as_micros(),
        size as f64 / 1_048_576.0,
        wall.as_secs_f64(),
    );
}
