//! The stores side by side, in one criterion run: SQLite (on a real file, `synchronous` FULL,
//! the default, and NORMAL) against memory, for
//! - `commit_usage`: usage records committed per second, in flushes of 1,000 records (the
//!   worker's batches: one transaction, one flush id, records of distinct tenants);
//! - `reserve`: the latency of one lease refill of a hard quota (one call, one transaction).
//!
//! Neither is on the request path: a request waits on `reserve` only on a tenant's first
//! request or an empty lease, and never on `commit_usage`. Run with
//! `cargo bench --bench store` (about a minute); report ratios against `memory` of the same run.

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::store::prelude::*;
use tollgate::{
    config::{Period, Synchronous},
    store::{FlushId, MemoryStore, QuotaKey, Reservation, ReserveToken, SqliteStore, UsageBatch, UsageRecord},
};

const RECORDS: usize = 1000;

fn stores(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    let open = |name: &str, sync| {
        Arc::new(rt.block_on(SqliteStore::open_with(dir.join(name), sync)).unwrap()) as Arc<dyn Store>
    };
    vec![
        ("memory", Arc::new(MemoryStore::new()) as Arc<dyn Store>),
        ("sqlite_full", open("full.db", Synchronous::Full)),
        ("sqlite_normal", open("normal.db", Synchronous::Normal)),
    ]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stores = stores(&rt, dir.path());

    let mut group = c.benchmark_group("commit_usage");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for (name, store) in &stores {
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new(*name, RECORDS), |b| {
            b.iter(|| {
                n += 1;
                // A new window per flush, as a long run moves through windows.
                let window = 1_773_446_400 + n as i64 * 60;
                let records = (0..RECORDS)
                    .map(|i| UsageRecord::new(format!("t{i}").into(), "requests".into(), window, 3))
                    .collect();
                let batch = UsageBatch::new(FlushId::new(format!("bench-{n}")), records);
                rt.block_on(store.commit_usage(&batch)).unwrap()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("reserve");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for (name, store) in &stores {
        let mut seq = 0u64;
        group.bench_function(BenchmarkId::new(*name, "lease_of_100"), |b| {
            b.iter(|| {
                seq += 1;
                // 100 tenants in turn, as refills of many tenants come in.
                let key = QuotaKey::new(
                    format!("t{}", seq % 100).into(),
                    "requests".into(),
                    Period::Month { anchor_day: 1 },
                    1_772_323_200,
                    1_775_001_600,
                );
                let r = Reservation::new(key, 100, 0, Some(u64::MAX / 2), ReserveToken::new(1, seq));
                rt.block_on(store.reserve(&r)).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
