//! The engine's heap per tenant, measured with a counting global allocator (not RSS): the heap
//! after warming N tenants (one API key and one quota each: each one request, so each holds a
//! lease) minus the heap before, divided by N, by part:
//!
//! - **states**: the tenants' states, the only allocations aligned to a cache line (64 bytes);
//! - **tables**: allocations of 64 KiB or more, the hash tables of the tenant table and of its
//!   credential index (they grow by doubling: the figure depends on where N falls);
//! - **small**: every other allocation, per tenant the small parts around the state and the
//!   table entries (tenant ids, quota cells, the API keys kept for revalidation).
//!
//! What the engine makes once, whatever N, is made before the first measure and not counted:
//! among it the 1 MiB table of API keys found valid lately.
//!
//! The store is a SQLite file, whose memory does not grow with N (its page cache is bounded),
//! so the difference is the engine's; it runs with `synchronous = NORMAL`, so that setting up
//! a million tenants (one transaction each) does not take a million fsyncs. No worker runs:
//! nothing is flushed or evicted meanwhile.
//!
//! Then the same tenants idle: the engine's clock (a fake one) moves past `limits.idle_timeout`,
//! the idle sweep lets every tenant go, giving its lease back to the store, and a flush takes
//! their usage (a state let go is kept until then). What is left of the heap over N is an idle
//! tenant's cost: the tables keep their capacity (they do not shrink), the states are freed.
//!
//! `cargo run --release --example memory_per_tenant -- [tenants] [billed]` (100,000 by default;
//! the issue's figure is at 1,000,000, several minutes). With `billed`, each tenant has a
//! billing customer and the configuration a second meter (`tokens`), as a billed deployment
//! has: what a tenant's state holds beyond its line of the request path and its cold line.
// A global allocator is an `unsafe impl`: it only counts and passes every call on to `System`.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicI64, Ordering},
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tollgate::store::prelude::*;
use tollgate::{
    clock::Clock,
    config::Synchronous,
    store::{KeyHash, SqliteStore, TenantRecord},
    Config, Tollgate,
};
use tower::{Layer, ServiceExt};

/// Live bytes by part.
struct Counting;

static ALL: AtomicI64 = AtomicI64::new(0);
static ALIGNED: AtomicI64 = AtomicI64::new(0);
static LARGE: AtomicI64 = AtomicI64::new(0);

/// An allocation this large or larger is counted as a table's.
const TABLE_BYTES: usize = 64 * 1024;

fn count(layout: Layout, sign: i64) {
    let bytes = sign * layout.size() as i64;
    ALL.fetch_add(bytes, Ordering::Relaxed);
    if layout.align() == 64 {
        ALIGNED.fetch_add(bytes, Ordering::Relaxed);
    } else if layout.size() >= TABLE_BYTES {
        LARGE.fetch_add(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout, 1);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout, -1);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout, -1);
        count(Layout::from_size_align(new_size, layout.align()).unwrap_or(layout), 1);
        // SAFETY: as `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn snapshot() -> (i64, i64, i64) {
    (ALL.load(Ordering::Relaxed), ALIGNED.load(Ordering::Relaxed), LARGE.load(Ordering::Relaxed))
}

fn key(i: usize) -> String {
    format!("key-{i:08}")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let tenants: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let billed = std::env::args().nth(2).as_deref() == Some("billed");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store =
        SqliteStore::open_with(dir.path().join("memory.db"), Synchronous::Normal).await.expect("a SQLite store");
    for chunk in (0..tenants).collect::<Vec<_>>().chunks(10_000) {
        for &i in chunk {
            let mut record = TenantRecord::new(format!("t{i}").into(), "p".into());
            if billed {
                record.customer = Some(format!("cus_{i:014}"));
            }
            store.put_tenant(&record, &[KeyHash::of(key(i).as_bytes())]).await.expect("a tenant");
        }
    }
    let config = Config::from_toml_str(&format!(
        r#"
        [limits]
        max_tenants = {max}
        headers = "none"
        [usage]
        window = "1h"
        flush_interval = "30m"
        [plans.p]
        rate = "1000/s"
        quotas.requests = {{ limit = 1000000000, period = "month", lease = 1000 }}
        {meters}
        "#,
        max = tenants * 2,
        meters = if billed { "[meters.tokens]" } else { "" },
    ))
    .expect("a configuration");
    let (clock, time) = Clock::fake();
    let (engine, _worker) = Tollgate::builder(config).store(store).clock(clock).build();
    let service = tower::service_fn(|_req: Request<tollgate::layer::RequestBody<Full<Bytes>>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    });
    let layer = tollgate::TollgateLayer::new(engine.clone()).streamed_bodies();
    let svc = layer.layer(service);
    // One request first (the lazily made parts of the engine), then the heap is read.
    let request = |i: usize| Request::get("/").header("x-api-key", key(i)).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(svc.clone().oneshot(request(0)).await.unwrap().status(), 200);
    let before = snapshot();
    for i in 1..tenants {
        let response = svc.clone().oneshot(request(i)).await.unwrap();
        assert_eq!(response.status(), 200, "tenant {i}");
    }
    let after = snapshot();
    let n = (tenants - 1) as f64;
    let (all, states, tables) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    let small = all - states - tables;
    println!("{} tenants warmed: {:.1} bytes per tenant", tenants - 1, all as f64 / n);
    println!("  states (cache-line aligned): {:.1}", states as f64 / n);
    println!("  tables (allocations of 64 KiB or more): {:.1}", tables as f64 / n);
    println!("  small allocations (ids, quota cells, API keys kept): {:.1}", small as f64 / n);
    // Idle: past `limits.idle_timeout` (15 minutes), the sweep lets every tenant go.
    time.advance(std::time::Duration::from_secs(16 * 60));
    let evicted = engine.sweep().await;
    // A state let go is kept until a flush has taken the usage recorded in it.
    engine.flush().await.expect("the usage flushed");
    let idle = snapshot();
    let (all, states, tables) = (idle.0 - before.0, idle.1 - before.1, idle.2 - before.2);
    let small = all - states - tables;
    println!("{evicted} tenants idle, let go by the sweep: {:.1} bytes per tenant", all as f64 / n);
    println!("  states (cache-line aligned): {:.1}", states as f64 / n);
    println!("  tables (allocations of 64 KiB or more): {:.1}", tables as f64 / n);
    println!("  small allocations: {:.1}", small as f64 / n);
    drop(svc);
    // Returning a million leases to the file can outlast `usage.shutdown_timeout`: said, and
    // not a failure of the measurement, which is done.
    if let Err(e) = engine.shutdown().await {
        eprintln!("shutdown: {e}");
    }
}
